"""Benchmark: mmplatform.data.quality image checks vs CleanVision on the same files.

    .venv/bin/python bench/image_checks_bench.py [--n 600] [--jobs 2] [--repeats 3] [--peers-python PATH]

Builds a seeded folder of ``--n`` image files that resembles web data: random crops of real photos
(scikit-image's bundled photos, exported by the peers interpreter, and scikit-learn's two), resized to
a longest side of 320..1024 px (mostly 480..800), JPEG (10% PNG), plus degraded variants so that every
issue type occurs: darkened, brightened, blurred, grayscale (stored as ``L``), tiny, very large, odd
aspect ratio, low information (flat colour), exact copies and re-encoded near copies.

Then, in the same run and on the same files, with ``--jobs`` workers each (CleanVision: its
multiprocessing pool, ``n_jobs``; ours: threads), alternating ``--repeats`` times and keeping the best:

* CleanVision (peers venv): ``Imagelab(data_path=DIR).find_issues(issue_types, n_jobs=J)`` for the
  seven per-image types plus ``exact_duplicates`` (the checks our module does), timed inside its
  process (interpreter start and imports excluded);
* ours (project venv): read each file, ``check_images(..., workers=J)`` and ``exact_duplicate_groups``.

Once more, CleanVision's default set (adds ``near_duplicates``, which live in another module here) is
timed for reference. Reports images/s for both and the ratio, and per issue type how our flags agree
with CleanVision's (precision and recall of ours taking CleanVision as the reference, mean |score
difference|, and how many of our extra flags are grey pixels in a colour-mode file, where the two
deliberately differ). Writes ``bench/results/image_checks.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from peers import peers_python, run_peers  # bench/ is on sys.path when this file is run as a script
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images

from mmplatform.data.quality import ISSUE_TYPES, check_images, exact_duplicate_groups

RESULTS = Path(__file__).resolve().parent / "results" / "image_checks.json"

# scikit-image's bundled photos (no download): colour and grey.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
                  "immunohistochemistry", "camera", "moon", "coins")

EXPORT_CODE = """
import os
import numpy as np
import skimage.data
from PIL import Image
for name in ARGS["names"]:
    a = getattr(skimage.data, name)()
    a = np.asarray(a[0] if isinstance(a, tuple) else a)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)
    Image.fromarray(a).save(os.path.join(ARGS["out"], name + ".png"))
RESULT = sorted(ARGS["names"])
"""

CLEANVISION_CODE = """
import contextlib, io, time
from cleanvision import Imagelab

def run(issue_types):
    with contextlib.redirect_stdout(io.StringIO()):
        lab = Imagelab(data_path=ARGS["dir"], verbose=False)
        t0 = time.perf_counter()
        lab.find_issues(issue_types, n_jobs=ARGS["jobs"], verbose=False)
        seconds = time.perf_counter() - t0
    issues = lab.issues
    flags, scores = {}, {}
    for col in issues.columns:
        if col.startswith("is_") and col.endswith("_issue"):
            flags[col[3:-6]] = {str(k): bool(v) for k, v in issues[col].items()}
        elif col.endswith("_score"):
            scores[col[:-6]] = {str(k): float(v) for k, v in issues[col].items()}
    return {"seconds": seconds, "flags": flags, "scores": scores, "n": len(issues)}

