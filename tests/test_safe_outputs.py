"""Outputs never destroy what is not ours: a dataset is written beside its target and renamed in, an OUT that
holds someone's files is refused (``--force`` overrides), and a write killed at any point leaves the previous
dataset or the new one, complete."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from mmplatform.data import dataset
from mmplatform.data.dataset import (
    OutputNotOursError,
    make_record,
    read_dataset,
    read_manifest,
    read_quarantine,
    write_dataset,
)

pytestmark = pytest.mark.reliability


def _records(n: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 7 % 256, 40, 90)).save(buf, format="PNG")
        out.append(make_record(buf.getvalue(), 8, 8, [f"{tag} caption {i}"], split="train"))
    return out


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "src").mkdir()
    (path / "src" / "main.py").write_text("print('mine')")
    return path


def test_write_dataset_refuses_a_directory_that_is_not_a_dataset(tmp_path):
    project = _user_dir(tmp_path / "project")
    with pytest.raises(OutputNotOursError, match="not a dataset written by mmp"):
        write_dataset(project, _records(3, "a"), stage="test")
    assert (project / "thesis.tex").read_text() == "years of work"
    assert (project / "src" / "main.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary left behind


def test_write_dataset_replaces_its_own_dataset_and_an_empty_directory(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, _records(3, "a"), stage="test")
    write_dataset(out, _records(5, "b"), stage="test", quarantine=[dict(_records(1, "q")[0], reason="bad: x")])
    assert read_manifest(out)["record_count"] == 5 and len(read_quarantine(out)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, _records(2, "c"), stage="test")
    assert len(read_dataset(empty)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "empty"]


def test_force_replaces_a_foreign_directory(tmp_path):
    project = _user_dir(tmp_path / "project")
    write_dataset(project, _records(2, "a"), stage="test", force=True)
    assert not (project / "thesis.tex").exists() and len(read_dataset(project)) == 2


def test_cli_clean_into_a_project_directory_is_refused_with_one_line(tmp_path, capsys):
    src = tmp_path / "in"
    write_dataset(src, _records(4, "a"), stage="ingest")
    project = _user_dir(tmp_path / "project")
    rc = main(["data", "clean", str(src), str(project), "-S", "engine=local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(project) in err[0] and "--force" in err[0]
    assert (project / "thesis.tex").read_text() == "years of work"


def test_cli_ingest_into_a_project_directory_is_refused(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red square"]}) + "\n")
    project = _user_dir(tmp_path / "project")
    rc = main(["data", "ingest", "--format", "jsonl", "--path", str(manifest), "--images", str(tmp_path),
               "--out", str(project)])
    assert rc == 2 and "not a dataset written by mmp" in capsys.readouterr().err
    assert (project / "thesis.tex").exists()
    rc = main(["data", "ingest", "--format", "jsonl", "--path", str(manifest), "--images", str(tmp_path),
               "--out", str(project), "--force"])
    assert rc == 0 and read_manifest(project)["record_count"] == 1


def test_cli_labelstudio_import_into_a_project_directory_is_refused(tmp_path, capsys):
    src = tmp_path / "ds"
    write_dataset(src, _records(2, "a"), stage="annotate")
    export = tmp_path / "export.json"
    export.write_text("[]")
    project = _user_dir(tmp_path / "project")
    rc = main(["annotate", "import-labelstudio", str(export), str(src), "--out", str(project)])
    assert rc == 2 and "not a dataset written by mmp" in capsys.readouterr().err
    assert (project / "thesis.tex").exists() and read_manifest(src)["record_count"] == 2


def _killed_at(k: int, fn) -> int:
    """Run ``fn`` in a forked child that dies (``os._exit``, no clean-up, as SIGKILL) when it has written and
    fsynced its k-th file; returns the child's exit status (9: killed, 0: ``fn`` finished first)."""
    pid = os.fork()
    if pid == 0:  # child
        calls = {"n": 0}
        real = dataset._fsync

        def dying(path):
            calls["n"] += 1
            if calls["n"] == k:
                os._exit(9)
            real(path)

        try:
            dataset._fsync = dying
            fn()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_write_killed_at_any_point_leaves_a_complete_dataset(tmp_path):
    out = tmp_path / "ds"
    old, new = _records(12, "old"), _records(30, "new")
    quarantine = [dict(new[0], reason="bad: kill test")] * 16
    outcomes = set()
    for k in range(1, 16):
        write_dataset(out, old, stage="old", shard_size=5)
        status = _killed_at(k, lambda: write_dataset(out, new, stage="new", shard_size=10, quarantine=quarantine))
        assert status in (0, 9)
        m = read_manifest(out)
        rows = read_dataset(out)
        assert len(rows) == m["record_count"]
        if m["stage"] == "old":
            assert [r["captions"] for r in rows] == [r["captions"] for r in old]
            outcomes.add("old")
        else:
            assert [r["captions"] for r in rows] == [r["captions"] for r in new]
            assert len(read_quarantine(out)) == m["quarantined"] == 16
            outcomes.add("new")
    assert outcomes == {"old", "new"}  # the kills reached both sides of the swap
    write_dataset(out, old, stage="old")  # the next write removes what killed writers left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
