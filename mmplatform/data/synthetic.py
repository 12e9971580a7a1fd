"""Built-in synthetic dataset: procedural scenes of coloured shapes on a 3x3 grid (CLEVR-CoGenT style).

Each image shows 1..4 objects (shape, colour, size), at most one per cell of a 3x3 grid, on a near-black
background. Every image comes with several differently worded captions naming each object with its size,
colour, shape and coarse position, plus short VQA pairs whose answers follow from the scene graph, which
is kept in ``meta``.

Splits: ``train`` / ``val`` / ``test`` never contain a held-out colour-shape combination
(:data:`DEFAULT_HELD_OUT`); every ``test_compositional`` scene contains at least one, so that split
measures compositional generalisation (each colour and each shape is still seen in training, only the
pairing is new). No two images share a full description (:func:`describe`), so retrieval has exactly one
right answer per query. Everything is drawn from ``numpy.random.default_rng(seed)`` (and per-image child
generators seeded from it), so the same arguments give byte-identical records.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmplatform.data.dataset import make_record

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
    "purple": (160, 40, 220),
    "cyan": (30, 220, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Radius as a fraction of the image side; a large shape (diameter 0.28) must fit in a cell (side 1/3).
SIZES: dict[str, float] = {"small": 0.08, "large": 0.14}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
# Each colour and each shape appears in exactly one held-out pair, so all are still seen in training.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "square"),
)
POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Flat near-black background: background noise made PNGs ~10x larger and ~6x slower to encode for no gain.
BACKGROUND: tuple[int, int, int] = (12, 12, 16)
MAX_OBJECTS = len(ROWS) * len(COLS)
MIN_IMAGE_SIZE = 32

_COLOR_NAMES = tuple(COLORS)
_SIZE_NAMES = tuple(SIZES)
_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}  # fixed -> deterministic bytes

Obj = dict[str, str]


# ----------------------------------------------------------------------------- scene graph helpers
def _cell_index(obj: Mapping[str, Any]) -> int:
    return ROWS.index(obj["row"]) * len(COLS) + COLS.index(obj["col"])


def position_phrase(obj: Mapping[str, Any]) -> str:
    """Coarse position of an object in words, e.g. ``"in the top left"``."""
    return POSITION_PHRASES[(obj["row"], obj["col"])]


def describe(objects: Sequence[Mapping[str, Any]]) -> str:
    """Canonical full description of a scene (objects in reading order with size, colour, shape, cell).

    Two scenes with the same description are indistinguishable up to jitter, so the generator
    keeps these unique across all splits."""
    parts = [f"{o['size']} {o['color']} {o['shape']} at {o['row']} {o['col']}"
             for o in sorted(objects, key=_cell_index)]
    return "; ".join(parts)


def is_compositional(objects: Sequence[Mapping[str, Any]],
                     held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT) -> bool:
    """True when the scene contains at least one held-out colour-shape combination."""
    held = {tuple(h) for h in held_out}
    return any((o["color"], o["shape"]) in held for o in objects)


def cell_center(row: str, col: str, image_size: int) -> tuple[int, int]:
    """Pixel (x, y) of a cell's centre; the object in that cell always covers this pixel."""
    cell = image_size / 3
    return int((COLS.index(col) + 0.5) * cell), int((ROWS.index(row) + 0.5) * cell)


# ----------------------------------------------------------------------------- rendering
def _inner_radius(shape: str, r: float) -> float:
    """Radius of the largest disc centred on the shape's centre that the drawn shape contains."""
    return {"circle": r, "square": 0.85 * r, "triangle": 0.5 * r, "diamond": r / math.sqrt(2)}[shape]


