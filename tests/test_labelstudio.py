"""Label Studio round trip: export tasks, simulate annotators, import/merge, ingest exports as a source."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmplatform.data.dataset import make_record
from mmplatform.data.labelstudio import (
    LABEL_CONFIG,
    caption_set_similarity,
    export_tasks,
    fleiss_kappa,
    import_export,
    ingest_labelstudio,
    krippendorff_alpha_nominal,
    merge_annotations,
    normalize_answer,
    token_f1,
    write_review,
)


def png(color, shape="square", size=(24, 20)) -> bytes:
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    if shape == "square":
        d.rectangle([4, 4, 16, 16], fill=color)
    elif shape == "circle":
        d.ellipse([4, 4, 16, 16], fill=color)
    else:
        d.rectangle([0, 8, 23, 12], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def dataset() -> list[dict]:
    return [
        make_record(png((255, 0, 0)), 24, 20, ["a red square", "a square painted red"],
                    ["what color is the square?", "how many squares are there?"], ["red", "1"], source="t"),
        make_record(png((0, 0, 255), "circle"), 24, 20, ["a blue circle"], ["what shape is it?"], ["circle"],
                    source="t"),
        make_record(png((0, 160, 0), "stripe"), 24, 20, ["a green stripe"], source="t", meta={"k": 1}),
    ]


def textarea(name: str, rows: list[str], origin: str = "manual") -> dict:
    return {"id": f"r-{name}", "from_name": name, "to_name": "image", "type": "textarea",
            "value": {"text": rows}, "origin": origin}


def ann(aid: int, who, captions=(), answers=None, **extra) -> dict:
    result = []
    if captions:
        result.append(textarea("caption", list(captions), extra.pop("origin", "manual")))
    if answers is not None:
        result.append(textarea("answers", [answers]))
    return {"id": aid, "completed_by": who, "result": result, "was_cancelled": False, "ground_truth": False,
            "lead_time": 3.2, "task": None, **extra}


def simulate_label_studio(tasks: list[dict]) -> list[dict]:
    """What Label Studio's JSON export looks like after annotators worked on the imported tasks."""
    out = copy.deepcopy(tasks)
    for i, t in enumerate(out):
        t["id"] = 100 + i
        for p in t.get("predictions", []):
            p["id"] = 900 + i
    pred0 = out[0]["predictions"][0]["result"][0]["value"]["text"][0]
    out[0]["annotations"] = [
        ann(11, 1, ["A red square on white"], "red\none"),
        ann(12, 2, ["a red square on white", "square of red colour"], "1. Red\n2. 1"),
        # annotator 3 accepted the model's caption unchanged
        ann(13, 3, [pred0], "red\n2", origin="prediction", parent_prediction=900),
        ann(14, 4, ["should not appear"], "blue\n7", was_cancelled=True),
    ]
    out[1]["annotations"] = [ann(21, 1, ["a blue disc"], "circle"),
                             ann(22, {"id": 2, "email": "b@example.org"}, ["blue round shape"], "ring")]
    out[2]["annotations"] = [ann(31, 1, ["green band\nthin green line"])]
    # a task from another project: its sample is not in our dataset
    out.append({"id": 200, "data": {"image": "https://example.org/x.jpg", "sample_id": "deadbeef"},
                "annotations": [ann(41, 1, ["lost caption"])]})
    # no sample_id: joined by the sha256 of its data-URI image
    nosid = {"id": 201, "data": {k: v for k, v in tasks[2]["data"].items() if k != "sample_id"},
             "annotations": [ann(42, 5, ["a green stripe on white"])]}
    out.append(nosid)
    return out


def stub_captioner(images: list[bytes]) -> list[str]:
    return ["a red square" if i == 0 else f"an image of {len(b)} bytes" for i, b in enumerate(images)]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -------------------------------------------------------------------------------------- round trip

