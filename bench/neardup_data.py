"""Build the near-duplicate bench set from real photos bundled with scikit-image and scikit-learn.

    .venv/bin/python bench/neardup_data.py [--out bench/.cache/neardup_set] [--seed 0] [--peers-python PATH]

Two steps, so that the project venv never imports scikit-image:

1. ``--export DIR`` (run with the *peers* python, which has scikit-image): writes the bundled photos as PNG
   (only files shipped inside the wheel, nothing is fetched) plus scikit-learn's ``china`` and ``flower`` and
   the LFW subset patches;
2. :func:`build_set` (project venv, PIL only): turns them into ``<out>/seed<seed>/images`` and ``truth.json``.

The set
-------
*Originals* (one ground-truth group each, 28): 16 whole photos, colour and grayscale (astronaut, camera,
chelsea, clock, coffee, coins, immunohistochemistry, moon, page, rocket, text, brick, grass, gravel, cell,
microaneurysms), scikit-learn's china and flower, and *tiles* of three large photos used only as tiles
(hubble_deep_field 2x2, retina 2x2, the left stereo-motorcycle view as two halves). Tiles of one photo share
palette, texture and (retina) a mirrored layout: the "same family, different image" hard negatives.

*Copies* (14 per original, groups of 15; parameters drawn per original from ``--seed``, see
:func:`make_transforms`): resize 50% / 75%, JPEG quality 30 / 60, a centre crop and two corner crops (side
80-90%), brightness x1.2-1.3 / x0.7-0.8, two rotations of 5-10 degrees with black corners, two with the borders
cropped to the largest inscribed rectangle, and a mix (resize 50-70%, brightness x1.1-1.25, JPEG 50).

*Distractors* (singletons, 124): 50 face and 50 non-face 25x25 patches of skimage's LFW subset upsampled to
100x100 (aligned faces and near-featureless patches look alike at low resolution: a precision test), and
:data:`N_SMALL_CROPS` small random crops (12-25% of the area) of the whole photos. A crop that small is *not* a
near duplicate by this bench's definition (copies keep at least 64% of the area), so a method that matches it
is over-generalising.

Every file is JPEG (edits meant to be lossless at quality 95): the data this targets is JPEG, and the clean
stage's decoder uses JPEG DCT scaling, so a PNG set would time a decoder nobody uses.

Left out, on purpose: ``cat`` (the same file as ``chelsea``), the right stereo view (a near duplicate of the
left view by any useful definition, so it would make the truth ambiguous), and synthetic or line-art images
(checkerboard, chessboard, colorwheel, logo, horse, phantom, binary_blobs): the bench is about photographs;
the built-in synthetic scenes are measured separately by ``bench/neardup_bench.py --synthetic``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WHOLE = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "immunohistochemistry", "moon", "page",
         "rocket", "text", "brick", "grass", "gravel", "cell", "microaneurysms")
TILED = {"hubble_deep_field": (2, 2), "retina": (2, 2), "motorcycle_left": (1, 2)}  # rows, cols
N_FACES = 50
N_NONFACES = 50
N_SMALL_CROPS = 24


def export(out: Path) -> None:
    """Write the bundled photos as PNG (run with the peers python: needs scikit-image, scikit-learn)."""
    import skimage.data as skd  # only in the peers venv
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {name: getattr(skd, name)() for name in WHOLE}
    arrays["hubble_deep_field"] = skd.hubble_deep_field()
    arrays["retina"] = skd.retina()
    arrays["motorcycle_left"] = skd.stereo_motorcycle()[0]
    sk = load_sample_images()
    for path, arr in zip(sk.filenames, sk.images, strict=True):
        arrays[Path(path).stem] = arr
    for name, arr in arrays.items():
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(out / f"{name}.png")
    lfw = skd.lfw_subset()  # 100 faces then 100 non-faces, float in [0, 1]
    for i, a in enumerate(lfw):
        Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)).save(out / f"lfw_{i:03d}.png")


# ----------------------------------------------------------------------------------------------------- transforms


def _resize(im, f: float):
    from PIL import Image

    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.LANCZOS)


def _crop(im, f: float, anchor: str):
    w, h = im.size
    cw, ch = round(w * f), round(h * f)
    x = (w - cw) // 2 if anchor == "c" else (0 if anchor[1] == "l" else w - cw)
    y = (h - ch) // 2 if anchor == "c" else (0 if anchor[0] == "t" else h - ch)
    return im.crop((x, y, x + cw, y + ch))


def _brightness(im, f: float):
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(im).enhance(f)


def _rotate(im, deg: float, crop_borders: bool):
    from PIL import Image

    out = im.rotate(deg, resample=Image.BICUBIC, expand=False, fillcolor=0)
    if not crop_borders:
        return out
    # Largest axis-aligned rectangle inside a w x h rectangle rotated by deg (same aspect ratio approximately):
    # the standard closed form (e.g. https://stackoverflow.com/a/16778797).
    w, h = im.size
    a = abs(np.deg2rad(deg))
    sin_a, cos_a = np.sin(a), np.cos(a)
    long_side, short_side = max(w, h), min(w, h)
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        wr, hr = (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr, hr = (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a
    cx, cy = w / 2, h / 2
    return out.crop((int(np.ceil(cx - wr / 2)), int(np.ceil(cy - hr / 2)),
                     int(np.floor(cx + wr / 2)), int(np.floor(cy + hr / 2))))


def _jpeg(im, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _hq(im) -> bytes:
    """Edits meant to be lossless: JPEG quality 95 (see the module docstring for why not PNG)."""
    return _jpeg(im, 95)


def make_transforms(rng: np.random.Generator) -> list[tuple[str, object, str]]:
    """The 15 copies of one original, with parameters drawn from ``rng`` inside the ranges the bench promises
    (so a different ``--seed`` gives a different draw of the same kinds of edit): ``(label, fn, ext)``, ``fn``
    maps a PIL image to encoded bytes, ``label`` records the drawn parameters."""
    u = rng.uniform
    corners = rng.permutation(["tl", "tr", "bl", "br"])[:2]
    fc, f1, f2 = u(0.8, 0.9), u(0.8, 0.9), u(0.8, 0.9)
    b_up, b_down = u(1.2, 1.3), u(0.7, 0.8)
    signs = rng.permutation([-1, 1])
    a1, a2 = signs[0] * u(5, 10), signs[1] * u(5, 10)  # black corners
    signs = rng.permutation([-1, 1])
    a3, a4 = signs[0] * u(5, 10), signs[1] * u(5, 10)  # borders cropped
    mix_s, mix_b = u(0.5, 0.7), u(1.1, 1.25)
    return [
        ("orig", lambda im: _hq(im), "jpg"),
        ("resize0.50", lambda im: _hq(_resize(im, 0.5)), "jpg"),
        ("resize0.75", lambda im: _hq(_resize(im, 0.75)), "jpg"),
        ("jpeg30", lambda im: _jpeg(im, 30), "jpg"),
        ("jpeg60", lambda im: _jpeg(im, 60), "jpg"),
        (f"crop{fc:.2f}@c", lambda im: _hq(_crop(im, fc, "c")), "jpg"),
        (f"crop{f1:.2f}@{corners[0]}", lambda im: _hq(_crop(im, f1, corners[0])), "jpg"),
        (f"crop{f2:.2f}@{corners[1]}", lambda im: _hq(_crop(im, f2, corners[1])), "jpg"),
        (f"bright{b_up:.2f}", lambda im: _hq(_brightness(im, b_up)), "jpg"),
        (f"bright{b_down:.2f}", lambda im: _hq(_brightness(im, b_down)), "jpg"),
        (f"rot{a1:+.1f}", lambda im: _hq(_rotate(im, a1, False)), "jpg"),
        (f"rot{a2:+.1f}", lambda im: _hq(_rotate(im, a2, False)), "jpg"),
        (f"rot{a3:+.1f}crop", lambda im: _hq(_rotate(im, a3, True)), "jpg"),
        (f"rot{a4:+.1f}crop", lambda im: _hq(_rotate(im, a4, True)), "jpg"),
        (f"mix{mix_s:.2f}/{mix_b:.2f}/jpeg50", lambda im: _jpeg(_brightness(_resize(im, mix_s), mix_b), 50), "jpg"),
    ]


# Kind of each copy, in the order make_transforms returns them (for per-kind recall in the bench).
KINDS = ("orig", "resize", "resize", "jpeg", "jpeg", "crop_centre", "crop_corner", "crop_corner", "bright",
         "bright", "rotate", "rotate", "rotate_crop", "rotate_crop", "mix")


def build_set(out: str | Path, peers_python: str | Path, seed: int = 0) -> dict:
    """Build the set under ``out`` (``images/`` and ``truth.json``); reuse it if ``truth.json`` exists.

    ``truth.json``: ``{"files": [{"file", "group", "original", "transform"}...], "groups", "originals",
    "copies", "distractors", "positive_pairs", "pairs"}``; ``group`` is -1 for distractors (singletons).
    """
    from PIL import Image

    out = Path(out)
    set_dir = out / f"seed{seed}"
    truth_path = set_dir / "truth.json"
    if truth_path.exists():
        return json.loads(truth_path.read_text())
    raw = out / "raw"
    if not (raw / "china.png").exists():
        subprocess.run([str(peers_python), os.path.abspath(__file__), "--export", str(raw)], check=True)
    img_dir = set_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    originals: dict[str, Image.Image] = {}
    for name in (*WHOLE, "china", "flower"):
        originals[name] = Image.open(raw / f"{name}.png").copy()
    for name, (rows, cols) in TILED.items():
        im = Image.open(raw / f"{name}.png").copy()
        tw, th = im.width // cols, im.height // rows
        for r in range(rows):
            for c in range(cols):
                originals[f"{name}_t{r}{c}"] = im.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))

    files: list[dict] = []

    def write(name: str, data: bytes, ext: str, group: int, original: str, transform: str, kind: str) -> None:
        (img_dir / f"{name}.{ext}").write_bytes(data)
        files.append({"file": f"{name}.{ext}", "group": group, "original": original, "transform": transform,
                      "kind": kind})

    rng = np.random.default_rng(seed)
    for g, (name, im) in enumerate(sorted(originals.items())):
        for i, ((label, fn, ext), kind) in enumerate(zip(make_transforms(rng), KINDS, strict=True)):
            write(f"{name}__{i:02d}_{kind}", fn(im), ext, g, name, label, kind)

    for i in [*range(N_FACES), *range(100, 100 + N_NONFACES)]:
        im = Image.open(raw / f"lfw_{i:03d}.png").convert("L").resize((100, 100), Image.BICUBIC)
        write(f"lfw_{i:03d}", _hq(im), "jpg", -1, f"lfw_{i:03d}", "upsampled x4",
              "distractor_face" if i < 100 else "distractor_patch")
    whole = sorted((*WHOLE, "china", "flower"))
    for k in range(N_SMALL_CROPS):
        name = whole[k % len(whole)]
        im = originals[name]
        f = float(rng.uniform(0.35, 0.5))  # side fraction -> 12..25% of the area
        cw, ch = round(im.width * f), round(im.height * f)
        x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        write(f"smallcrop_{k:02d}_{name}", _hq(im.crop((x, y, x + cw, y + ch))), "jpg", -1, name,
              f"crop{f:.2f}@({x},{y})", "distractor_small_crop")

    n = len(files)
    sizes = np.bincount([f["group"] for f in files if f["group"] >= 0])
    truth = {
        "files": files,
        "groups": int(len(sizes)),
        "originals": int(len(sizes)),
        "copies": int(sizes.sum() - len(sizes)),
        "distractors": int(sum(f["group"] < 0 for f in files)),
        "images": n,
        "pairs": n * (n - 1) // 2,
        "positive_pairs": int((sizes * (sizes - 1) // 2).sum()),
        "seed": seed,
    }
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


def default_peers_python() -> str:
    here = Path(__file__).resolve().parent
    return os.environ.get("MMP_PEERS_PYTHON") or str(here / ".venv-peers" / "bin" / "python")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="(peers python) write the bundled photos to this folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".cache" / "neardup_set")
    parser.add_argument("--peers-python", default=default_peers_python())
    parser.add_argument("--seed", type=int, default=0, help="draw of the copy parameters and distractor crops")
    args = parser.parse_args(argv)
    if args.export:
        export(args.export)
        return 0
    truth = build_set(args.out, args.peers_python, args.seed)
    print({k: v for k, v in truth.items() if k != "files"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
