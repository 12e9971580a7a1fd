"""Composition foils: known input/output pairs, and on synthetic scenes every foil is false for its image."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from mmplatform.data.foils import foils, reverse_relation, shuffle_order, swap_attributes
from mmplatform.data.synthetic import COLORS, POSITION_PHRASES, SHAPES, SIZES, _relation, generate_synthetic

# ----------------------------------------------------------------------------- known pairs


@pytest.mark.parametrize(("caption", "expected"), [
    ("a red circle and a blue square", "a blue circle and a red square"),
    ("there is a red circle above a blue square", "there is a blue circle above a red square"),
    ("a large yellow triangle in the top right, a large purple triangle in the center and a small yellow diamond"
     " on the right",
     "a large purple triangle in the top right, a large yellow triangle in the center and a small yellow diamond"
     " on the right"),
    ("Red car next to a white house.", "White car next to a red house."),
    # the first pair shares its colour, the first and third differ
    ("a red circle, a red square and a blue triangle", "a blue circle, a red square and a red triangle"),
    # swapping between objects that differ in nothing else would still be true: next pair
    ("a red circle on the left and a blue circle on the right",
     "a blue circle on the left and a red circle on the right"),
])
def test_swap_attributes_known_pairs(caption, expected):
    assert swap_attributes(caption) == expected


@pytest.mark.parametrize("caption", [
    "a red circle and a red square",                      # both objects share the colour
    "a small red circle in the center and a large red square on the left",
    "a red circle and a blue circle",                     # otherwise identical objects: still true after a swap
    "a black and white photo of a dog",                   # one object phrase only
    "two dogs playing in the grass",                      # no attribute at all
    "",
])
def test_swap_attributes_not_applicable(caption):
    assert swap_attributes(caption) is None


def test_swap_sizes_and_bad_attribute():
    caption = "a large cyan circle in the center and a small cyan circle in the bottom left"
    assert swap_attributes(caption) is None  # same colour
    assert swap_attributes(caption, "size") == (
        "a small cyan circle in the center and a large cyan circle in the bottom left")
    with pytest.raises(ValueError, match="attribute"):
        swap_attributes(caption, "material")


@pytest.mark.parametrize(("caption", "expected"), [
    ("a red circle above a blue square", "a blue square above a red circle"),
    ("there is a red circle above a blue square", "there is a blue square above a red circle"),
    ("the dog is under the table", "the table is under the dog"),
    ("A man in a red shirt to the left of a car.", "A car to the left of a man in a red shirt."),
    ("a green triangle and a red circle above a blue square", "a green triangle and a blue square above a red circle"),
    ("a large red circle in the top left, above and to the left of a small blue square in the bottom right",
     "a small blue square in the bottom right, above and to the left of a large red circle in the top left"),
    # no binary relation: one position word flipped
    ("a small red circle on the left", "a small red circle on the right"),
    ("a large cyan diamond at the top and a small green diamond in the bottom left",
     "a large cyan diamond at the bottom and a small green diamond in the bottom left"),
    ("a large cyan circle in the center and a small cyan circle in the bottom left",
     "a large cyan circle in the center and a small cyan circle in the top left"),
    ("a dog on the left side of the road", "a dog on the right side of the road"),
])
def test_reverse_relation_known_pairs(caption, expected):
    assert reverse_relation(caption) == expected


@pytest.mark.parametrize("caption", [
    "a large red circle in the center",                   # nothing to flip
    "two dogs playing in the grass",
    # flipping either would move one identical object onto the other: still true
    "a small red circle on the left and a small red circle on the right",
    "a dog above a dog",
    "a small red circle above a small red circle",
])
def test_reverse_relation_not_applicable(caption):
    assert reverse_relation(caption) is None


def test_shuffle_order_differs_keeps_the_words_and_accepts_both_rngs():
    caption = "a small red circle on the left and a blue square"
    for rng in (np.random.default_rng(0), random.Random(0)):
        for _ in range(20):
            foil = shuffle_order(caption, rng)
            assert foil is not None and foil != caption
            assert Counter(foil.split()) == Counter(caption.split())
    assert shuffle_order("dog dog dog", np.random.default_rng(0)) is None
    assert shuffle_order("dog", np.random.default_rng(0)) is None


def test_shuffle_order_falls_back_when_the_rng_keeps_returning_the_identity():
    class Identity(random.Random):
        def shuffle(self, x):  # type: ignore[override]
            return None

    assert shuffle_order("red circle", Identity(), tries=3) == "circle red"


def test_foils_dict_leaves_out_what_does_not_apply():
    rng = np.random.default_rng(0)
    out = foils("a red circle above a blue square", rng)
    assert out["attribute"] == "a blue circle above a red square"
    assert out["relation"] == "a blue square above a red circle"
    assert set(out) == {"attribute", "relation", "order"}
    assert set(foils("two dogs playing in the grass", rng)) == {"order"}
    assert foils("dog", rng) == {}
    # size swap when no colour swap exists
    out = foils("a large red circle and a small red square", rng)
    assert out["attribute"] == "a small red circle and a large red square"


# ----------------------------------------------------------------------------- synthetic scenes: foils are false

_POS = {v: k for k, v in POSITION_PHRASES.items()}
_OBJ = (rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
        rf"({'|'.join(sorted(_POS, key=len, reverse=True))})")
_REL_WORDS = r"(?:above|below)(?: and to the (?:left|right) of)?|to the (?:left|right) of"
_RELATION = re.compile(rf"^({_OBJ}), ({_REL_WORDS}) ({_OBJ})$")


def _claimed(caption: str) -> Counter:
    return Counter((s, c, sh, *_POS[p]) for s, c, sh, p in re.findall(_OBJ, caption))


def _scene(meta: dict) -> Counter:
    return Counter((o["size"], o["color"], o["shape"], o["row"], o["col"]) for o in meta["objects"])


def _obj(groups: tuple[str, ...]) -> dict[str, str]:
    size, color, shape, where = groups
    row, col = _POS[where]
    return {"size": size, "color": color, "shape": shape, "row": row, "col": col}


def _is_false(foil: str, meta: dict) -> bool:
    if _claimed(foil) != _scene(meta):
        return True
    m = _RELATION.match(foil)  # same objects, so only the relation can be wrong
    if m is None:
        return False
    a = _obj(m.group(2, 3, 4, 5))
    b = _obj(m.group(8, 9, 10, 11))
    return _relation(a, b) != m.group(6)


@pytest.fixture(scope="module")
def scenes():
    import json

    recs = generate_synthetic(seed=3, n_train=60, n_val=0, n_test=0, n_test_compositional=10, captions_per_image=10)
    return [(r["captions"], json.loads(r["meta"]) if isinstance(r["meta"], str) else r["meta"]) for r in recs]


def test_every_synthetic_caption_reads_back_as_its_scene(scenes):
    # guards the parser below: a caption that it misread would make the falsity check vacuous
    for captions, meta in scenes:
        for c in captions:
            assert _claimed(c) == _scene(meta), c
            assert _is_false(c, meta) is False


def test_synthetic_foils_are_false_for_their_image(scenes):
    rng = np.random.default_rng(0)
    made = Counter()
    for captions, meta in scenes:
        for c in captions:
            for kind, foil in foils(c, rng).items():
                assert foil != c
                made[kind] += 1
                if kind != "order":
                    assert _is_false(foil, meta), (kind, c, foil)
    n_multi = sum(len(caps) for caps, meta in scenes if len(meta["objects"]) > 1)
    # each kind applies to most multi-object captions (attribute needs two objects that differ)
    assert made["attribute"] > 0.6 * n_multi and made["relation"] > 0.8 * n_multi, made
    assert made["order"] == sum(len(caps) for caps, _ in scenes)
