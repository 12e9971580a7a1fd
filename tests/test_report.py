"""The data report: known counts and text statistics on hand-built datasets, escaping of untrusted text,
robustness (empty dataset, no quarantine, nothing decodable), and a synthetic dataset end to end."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmplatform.data.dataset import make_record, write_dataset
from mmplatform.data.report import build_report, render_html, report_figures, summary_metrics, write_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(i: int, size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10 * i % 256, 255 - 7 * i % 256, 3 * i % 256)).save(buf, format="PNG")
    return buf.getvalue()


def rec(i: int, captions: list[str], split: str = "train", meta: dict | None = None, **kw) -> dict:
    return make_record(png(i), 16, 16, captions, split=split, meta=meta, source=f"test:{i}", **kw)


def n_thumbs(page: str) -> int:
    return page.count('<img class="thumb"')


@pytest.fixture
def known(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """Three kept records with hand-countable captions and five quarantined rows."""
    a = rec(1, ["a red circle", "a red square"], meta={"quality": {"issues": ["dark"], "scores": {"dark": 0.05}}})
    b = rec(2, ["A red circle."], split="val",
            meta={"quality": {"issues": ["dark", "blurry"], "scores": {"dark": 0.02, "blurry": 0.3}},
                  "caption_repairs": ["html_stripped", "url_removed"]})
    c = rec(3, ["<script>alert(1)</script>"], questions=["what?"], answers=["that"])
    d = dict(rec(4, ["x"], split=""), image=b"not an image", source="file:<iframe src=x>",
             reason="corrupt_image: <img src=x onerror=alert(2)>")
    e = dict(rec(5, ["y"], split=""), reason="dark: score 0.01 < 0.1")
    f = dict(rec(6, ["z"], split=""), reason=f"near_duplicate: of {a['sample_id']} (phash 2)")
    g = dict(rec(7, ["w"], split=""), reason=f"near_duplicate: of {a['sample_id']} (cnn 0.95)")
    h = dict(rec(8, ["v"], split=""), reason=f"exact_duplicate: of {b['sample_id']}")
    out = tmp_path / "ds"
    write_dataset(out, [a, b, c], stage="clean", quarantine=[d, e, f, g, h])
    return out, {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "g": g, "h": h}


def test_counts_quarantine_issues_and_duplicates(known):
    path, r = known
    rep = build_report(path)
    c = rep["counts"]
    assert (c["records"], c["images"], c["captions"], c["qa_pairs"], c["quarantined"]) == (3, 3, 4, 1, 5)
    assert c["splits"] == {"train": {"records": 2, "captions": 3, "qa_pairs": 1},
                           "val": {"records": 1, "captions": 1, "qa_pairs": 0}}
    q = rep["quarantine"]["reasons"]
    assert {k: v["count"] for k, v in q.items()} == {"near_duplicate": 2, "corrupt_image": 1, "dark": 1,
                                                     "exact_duplicate": 1}
    assert q["corrupt_image"]["examples"][0]["thumb"] is None  # undecodable: placeholder, no crash
    assert q["dark"]["examples"][0]["thumb"].startswith("data:image/png;base64,")

    dark = rep["issues"]["dark"]
    assert (dark["kept_flagged"], dark["quarantined"], dark["total"]) == (2, 1, 3)
    # Worst first: the quarantined row's score comes from its reason, the kept ones from meta["quality"].
    assert [(x["sample_id"], x["score"], x["status"]) for x in dark["examples"]] == [
        (r["e"]["sample_id"], 0.01, "quarantined"), (r["b"]["sample_id"], 0.02, "kept"),
        (r["a"]["sample_id"], 0.05, "kept")]
    assert rep["issues"]["blurry"]["total"] == 1 and rep["issues"]["light"]["total"] == 0
    assert rep["issues"]["near_duplicate"]["total"] == 2 and rep["issues"]["exact_duplicate"]["total"] == 1

    near = rep["duplicates"]["near_duplicate"]
    assert (near["groups"], near["dropped"], near["largest"]) == (1, 2, 3)
    group = near["examples"][0]
    assert group["representative"]["sample_id"] == r["a"]["sample_id"]
    assert group["representative"]["status"] == "kept" and group["representative"]["thumb"]
    assert [(m["sample_id"], m["how"]) for m in group["members"]] == [
        (r["f"]["sample_id"], "phash 2"), (r["g"]["sample_id"], "cnn 0.95")]
    exact = rep["duplicates"]["exact_duplicate"]
    assert exact["examples"][0]["representative"]["sample_id"] == r["b"]["sample_id"]
    assert rep["caption_repairs"] == {"records": 1, "codes": {"html_stripped": 1, "url_removed": 1}}
    json.dumps(rep)  # serialisable as an artifact

    assert len(build_report(path, max_examples=1)["issues"]["dark"]["examples"]) == 1


def test_text_statistics_known_values(known):
    path, _ = known
    rep = build_report(path)
    d, k = rep["diversity"], rep["concepts"]
    # Tokens: [a red circle] [a red square] [a red circle] [script alert 1 script]
    assert (d["unigrams"], d["bigrams"]) == (13, 9)
    assert d["distinct_1"] == pytest.approx(7 / 13)
    assert d["distinct_2"] == pytest.approx(6 / 9)
    assert d["type_token_ratio"] == pytest.approx((1 + 1 + 1 + 3 / 4) / 4)
    assert d["unique_caption_share"] == pytest.approx(3 / 4)  # "a red circle" == "A red circle."
    assert d["image_specific_caption_share"] == pytest.approx(2 / 4)  # "a red circle" is on two images
    assert d["intra_image_similarity"] == pytest.approx(1 / 3)  # {red, circle} vs {red, square}
    assert d["mean_idf"] == pytest.approx(math.log(4.5) / 2)  # (5 ln 1.5 + 5 ln 3) / 10
    assert d["idf_specificity"] == pytest.approx(math.log(4.5) / 2 / math.log(3))
    # Concepts ("a" is a stop word): red 3, circle 2, script 2, square 1, alert 1, "1" 1.
    assert (k["vocabulary"], k["mentions"], k["hapax"]) == (6, 10, 3)
    assert k["top"][0] == ["red", 3] and sorted(k["frequencies"], reverse=True) == [3, 2, 2, 1, 1, 1]
    assert k["hapax_share"] == pytest.approx(0.5)
    assert (k["concept_coverage_50"], k["concept_coverage_90"]) == (2, 5)
    assert k["color_shape"] is None  # no scene graphs
    cap = rep["captions"]
    assert cap["length_hist"] == {"value": [1, 3], "count": [1, 3]}  # whitespace-separated words
    assert cap["per_image_hist"] == {"value": [1, 2], "count": [2, 1]}
    assert cap["most_shared"] == [{"caption": "a red circle", "images": 2}]
    assert [x["words"] for x in cap["shortest_longest"]] == [1, 3, 3, 3]

    m = summary_metrics(rep)
    assert all(re.fullmatch(r"[\w.-]+", name) and name.startswith("data_") for name in m)
    assert all(isinstance(v, int | float) for v in m.values())
    assert isinstance(m["data_records"], int) and isinstance(m["data_quarantined"], int)  # counts print as counts
    assert isinstance(m["data_distinct_2"], float)
    assert m["data_quarantined"] == 5 and m["data_issue_dark"] == 3 and m["data_issue_grayscale"] == 0
    assert m["data_quarantine_near_duplicate"] == 2 and m["data_near_duplicate_groups"] == 1
    assert m["data_distinct_2"] == pytest.approx(2 / 3) and m["data_hapax_share"] == pytest.approx(0.5)
    assert m["data_split_train_records"] == 2 and m["data_caption_repairs_url_removed"] == 1


def test_html_is_self_contained_and_escaped(known, tmp_path):
    path, _ = known
    rep = build_report(path)
    out = write_html(rep, tmp_path / "sub" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert render_html(build_report(path)) == page  # deterministic: same dataset, same page
    for section in ("id='summary'", "id='quarantine'", "id='issues'", "id='duplicates'", "id='captions'",
                    "id='concepts'", "id='diversity'", "id='repairs'"):
        assert section in page
    # Untrusted text (captions, reasons, sources) is escaped, never live markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "<iframe" not in page and "onerror=alert(2)>" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    # Cards: quarantine 4 (+1 undecodable), issues dark 3 + blurry 1, exact group 2, near group 3.
    assert n_thumbs(page) == 13
    assert page.count('class="noimg"') == 1
    # Nothing external: every src is a data URI.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page
    figs = report_figures(rep)
    assert {"caption_length.png", "captions_per_image.png", "concepts_top.png",
            "concepts_rank_frequency.png"} <= set(figs)
    assert all(v.startswith(PNG_MAGIC) for v in figs.values())
    assert page.count('<img class="fig"') == len(figs)


def test_empty_dataset(tmp_path):
    write_dataset(tmp_path / "empty", [], stage="ingest")
    rep = build_report(tmp_path / "empty")
    assert rep["counts"]["records"] == 0 and rep["quarantine"]["total"] == 0
    assert rep["diversity"]["distinct_2"] is None and rep["concepts"]["hapax_share"] is None
    assert report_figures(rep) == {}
    page = render_html(rep)
    assert "id='diversity'" in page and n_thumbs(page) == 0 and "nothing quarantined" in page
    m = summary_metrics(rep)
    assert m["data_records"] == 0 and "data_distinct_2" not in m


def test_no_quarantine_directory(known):
    path, _ = known
    shutil.rmtree(path / "quarantine")
    rep = build_report(path)
    assert rep["counts"]["quarantined"] == 0 and rep["quarantine"]["reasons"] == {}
    assert rep["issues"]["dark"]["total"] == 2 and rep["duplicates"]["near_duplicate"]["groups"] == 0
    assert "nothing quarantined" in render_html(rep)


def test_all_images_bad(tmp_path):
    """Nothing decodes, metas are malformed: the report still builds and shows placeholders."""
    kept = [dict(rec(1, ["a cat"]), image=b"\x89PNG\r\n\x1a\nbroken", meta="not json"),
            dict(rec(2, ["a dog"]), image=b"",
                 meta=json.dumps({"quality": {"issues": ["dark", 3], "scores": {"dark": "low"}}}))]
    quar = [dict(rec(3, []), image=b"GIF89a" + b"\0" * 10, reason="corrupt_image: truncated"),
            dict(rec(4, []), image=b"", reason="empty_file"),
            dict(rec(5, []), image=b"%!PS-Adobe", reason="unsupported_format")]
    write_dataset(tmp_path / "bad", kept, stage="clean", quarantine=quar)
    rep = build_report(tmp_path / "bad")
    assert rep["issues"]["dark"]["total"] == 1 and rep["issues"]["dark"]["examples"][0]["score"] is None
    page = render_html(rep)
    assert n_thumbs(page) == 0 and page.count('class="noimg"') == 4  # 3 quarantine + 1 dark example
    assert set(rep["quarantine"]["reasons"]) == {"corrupt_image", "empty_file", "unsupported_format"}


def test_missing_dataset_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_synthetic_dataset(tmp_path):
    from mmplatform.data.synthetic import DEFAULT_HELD_OUT, generate_synthetic

    recs = generate_synthetic(seed=1, n_train=40, n_val=4, n_test=4, n_test_compositional=6, image_size=32,
                              captions_per_image=3)
    write_dataset(tmp_path / "syn", recs, stage="ingest")
    rep = build_report(tmp_path / "syn")
    cs = rep["concepts"]["color_shape"]
    n_objects = sum(len(json.loads(r["meta"])["objects"]) for r in recs)
    assert sum(map(sum, cs["counts"]["all"])) == n_objects
    # CoGenT: held-out colour-shape pairs never occur in train.
    assert {tuple(p) for p in DEFAULT_HELD_OUT} <= {tuple(p) for p in cs["zero_pairs"]["train"]}
    assert rep["counts"]["captions"] == 3 * len(recs)
    assert rep["diversity"]["image_specific_caption_share"] == 1.0  # scenes are unique, so are captions
    figs = report_figures(rep)
    assert figs["color_shape.png"].startswith(PNG_MAGIC)
    page = render_html(rep, figs)
    assert "Pairs never seen in train" in page and "red triangle" in page
