"""Augmentation: left/right text flip, hflip records, hue-preserving colour jitter, augment_records."""

from __future__ import annotations

import colorsys
import io
import json

import numpy as np
import pytest
from PIL import Image

from mmplatform.data.augment import augment_records, color_jitter, hflip_record
from mmplatform.data.dataset import make_record
from mmplatform.data.images import decode_image
from mmplatform.data.text import flip_left_right


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Left", "Right"),
        ("LEFT", "RIGHT"),
        ("right", "left"),
        ("to the left of", "to the right of"),
        ("the leftmost cube", "the rightmost cube"),
        ("Rightmost", "Leftmost"),
        ("left, right; left.", "right, left; right."),
        ("bright", "bright"),
        ("leftover", "leftover"),
        ("righteous", "righteous"),
        ("copyright", "copyright"),
        ("a brightly lit scene", "a brightly lit scene"),
    ],
)
def test_flip_left_right(text, expected):
    assert flip_left_right(text) == expected


def red_dot_record(split="train", i=0) -> dict:
    im = Image.new("RGB", (10, 6), (0, 0, 0))
    im.putpixel((0, 2), (255, 0, 0))
    im.putpixel((9, 5), (0, 0, (i % 255) + 1))  # makes images distinct
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    meta = {"objects": [{"color": "red", "shape": "circle", "col": "left", "row": "middle"},
                        {"color": "blue", "shape": "square", "col": "center", "row": "top"}]}
    return make_record(buf.getvalue(), 10, 6, ["a red circle on the left", "the Leftmost dot is red"],
                       questions=["is the red circle on the left?", "which side is the dot on?"],
                       answers=["yes", "left"], source=f"t:{i}", split=split, meta=meta)


def test_hflip_record():
    rec = red_dot_record()
    out = hflip_record(rec)
    im = decode_image(out["image"])
    assert im.getpixel((9, 2)) == (255, 0, 0) and im.getpixel((0, 2)) == (0, 0, 0)
    assert out["captions"] == ["a red circle on the right", "the Rightmost dot is red"]
    assert out["questions"] == ["is the red circle on the right?", "which side is the dot on?"]
    assert out["answers"] == ["yes", "right"]
    meta = json.loads(out["meta"])
    assert [o["col"] for o in meta["objects"]] == ["right", "center"]
    assert meta["augmented_from"] == rec["sample_id"] and meta["augmentation"] == "hflip"
    assert out["sample_id"] != rec["sample_id"] and out["split"] == "train"
    assert (out["width"], out["height"]) == (10, 6)
    assert hflip_record(rec)["image"] == out["image"]  # deterministic encoding


def test_color_jitter_preserves_hue():
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:4] = (220, 40, 30)  # saturated red-orange
    arr[4:] = (30, 90, 200)  # saturated blue
    img = Image.fromarray(arr)
    for seed in range(20):
        out = np.asarray(color_jitter(img, np.random.default_rng(seed), 0.4, 0.4, 0.4))
        for y, src in ((0, arr[0, 0]), (7, arr[7, 0])):
            h0 = colorsys.rgb_to_hsv(*(src / 255.0))[0] * 360
            h1 = colorsys.rgb_to_hsv(*(out[y, 0] / 255.0))[0] * 360
            diff = min(abs(h0 - h1), 360 - abs(h0 - h1))
            assert diff < 3.0, (seed, src, out[y, 0])
    a = color_jitter(img, np.random.default_rng(5))
    b = color_jitter(img, np.random.default_rng(5))
    assert a.tobytes() == b.tobytes()
    assert np.asarray(color_jitter(img, np.random.default_rng(0), 0, 0, 0)).tolist() == arr.tolist()


def test_bright_saturated_pixel_hue_survives_clipping():
    # A plain RGB multiply by 1.4 would clip R at 255 and shift this orange towards yellow.
    img = Image.new("RGB", (2, 2), (250, 120, 0))
    rng = np.random.default_rng(0)
    out = color_jitter(img, rng, brightness=0.4, contrast=0.0, saturation=0.0).getpixel((0, 0))
    h0 = colorsys.rgb_to_hsv(250 / 255, 120 / 255, 0)[0] * 360
    h1 = colorsys.rgb_to_hsv(*(np.array(out) / 255.0))[0] * 360
    assert abs(h0 - h1) < 1.5


def test_augment_records_deterministic_and_train_only():
    records = [red_dot_record("train", i) for i in range(20)]
    records += [red_dot_record("val", 100 + i) for i in range(5)]
    records.append(red_dot_record("test", 200))
    out1 = augment_records(records, seed=1, flip_fraction=0.5, jitter_fraction=0.3)
    out2 = augment_records(records, seed=1, flip_fraction=0.5, jitter_fraction=0.3)
    assert [r["image"] for r in out1] == [r["image"] for r in out2]
    assert [r["meta"] for r in out1] == [r["meta"] for r in out2]
    assert out1[: len(records)] == records  # inputs unchanged, in order
    new = out1[len(records):]
    assert new, "expected some augmented copies"
    by_id = {r["sample_id"]: r for r in records}
    kinds = set()
    for r in new:
        meta = json.loads(r["meta"])
        kinds.add(meta["augmentation"])
        assert by_id[meta["augmented_from"]]["split"] == "train" and r["split"] == "train"
    assert kinds == {"hflip", "color_jitter"}
    flips = sum(json.loads(r["meta"])["augmentation"] == "hflip" for r in new)
    assert 4 <= flips <= 16
    assert len({r["sample_id"] for r in out1}) == len(out1)
    # Re-running on the augmented output adds nothing for the copies, and the same copies again are skipped.
    assert len(augment_records(out1, seed=1, flip_fraction=0.5, jitter_fraction=0.3)) == len(out1)
    assert augment_records(records, seed=2, flip_fraction=0.5) != out1
    assert augment_records(records, flip_fraction=0.0) == records
