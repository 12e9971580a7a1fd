"""Per-image quality checks with CleanVision's issue types and scores, computed several times faster.

CleanVision (cleanlab/cleanvision, ``issue_managers/image_property.py``) checks nine issue types; this
module computes the seven per-image ones with the same scores (a float in [0, 1], lower = worse, flagged
when ``score < threshold``) and the same default thresholds:

================  =============================================================  =========
issue             score                                                          threshold
================  =============================================================  =========
dark              99th percentile of perceived brightness                        0.32
light             1 - 5th percentile of perceived brightness                     0.05
blurry            ``min(1, (1 - exp(-0.01 edge_std)) + s)`` on a 64-px grey      0.29
                  image; ``s = 1 - exp(-0.01 std(grey histogram counts))`` when
                  above 0.18, else 0 (so flat images are not called blurry)
low_information   ``min(1, 0.1 * entropy)`` of the image histogram (bits)        0.3
odd_aspect_ratio  ``min(w/h, h/w)``                                              0.35
odd_size          ``1 - |sqrt(wh) - mid| / (upper - lower)``, fences at          0.5
                  Q1 - 3 IQR and Q3 + 3 IQR of the dataset (:func:`score_images`)
grayscale         share of pixels with colour (see below)                        0.01
================  =============================================================  =========

Perceived brightness is ``sqrt(0.241 r^2 + 0.691 g^2 + 0.068 b^2) / 255`` (Darel Rex Finley's HSP
model, as CleanVision uses). Exact duplicates are groups of identical bytes (:func:`exact_duplicate_groups`;
CleanVision hashes the decoded pixels with md5); near duplicates live in :mod:`mmplatform.data.neardup`.

Why faster: CleanVision decodes every file at full resolution (twice: once for the properties, once
for the duplicate hashes) and takes float64 percentiles over every pixel. Here a JPEG is decoded with
libjpeg's DCT-domain scaling (``decode_image(draft=...)``, 1/2..1/8 of the size for a fraction of the
cost), other formats are box-reduced, and every statistic is taken once, vectorised with numpy, on an
image of about :data:`CHECK_SIDE` pixels; the 64-pixel grey image CleanVision's blur check uses is
resampled from it. ``bench/image_checks_bench.py`` measures speed and flag agreement against
CleanVision on the same files.

Where this deliberately differs from CleanVision:

* grayscale: CleanVision flags an image iff its *file* is stored in PIL mode ``L``, so a grey photo
  saved as RGB passes and an ``LA``/``P`` grey image passes. Every image here is decoded to RGB, so the
  check looks at the pixels: the score is the share of pixels whose channels differ by more than
  :data:`GRAY_TOLERANCE` level (grey content stored as RGB has equal channels, JPEG included: libjpeg's
  fixed-point chroma weights sum exactly to zero for grey). Files stored as ``L`` score 0, as in
  CleanVision; so do colour images washed out to within a level of grey (almost white or black).
* low_information: PIL's ``Image.entropy()`` (what CleanVision calls) pools the three channel
  histograms of an RGB image, which adds ``log2(3)`` bits compared with the same picture stored as
  ``L``. Here grey content uses its single-channel histogram whatever the storage mode, so a grey
  image gets the score CleanVision gives it when it is stored as ``L``.
* odd_size: when the inter-quartile range of sizes is zero CleanVision normalises by the median size
  and raises its threshold to 1.0, flagging every image whose size differs at all from the common
  one; here the threshold stays as configured (default 0.5: flagged below half or above 1.5 times the
  common size), which suits web data where most, but not all, images share a size.
* The statistics are taken on a downscaled image, so percentiles and entropy differ slightly from a
  full-resolution computation (tests bound the difference; the bench reports flag agreement).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from mmplatform.data.images import FULL_SIZE_KEY, BadImage, decode_image

log = logging.getLogger(__name__)

ISSUE_TYPES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")

# Side (pixels) of the image the statistics are taken on: the decoded image is reduced by an integer
# box factor to a longest side in [CHECK_SIDE, 2*CHECK_SIDE). Large enough that brightness-percentile and
# entropy scores stay within ~0.03 of a full-resolution computation on 95% of the bench's photos (worst
# ~0.1), small enough to keep decoding and statistics ~1-2 ms an image.
CHECK_SIDE = 192
# CleanVision's MAX_RESOLUTION_FOR_BLURRY_DETECTION: the blur check runs on a grey image this size.
BLUR_SIDE = 64
# CleanVision's normalising factors (get_default_params of ImagePropertyIssueManager).
ENTROPY_FACTOR = 0.1
BLUR_FACTOR = 0.01
BLUR_COLOR_THRESHOLD = 0.18
# A pixel counts as coloured when max(r, g, b) - min(r, g, b) exceeds this many levels (of 255); 1 allows
# for encoders whose RGB -> YCbCr rounding leaves grey off by one.
GRAY_TOLERANCE = 1

# HSP perceived brightness (CleanVision's calculate_brightness): sqrt(0.241 r^2 + 0.691 g^2 + 0.068 b^2) / 255.
_BRIGHT_WEIGHTS = (np.array([0.241, 0.691, 0.068]) / 255.0**2).astype(np.float32)


class QualityThresholds(BaseModel):
    """Flag an image for an issue when its score (lower = worse) is below the threshold.
    Defaults are CleanVision 0.3's (grayscale has none there: it flags files stored as ``L``)."""

    model_config = ConfigDict(extra="forbid")

    dark: float = Field(0.32, ge=0.0, le=1.0, description="99th-percentile perceived brightness below this is dark")
    light: float = Field(0.05, ge=0.0, le=1.0,
                         description="1 - 5th-percentile perceived brightness below this is light (washed out)")
    blurry: float = Field(0.29, ge=0.0, le=1.0,
                          description="edge-strength score of the 64-px grey image below this is blurry")
    low_information: float = Field(0.3, ge=0.0, le=1.0,
                                   description="0.1 * histogram entropy (bits) below this is low information")
    odd_aspect_ratio: float = Field(0.35, ge=0.0, le=1.0,
                                    description="min(w/h, h/w) below this is an odd aspect ratio")
    odd_size: float = Field(0.5, ge=0.0, le=1.0,
                            description="distance of sqrt(w*h) from the middle of the dataset's IQR fences, "
                                        "as 1 - distance / fence width; below this is an odd size")
    odd_size_iqr_factor: float = Field(3.0, gt=0.0,
                                       description="fences at Q1 - k*IQR and Q3 + k*IQR of sqrt(w*h) (k=3 as "
                                                   "CleanVision)")
    grayscale: float = Field(0.01, ge=0.0, le=1.0,
                             description="share of coloured pixels (channels more than 1 level apart) below "
                                         "this is grayscale")


