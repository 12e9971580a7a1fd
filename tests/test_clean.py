"""The clean stage: decode, exact/near duplicates, image issues, caption filters, alignment, splits."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from netwatch import TreeWatch, exposed
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

from mmplatform.config import CleanParams
from mmplatform.data.clean import assign_split, clean_dataset, clean_records
from mmplatform.data.dataset import make_record, read_dataset, read_manifest, read_quarantine, write_dataset
from mmplatform.data.text import clean_caption, normalize_text


def noise_png(i: int, size=(24, 18)) -> bytes:
    """A distinct image per i (seeded noise): no two are near duplicates."""
    a = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rec(i: int, captions=("a small red square",), split="", **kw) -> dict:
    return make_record(noise_png(i), 1, 1, list(captions), split=split, source=f"test:{i}", **kw)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(a) for a in load_sample_images().images]  # china, flower (640x427)


def test_normalize_text():
    assert normalize_text("  a\tred\n\nsquare\u00a0 ") == "a red square"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert clean_caption("   ") is None and clean_caption(None) is None and clean_caption(3) is None


def test_duplicates_quarantined_and_captions_merged():
    a, b, c = rec(1, ["first caption"]), rec(1, ["second caption"]), rec(2)
    kept, quarantined, stats = clean_records([a, b, c])
    assert [r["sample_id"] for r in kept] == [a["sample_id"], c["sample_id"]]
    assert quarantined[0]["reason"] == f"exact_duplicate: of {a['sample_id']}"
    assert quarantined[0]["source"] == "test:1" and quarantined[0]["captions"] == ["second caption"]
    assert kept[0]["captions"] == ["first caption", "second caption"]
    assert json.loads(kept[0]["meta"])["merged_sources"] == ["test:1"]
    assert stats["reasons"] == {"exact_duplicate": 1}

    kept, quarantined, _ = clean_records([a, b, c], merge_duplicates=False)
    assert kept[0]["captions"] == ["first caption"] and len(quarantined) == 1


def test_caption_filters_repairs_and_no_valid_caption():
    long = " ".join(["word"] * 61)
    records = [
        rec(1, ["  a  red\tsquare ", "", "   ", long, "a red square", "ok", "IMG_1234.jpg",
                "a <b>blue</b> circle http://x.example/a.png"]),
        rec(2, ["", long, "untitled"]),
        rec(3, ["one"]),
    ]
    kept, quarantined, stats = clean_records(records, min_caption_words=2)
    assert kept[0]["captions"] == ["a red square", "a blue circle"]
    assert stats["captions_dropped"] == {"duplicate": 1, "empty": 3, "placeholder": 2, "too_long": 2,
                                         "too_short": 2}
    assert {"html_stripped", "url_removed"} <= set(json.loads(kept[0]["meta"])["caption_repairs"])
    reasons = {q["source"]: q["reason"] for q in quarantined}
    assert reasons == {"test:2": "no_valid_caption", "test:3": "no_valid_caption"}
    # Quarantined records are the input unchanged (plus reason).
    assert quarantined[0]["captions"] == ["", long, "untitled"]


def test_bad_image_and_width_refresh():
    good = rec(1)
    assert (good["width"], good["height"]) == (1, 1)
    bad = make_record(b"not an image", 1, 1, ["x"], source="bad")
    kept, quarantined, stats = clean_records([good, bad])
    assert (kept[0]["width"], kept[0]["height"]) == (24, 18)
    assert quarantined[0]["reason"] == "unsupported_format"
    tampered = dict(rec(5), image_sha256="0" * 64)
    _, q, _ = clean_records([tampered])
    assert q[0]["reason"] == "hash_mismatch"


def test_splits_deterministic_proportional_and_preassigned_kept():
    records = [rec(i) for i in range(600)]
    records[0]["split"] = "test_compositional"
    records[1]["split"] = "val"
    kw = {"val_fraction": 0.2, "test_fraction": 0.1, "split_seed": 3}
    kept1, q1, stats1 = clean_records(records, **kw)
    kept2, _, _ = clean_records(list(reversed(records)), **kw)
    assert q1 == [] and stats1["read"] == stats1["kept"] == 600
    s1 = {r["sample_id"]: r["split"] for r in kept1}
    assert s1 == {r["sample_id"]: r["split"] for r in kept2}  # order-independent
    assert s1[records[0]["sample_id"]] == "test_compositional"
    assert s1[records[1]["sample_id"]] == "val"
    n = stats1["splits"]
    assert sum(n.values()) == 600
    assert 90 <= n["val"] <= 150 and 35 <= n["test"] <= 85 and 360 <= n["train"] <= 470
    other_seed = {r["sample_id"]: r["split"] for r in clean_records(records, split_seed=4)[0]}
    assert other_seed != s1
    assert assign_split("abc", split_seed=1) == assign_split("abc", split_seed=1)


def test_image_issues_flagged_with_scores_and_dropped_when_asked(photos):
    black = Image.new("RGB", (200, 150), (3, 3, 3))
    records = [make_record(jpeg(photos[0]), 0, 0, ["a temple"], source="photo"),
               make_record(jpeg(black), 0, 0, ["nothing to see"], source="black")]
    kept, quarantined, stats = clean_records(records)
    assert len(kept) == 2 and stats["image_issues_flagged"].get("dark") == 1
    q = {r["source"]: json.loads(r["meta"])["quality"] for r in kept}
    assert "dark" in q["black"]["issues"] and q["black"]["scores"]["dark"] < 0.1
    assert q["photo"]["issues"] == [] and set(q["photo"]["scores"]) >= {"dark", "light", "blurry", "grayscale"}

    kept, quarantined, stats = clean_records(records, drop_issues=["dark"])
    assert [r["source"] for r in kept] == ["photo"]
    assert quarantined[0]["reason"].startswith("dark: score ") and quarantined[0]["source"] == "black"


def near_dup_set(photos) -> list[dict]:
    china, flower = photos
    small = china.resize((480, 320))
    bright = ImageEnhance.Brightness(flower).enhance(1.2)
    return [make_record(jpeg(china), 0, 0, ["a temple"], source="china", split="test"),
            make_record(jpeg(small, 60), 0, 0, ["a temple, smaller"], source="china-small", split="train"),
            make_record(jpeg(flower), 0, 0, ["a flower"], source="flower"),
            make_record(jpeg(bright), 0, 0, ["a bright flower"], source="flower-bright")]


def test_near_duplicates_one_kept_per_group(photos):
    records = near_dup_set(photos)
    kept, quarantined, stats = clean_records(records)
    assert sorted(r["source"] for r in kept) == ["china", "flower"]  # policy "largest"
    by_src = {r["source"]: r for r in kept}
    reasons = {r["source"]: r["reason"] for r in quarantined}
    assert reasons["china-small"].startswith(f"near_duplicate: of {by_src['china']['sample_id']} (")
    assert reasons["flower-bright"].startswith(f"near_duplicate: of {by_src['flower']['sample_id']} (")
    assert stats["near_duplicate_groups"] == 2
    assert json.loads(by_src["china"]["meta"])["near_duplicate_members"] == 2


def test_near_duplicate_group_never_straddles_splits(photos):
    records = near_dup_set(photos)
    kept, quarantined, _ = clean_records(records, near_duplicates={"action": "keep"})
    assert quarantined == []
    split = {r["source"]: r["split"] for r in kept}
    # The group takes the most held-out split any member was given: the train copy moves to test.
    assert split["china"] == split["china-small"] == "test"
    assert split["flower"] == split["flower-bright"]
    moved = json.loads(next(r for r in kept if r["source"] == "china-small")["meta"])
    assert moved["split_moved_from"] == "train"


class ColourScorer:
    """A real, if tiny, image-text model: an image is embedded by its mean colour, a caption by the colour
    words it names. It lets the filter be tested on known scores without training a network."""

    source = "colour-words"
    COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}

    def embed_images(self, images):
        v = np.array([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32).mean((0, 1)) for b in images])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_texts(self, texts):
        v = np.array([np.sum([self.COLOURS[w] for w in t.split() if w in self.COLOURS] or [(1, 1, 1)], 0)
                      for t in texts], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def solid_png(rgb, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 40, (32, 32, 3)) + np.array(rgb) * 215 // 255
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_alignment_filter_drops_captions_of_other_images():
    recs = []
    for i in range(30):
        colour = ["red", "green", "blue"][i % 3]
        wrong = ["green", "blue", "red"][i % 3]
        rgb = tuple(255 * c for c in ColourScorer.COLOURS[colour])
        caps = [f"a {colour} patch number {i}"] + ([f"a {wrong} patch"] if i % 5 == 0 else [])
        recs.append(make_record(solid_png(rgb, i), 0, 0, caps, source=f"r{i}"))
    recs.append(make_record(solid_png((0, 0, 255), 99), 0, 0, ["a red thing"], source="all-wrong"))
    p = {"near_duplicates": {"enabled": False}, "alignment": {"min_score": 0.5}}
    kept, quarantined, stats = clean_records(recs, scorer=ColourScorer(), **p)
    assert stats["alignment"]["status"] == "applied"
    assert stats["alignment"]["captions_dropped"] == 6  # the six "wrong colour" captions
    assert all(len(r["captions"]) == 1 and "patch number" in r["captions"][0] for r in kept)
    assert [q["source"] for q in quarantined] == ["all-wrong"]
    assert quarantined[0]["reason"].startswith("low_alignment: best caption percentile ")

    # No scorer (no champion yet): skipped and said so, nothing dropped.
    kept, quarantined, stats = clean_records(recs, **p)
    assert stats["alignment"]["status"] == "skipped: no champion" and len(kept) == 31
    # top_fraction keeps the best share of captions.
    kept, _, stats = clean_records(recs, scorer=ColourScorer(), near_duplicates={"enabled": False},
                                   alignment={"mode": "top_fraction", "keep_fraction": 0.5})
    assert 16 <= sum(len(r["captions"]) for r in kept) <= 20


def test_kept_plus_quarantined_equals_read_and_stats():
    records = [rec(1), rec(1), rec(2, [""]), make_record(b"", 0, 0, ["x"]), rec(3, split="train")]
    kept, quarantined, stats = clean_records(records)
    assert len(kept) + len(quarantined) == len(records) == stats["read"]
    assert stats["kept"] == 2 and stats["quarantined"] == 3
    assert stats["reasons"] == {"empty_file": 1, "exact_duplicate": 1, "no_valid_caption": 1}
    assert all("reason" in q for q in quarantined)
    json.dumps(stats)


def test_bad_params():
    with pytest.raises(ValueError):
        clean_records([], val_fraction=0.7, test_fraction=0.5)
    with pytest.raises(ValueError):
        CleanParams.model_validate({"drop_issues": ["no_such_issue"]})


def _dataset(tmp_path, photos):
    records = [rec(i, [f"caption number {i}"]) for i in range(40)] + near_dup_set(photos)
    records += [records[3], make_record(b"GIF89a-broken", 0, 0, ["x"], source="broken")]
    write_dataset(tmp_path / "in", records, stage="annotate", shard_size=16)
    return records


def test_clean_dataset_local_engine_in_row_ranges(tmp_path, photos):
    records = _dataset(tmp_path, photos)
    p = CleanParams(engine="local", rows_per_task=7)
    stats = clean_dataset(tmp_path / "in", tmp_path / "out", p)
    kept, quarantined = read_dataset(tmp_path / "out"), read_quarantine(tmp_path / "out")
    assert len(kept) + len(quarantined) == len(records) == stats["read"]
    assert stats["reasons"] == {"corrupt_image": 1, "exact_duplicate": 1, "near_duplicate": 2}
    assert read_manifest(tmp_path / "out")["stats"]["kept"] == len(kept) == 42
    # The same as the in-memory path, record for record.
    mem_kept, mem_q, _ = clean_records(records)
    assert [r["sample_id"] for r in kept] == [r["sample_id"] for r in mem_kept]
    assert [q["reason"] for q in quarantined] == [q["reason"] for q in mem_q]


@pytest.mark.slow
def test_clean_dataset_on_ray_data_matches_local(tmp_path, photos):
    _dataset(tmp_path, photos)
    local = clean_dataset(tmp_path / "in", tmp_path / "local", CleanParams(engine="local", rows_per_task=10))
    with TreeWatch() as sockets:  # Ray's processes (GCS, raylet, agents, Data workers) on loopback only
        on_ray = clean_dataset(tmp_path / "in", tmp_path / "ray", CleanParams(engine="ray", rows_per_task=10))
    assert sockets.seen and not exposed(sockets.seen), f"listening beyond loopback: {exposed(sockets.seen)}"
    assert on_ray["engine"] == "ray"
    for key in ("kept", "quarantined", "reasons", "splits", "image_issues_flagged"):
        assert on_ray[key] == local[key]
    assert read_manifest(tmp_path / "ray")["content_hash"] == read_manifest(tmp_path / "local")["content_hash"]
