"""Image quality checks (CleanVision's issue types): known values, draft decoding, thresholds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageStat
from pydantic import ValidationError
from sklearn.datasets import load_sample_images

from mmplatform.data.images import BadImage, decode_image
from mmplatform.data.quality import (
    ISSUE_TYPES,
    QualityThresholds,
    check_images,
    decode_for_checks,
    exact_duplicate_groups,
    image_stats,
    score_images,
)


def jpeg(im: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 640x427 each
    return {"china": china, "flower": flower}


def one(data: bytes, **kw) -> dict:
    (r,) = check_images([data], **kw)
    return r


def test_real_photos_have_no_issues(photos):
    results = check_images([jpeg(photos["china"]), jpeg(photos["flower"])])
    for r in results:
        assert r["issues"] == [], r
        assert set(r["scores"]) == set(ISSUE_TYPES)
        assert all(0.0 <= v <= 1.0 for v in r["scores"].values())


def test_dark_and_light():
    black, white = one(png(Image.new("RGB", (64, 48)))), one(png(Image.new("RGB", (64, 48), (255, 255, 255))))
    assert black["scores"]["dark"] == 0.0 and "dark" in black["issues"] and "light" not in black["issues"]
    assert white["scores"]["light"] == 0.0 and "light" in white["issues"] and "dark" not in white["issues"]
    # HSP brightness of pure green at 50%: sqrt(0.691) * 128/255 = 0.4173 -> not dark (>= 0.32).
    green = one(png(Image.new("RGB", (64, 48), (0, 128, 0))))
    assert green["scores"]["dark"] == pytest.approx(np.sqrt(0.691) * 128 / 255, abs=1e-4)
    assert "dark" not in green["issues"]


def test_darkened_photo_is_dark(photos):
    dark = Image.fromarray((np.asarray(photos["china"]) * 0.2).astype(np.uint8))
    r = one(jpeg(dark))
    assert "dark" in r["issues"] and r["scores"]["dark"] < 0.25


def test_blur_lowers_the_score(photos):
    for name in ("china", "flower"):
        scores = [one(jpeg(photos[name].filter(ImageFilter.GaussianBlur(radius))))["scores"]["blurry"]
                  for radius in (0, 2, 4, 8)]
        assert scores == sorted(scores, reverse=True) and scores[0] - scores[-1] > 0.1, (name, scores)
    assert "blurry" in one(jpeg(photos["flower"].filter(ImageFilter.GaussianBlur(8))))["issues"]


def test_flat_image_is_low_information():
    # One colour in each of R, G, B: PIL's pooled histogram has 3 equal bins -> log2(3) bits -> 0.1585.
    r = one(png(Image.new("RGB", (64, 48), (200, 30, 60))))
    assert r["scores"]["low_information"] == pytest.approx(0.1 * np.log2(3), abs=1e-4)
    assert r["issues"] == ["low_information"]  # a flat image is not "blurry" (CleanVision's histogram term)
    # Grey content uses its one channel (as CleanVision does for files stored as L): a flat grey is 0 bits.
    assert one(png(Image.new("RGB", (64, 48), (90, 90, 90))))["scores"]["low_information"] == 0.0


def test_odd_aspect_ratio():
    r = one(png(Image.new("RGB", (10, 1000), (200, 30, 60))))
    assert r["scores"]["odd_aspect_ratio"] == pytest.approx(0.01)
    assert "odd_aspect_ratio" in r["issues"]
    assert one(png(Image.new("RGB", (100, 40), (200, 30, 60))))["scores"]["odd_aspect_ratio"] == 0.4


def _stats(width: int, height: int) -> dict[str, float]:
    return image_stats(Image.new("RGB", (8, 8), (10, 200, 30)), width, height)


def test_odd_size_from_the_dataset_iqr():
    # sqrt(w*h) = 10, 400, 450, 500, 550, 600: Q1 412.5, Q3 537.5, fences 37.5 and 912.5, middle 475,
    # width 875 -> score(10) = 1 - 465/875, score(600) = 1 - 125/875.
    sizes = [10, 400, 450, 500, 550, 600]
    out = score_images([_stats(s, s) for s in sizes])
    assert out[0]["scores"]["odd_size"] == pytest.approx(1 - 465 / 875, abs=1e-4)
    assert out[-1]["scores"]["odd_size"] == pytest.approx(1 - 125 / 875, abs=1e-4)
    assert [("odd_size" in o["issues"]) for o in out] == [True] + [False] * 5
    # Every image the same size but one tiny: zero IQR, distances relative to the common size.
    out = score_images([_stats(640, 480)] * 9 + [_stats(32, 24)])
    assert ["odd_size" in o["issues"] for o in out] == [False] * 9 + [True]
    assert out[0]["scores"]["odd_size"] == 1.0


def test_grayscale(photos):
    grey_rgb = photos["china"].convert("L").convert("RGB")
    for data in (jpeg(grey_rgb), png(grey_rgb), jpeg(photos["china"].convert("L"))):
        r = one(data)
        assert r["scores"]["grayscale"] == 0.0 and "grayscale" in r["issues"]
    colour = one(jpeg(photos["flower"]))
    assert colour["scores"]["grayscale"] > 0.9 and "grayscale" not in colour["issues"]


def test_stats_match_cleanvision_formulas(photos):
    """On an image already <= 64 px (no resize) and at full resolution the raw values are CleanVision's
    formulas exactly (its image_property.py: FIND_EDGES std, histogram std, HSP percentiles, entropy)."""
    im = photos["china"].resize((60, 40))
    s = image_stats(im, 60, 40)
    gray = im.convert("L")
    assert s["blurriness"] == pytest.approx(np.sqrt(ImageStat.Stat(gray.filter(ImageFilter.FIND_EDGES)).var[0]))
    assert s["gray_hist_std"] == pytest.approx(np.std(gray.histogram()))
    assert s["entropy"] == pytest.approx(im.entropy())
    a = np.asarray(im).astype(int)
    bright = np.sqrt(0.241 * a[..., 0] ** 2 + 0.691 * a[..., 1] ** 2 + 0.068 * a[..., 2] ** 2) / 255
    assert [s["brightness_p5"], s["brightness_p99"]] == pytest.approx(list(np.percentile(bright, [5, 99])))


def test_draft_decode_keeps_full_size_and_orientation(photos):
    data = jpeg(photos["china"])
    im, w, h = decode_for_checks(data, max_side=128)
    assert (w, h) == (640, 427) and 128 <= max(im.size) < 256
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the viewer sees 427x640
    im, w, h = decode_for_checks(jpeg(photos["china"], exif=exif.tobytes()), max_side=128)
    assert (w, h) == (427, 640) and im.height > im.width
    assert decode_image(data).size == (640, 427)  # without draft: unchanged


def test_draft_decode_still_detects_truncation(photos):
    data = jpeg(photos["china"])
    truncated = data[: len(data) * 2 // 3]
    for kw in ({}, {"draft": 64}):
        with pytest.raises(BadImage, match="corrupt_image"):
            decode_image(truncated, **kw)
    r = one(truncated)
    assert r["error"].startswith("corrupt_image") and r["issues"] == []


def test_draft_scores_agree_with_full_decode(photos):
    darker = Image.fromarray((np.asarray(photos["flower"]) * 0.5).astype(np.uint8))
    images = [jpeg(photos["china"]), jpeg(photos["flower"]), jpeg(darker),
              jpeg(photos["china"].filter(ImageFilter.GaussianBlur(4)))]
    fast = check_images(images)
    full = check_images(images, max_side=100_000)  # no draft scaling, no reduce
    for a, b in zip(fast, full, strict=True):
        for issue in ("dark", "light", "blurry", "low_information", "grayscale"):
            assert a["scores"][issue] == pytest.approx(b["scores"][issue], abs=0.03), issue
        assert a["scores"]["odd_aspect_ratio"] == b["scores"]["odd_aspect_ratio"]
        assert a["stats"]["size"] == b["stats"]["size"]
        assert a["issues"] == b["issues"]


def test_thresholds_model_and_overrides(photos):
    t = QualityThresholds()
    assert (t.dark, t.light, t.blurry, t.low_information, t.odd_aspect_ratio, t.odd_size) == (
        0.32, 0.05, 0.29, 0.3, 0.35, 0.5)  # CleanVision's defaults
    with pytest.raises(ValidationError):
        QualityThresholds(darkness=0.3)
    with pytest.raises(ValidationError):
        QualityThresholds(dark=1.5)
    data = [jpeg(photos["flower"])]
    assert "dark" not in check_images(data)[0]["issues"]
    assert "dark" in check_images(data, {"dark": 0.9})[0]["issues"]  # flower's p99 brightness is ~0.79


def test_check_images_skips_bad_bytes_and_threads_agree(photos):
    images = [jpeg(photos["china"]), b"not an image", png(Image.new("RGB", (30, 30), (1, 2, 3)))]
    serial = check_images(images)
    assert serial[1] == {"error": "unsupported_format", "scores": {}, "issues": []}
    assert check_images(images, workers=2) == serial


def test_exact_duplicate_groups():
    assert exact_duplicate_groups([b"a", b"b", b"a", b"c", b"b", b"a"]) == [[0, 2, 5], [1, 4]]
    assert exact_duplicate_groups([b"a", b"b"]) == []