def _as_thresholds(thresholds: QualityThresholds | dict[str, Any] | None) -> QualityThresholds:
    if thresholds is None:
        return QualityThresholds()
    if isinstance(thresholds, QualityThresholds):
        return thresholds
    return QualityThresholds.model_validate(thresholds)


def decode_for_checks(data: bytes, *, max_side: int = CHECK_SIDE, max_bytes: int = 20_000_000,
                      max_pixels: int = 50_000_000) -> tuple[Image.Image, int, int]:
    """Safely decode ``data`` (raises :class:`BadImage`) to an RGB image whose longest side is in
    ``[max_side, 2*max_side)`` (or smaller when the file is), plus the file's full width and height.

    JPEG uses DCT-domain scaling (truncated files are still refused); other formats are decoded in
    full and box-reduced by an integer factor (:meth:`PIL.Image.Image.reduce`, exact averaging).
    """
    im = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=max_side)
    width, height = im.info.get(FULL_SIZE_KEY, im.size)
    factor = max(im.size) // max_side
    if factor >= 2:
        im = im.reduce(factor)
    return im, int(width), int(height)


def _percentiles_of_sqrt(x: np.ndarray, qs: Sequence[float]) -> list[float]:
    """``np.percentile(np.sqrt(x), qs)`` (linear interpolation) with one partial sort and a few sqrts."""
    n = x.size
    pos = [q / 100 * (n - 1) for q in qs]
    ks = sorted({min(int(p) + d, n - 1) for p in pos for d in (0, 1)})
    part = np.partition(x, ks)
    out = []
    for p in pos:
        lo, hi = math.sqrt(max(float(part[int(p)]), 0.0)), math.sqrt(max(float(part[min(int(p) + 1, n - 1)]), 0.0))
        out.append(lo + (p - int(p)) * (hi - lo))
    return out


def _entropy(hist: np.ndarray) -> float:
    """Shannon entropy (bits) of a histogram, as PIL's ``Image.entropy()`` computes it."""
    h = hist[hist > 0].astype(np.float64)
    p = h / h.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: a single bin gives -0.0


