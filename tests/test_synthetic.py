"""Behavioural tests of the built-in synthetic dataset (mmplatform.data.synthetic)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmplatform.data.dataset import sample_id_for
from mmplatform.data.synthetic import (
    COLORS,
    COLS,
    DEFAULT_HELD_OUT,
    NUMBER_WORDS,
    POSITION_PHRASES,
    ROWS,
    SHAPES,
    SIZES,
    cell_center,
    describe,
    generate_synthetic,
    render_scene,
)

SMALL = {"n_train": 300, "n_val": 40, "n_test": 60, "n_test_compositional": 80}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_synthetic(seed=3, **SMALL)


def _objects(rec: dict) -> list[dict]:
    return json.loads(rec["meta"])["objects"]


def _decode(rec: dict) -> Image.Image:
    img = Image.open(io.BytesIO(rec["image"]))
    assert img.format == "PNG"
    return img.convert("RGB")


def test_public_constants() -> None:
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "cyan"}
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert set(SIZES) == {"small", "large"} and SIZES["small"] < SIZES["large"] < 1 / 6
    # Held-out pairs leave every colour and every shape seen in training with other partners.
    for colour, shape in DEFAULT_HELD_OUT:
        assert any((colour, s) not in DEFAULT_HELD_OUT for s in SHAPES)
        assert any((c, shape) not in DEFAULT_HELD_OUT for c in COLORS)


def test_deterministic_bytes() -> None:
    a = generate_synthetic(seed=7, **SMALL)
    b = generate_synthetic(seed=7, **SMALL)
    assert a == b
    c = generate_synthetic(seed=8, **SMALL)
    assert [r["image_sha256"] for r in a] != [r["image_sha256"] for r in c]
    assert {r["source"] for r in a} == {"synthetic:seed=7"}


def test_split_counts_and_record_shape(records: list[dict]) -> None:
    counts = Counter(r["split"] for r in records)
    assert counts == {"train": 300, "val": 40, "test": 60, "test_compositional": 80}
    for r in records:
        assert r["sample_id"] == sample_id_for(r["image"])
        assert (r["width"], r["height"]) == (64, 64)
        meta = json.loads(r["meta"])
        assert meta["generator"] == "synthetic" and meta["seed"] == 3
        assert 1 <= len(meta["objects"]) <= 4


def test_object_count_distribution_favours_several_objects() -> None:
    recs = generate_synthetic(seed=0, n_train=1000, n_val=1, n_test=1, n_test_compositional=0)
    counts = Counter(len(_objects(r)) for r in recs)
    assert counts[1] < counts[2] and counts[1] < counts[3] and counts[1] < counts[4]


def test_held_out_combos_only_in_compositional_split(records: list[dict]) -> None:
    held = set(DEFAULT_HELD_OUT)
    for r in records:
        has_held = any((o["color"], o["shape"]) in held for o in _objects(r))
        assert has_held == (r["split"] == "test_compositional")
        assert json.loads(r["meta"])["compositional"] == has_held


def test_custom_held_out() -> None:
    held = (("green", "circle"),)
    recs = generate_synthetic(seed=1, n_train=50, n_val=5, n_test=5, n_test_compositional=20, held_out=held)
    for r in recs:
        has_held = any((o["color"], o["shape"]) == ("green", "circle") for o in _objects(r))
        assert has_held == (r["split"] == "test_compositional")


def test_descriptions_unique(records: list[dict]) -> None:
    descs = [describe(_objects(r)) for r in records]
    assert len(set(descs)) == len(descs)
    assert len({r["image_sha256"] for r in records}) == len(records)
    # Canonical: independent of the order objects are listed in.
    objs = _objects(records[0])
    assert describe(list(reversed(objs))) == describe(objs)


def test_captions_mention_every_object(records: list[dict]) -> None:
    for r in records:
        caps = r["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert not re.search(r"\d", cap), cap
            assert len(cap.split()) < 40, cap
            for o in _objects(r):
                assert f"a {o['size']} {o['color']} {o['shape']} {POSITION_PHRASES[(o['row'], o['col'])]}" in cap


def test_captions_per_image_is_respected() -> None:
    recs = generate_synthetic(seed=2, n_train=20, n_val=1, n_test=1, n_test_compositional=1,
                              captions_per_image=10)
    assert all(len(set(r["captions"])) == 10 for r in recs)
    with pytest.raises(ValueError):
        generate_synthetic(n_train=5, captions_per_image=11)


def _answer(question: str, objs: list[dict]) -> str:
    """Independent re-derivation of each question type's answer from the scene graph."""
    def find(colour: str, shape: str) -> dict:
        (o,) = [o for o in objs if o["color"] == colour and o["shape"] == shape]
        return o

    if question in ("how many shapes are there?", "how many objects are in the image?"):
        return NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o["shape"] == m[1]]
        return o["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o["color"] == m[1]]
        return o["shape"]
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        return find(m[1], m[2])["size"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) to the (left|right) of the (\w+) (\w+)\?", question):
        a, b = find(m[1], m[2]), find(m[4], m[5])
        d = COLS.index(a["col"]) - COLS.index(b["col"])
        assert d != 0
        return "yes" if (d < 0) == (m[3] == "left") else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (above|below) the (\w+) (\w+)\?", question):
        a, b = find(m[1], m[2]), find(m[4], m[5])
        d = ROWS.index(a["row"]) - ROWS.index(b["row"])
        assert d != 0
        return "yes" if (d < 0) == (m[3] == "above") else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_vqa_answers_follow_scene_graph(records: list[dict]) -> None:
    yes_no = Counter()
    for r in records:
        objs = _objects(r)
        assert 4 <= len(r["questions"]) == len(r["answers"]) <= 6
        assert len(set(r["questions"])) == len(r["questions"])
        for q, a in zip(r["questions"], r["answers"], strict=True):
            assert _answer(q, objs) == a, (q, a, objs)
            if a in ("yes", "no"):
                yes_no[a] += 1
    assert yes_no["yes"] > 0.35 * sum(yes_no.values()) and yes_no["no"] > 0.35 * sum(yes_no.values())


def test_training_questions_never_name_held_out_pairs(records: list[dict]) -> None:
    held = [f"{c} {s}" for c, s in DEFAULT_HELD_OUT]
    for r in records:
        if r["split"] != "test_compositional":
            assert not any(h in q for q in r["questions"] for h in held)


def test_image_pixels_match_scene(records: list[dict]) -> None:
    for r in records[:150]:
        img = _decode(r)
        assert img.size == (64, 64)
        for o in _objects(r):
            assert img.getpixel(cell_center(o["row"], o["col"], 64)) == COLORS[o["color"]]
        # An empty cell's centre shows the dark background.
        used = {(o["row"], o["col"]) for o in _objects(r)}
        for row in ROWS:
            for col in COLS:
                if (row, col) not in used:
                    assert max(img.getpixel(cell_center(row, col, 64))) < 40


@pytest.mark.parametrize("size", [32, 64, 96])
def test_every_shape_stays_inside_its_cell(size: int) -> None:
    cell = size / 3
    for shape in SHAPES:
        for sz in SIZES:
            for seed in range(4):
                obj = {"shape": shape, "color": "cyan", "size": sz, "row": "middle", "col": "center"}
                img = np.asarray(Image.open(io.BytesIO(render_scene([obj], size, np.random.default_rng(seed)))))
                ys, xs = np.nonzero((img == COLORS["cyan"]).all(axis=-1))
                assert len(xs) > 0
                assert xs.min() >= cell - 0.5 and xs.max() <= 2 * cell + 0.5, (shape, sz, size)
                assert ys.min() >= cell - 0.5 and ys.max() <= 2 * cell + 0.5, (shape, sz, size)
                cx, cy = cell_center("middle", "center", size)
                assert tuple(img[cy, cx]) == COLORS["cyan"]


def test_impossible_request_raises() -> None:
    # Only 9 cells x 20 allowed colour-shape pairs x 2 sizes = 360 distinct one-object training scenes.
    with pytest.raises(RuntimeError):
        generate_synthetic(n_train=370, n_val=0, n_test=0, n_test_compositional=0, min_objects=1, max_objects=1)
    with pytest.raises(ValueError):
        generate_synthetic(n_train=5, held_out=(("pink", "circle"),))
