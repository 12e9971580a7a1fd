"""Offline, deterministic data augmentation that keeps images and text consistent.

* :func:`hflip_record` mirrors the image *and* the text (left<->right in captions, questions, answers,
  and the ``col`` of scene-graph objects in meta), so a flipped "red circle on the left" is still
  described truthfully.
* :func:`color_jitter` changes brightness, contrast and saturation but never hue: captions name
  colours ("a red circle"), and a hue shift would silently turn red into orange or purple and make
  the caption false. It works in HSV with hue untouched and clips only V and S, because clipping R,
  G, B separately (as a plain RGB multiply does) shifts the hue of saturated pixels.
* :func:`augment_records` adds augmented copies of a seeded fraction of the *train* records only
  (val/test must stay the real distribution), each with ``meta.augmented_from`` for provenance.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mmplatform.data.dataset import make_record
from mmplatform.data.images import BadImage, decode_image, encode_png
from mmplatform.data.text import flip_left_right

log = logging.getLogger(__name__)

_COL_FLIP = {"left": "right", "right": "left"}


def _meta_dict(meta: Any) -> dict[str, Any]:
    if isinstance(meta, dict):
        return copy.deepcopy(meta)
    if isinstance(meta, str) and meta:
        try:
            parsed = json.loads(meta)
        except ValueError:
            parsed = None
        # Unparseable meta is kept verbatim rather than lost.
        return parsed if isinstance(parsed, dict) else {"meta_unparsed": meta}
    return {}


def _mirror_scene_graph(meta: dict[str, Any]) -> None:
    """Mirror ``objects[*].col`` in meta, whether the scene graph is meta itself or one of its
    top-level values (e.g. ``meta["scene_graph"]``). In place."""
    holders = [meta] + [v for v in meta.values() if isinstance(v, dict)]
    for h in holders:
        objs = h.get("objects")
        if not isinstance(objs, list):
            continue
        for o in objs:
            if isinstance(o, dict) and isinstance(o.get("col"), str):
                o["col"] = _COL_FLIP.get(o["col"].lower(), o["col"])


def _derived(rec: dict[str, Any], im: Image.Image, captions: list[str], questions: list[str],
             answers: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    meta["augmented_from"] = rec["sample_id"]
    return make_record(encode_png(im), im.width, im.height, captions, questions, answers,
                       source=rec.get("source", ""), split=rec.get("split", ""), meta=meta)


def hflip_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A new record: image mirrored left-right (re-encoded as PNG), text and scene graph flipped.
    Raises :class:`~mmplatform.data.images.BadImage` if the image does not decode."""
    im = ImageOps.mirror(decode_image(rec["image"]))
    meta = _meta_dict(rec.get("meta"))
    _mirror_scene_graph(meta)
    meta["augmentation"] = "hflip"
    return _derived(
        rec, im,
        [flip_left_right(c) for c in rec.get("captions") or []],
        [flip_left_right(q) for q in rec.get("questions") or []],
        [flip_left_right(a) for a in rec.get("answers") or []],
        meta,
    )


# ------------------------------------------------------------------------------------- colour jitter

def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float RGB in [0, 1] -> (h in [0, 6), s, v), vectorised."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0.0)
    safe_c = np.where(c > 0, c, 1)
    h = np.where(v == r, ((g - b) / safe_c) % 6,
                 np.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = np.where(c > 0, h, 0.0)
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    z = np.zeros_like(h)
    sector = np.floor(h).astype(np.int64) % 6
    choices_r = [c, x, z, z, x, c]
    choices_g = [x, c, c, x, z, z]
    choices_b = [z, z, x, c, c, x]
    r = np.choose(sector, choices_r)
    g = np.choose(sector, choices_g)
    b = np.choose(sector, choices_b)
    return np.stack([r + m, g + m, b + m], axis=-1)


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2) -> Image.Image:
    """Random brightness, contrast and saturation, hue unchanged (see module docstring for why).

    Factors are drawn uniformly from ``[max(0, 1 - x), 1 + x]`` in a fixed order (brightness,
    contrast, saturation) — always three draws, so the generator advances the same way whatever the
    parameters. Brightness scales V, contrast scales V around the image's mean V, saturation scales S;
    V and S are clipped to [0, 1]. Hue is exact in float; only the final rounding to 8 bits can move
    it, by well under a degree for saturated pixels. Deterministic for a given generator state.
    """
    return _apply_jitter(img, *_draw_factors(rng, brightness, contrast, saturation))