def image_stats(im: Image.Image, width: int, height: int) -> dict[str, float]:
    """Raw per-image values (plain floats, cheap to pickle) for :func:`score_images`.

    ``im`` is the (possibly downscaled, see :func:`decode_for_checks`) image, ``width``/``height``
    the file's full size, which the aspect-ratio, size and blur-resize computations use.
    """
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    a = np.asarray(rgb)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]

    # Brightness percentiles (CleanVision: np.percentile over every pixel, linear interpolation), taken
    # on squared brightness (a matmul) and square-rooted at the end: sqrt is monotonic, so the order
    # statistics are the same and only the few picked values need a sqrt.
    af = a.reshape(-1, 3).astype(np.float32)
    p5, p99 = _percentiles_of_sqrt((af * af) @ _BRIGHT_WEIGHTS, (5, 99))

    # Colour: share of pixels whose channels differ by more than GRAY_TOLERANCE.
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    n_coloured = int(np.count_nonzero(chroma > GRAY_TOLERANCE))

    # Entropy of the pooled channel histograms (PIL Image.entropy); grey content: its grey histogram.
    gray = rgb.convert("L")
    hist = gray.histogram() if n_coloured == 0 else rgb.histogram()
    entropy = _entropy(np.asarray(hist, dtype=np.int64))

    # Blur: CleanVision resizes the full image so its longest side is 64 (PIL's default bicubic), converts
    # to L, takes FIND_EDGES and the std of the edge image; plus the std of the grey histogram's counts.
    ratio = max(width, height) / BLUR_SIDE
    if ratio > 1:
        size = (max(int(width // ratio), 1), max(int(height // ratio), 1))
    else:
        size = (width, height)
    small = gray if gray.size == size else gray.resize(size, Image.Resampling.BICUBIC)
    edges = np.asarray(small.filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    gray_hist = np.asarray(small.histogram(), dtype=np.float64)

    return {
        "brightness_p5": float(p5),
        "brightness_p99": float(p99),
        "entropy": entropy,
        "blurriness": float(edges.std()),
        "gray_hist_std": float(gray_hist.std()),
        "colour_fraction": n_coloured / chroma.size,
        "aspect_ratio": min(width / height, height / width),
        "size": math.sqrt(width) * math.sqrt(height),
        "width": float(width),
        "height": float(height),
    }


def _size_scores(sizes: np.ndarray, iqr_factor: float) -> np.ndarray:
    """CleanVision's SizeProperty.get_scores: 1 - |size - mid| / (upper - lower), IQR fences."""
    if sizes.size == 0:
        return sizes
    q1, q3 = np.percentile(sizes, [25, 75])
    lower, upper = q1 - iqr_factor * (q3 - q1), q3 + iqr_factor * (q3 - q1)
    mid = (lower + upper) / 2
    norm = upper - lower if upper > lower else mid  # zero IQR: relative to the common size
    if norm <= 0:
        return np.ones_like(sizes)
    return 1.0 - np.clip(np.abs(sizes - mid) / norm, 0.0, 1.0)


def score_images(stats: Sequence[dict[str, float]],
                 thresholds: QualityThresholds | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Scores and flagged issues for each image, ``[{"scores": {issue: float}, "issues": [issue, ...]}]``
    in the order of ``stats`` (from :func:`image_stats`). ``odd_size`` is relative to these images, so
    pass the whole dataset (or a representative sample's stats plus the images to score).
    Scores are rounded to 4 decimals (they go into meta JSON)."""
    th = _as_thresholds(thresholds)
    if not stats:
        return []
    col = {k: np.array([s[k] for s in stats], dtype=np.float64) for k in stats[0]}
    blur = 1.0 - np.exp(-col["blurriness"] * BLUR_FACTOR)
    hist_term = 1.0 - np.exp(-col["gray_hist_std"] * BLUR_FACTOR)
    hist_term[hist_term <= BLUR_COLOR_THRESHOLD] = 0.0
    scores = {
        "dark": col["brightness_p99"],
        "light": 1.0 - col["brightness_p5"],
        "blurry": np.minimum(blur + hist_term, 1.0),
        "low_information": np.minimum(ENTROPY_FACTOR * col["entropy"], 1.0),
        "odd_aspect_ratio": col["aspect_ratio"],
        "odd_size": _size_scores(col["size"], th.odd_size_iqr_factor),
        "grayscale": col["colour_fraction"],
    }
    limits = {issue: getattr(th, issue) for issue in ISSUE_TYPES}
    out = []
    for i in range(len(stats)):
        s = {issue: round(float(np.clip(scores[issue][i], 0.0, 1.0)), 4) for issue in ISSUE_TYPES}
        out.append({"scores": s, "issues": [issue for issue in ISSUE_TYPES if s[issue] < limits[issue]]})
    return out


def exact_duplicate_groups(images: Iterable[bytes]) -> list[list[int]]:
    """Indices of byte-identical images (sha256), one list per group of two or more, each in input
    order (the first is the one to keep), groups ordered by their first index."""
    by_hash: dict[bytes, list[int]] = {}
    for i, data in enumerate(images):
        by_hash.setdefault(hashlib.sha256(data).digest(), []).append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def _stats_or_error(data: bytes, max_side: int) -> dict[str, float] | str:
    try:
        im, w, h = decode_for_checks(data, max_side=max_side)
    except BadImage as e:
        return e.reason
    return image_stats(im, w, h)


def check_images(images: Sequence[bytes], thresholds: QualityThresholds | dict[str, Any] | None = None, *,
                 max_side: int = CHECK_SIDE, workers: int = 1) -> list[dict[str, Any]]:
    """Decode, measure and score ``images``: one ``{"scores", "issues", "stats"}`` dict per image, or
    ``{"error": reason, "scores": {}, "issues": []}`` for bytes :func:`decode_image` refuses (those are
    left out of the dataset-level ``odd_size`` statistics). ``workers`` > 1 decodes in threads (PIL and
    numpy release the GIL for the heavy parts)."""
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda d: _stats_or_error(d, max_side), images))
    else:
        results = [_stats_or_error(d, max_side) for d in images]
    good = [r for r in results if isinstance(r, dict)]
    scored = iter(score_images(good, thresholds))
    out: list[dict[str, Any]] = []
    for r in results:
        if isinstance(r, dict):
            out.append(dict(next(scored), stats=r))
        else:
            out.append({"error": r, "scores": {}, "issues": []})
    return out