def test_round_trip_loses_no_caption(tmp_path):
    records = dataset()
    n = export_tasks(records, tmp_path / "tasks.json", predict_captions=stub_captioner, model_version="stub-v1")
    assert n == 3
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert tasks[0]["data"]["image"].startswith("data:image/png;base64,")
    assert base64.b64decode(tasks[0]["data"]["image"].split(",", 1)[1]) == records[0]["image"]
    assert tasks[0]["data"]["sample_id"] == records[0]["sample_id"]
    export = write_json(tmp_path / "export.json", simulate_label_studio(tasks))

    merged, stats, review = merge_annotations(records, [export], min_agreement=0.5)

    assert [r["sample_id"] for r in merged] == [r["sample_id"] for r in records]
    annotator_captions = ["A red square on white", "a red square on white", "square of red colour",
                          "a red square", "a blue disc", "blue round shape", "green band", "thin green line",
                          "a green stripe on white"]
    all_caps = [c.casefold() for r in merged for c in r["captions"]]
    for c in [c for r in records for c in r["captions"]] + annotator_captions:
        assert c.casefold() in all_caps, c
    assert "should not appear" not in all_caps and "lost caption" not in all_caps
    # order: existing first, then by annotation id; case-insensitive duplicates once
    assert merged[0]["captions"] == ["a red square", "a square painted red", "A red square on white",
                                     "square of red colour"]
    assert merged[2]["captions"] == ["a green stripe", "green band", "thin green line", "a green stripe on white"]
    # consensus: Q1 red x3; Q2 one/1/2 -> "1" (2 of 3); the normal form is stored
    assert merged[0]["answers"] == ["red", "1"]
    meta0 = json.loads(merged[0]["meta"])["annotations"]
    assert meta0["annotators"] == ["1", "2", "3"] and meta0["annotations"] == 3 and meta0["cancelled"] == 1
    assert meta0["accepted_predictions"] == 1
    assert meta0["answers"]["how many squares are there?"]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert json.loads(merged[2]["meta"])["k"] == 1  # existing meta kept
    # the tie circle/ring is flagged and the answer left as it was
    assert merged[1]["answers"] == ["circle"]
    ties = [r for r in review if r["reason"].startswith("tie")]
    assert len(ties) == 1 and ties[0]["sample_id"] == records[1]["sample_id"]
    assert ties[0]["question"] == "what shape is it?"
    assert ties[0]["answers"] == {"1": "circle", "b@example.org": "ring"}
    unknown = [r for r in review if r["reason"] == "unknown_sample"]
    assert len(unknown) == 1 and unknown[0]["sample_id"] == "deadbeef" and unknown[0]["task_id"] == 200

    # Hand-computed over the 3 questions with >= 2 votes: {red,red,red}, {1,1,2}, {circle,ring}.
    # Fleiss: P_i = 1, 1/3, 0 -> P = 4/9; p = (3,2,1,1,1)/8 -> Pe = 16/64; kappa = (4/9-1/4)/(3/4) = 7/27.
    # Krippendorff: o(1,2)=o(2,1)=1, o(circle,ring)=o(ring,circle)=1, n=8; Do = 4/8,
    # De = (64 - 16)/56; alpha = 1 - (1/2)/(48/56) = 5/12.
    assert stats["kappa"] == pytest.approx(7 / 27, abs=1e-6)
    assert stats["krippendorff_alpha"] == pytest.approx(5 / 12, abs=1e-6)
    assert stats["tasks"] == 5 and stats["annotations"] == 8 and stats["cancelled"] == 1
    assert stats["unknown_samples"] == 1 and stats["records_annotated"] == 3
    assert stats["answers_merged"] == 2 and stats["flagged"] == 1 and stats["review_items"] == 2
    assert stats["captions_added"] == 7
    assert stats["answer_agreement_mean"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, abs=1e-6)

    # the same project exported twice: nothing counted twice
    again = write_json(tmp_path / "export-again.json", json.loads(export.read_text()))
    merged2, stats2, review2 = merge_annotations(records, [export, again])
    assert [r["captions"] for r in merged2] == [r["captions"] for r in merged]
    assert [r["answers"] for r in merged2] == [r["answers"] for r in merged]
    assert json.loads(merged2[0]["meta"])["annotations"]["cancelled"] == 1
    assert stats2["kappa"] == stats["kappa"] and stats2["flagged"] == 1

    n_written = write_review(review, tmp_path / "out" / "review.jsonl")
    lines = (tmp_path / "out" / "review.jsonl").read_text().splitlines()
    assert n_written == len(lines) == 2 and {json.loads(x)["reason"] for x in lines} >= {"unknown_sample"}