def _draw_factors(rng: np.random.Generator, brightness: float, contrast: float,
                  saturation: float) -> tuple[float, float, float]:
    fb, fc, fs = (float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x)) for x in (brightness, contrast, saturation))
    return fb, fc, fs


def _apply_jitter(img: Image.Image, fb: float, fc: float, fs: float) -> Image.Image:
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    h, s, v = _rgb_to_hsv(rgb)
    v = np.clip(v * fb, 0.0, 1.0)
    mean_v = float(v.mean()) if v.size else 0.0
    v = np.clip(mean_v + fc * (v - mean_v), 0.0, 1.0)
    s = np.clip(s * fs, 0.0, 1.0)
    out = _hsv_to_rgb(h, s, v)
    return Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------- whole dataset

def _unit(seed: int, sample_id: str, what: str) -> float:
    """Uniform [0, 1) from sha256 of (seed, sample_id, purpose): per-record and order-independent, so
    the choice for a record does not change when other records are added or reordered."""
    d = hashlib.sha256(f"{seed}:{what}:{sample_id}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


def augment_records(
    records: list[dict[str, Any]],
    *,
    seed: int = 0,
    flip_fraction: float = 0.5,
    jitter_fraction: float = 0.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
) -> list[dict[str, Any]]:
    """All input records unchanged and in order, followed by new augmented copies.

    Only records with ``split == "train"`` that are not themselves augmented copies
    (no ``augmented_from`` in meta; so re-running on an augmented dataset adds nothing twice) are
    eligible. Each one independently gets an hflip copy with probability ``flip_fraction`` and,
    separately, a colour-jittered copy of the *original* with probability ``jitter_fraction``.
    Separate copies (rather than jittering flipped ones) keep every derived record one transform away
    from a real one, with one ``augmentation`` name. Choices and jitter factors come from sha256 of
    (seed, sample_id), so the same input and seed give the same output bytes.

    A copy whose sample_id already exists (e.g. a left-right symmetric PNG flips to identical bytes)
    is skipped, keeping sample_ids unique. A record whose image fails to decode is left as is
    (logged); nothing is ever dropped here.
    """
    for name, x in (("flip_fraction", flip_fraction), ("jitter_fraction", jitter_fraction)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}")
    out = list(records)
    seen = {r["sample_id"] for r in records}
    added = {"hflip": 0, "color_jitter": 0}
    for rec in records:
        if rec.get("split") != "train":
            continue
        meta = _meta_dict(rec.get("meta"))
        if "augmented_from" in meta:
            continue
        new: list[dict[str, Any]] = []
        try:
            if _unit(seed, rec["sample_id"], "hflip") < flip_fraction:
                new.append(hflip_record(rec))
            if _unit(seed, rec["sample_id"], "jitter") < jitter_fraction:
                new.append(_jitter_record(rec, meta, seed, brightness, contrast, saturation))
        except BadImage as e:
            log.warning("not augmenting %s (%s): %s", rec["sample_id"], rec.get("source"), e.reason)
            continue
        for n in new:
            if n["sample_id"] in seen:
                log.debug("skipping augmented copy of %s: identical to an existing image", rec["sample_id"])
                continue
            seen.add(n["sample_id"])
            added[json.loads(n["meta"])["augmentation"]] += 1
            out.append(n)
    log.info("augment: %d records in, added %s", len(records), added)
    return out


def _jitter_record(rec: dict[str, Any], meta: dict[str, Any], seed: int, brightness: float,
                   contrast: float, saturation: float) -> dict[str, Any]:
    rng_seed = int.from_bytes(hashlib.sha256(f"{seed}:jitter-rng:{rec['sample_id']}".encode()).digest()[:8],
                              "big")
    factors = _draw_factors(np.random.default_rng(rng_seed), brightness, contrast, saturation)
    im = _apply_jitter(decode_image(rec["image"]), *factors)
    meta = dict(meta, augmentation="color_jitter",
                jitter={k: round(f, 6) for k, f in zip(("brightness", "contrast", "saturation"), factors,
                                                         strict=True)})
    return _derived(rec, im, list(rec.get("captions") or []), list(rec.get("questions") or []),
                    list(rec.get("answers") or []), meta)