RESULT = run(None if ARGS["default"] else {t: {} for t in ARGS["per_image"] + ["exact_duplicates"]})
"""

VARIANTS = {  # name -> share of the files
    "normal": 0.50, "dark": 0.06, "light": 0.06, "blurry": 0.07, "grayscale": 0.06, "tiny": 0.04,
    "large": 0.03, "odd_aspect": 0.05, "low_information": 0.05, "exact_copy": 0.04, "near_copy": 0.04,
}


def load_photos(peers: str, tmp: Path) -> list[Image.Image]:
    """scikit-learn's two photos and scikit-image's bundled ones (exported by the peers interpreter)."""
    export = tmp / "skimage"
    export.mkdir()
    run_peers(peers, EXPORT_CODE, {"names": list(SKIMAGE_PHOTOS), "out": str(export)})
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for p in sorted(export.glob("*.png")):
        with Image.open(p) as im:
            photos.append(im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy())
    return photos


def _longest(im: Image.Image, side: int) -> Image.Image:
    s = side / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)


def _encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_files(photos: list[Image.Image], n: int, out: Path, seed: int) -> tuple[dict[str, str], set[str]]:
    """Write ``n`` image files to ``out``; returns file name -> variant, and the names of files whose
    pixels come from a grey photo but which are stored in a colour mode (darkened/brightened copies of
    grey photos): CleanVision judges grayscale by the file's mode, ours by the pixels."""
    rng = np.random.default_rng(seed)
    names, shares = list(VARIANTS), np.array(list(VARIANTS.values()))
    written: list[tuple[str, bytes, Image.Image, bool]] = []  # name, bytes, pixels, grey content
    variants: dict[str, str] = {}
    grey_in_rgb: set[str] = set()
    for i in range(n):
        variant = str(rng.choice(names, p=shares / shares.sum()))
        if variant in ("exact_copy", "near_copy") and not written:
            variant = "normal"
        if variant == "exact_copy":
            src_name, data, _, _ = written[int(rng.integers(len(written)))]
            name = f"{i:05d}_{variant}{Path(src_name).suffix}"
            (out / name).write_bytes(data)
            variants[name] = variant
            if src_name in grey_in_rgb:
                grey_in_rgb.add(name)
            continue
        if variant == "near_copy":  # the same picture re-encoded at another quality and slightly smaller
            _, _, src, grey = written[int(rng.integers(len(written)))]
            im = _longest(src, int(max(src.size) * rng.uniform(0.8, 0.95)))
        else:
            photo = photos[int(rng.integers(len(photos)))]
            grey = (photo.mode == "L" or variant == "grayscale") and variant != "low_information"
            # A random crop of 40-100% of each side, sometimes mirrored, so images are distinct.
            fw, fh = rng.uniform(0.4, 1.0, size=2)
            cw, ch = max(8, int(photo.width * fw)), max(8, int(photo.height * fh))
            x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
            im = photo.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if variant == "odd_aspect":  # a banner strip, 1:3 to 1:6
                k = rng.uniform(3, 6)
                im = im.crop((0, 0, im.width, max(1, int(im.width / k))))
            side = int(rng.choice([320, 480, 500, 640, 640, 640, 800, 1024]))
            if variant == "tiny":
                side = int(rng.integers(24, 64))
            elif variant == "large":
                side = int(rng.integers(1800, 2600))
            im = _longest(im, side)
            im = _degrade(im, variant, rng)
        fmt = "PNG" if rng.random() < 0.1 else "JPEG"
        data = _encode(im, fmt, int(rng.integers(75, 96)))
        name = f"{i:05d}_{variant}.{'png' if fmt == 'PNG' else 'jpg'}"
        (out / name).write_bytes(data)
        written.append((name, data, im, grey))
        variants[name] = variant
        if grey and im.mode != "L":
            grey_in_rgb.add(name)
    return variants, grey_in_rgb


def _degrade(im: Image.Image, variant: str, rng: np.random.Generator) -> Image.Image:
    if variant == "grayscale":
        return im.convert("L")
    if variant in ("dark", "light"):
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
        if variant == "dark":
            a = a * rng.uniform(0.08, 0.25)
        else:
            a = 255 - (255 - a) * rng.uniform(0.01, 0.04)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if variant == "blurry":
        return im.filter(ImageFilter.GaussianBlur(max(im.size) * rng.uniform(0.03, 0.06)))
    if variant == "low_information":  # a flat colour, sometimes with a faint gradient
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        flat = Image.new("RGB", im.size, colour)
        if rng.random() < 0.5:
            ramp = np.linspace(0, 6, im.width, dtype=np.float32)[None, :, None]
            a = np.clip(np.asarray(flat, dtype=np.float32) + ramp, 0, 255).astype(np.uint8)
            flat = Image.fromarray(a)
        return flat
    return im.convert("RGB") if im.mode not in ("RGB", "L") else im


def run_ours(paths: Sequence[Path], jobs: int) -> tuple[float, dict[str, dict[str, bool]], dict[str, dict[str, float]]]:
    t0 = time.perf_counter()
    data = [p.read_bytes() for p in paths]
    results = check_images(data, workers=jobs)
    groups = exact_duplicate_groups(data)
    seconds = time.perf_counter() - t0
    names = [str(p) for p in paths]
    flags = {t: {n: t in r["issues"] for n, r in zip(names, results, strict=True)} for t in ISSUE_TYPES}
    scores = {t: {n: r["scores"].get(t, float("nan")) for n, r in zip(names, results, strict=True)}
              for t in ISSUE_TYPES}
    dup = {n: False for n in names}
    for g in groups:
        for i in g:
            dup[names[i]] = True
    flags["exact_duplicates"] = dup
    return seconds, flags, scores