def test_predictions_block_shape(tmp_path):
    records = dataset()
    export_tasks(records, tmp_path / "t.json", predict_captions=stub_captioner, model_version="champion-v7")
    tasks = json.loads((tmp_path / "t.json").read_text())
    pred = tasks[0]["predictions"]
    assert len(pred) == 1 and pred[0]["model_version"] == "champion-v7"
    assert pred[0]["score"] == 1.0  # "a red square" is one of the image's captions
    (res,) = pred[0]["result"]
    assert {k: res[k] for k in ("from_name", "to_name", "type")} == {
        "from_name": "caption", "to_name": "image", "type": "textarea"}
    assert res["value"] == {"text": ["a red square"]} and isinstance(res["id"], str)
    assert tasks[2]["predictions"][0]["score"] == 0.0  # no word shared with "a green stripe"
    # a callable that gives its own confidence
    export_tasks(records, tmp_path / "t2.json", model_version="m",
                 predict_captions=lambda ims: [("a thing", 0.25)] * len(ims))
    t2 = json.loads((tmp_path / "t2.json").read_text())
    assert [t["predictions"][0]["score"] for t in t2] == [0.25] * 3
    with pytest.raises(ValueError, match="returned 1 captions for 3 images"):
        export_tasks(records, tmp_path / "t3.json", predict_captions=lambda ims: ["x"])
    # without a captioner there is no predictions key at all
    export_tasks(records, tmp_path / "t4.json")
    assert all("predictions" not in t for t in json.loads((tmp_path / "t4.json").read_text()))


def test_label_config_matches_task_data(tmp_path):
    root = ET.fromstring(LABEL_CONFIG)
    tags = {el.get("name"): el for el in root.iter() if el.get("name")}
    assert tags["image"].tag == "Image" and tags["image"].get("value") == "$image"
    for name in ("caption", "answers"):
        assert tags[name].tag == "TextArea" and tags[name].get("toName") == "image"
    assert tags["flags"].tag == "Choices"
    export_tasks(dataset(), tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())[0]["data"]
    variables = {el.get("value")[1:] for el in root.iter() if (el.get("value") or "").startswith("$")}
    assert variables == {"image", "captions_text", "questions_text"} and variables <= data.keys()
    assert data["questions_text"] == "1. what color is the square?\n2. how many squares are there?"


# ----------------------------------------------------------------------------------- agreement math

def test_textbook_agreement_values():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa = 0.210
    rows = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [[str(j) for j, c in enumerate(r) for _ in range(c)] for r in rows]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-5)
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units with missing
    # values, nominal alpha = 0.743
    coders = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3",
              ". 3 3 3 2 3 4 2 2 5 1 .", "1 2 3 3 2 4 4 1 2 5 1 ."]
    units = [[v for v in col if v != "."] for col in zip(*(c.split() for c in coders), strict=True)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert fleiss_kappa([["a", "a"], ["a", "a"]]) is None  # one category: undefined
    assert krippendorff_alpha_nominal([["a"]]) is None


def test_text_similarity_and_answer_normalisation():
    assert token_f1("a red square", "red square on white") == pytest.approx(4 / 7)
    assert token_f1("x", "y") == 0.0
    # best match each way: forward 1.0, backward (1 + 0) / 2
    assert caption_set_similarity(["a red square"], ["a red square", "blue circle"]) == pytest.approx(0.75)
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Red car!") == "red car"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5 m") == "3.5 m"
    assert normalize_answer("Don't know") == "dont know"


def test_ground_truth_decides_and_low_agreement_flagged(tmp_path):
    rec = make_record(png((9, 9, 9)), 24, 20, ["c"], ["is it dark?", "what is it?"], ["no", "square"])
    task = {"id": 1, "data": {"sample_id": rec["sample_id"], "questions": rec["questions"]},
            "annotations": [ann(1, "a", answers="yes\n-", ground_truth=True),  # "-": cannot tell
                            ann(2, "b", answers="no\nsquare"), ann(3, "c", answers="no\nbox"),
                            ann(4, "d", answers="No.\n2. square")]}
    export = write_json(tmp_path / "e.json", [task])
    (merged,), stats, review = merge_annotations([rec], [export], min_agreement=0.75)
    assert merged["answers"] == ["yes", "square"]  # ground truth wins over the 2 "no" votes
    meta = json.loads(merged["meta"])["annotations"]
    assert meta["replaced_answers"] == {"is it dark?": "no"} and meta["ground_truth"] is True
    assert meta["answers"]["is it dark?"]["agreement"] == pytest.approx(1 / 4, abs=1e-4)
    # no ground truth on "what is it?" and 2/3 < 0.75: flagged, answer kept
    (item,) = review
    assert item["reason"] == "low_agreement: 0.67 < 0.75" and item["question"] == "what is it?"
    assert item["answers"] == {"b": "square", "c": "box", "d": "square"}
    assert stats["answers_merged"] == 1 and stats["flagged"] == 1


