"""clean_records and the caption normaliser."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mmplatform.data.clean import assign_split, clean_records
from mmplatform.data.dataset import make_record
from mmplatform.data.text import clean_caption, normalize_text


def png(i: int, size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i % 256, (i // 256) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def rec(i: int, captions=("a small red square",), split="", **kw) -> dict:
    return make_record(png(i), 1, 1, list(captions), split=split, source=f"test:{i}", **kw)


def test_normalize_text():
    assert normalize_text("  a\tred\n\nsquare\u00a0 ") == "a red square"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert normalize_text("a\u200bb\x00c\u202ed") == "ab cd"
    assert clean_caption("   ") is None and clean_caption(None) is None and clean_caption(3) is None


def test_duplicates_quarantined_and_captions_merged():
    a, b, c = rec(1, ["first caption"]), rec(1, ["second caption"]), rec(2)
    kept, quarantined, stats = clean_records([a, b, c])
    assert [r["sample_id"] for r in kept] == [a["sample_id"], c["sample_id"]]
    assert quarantined[0]["reason"] == f"exact_duplicate: of {a['sample_id']}"
    assert quarantined[0]["source"] == "test:1" and quarantined[0]["captions"] == ["second caption"]
    assert kept[0]["captions"] == ["first caption", "second caption"]
    assert stats["reasons"] == {"exact_duplicate": 1}

    kept, quarantined, _ = clean_records([a, b, c], merge_duplicates=False)
    assert kept[0]["captions"] == ["first caption"] and len(quarantined) == 1


def test_caption_filters_and_no_valid_caption():
    long = " ".join(["word"] * 61)
    records = [
        rec(1, ["  a  red\tsquare ", "", "   ", long, "a red square", "ok"]),
        rec(2, ["", long]),
        rec(3, ["one"]),
    ]
    kept, quarantined, stats = clean_records(records, min_caption_words=2)
    assert kept[0]["captions"] == ["a red square"]
    assert stats["captions_dropped"] == {"duplicate": 1, "empty": 3, "too_long": 2, "too_short": 2}
    reasons = {q["source"]: q["reason"] for q in quarantined}
    assert reasons == {"test:2": "no_valid_caption", "test:3": "no_valid_caption"}
    # Quarantined records are the input unchanged (plus reason).
    assert quarantined[0]["captions"] == ["", long]


def test_bad_image_and_width_refresh():
    good = rec(1)
    assert (good["width"], good["height"]) == (1, 1)
    bad = make_record(b"not an image", 1, 1, ["x"], source="bad")
    kept, quarantined, stats = clean_records([good, bad])
    assert (kept[0]["width"], kept[0]["height"]) == (4, 3)
    assert quarantined[0]["reason"] == "unsupported_format"
    tampered = dict(rec(5), image_sha256="0" * 64)
    _, q, _ = clean_records([tampered])
    assert q[0]["reason"] == "hash_mismatch"


def test_splits_deterministic_proportional_and_preassigned_kept():
    records = [rec(i) for i in range(600)]
    records[0]["split"] = "test_compositional"
    records[1]["split"] = "val"
    kept1, q1, stats1 = clean_records(records, val_fraction=0.2, test_fraction=0.1, split_seed=3)
    kept2, _, _ = clean_records(list(reversed(records)), val_fraction=0.2, test_fraction=0.1, split_seed=3)
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


def test_kept_plus_quarantined_equals_read_and_stats():
    records = [rec(1), rec(1), rec(2, [""]), make_record(b"", 0, 0, ["x"]), rec(3, split="train")]
    kept, quarantined, stats = clean_records(records)
    assert len(kept) + len(quarantined) == len(records) == stats["read"]
    assert stats["kept"] == 2 and stats["quarantined"] == 3
    assert stats["reasons"] == {"empty_file": 1, "exact_duplicate": 1, "no_valid_caption": 1}
    assert all("reason" in q for q in quarantined)
    json.dumps(stats)


def test_bad_fractions():
    with pytest.raises(ValueError):
        clean_records([], val_fraction=0.7, test_fraction=0.5)