def agreement(ours: dict[str, bool], ref: dict[str, bool]) -> dict[str, Any]:
    """Counts, precision and recall of ``ours`` taking ``ref`` (CleanVision) as the truth; the files
    where they disagree, by variant."""
    keys = sorted(ref)
    o = np.array([ours[k] for k in keys])
    r = np.array([ref[k] for k in keys])
    tp = int((o & r).sum())
    only = {"ours_only": o & ~r, "cleanvision_only": r & ~o}
    return {"cleanvision": int(r.sum()), "ours": int(o.sum()), "both": tp,
            "precision": tp / o.sum() if o.sum() else 1.0, "recall": tp / r.sum() if r.sum() else 1.0,
            "agree": float((o == r).mean()),
            **{name: sorted(Path(k).name for k, m in zip(keys, mask, strict=True) if m)
               for name, mask in only.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="number of image files")
    parser.add_argument("--jobs", type=int, default=2, help="workers for each side (CleanVision's n_jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers-python", default=None,
                        help="interpreter of the peers venv (default $MMP_PEERS_PYTHON, else bench/.venv-peers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (best is reported)")
    parser.add_argument("--no-default", action="store_true",
                        help="skip the extra CleanVision run with its default issue set (near duplicates)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    peers = peers_python(args.peers_python)

    with tempfile.TemporaryDirectory(prefix="mmp-imgbench-") as tmp_s:
        tmp = Path(tmp_s)
        photos = load_photos(peers, tmp)
        folder = tmp / "images"
        folder.mkdir()
        variants, grey_rgb = make_files(photos, args.n, folder, args.seed)
        paths = sorted(folder.iterdir())
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} files ({total_mb:.1f} MB) from {len(photos)} photos; variants: "
              + ", ".join(f"{k} {sum(v == k for v in variants.values())}" for k in VARIANTS))

        # Alternate the two so that both see the same background load; best of --repeats is reported.
        cv_args = {"dir": str(folder), "jobs": args.jobs, "per_image": list(ISSUE_TYPES), "default": False}
        cv_times, our_times = [], []
        for _ in range(args.repeats):
            same = run_peers(peers, CLEANVISION_CODE, cv_args)
            cv_times.append(same["seconds"])
            t, our_flags, our_scores = run_ours(paths, args.jobs)
            our_times.append(t)
        default = None if args.no_default else run_peers(peers, CLEANVISION_CODE, dict(cv_args, default=True))

    n = len(paths)
    assert same["n"] == n, (same["n"], n)
    rows = {}
    for t in (*ISSUE_TYPES, "exact_duplicates"):
        rows[t] = agreement(our_flags[t], same["flags"][t])
        if t in our_scores and t != "grayscale":  # CleanVision's grayscale score is 0/1 (file mode)
            diffs = [abs(our_scores[t][k] - same["scores"][t][k]) for k in same["scores"][t]]
            rows[t]["mean_abs_score_diff"] = float(np.mean(diffs))
            rows[t]["max_abs_score_diff"] = float(np.max(diffs))
        # Disagreements explained by the deliberate difference: grey pixels in a colour-mode file.
        rows[t]["ours_only_grey_in_colour_file"] = sum(name in grey_rgb for name in rows[t]["ours_only"])
    t_cv, t_ours = min(cv_times), min(our_times)
    result = {
        "n_images": n, "megabytes": round(total_mb, 1), "jobs": args.jobs, "seed": args.seed,
        "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "variants": {k: sum(v == k for v in variants.values()) for k in VARIANTS},
        "grey_pixels_in_colour_mode_files": len(grey_rgb),
        "cleanvision_seconds": t_cv, "ours_seconds": t_ours,
        "cleanvision_seconds_all": cv_times, "ours_seconds_all": our_times,
        "cleanvision_images_per_s": n / t_cv, "ours_images_per_s": n / t_ours,
        "speedup": t_cv / t_ours,
        "agreement": rows,
    }
    if default is not None:
        result["cleanvision_default_seconds"] = default["seconds"]
        result["cleanvision_default_images_per_s"] = n / default["seconds"]
        result["cleanvision_near_duplicates_flagged"] = int(sum(default["flags"]["near_duplicates"].values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{n} images, {args.jobs} workers each, best of {args.repeats}")
    print(f"{'':30s}{'seconds':>9s}{'images/s':>10s}")
    print(f"{'CleanVision, 7 types + exact':30s}{t_cv:9.2f}{n / t_cv:10.1f}")
    print(f"{'ours, 7 types + exact':30s}{t_ours:9.2f}{n / t_ours:10.1f}")
    if default is not None:
        print(f"{'CleanVision default (+ near)':30s}{default['seconds']:9.2f}{n / default['seconds']:10.1f}  (one run)")
    print(f"speed-up over CleanVision, same checks: {result['speedup']:.1f}x")
    print(f"\n{'issue':18s}{'CV':>5s}{'ours':>6s}{'both':>6s}{'prec':>7s}{'recall':>8s}{'mean|ds|':>10s}"
          f"{'ours-only grey-in-RGB':>23s}")
    for t, r in rows.items():
        d = f"{r['mean_abs_score_diff']:.4f}" if "mean_abs_score_diff" in r else "-"
        print(f"{t:18s}{r['cleanvision']:5d}{r['ours']:6d}{r['both']:6d}{r['precision']:7.3f}{r['recall']:8.3f}{d:>10s}"
              f"{r['ours_only_grey_in_colour_file']:>23d}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