# ------------------------------------------------------------------------------------- bad exports

def test_broken_export_is_one_line_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"data": {"image": "a.png"}}, {"data": {"image": "b.png"')
    with pytest.raises(ValueError) as ei:
        import_export(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and "task index 1" in msg
    p.write_text('"just a string"')
    with pytest.raises(ValueError, match="expected a list of tasks"):
        import_export(p)
    p.write_bytes(b"[\xff]")
    with pytest.raises(ValueError, match="not UTF-8"):
        import_export(p)
    p.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="task index 0"):
        import_export(p)


def test_bad_tasks_become_review_items(tmp_path):
    rec = dataset()[1]
    bad_ann = {"id": 7, "completed_by": 1, "result": [
        {"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": "one string row"}},
        {"from_name": "answers", "to_name": "image", "type": "textarea", "value": {"text": [3]}},
        "not a result"]}
    tasks = [1, {"id": 5}, {"id": 6, "data": {"sample_id": rec["sample_id"], "questions": rec["questions"]},
                           "annotations": [bad_ann, "junk", ann(8, 2, ["ok caption"], "circle\nextra\nmore")]}]
    export = write_json(tmp_path / "e.json", tasks)
    parsed = import_export(export)
    assert [t.valid for t in parsed] == [False, False, True]
    assert parsed[0].problems == ["bad_task: not an object"] and parsed[1].problems == ["missing_field: data"]
    (merged,), stats, review = merge_annotations([rec], [export])
    reasons = [r["reason"] for r in review]
    assert reasons[:2] == ["bad_task: not an object", "missing_field: data"]
    assert any(r.startswith("bad_result: 7: answers") for r in reasons)
    assert any(r.startswith("bad_result: 7: not an object") for r in reasons)
    assert "bad_annotation: 1: not an object" in reasons
    assert "extra_answers: 8: 3 answer lines, 1 questions" in reasons
    # what was sound is kept: a single-string text value and the good annotation
    assert merged["captions"] == ["a blue circle", "one string row", "ok caption"]
    assert stats["tasks"] == 3


# ------------------------------------------------------------------------------------------ ingest

def test_ingest_data_uri_export(tmp_path):
    records = dataset()
    export_tasks(records, tmp_path / "tasks.json", predict_captions=stub_captioner)
    tasks = simulate_label_studio(json.loads((tmp_path / "tasks.json").read_text()))
    export = write_json(tmp_path / "export.json", tasks[:3])
    kept, quarantined = ingest_labelstudio(export)
    assert quarantined == [] and len(kept) == 3
    assert [r["sample_id"] for r in kept] == [r["sample_id"] for r in records]  # same bytes, same id
    assert kept[0]["captions"] == ["a red square", "a square painted red", "A red square on white",
                                   "square of red colour"]
    assert kept[0]["questions"] == records[0]["questions"] and kept[0]["answers"] == ["red", "1"]
    # tie: the answer the task carried is kept; the vote stays in meta
    assert kept[1]["answers"] == ["circle"]
    meta1 = json.loads(kept[1]["meta"])
    assert meta1["annotations"]["answers"]["what shape is it?"]["unresolved"].startswith("tie")
    assert meta1["labelstudio"] == {"task_id": 101, "task_index": 1, "sample_id": records[1]["sample_id"]}
    assert kept[0]["width"] == 24 and kept[0]["source"] == f"labelstudio:{export}:0"


def test_ingest_local_files_export(tmp_path):
    records = dataset()
    out = tmp_path / "ls"
    export_tasks(records, out / "tasks.json", image_mode="local-files")
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=images/{records[0]['sample_id']}.png"
    assert (out / "images" / f"{records[0]['sample_id']}.png").read_bytes() == records[0]["image"]
    kept, quarantined = ingest_labelstudio(out / "tasks.json")
    assert quarantined == [] and [r["sample_id"] for r in kept] == [r["sample_id"] for r in records]
    assert json.loads(kept[0]["meta"])["file"] == f"images/{records[0]['sample_id']}.png"
    with pytest.raises(ValueError, match="not inside document_root"):
        export_tasks(records, out / "t.json", image_mode="local-files", image_root=tmp_path / "elsewhere",
                     document_root=out)


def test_ingest_hostile_tasks(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    good = png((1, 2, 3))
    (root / "sub" / "ok.png").write_bytes(good)
    (root / "abc123-up.png").write_bytes(png((4, 5, 6)))
    (tmp_path / "secret.png").write_bytes(png((7, 8, 9)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    b64 = base64.b64encode(good).decode()
    refs = {
        "local": "/data/local-files/?d=sub/ok.png",
        "upload": "/data/upload/3/abc123-up.png",
        "relative": "sub/ok.png",
        "traversal": "/data/local-files/?d=../secret.png",
        "absolute": "/data/local-files/?d=/etc/passwd",
        "symlink": "/data/local-files/?d=link.png",
        "http": "https://example.org/cat.jpg",
        "s3": "s3://bucket/cat.jpg",
        "bad_b64": "data:image/png;base64,@@not base64@@",
        "not_b64": "data:text/plain,hello",
        "not_image": "data:image/png;base64," + base64.b64encode(b"hello world").decode(),
        "huge": "data:image/png;base64," + "A" * 4000,
        "missing_file": "/data/local-files/?d=sub/nope.png",
        "no_d": "/data/local-files/?x=1",
        "file_url": "file:///etc/passwd",
        "data_uri": "data:image/png;base64," + b64,
    }
    tasks = [{"id": i, "data": {"image": ref, "captions": [name]}} for i, (name, ref) in enumerate(refs.items())]
    tasks += [{"id": 98, "data": {"captions": ["no image"]}}, "not a task"]
    export = write_json(tmp_path / "e.json", tasks)
    kept, quarantined = ingest_labelstudio(export, images=root, max_image_bytes=2000)
    assert len(kept) + len(quarantined) == len(tasks)
    assert sorted(r["captions"][0] for r in kept) == ["data_uri", "local", "relative", "upload"]
    reasons = {(r["captions"] or ["<none>"])[0]: r["reason"] for r in quarantined}
    assert reasons == {
        "traversal": "path_outside_root", "absolute": "path_outside_root", "symlink": "path_outside_root",
        "http": "remote_image: not fetched", "s3": "remote_image: not fetched",
        "bad_b64": "bad_data_uri: invalid base64", "not_b64": "bad_data_uri: not base64",
        "not_image": "unsupported_format", "huge": "too_large: data URI over 2000 bytes",
        "missing_file": "missing_file", "no_d": "bad_field: image: local-files URL without d=",
        "file_url": "unsupported_image_ref: file", "no image": "missing_field: image",
        "<none>": "bad_task: not an object",
    }
    # the same image via a file and via a data URI is the same sample
    by_cap = {r["captions"][0]: r for r in kept}
    assert by_cap["local"]["sample_id"] == by_cap["data_uri"]["sample_id"] == make_record(good, 1, 1, [])[
        "sample_id"]


def test_ingest_missing_export_and_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        ingest_labelstudio(tmp_path / "nope.json")
    p = write_json(tmp_path / "e.json", [])
    with pytest.raises(FileNotFoundError, match="images root"):
        ingest_labelstudio(p, images=tmp_path / "nodir")
    assert ingest_labelstudio(p) == ([], [])


def test_ingest_uploaded_files_by_original_name(tmp_path):
    """Label Studio renames uploads to "<8 hex>-<name>"; the user's image folder has the original names."""
    records = dataset()
    (tmp_path / "imgs").mkdir()
    tasks = []
    for i, r in enumerate(records):
        (tmp_path / "imgs" / f"photo{i}.png").write_bytes(r["image"])
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/7/{i:08x}-photo{i}.png"},
                      "annotations": [ann(i + 1, 1, [f"caption {i}"])]})
    export = write_json(tmp_path / "export.json", tasks)
    kept, quarantined = ingest_labelstudio(export, tmp_path / "imgs")
    assert quarantined == [] and [r["sample_id"] for r in kept] == [r["sample_id"] for r in records]
    assert [r["captions"] for r in kept] == [[f"caption {i}"] for i in range(3)]