def _max_jitter(shape: str, r: float, image_size: int) -> int:
    # "A couple of px" at 64 px, scaled with the image; capped so the shape stays inside its cell and
    # still covers the cell-centre pixel (1 px margin for rasterisation).
    budget = max(1, round(image_size / 32))
    cell_slack = image_size / 6 - r - 1
    centre_slack = (_inner_radius(shape, r) - 1) / math.sqrt(2)
    return max(0, min(budget, math.floor(cell_slack), math.floor(centre_slack)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # slightly smaller half-side so a square looks about as big as a circle
        draw.polygon([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "triangle":
        # Equilateral, circumradius r, centroid at the centre.
        dx, dy = r * math.sqrt(3) / 2, r / 2
        draw.polygon([(cx, cy - r), (cx + dx, cy + dy), (cx - dx, cy + dy)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: Sequence[Mapping[str, Any]], image_size: int, rng: np.random.Generator) -> bytes:
    """Draw a scene as RGB PNG bytes (``image_size`` square); ``rng`` drives the per-object jitter."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = SIZES[o["size"]] * image_size
        cx, cy = cell_center(o["row"], o["col"], image_size)
        j = _max_jitter(o["shape"], r, image_size)
        jx, jy = (int(v) for v in rng.integers(-j, j + 1, size=2)) if j else (0, 0)
        _draw_shape(draw, o["shape"], cx + jx, cy + jy, r, COLORS[o["color"]])
    buf = io.BytesIO()
    img.save(buf, **_PNG_OPTIONS)
    return buf.getvalue()


# ----------------------------------------------------------------------------- captions
def _phrase(o: Mapping[str, Any]) -> str:
    return f"a {o['size']} {o['color']} {o['shape']} {position_phrase(o)}"


def _and_list(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _comma_and_list(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _count_shapes(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}"


def _relation(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Where ``a`` is relative to ``b`` ("above and to the left of"); the cells differ, so never empty."""
    ra, rb = ROWS.index(a["row"]), ROWS.index(b["row"])
    ca, cb = COLS.index(a["col"]), COLS.index(b["col"])
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def _orders(objs: Sequence[Obj]) -> dict[str, list[str]]:
    reading = sorted(objs, key=_cell_index)
    return {
        "reading": [_phrase(o) for o in reading],
        "reverse": [_phrase(o) for o in reversed(reading)],
        "large_first": [_phrase(o) for o in sorted(reading, key=lambda o: o["size"] != "large")],
        "small_first": [_phrase(o) for o in sorted(reading, key=lambda o: o["size"] != "small")],
        "columns": [_phrase(o) for o in sorted(reading, key=lambda o: (COLS.index(o["col"]), ROWS.index(o["row"])))],
        "by_color": [_phrase(o) for o in sorted(reading, key=lambda o: _COLOR_NAMES.index(o["color"]))],
    }


# Each template gives a different frame, so captions of one image always differ in wording; object order
# varies too (reading order, reverse, by size, by column, by colour). A template is (frame before, object
# order, list style, frame after); "{count}" in a frame becomes "two shapes" and so on.
Template = tuple[str, str, str, str]
_TEMPLATES: tuple[Template, ...] = (
    ("", "reading", "and", ""),
    ("there is ", "reverse", "and", ""),
    ("{count}: ", "reading", "and", ""),
    ("an image with ", "large_first", "comma", ""),
    ("", "large_first", "and", " on a dark background"),
    ("this picture shows ", "columns", "and", ""),
    ("{count} in total: ", "columns", "comma", ""),
    ("a dark scene with ", "by_color", "and", ""),
    ("a picture of ", "small_first", "and", ""),
    ("the image contains ", "reverse", "comma", ""),
)
MAX_CAPTIONS = len(_TEMPLATES)


def write_templates(objects: Sequence[Obj], templates: Sequence[Template]) -> list[str]:
    """The scene written in each of ``templates``."""
    orders, count = _orders(objects), _count_shapes(len(objects))
    return [before.replace("{count}", count) + (_and_list if style == "and" else _comma_and_list)(orders[order])
            + after for before, order, style, after in templates]


def recombined_templates() -> list[Template]:
    """Every template made of the generator's parts (each frame before, order, list style and frame after with
    any other): the wordings a captioner could write by recombining what it was trained on."""
    parts = [list(dict.fromkeys(t[i] for t in _TEMPLATES)) for i in range(4)]
    return list(itertools.product(*parts))


def template_captions(objects: Sequence[Obj]) -> list[str]:
    """The scene written in each of the generator's wordings: ``_TEMPLATES`` in order (the reading-order caption
    first), then for two objects the relation caption; what a captioner that knows the scene but not which
    wordings were drawn can write."""
    out = write_templates(objects, _TEMPLATES)
    if len(objects) == 2:
        a, b = sorted(objects, key=_cell_index)
        out.append(f"{_phrase(a)}, {_relation(a, b)} {_phrase(b)}")
    return out


def make_captions(objects: Sequence[Obj], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` differently worded captions; the first is always the plain reading-order description."""
    if not 1 <= n <= MAX_CAPTIONS:
        raise ValueError(f"captions_per_image must be in 1..{MAX_CAPTIONS}, got {n}")
    first, *pool = template_captions(objects)
    picks = rng.permutation(len(pool))[: n - 1]
    return [first] + [pool[int(i)] for i in picks]


# ----------------------------------------------------------------------------- VQA
def make_questions(objects: Sequence[Obj], rng: np.random.Generator, *, compositional: bool = False,
                   held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT,
                   min_questions: int = 4, max_questions: int = 6) -> tuple[list[str], list[str], list[str]]:
    """Sample ``min..max`` question/answer pairs answerable from the scene graph.

    Returns ``(questions, answers, types)``. Objects are only referred to by a name that is unique in the
    scene. Existence and relation questions are balanced between yes and no. Negative existence
    questions in non-compositional scenes never name a held-out combination, so no training question
    mentions one."""
    n = len(objects)
    shape_n = Counter(o["shape"] for o in objects)
    color_n = Counter(o["color"] for o in objects)
    cs_n = Counter((o["color"], o["shape"]) for o in objects)
    unique_cs = [o for o in objects if cs_n[(o["color"], o["shape"])] == 1]

    def shuffled(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [items[int(i)] for i in rng.permutation(len(items))]

    pools: dict[str, list[tuple[str, str]]] = {}
    count_q = ("how many shapes are there?", "how many objects are in the image?")[int(rng.integers(2))]
    pools["count"] = [(count_q, NUMBER_WORDS[n])]
    pools["color"] = shuffled([(f"what color is the {o['shape']}?", o["color"])
                               for o in objects if shape_n[o["shape"]] == 1])
    pools["shape"] = shuffled([(f"what shape is the {o['color']} object?", o["shape"])
                               for o in objects if color_n[o["color"]] == 1])
    pools["size"] = shuffled([(f"what size is the {o['color']} {o['shape']}?", o["size"]) for o in unique_cs])

    held = {tuple(h) for h in held_out}
    yes = shuffled([(f"is there a {c} {s}?", "yes") for c, s in sorted(cs_n)])
    no = shuffled([(f"is there a {c} {s}?", "no") for c in _COLOR_NAMES for s in SHAPES
                   if (c, s) not in cs_n and (compositional or (c, s) not in held)])
    first, second = (yes, no) if rng.random() < 0.5 else (no, yes)
    exist = [q for pair in zip(first, second, strict=False) for q in pair]
    exist += first[len(second):] + second[len(first):]
    pools["exist"] = exist

    left_right: list[tuple[str, str]] = []
    above_below: list[tuple[str, str]] = []
    for i, a in enumerate(unique_cs):
        for b in unique_cs[i + 1:]:
            # Random order and wording per pair so that yes and no are equally likely.
            x, y = (a, b) if rng.random() < 0.5 else (b, a)
            nx, ny = f"the {x['color']} {x['shape']}", f"the {y['color']} {y['shape']}"
            dc = COLS.index(x["col"]) - COLS.index(y["col"])
            if dc:
                word = ("left", "right")[int(rng.integers(2))]
                ans = (dc < 0) == (word == "left")
                left_right.append((f"is {nx} to the {word} of {ny}?", "yes" if ans else "no"))
            dr = ROWS.index(x["row"]) - ROWS.index(y["row"])
            if dr:
                word = ("above", "below")[int(rng.integers(2))]
                ans = (dr < 0) == (word == "above")
                above_below.append((f"is {nx} {word} {ny}?", "yes" if ans else "no"))
    pools["left_right"] = shuffled(left_right)
    pools["above_below"] = shuffled(above_below)

    # Round-robin over question types in a random order, so each image gets a mix of types.
    types = [t for t in pools if pools[t]]
    types = [types[int(i)] for i in rng.permutation(len(types))]
    k = int(rng.integers(min_questions, max_questions + 1))
    questions: list[str] = []
    answers: list[str] = []
    kinds: list[str] = []
    cursor = dict.fromkeys(types, 0)
    while len(questions) < k and any(cursor[t] < len(pools[t]) for t in types):
        for t in types:
            if len(questions) >= k:
                break
            if cursor[t] < len(pools[t]):
                q, a = pools[t][cursor[t]]
                cursor[t] += 1
                questions.append(q)
                answers.append(a)
                kinds.append(t)
    return questions, answers, kinds


# ----------------------------------------------------------------------------- generator
def _count_sampler(min_objects: int, max_objects: int) -> list[float]:
    # Single objects get a third of the weight of larger counts (1..4 -> .1, .3, .3, .3): multi-object
    # scenes are the interesting ones, and the single-object scene space is small anyway.
    weights = [1.0 if k == 1 else 3.0 for k in range(min_objects, max_objects + 1)]
    total = sum(weights)
    return list(np.cumsum([w / total for w in weights]))


def _sample_objects(rng: np.random.Generator, cum: list[float], min_objects: int) -> list[Obj]:
    n = min_objects + min(bisect.bisect_right(cum, rng.random()), len(cum) - 1)
    cells = sorted(int(c) for c in rng.permutation(MAX_OBJECTS)[:n])
    attrs = rng.integers(0, [len(_COLOR_NAMES), len(SHAPES), len(_SIZE_NAMES)], size=(n, 3))
    return [
        {"shape": SHAPES[s], "color": _COLOR_NAMES[c], "size": _SIZE_NAMES[z],
         "row": ROWS[cell // 3], "col": COLS[cell % 3]}
        for cell, (c, s, z) in zip(cells, attrs.tolist(), strict=False)
    ]


def _validate(counts: dict[str, int], image_size: int, captions_per_image: int, min_objects: int,
              max_objects: int, held_out: Sequence[tuple[str, str]], seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, c in counts.items():
        if c < 0:
            raise ValueError(f"n_{name} must be >= 0, got {c}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= captions_per_image <= MAX_CAPTIONS:
        raise ValueError(f"captions_per_image must be in 1..{MAX_CAPTIONS}, got {captions_per_image}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                         f"got {min_objects}..{max_objects}")
    for combo in held_out:
        if len(combo) != 2 or combo[0] not in COLORS or combo[1] not in SHAPES:
            raise ValueError(f"held_out entries must be (colour, shape) pairs from COLORS/SHAPES, got {combo!r}")
    if counts["test_compositional"] and not held_out:
        raise ValueError("n_test_compositional > 0 needs at least one held_out combination")


def generate_synthetic(*, seed: int = 0, n_train: int = 8000, n_val: int = 500, n_test: int = 1000,
                       n_test_compositional: int = 1000, image_size: int = 64, captions_per_image: int = 5,
                       min_objects: int = 1, max_objects: int = 4,
                       held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT) -> list[dict[str, Any]]:
    """Generate the synthetic dataset as canonical records (see :func:`mmplatform.data.dataset.make_record`).

    Records come grouped by split (train, val, test, test_compositional), in generation order within each.
    Scenes are rejection-sampled: duplicates of an earlier scene's :func:`describe` are dropped, scenes with
    a held-out combination only fill ``test_compositional``, and other scenes are dealt to train/val/test
    with probability proportional to what each still needs (so the three splits are identically
    distributed). Raises ``RuntimeError`` if the requested counts cannot be reached (scene space exhausted).
    """
    held = tuple((str(c), str(s)) for c, s in held_out)
    need = {"train": n_train, "val": n_val, "test": n_test, "test_compositional": n_test_compositional}
    _validate(need, image_size, captions_per_image, min_objects, max_objects, held, seed)
    held_set = set(held)
    iid_splits = ("train", "val", "test")

    rng = np.random.default_rng(seed)
    cum = _count_sampler(min_objects, max_objects)
    seen: set[str] = set()
    accepted: list[tuple[str, list[Obj], bool]] = []
    total = sum(need.values())
    max_attempts = 1_000 + 50 * total  # ~1.8 draws per image are needed with the defaults
    attempts = 0
    while len(accepted) < total:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"synthetic: could not fill the splits after {max_attempts} sampled scenes "
                f"(still needed {need}); lower the counts or widen min/max_objects/held_out")
        objs = _sample_objects(rng, cum, min_objects)
        key = describe(objs)
        if key in seen:
            continue
        comp = any((o["color"], o["shape"]) in held_set for o in objs)
        if comp:
            if not need["test_compositional"]:
                continue
            split = "test_compositional"
        else:
            remaining = sum(need[s] for s in iid_splits)
            if not remaining:
                continue
            pick = int(rng.integers(remaining))
            for split in iid_splits:
                if pick < need[split]:
                    break
                pick -= need[split]
        need[split] -= 1
        seen.add(key)
        accepted.append((split, objs, comp))

    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in ("train", "val", "test", "test_compositional")}
    source = f"synthetic:seed={seed}"
    for index, (split, objs, comp) in enumerate(accepted):
        # A child generator per image: rendering and text of image i do not depend on how many scenes
        # were rejected around it, only on (seed, i).
        img_rng = np.random.default_rng([int(seed), index])
        png = render_scene(objs, image_size, img_rng)
        captions = make_captions(objs, captions_per_image, img_rng)
        questions, answers, kinds = make_questions(objs, img_rng, compositional=comp, held_out=held)
        meta = {"objects": objs, "compositional": comp, "generator": "synthetic", "seed": int(seed),
                "question_types": kinds}
        by_split[split].append(make_record(png, image_size, image_size, captions, questions, answers,
                                           source=source, split=split, meta=meta))
    logger.info("synthetic: %d images (%s) from %d sampled scenes, seed=%d", total,
                ", ".join(f"{s}={len(v)}" for s, v in by_split.items()), attempts, seed)
    return [r for recs in by_split.values() for r in recs]
