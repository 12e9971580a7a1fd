"""The data commands end to end, in-process: real photos in COCO format through ingest and clean, the
Label Studio round trip through `mmp annotate`, and the annotate stage picking up exports."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from flows.cli import main
from mmplatform.data import stages
from mmplatform.data.dataset import make_record, read_dataset, read_manifest, read_quarantine, write_dataset


@pytest.fixture(scope="module")
def photo_tiles() -> list[Image.Image]:
    """Twelve distinct real photographs: 3x2 non-overlapping tiles of each of scikit-learn's two photos."""
    tiles = []
    for a in load_sample_images().images:  # 427 x 640
        im = Image.fromarray(a)
        for r in range(2):
            for c in range(3):
                tiles.append(im.crop((c * 213, r * 213, c * 213 + 213, r * 213 + 213)))
    return tiles


@pytest.fixture(autouse=True)
def _own_mlflow_store(tmp_path, monkeypatch):
    # The clean stage aligns with the registered champion when the MLflow store has one: point it at an
    # empty store so a champion left in the checkout's mlflow.db by an earlier `make run` does not leak in.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_coco_real_photos_through_ingest_and_clean_keep_every_valid_record(tmp_path, photo_tiles):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, tile in enumerate(photo_tiles):
        tile.save(root / "images" / f"{i:012d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"images/{i:012d}.jpg", "width": 213, "height": 213})
        for k in range(5):
            annotations.append({"id": 100 * i + k, "image_id": i + 1, "caption": f"photo {i} caption {k}"})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))

    out, clean = tmp_path / "ingested", tmp_path / "clean"
    assert main(["data", "ingest", "--format", "coco", "--path", str(root / "captions.json"), "--out", str(out)]) == 0
    assert len(read_dataset(out)) == 12 and read_quarantine(out) == []
    assert main(["data", "clean", str(out), str(clean), "-S", "engine=local"]) == 0
    kept = read_dataset(clean)
    assert len(kept) == 12 and read_quarantine(clean) == []
    assert all(len(r["captions"]) == 5 and (r["width"], r["height"]) == (213, 213) for r in kept)
    assert all(json.loads(r["meta"])["quality"]["issues"] == [] for r in kept)
    assert (clean / "report.html").is_file()
    assert read_manifest(clean)["stats"]["kept"] == 12


def _png(i: int) -> bytes:
    im = Image.new("RGB", (32, 32), ((40 * i) % 256, 90, 200))
    im.putpixel((i % 32, i // 32), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _annotated_export(tasks: list[dict]) -> list[dict]:
    """What Label Studio exports after two annotators captioned every task and answered its question."""
    out = []
    for t, task in enumerate(tasks):
        anns = []
        for who in (1, 2):
            result = [{"from_name": "caption", "to_name": "image", "type": "textarea",
                       "value": {"text": [f"annotator {who} caption for task {t}"]}}]
            if task["data"].get("questions"):
                result.append({"from_name": "answers", "to_name": "image", "type": "textarea",
                               "value": {"text": ["blue" if who == 1 or t % 2 else "red"]}})
            anns.append({"id": 10 * t + who, "completed_by": who, "result": result, "was_cancelled": False})
        out.append({**task, "id": t + 1, "annotations": anns})
    return out


def test_labelstudio_round_trip_through_the_cli_loses_no_caption(tmp_path):
    records = [make_record(_png(i), 32, 32, [f"original caption {i}"], ["what colour is it?"], ["blue"],
                           source="t", split="train") for i in range(6)]
    write_dataset(tmp_path / "ds", records, stage="clean")
    tasks_file = tmp_path / "tasks.json"
    assert main(["annotate", "export-labelstudio", str(tmp_path / "ds"), str(tasks_file), "--no-predictions"]) == 0
    tasks = json.loads(tasks_file.read_text())
    assert len(tasks) == 6 and all(t["data"]["image"].startswith("data:image/png;base64,") for t in tasks)
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_annotated_export(tasks)))

    assert main(["annotate", "import-labelstudio", str(export), str(tmp_path / "ds"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = {r["sample_id"]: r for r in read_dataset(tmp_path / "merged")}
    assert len(merged) == 6
    for t, rec in enumerate(records):
        caps = merged[rec["sample_id"]]["captions"]
        assert caps == [f"original caption {t}", f"annotator 1 caption for task {t}",
                        f"annotator 2 caption for task {t}"]
    # Odd tasks: both said blue; even tasks: blue vs red is a tie, flagged for review, answer left alone.
    review = [json.loads(x) for x in (tmp_path / "merged" / "review.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in review) == sorted(records[t]["sample_id"] for t in (0, 2, 4))
    assert all(r["answers"] == ["blue"] for r in merged.values())

    # The annotate stage merges whatever exports sit in data/annotations/.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "batch-1.json").write_text(export.read_text())
    st = stages.annotate(tmp_path / "ds", tmp_path / "annotated", tmp_path / "annotations")
    assert st["labelstudio"]["captions_added"] == 12 and st["labelstudio"]["flagged"] == 3
    assert sum(len(r["captions"]) for r in read_dataset(tmp_path / "annotated")) == 18


def test_data_clean_bad_override_is_one_line(tmp_path, capsys):
    write_dataset(tmp_path / "ds", [], stage="ingest")
    assert main(["data", "clean", str(tmp_path / "ds"), str(tmp_path / "out"), "-S", "no_such=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clean.no_such: unknown key" in err[0]
