"""The mmp data commands through the CLI entry point, in-process."""

from __future__ import annotations

import json
import os

from PIL import Image

from flows.cli import _prefect_env, main
from mmplatform.data.dataset import read_dataset, read_quarantine


def _manifest(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(root / f"{i}.png")
    (root / "fake.jpg").write_text("not an image")
    lines = [
        {"image": "0.png", "captions": ["a red square", "a square that is red"]},
        {"file_name": "1.png", "caption": "a blue square"},
        {"image": "2.png", "captions": ["a green square"], "questions": ["what color?"], "answers": ["green"]},
        {"image": "../outside.png", "captions": ["escape"]},
        {"image": "missing.png", "captions": ["gone"]},
        {"image": "fake.jpg", "captions": ["text pretending"]},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (root / "manifest.jsonl").write_text(text)
    return root


def test_data_ingest_then_clean_keeps_good_and_quarantines_bad(tmp_path, capsys):
    root = _manifest(tmp_path)
    out = tmp_path / "ds"
    assert main(["data", "ingest", "--format", "jsonl", "--path", str(root / "manifest.jsonl"),
                 "--images", str(root), "--out", str(out)]) == 0
    kept, quarantined = read_dataset(out), read_quarantine(out)
    assert len(kept) == 3 and len(quarantined) == 4
    reasons = sorted(r["reason"].split(":")[0] for r in quarantined)
    assert reasons == ["bad_json", "missing_file", "path_outside_root", "unsupported_format"]
    assert all(r["stage"] == "ingest" for r in quarantined)

    cleaned = tmp_path / "clean"
    assert main(["data", "clean", str(out), str(cleaned)]) == 0
    assert len(read_dataset(cleaned)) + len(read_quarantine(cleaned)) == 3
    assert {r["split"] for r in read_dataset(cleaned)} <= {"train", "val", "test"}

    assert main(["data", "report", str(cleaned), "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Data report" in page and "Quarantine" in page


def test_missing_manifest_is_one_line_error(tmp_path, capsys):
    rc = main(["data", "ingest", "--format", "jsonl", "--path", str(tmp_path / "nope.jsonl"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "nope.jsonl" in err
    rc = main(["data", "ingest", "--format", "parquet", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--format parquet" in capsys.readouterr().err


def test_prefect_local_api_gets_time_to_start_on_a_cold_machine(tmp_path, monkeypatch):
    """On a fresh 2-core AVX2 machine the temporary Prefect API took longer than Prefect's 20 s default to migrate
    its database on first start, and mmp run failed before any stage; the CLI gives it 180 s unless the user set
    a value."""
    for key in ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, "")  # recorded, so whatever _prefect_env sets is undone after the test
        monkeypatch.delenv(key)
    _prefect_env(tmp_path)
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 120
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "30")
    _prefect_env(tmp_path)
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "30"
