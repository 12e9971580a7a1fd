"""Benchmark: near-duplicate detection, mmplatform.data.neardup vs imagededup, on the same files in one run.

    .venv/bin/python bench/neardup_bench.py [--peers-python PATH] [--seeds 0 1] [--synthetic 2000]

The set (``bench/neardup_data.py``): 28 real photos bundled with scikit-image / scikit-learn, 14 edited copies
of each (resize, JPEG, crops, brightness, rotations, a mix), 124 distractors; a group is one photo and its
copies. ``--seeds``: the first seed is the set the defaults were chosen on, the others redraw every copy's
parameters (crop sizes and corners, angles, factors) to check that the choice holds.

Run per seed, on the same files:

* imagededup ``PHash`` with its recommended ``max_distance_threshold=10``, in the peers venv (a subprocess,
  ``--peers-python``, default ``$MMP_PEERS_PYTHON`` or ``bench/.venv-peers/bin/python``); its hashes also give
  its whole radius curve. imagededup ``CNN`` is tried too and reported as not runnable with the error line
  when it cannot run;
* ours: safe decode (``decode_image``, JPEG DCT-scaled to >= 128 px), ``image_signature``,
  ``find_near_duplicates`` at the module defaults, plus a sweep of (Hamming radius, cosine threshold) and the
  three linkages.

Metrics are pairwise over all unordered pairs of images: a predicted pair is two images in one predicted
group (``groups``: connected components of the reported pairs for imagededup, our linkage for ours) or,
for ``pairs``, only the pairs a method reported directly. Speed: images per second from reading the files
to groups, excluding interpreter start and imports, best of ``--repeats``.

``--synthetic N``: also runs ours on N built-in synthetic scenes (all distinct by construction) and counts
what would be quarantined, as a false-positive check on a very different kind of image.

Writes ``bench/results/neardup.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "neardup_set"
RESULTS = HERE / "results" / "neardup.json"
RADII = (0, 2, 4, 6, 8, 10, 12, 14, 16)
THRESHOLDS = tuple(round(0.86 + 0.01 * k, 2) for k in range(12))  # 0.86 .. 0.97


# ------------------------------------------------------------------------------------- peers side (imagededup)


def _peer_phash(image_dir: str, out: str, repeats: int) -> None:
    """Runs under the peers python. imagededup.methods imports its CNN module, which imports torchvision; when
    torchvision cannot load, stub the two CNN-only modules so that the hashing methods still import."""
    import types

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: hashing does not need it
        for name in [m for m in sys.modules if m.startswith(("torchvision", "imagededup"))]:
            del sys.modules[name]
        cnn = types.ModuleType("imagededup.methods.cnn")
        cnn.CNN = None
        models = types.ModuleType("imagededup.utils.models")
        models.CustomModel = None
        sys.modules["imagededup.methods.cnn"] = cnn
        sys.modules["imagededup.utils.models"] = models
    import logging

    from imagededup.methods import PHash

    logging.disable(logging.WARNING)  # imagededup logs every file it cannot find duplicates for
    best, encodings, dups = float("inf"), None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        phasher = PHash(verbose=False)
        encodings = phasher.encode_images(image_dir=image_dir)
        dups = phasher.find_duplicates(encoding_map=encodings, max_distance_threshold=10)
        best = min(best, time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"seconds": best, "encodings": encodings, "duplicates": dups}))


def _peer_cnn(image_dir: str, out: str) -> None:
    """Runs under the peers python: try imagededup's CNN (MobileNetV3 with pretrained weights)."""
    result: dict = {"runnable": False}
    try:
        from imagededup.methods import CNN

        t0 = time.perf_counter()
        cnn = CNN(verbose=False)
        dups = cnn.find_duplicates(image_dir=image_dir, min_similarity_threshold=0.9)
        result = {"runnable": True, "seconds": time.perf_counter() - t0, "duplicates": dups}
    except Exception as e:  # noqa: BLE001 - report whatever stops it
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    Path(out).write_text(json.dumps(result))


def run_imagededup(peers_python: str, image_dir: Path, work: Path, repeats: int,
                   cnn: bool = True) -> tuple[dict, dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "imagededup_phash.json"
    subprocess.run([peers_python, __file__, "--peer-phash", str(image_dir), "--peer-out", str(out),
                    "--repeats", str(repeats)], check=True)
    phash = json.loads(out.read_text())
    if not cnn:
        return phash, {}
    out_cnn = work / "imagededup_cnn.json"
    proc = subprocess.run([peers_python, __file__, "--peer-cnn", str(image_dir), "--peer-out", str(out_cnn)],
                          capture_output=True, text=True)
    if out_cnn.exists():
        cnn_res = json.loads(out_cnn.read_text())
    else:
        cnn_res = {"runnable": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    if not cnn_res.get("runnable"):
        cnn_res["why"] = ("imagededup.methods imports torchvision, which does not load against this torch build; "
                      "and CNN() needs MobileNetV3 ImageNet weights from download.pytorch.org, which cannot be "
                      "fetched offline (no torch hub cache on this machine)")
    return phash, cnn_res


# ----------------------------------------------------------------------------------------------------- metrics


def _c2(n):
    return n * (n - 1) // 2


def pair_metrics(pred_groups: list[list[int]], truth_groups: list[int]) -> dict:
    """Pairwise precision/recall of predicted groups against truth labels (-1 = singleton)."""
    from collections import Counter

    true_pairs = sum(_c2(c) for g, c in Counter(truth_groups).items() if g >= 0)
    pred_pairs = sum(_c2(len(g)) for g in pred_groups)
    tp = 0
    for g in pred_groups:
        tp += sum(_c2(c) for t, c in Counter(truth_groups[i] for i in g).items() if t >= 0)
    return _prf(tp, pred_pairs, true_pairs)


def edge_metrics(edges, truth_groups: list[int]) -> dict:
    from collections import Counter

    true_pairs = sum(_c2(c) for g, c in Counter(truth_groups).items() if g >= 0)
    tp = sum(1 for i, j in edges if truth_groups[i] >= 0 and truth_groups[i] == truth_groups[j])
    return _prf(tp, len(edges), true_pairs)


def _prf(tp: int, pred: int, true: int) -> dict:
    p = tp / pred if pred else 1.0
    r = tp / true if true else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "true_positive_pairs": tp, "predicted_pairs": pred}


def per_kind(groups: list[list[int]], files: list[dict]) -> dict:
    """Fraction of copies of each kind that end up in the same predicted group as their original."""
    label = {}
    for k, g in enumerate(groups):
        for i in g:
            label[i] = k
    orig = {f["group"]: i for i, f in enumerate(files) if f["kind"] == "orig"}
    hits: dict[str, list[bool]] = {}
    for i, f in enumerate(files):
        if f["group"] >= 0 and f["kind"] != "orig":
            o = orig[f["group"]]
            hits.setdefault(f["kind"], []).append(i in label and label.get(o) == label[i])
    return {k: round(sum(v) / len(v), 3) for k, v in hits.items()}


def components(n: int, edges) -> list[list[int]]:
    from mmplatform.data.neardup import Match, group_edges

    return group_edges(n, {e: Match() for e in edges}, "connected")


# --------------------------------------------------------------------------------------------------------- ours


def _decode(data: bytes):
    import inspect

    from mmplatform.data.images import decode_image

    if "draft" in inspect.signature(decode_image).parameters:
        # The signature reads a 64x64 area average: a JPEG decoded by DCT scaling to >= 128 px loses nothing
        # it uses (imagededup has no such option and decodes every pixel). The clean stage decodes to 256 px
        # once for all its checks, which gives the same groups (the tests check size independence).
        return decode_image(data, draft=128)
    return decode_image(data)


def _signature_of_file(path: Path) -> tuple[int, object]:
    from mmplatform.data.neardup import image_signature

    return image_signature(_decode(path.read_bytes()))


def run_ours(paths: list[Path]) -> dict:
    """Signatures and grouping at the module defaults in one process, timed by phase."""
    import numpy as np

    from mmplatform.data import neardup as nd

    t0 = time.perf_counter()
    images = [_decode(p.read_bytes()) for p in paths]
    t1 = time.perf_counter()
    sigs = [nd.image_signature(im) for im in images]
    phashes = [s[0] for s in sigs]
    views = np.stack([s[1] for s in sigs])
    t2 = time.perf_counter()
    result = nd.find_near_duplicates([p.name for p in paths], phashes, views)
    t3 = time.perf_counter()
    return {"seconds": {"total": t3 - t0, "decode": t1 - t0, "signature": t2 - t1, "grouping": t3 - t2},
            "phashes": phashes, "views": views, "result": result}


def run_ours_pool(paths: list[Path], workers: int) -> tuple[float, list[list[int]]]:
    """Decode + signature in a pool of ``workers`` processes (imagededup hashes with ``cpu_count()``
    processes by default), grouping in the parent: seconds from file bytes to groups."""
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from mmplatform.data import neardup as nd

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        sigs = list(ex.map(_signature_of_file, paths, chunksize=max(1, len(paths) // (4 * workers))))
    res = nd.find_near_duplicates([p.name for p in paths], [s[0] for s in sigs], np.stack([s[1] for s in sigs]))
    return time.perf_counter() - t0, res.groups


def sweep(ours: dict, truth_groups: list[int]) -> list[dict]:
    """Operating curves, from edges computed once at the loosest setting and then filtered: pHash alone over
    the radius, views alone over the threshold, and both (the module's rule, hash corroborated) over the
    threshold at the default radius and over the radius at the default threshold."""
    from mmplatform.data import neardup as nd

    loose = nd.near_duplicate_edges(ours["phashes"], ours["views"], hamming_radius=max(RADII),
                                    cosine_threshold=min(THRESHOLDS), hash_min_cosine=None)
    n = len(truth_groups)
    guard = nd.DEFAULT_HASH_MIN_COSINE
    rows = []

    def add(kind, radius, threshold, keep):
        edges = {k: m for k, m in loose.items() if keep(m)}
        rows.append({"signal": kind, "hamming_radius": radius, "cosine_threshold": threshold,
                     "connected": pair_metrics(nd.group_edges(n, edges, "connected"), truth_groups),
                     "star": pair_metrics(nd.group_edges(n, edges, "star"), truth_groups),
                     "pairs": edge_metrics(edges, truth_groups)})

    def rule(r, t):
        return lambda m: ((m.cosine is not None and m.cosine >= t)
                          or (m.hamming is not None and m.hamming <= r and m.cosine is not None and m.cosine >= guard))

    for r in RADII:
        add("phash", r, None, lambda m, r=r: m.hamming is not None and m.hamming <= r)
    for t in THRESHOLDS:
        add("views", None, t, lambda m, t=t: m.cosine is not None and m.cosine >= t)
    # Ablation: the whole-image view alone (one 128-d vector per image), over a wider range of thresholds.
    whole = nd.cosine_pairs(ours["views"][:, :1], 0.80)
    for t in (0.80, 0.82, 0.84, *THRESHOLDS):
        edges = {k: nd.Match(cosine=c) for k, c in whole.items() if c >= t}
        rows.append({"signal": "whole_view_only", "hamming_radius": None, "cosine_threshold": t,
                     "connected": pair_metrics(nd.group_edges(n, edges, "connected"), truth_groups),
                     "star": pair_metrics(nd.group_edges(n, edges, "star"), truth_groups),
                     "pairs": edge_metrics(edges, truth_groups)})
    for t in THRESHOLDS:
        add("both", nd.DEFAULT_HAMMING_RADIUS, t, rule(nd.DEFAULT_HAMMING_RADIUS, t))
    for r in RADII:
        if r != nd.DEFAULT_HAMMING_RADIUS:
            add("both", r, nd.DEFAULT_COSINE_THRESHOLD, rule(r, nd.DEFAULT_COSINE_THRESHOLD))
    return rows


def pick_defaults(rows: list[dict], linkage: str, min_precision: float = 0.995) -> dict | None:
    """The rule the defaults were chosen by: at the default radius, the threshold with the best group recall
    among those whose group precision is >= ``min_precision`` (0.99 plus a margin); None if that recall is
    under 0.9."""
    from mmplatform.data import neardup as nd

    ok = [r for r in rows if r["signal"] == "both" and r["hamming_radius"] == nd.DEFAULT_HAMMING_RADIUS
          and r[linkage]["precision"] >= min_precision]
    best = max(ok, key=lambda r: (r[linkage]["recall"], r["cosine_threshold"]), default=None)
    return best if best is not None and best[linkage]["recall"] >= 0.9 else None


def synthetic_check(n: int) -> dict:
    """Ours on ``n`` built-in synthetic scenes (distinct by construction): pairs and quarantine counts."""
    import io

    import numpy as np
    from PIL import Image

    from mmplatform.data import neardup as nd
    from mmplatform.data.synthetic import generate_synthetic

    recs = generate_synthetic(seed=0, n_train=n, n_val=0, n_test=0, n_test_compositional=0)
    sigs = [nd.image_signature(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in recs]
    phashes, views = [s[0] for s in sigs], np.stack([s[1] for s in sigs])
    ids = [r["sample_id"] for r in recs]
    out: dict = {"images": n}
    for r in (0, nd.DEFAULT_HAMMING_RADIUS):
        out[f"phash_pairs_within_{r}"] = len(nd.hamming_pairs(phashes, r))
    settings = {
        "defaults": {},
        "defaults_plain_or": {"hash_min_cosine": None},
        "views_only_defaults": {"hamming_radius": -1},
        "views_only_0.97": {"hamming_radius": -1, "cosine_threshold": 0.97},
    }
    for name, kw in settings.items():
        for linkage in ("connected", "star"):
            res = nd.find_near_duplicates(ids, phashes, views, linkage=linkage, **kw)
            out[f"{name}/{linkage}"] = {
                "pairs": len(res.edges), "groups": len(res.groups),
                "quarantined": sum(len(g) - 1 for g in res.groups),
                "largest_group": max(map(len, res.groups), default=0)}
    return out


# --------------------------------------------------------------------------------------------------------- main


def _fmt(m: dict) -> str:
    return f"{m['precision']:.4f}  {m['recall']:.4f}"


def run_seed(seed: int, peers_python: str, repeats: int) -> dict:
    from mmplatform.data import neardup as nd

    sys.path.insert(0, str(HERE))
    from neardup_data import build_set

    truth = build_set(CACHE, peers_python, seed)
    set_dir = CACHE / f"seed{seed}"
    files = truth["files"]
    names = [f["file"] for f in files]
    labels = [f["group"] for f in files]
    index = {name: i for i, name in enumerate(names)}
    n = len(files)

    # Timing: imagededup and ours alternate, best of ``repeats`` each, so that load from other processes on
    # the machine hits both alike.
    paths = [set_dir / "images" / name for name in names]
    workers = os.cpu_count() or 1
    phash, cnn = run_imagededup(peers_python, set_dir / "images", set_dir / "work", 1)
    idd_best, pool_best = phash["seconds"], float("inf")
    ours = run_ours(paths)
    for k in range(repeats):
        pool_s, pool_groups = run_ours_pool(paths, workers)
        pool_best = min(pool_best, pool_s)
        assert pool_groups == ours["result"].groups
        if k:
            idd_best = min(idd_best, run_imagededup(peers_python, set_dir / "images", set_dir / "work", 1,
                                                    cnn=False)[0]["seconds"])
            again = run_ours(paths)
            if again["seconds"]["total"] < ours["seconds"]["total"]:
                ours["seconds"] = again["seconds"]
    phash["seconds"] = idd_best
    idd_edges = {tuple(sorted((index[a], index[b]))) for a, bs in phash["duplicates"].items() for b in bs}
    idd_groups = components(n, idd_edges)
    # imagededup's own hashes -> its curve over max_distance_threshold
    hashes = [int(phash["encodings"][name], 16) for name in names]
    idd_loose = nd.hamming_pairs(hashes, max(RADII))
    idd_curve = []
    for r in RADII:
        e = {k for k, d in idd_loose.items() if d <= r}
        idd_curve.append({"max_distance_threshold": r, "groups": pair_metrics(components(n, e), labels),
                          "pairs": edge_metrics(e, labels)})

    res = ours["result"]
    linkage = {}
    for lk in nd.LINKAGES:
        groups = nd.group_edges(n, res.edges, lk)
        linkage[lk] = {"groups": pair_metrics(groups, labels), "largest_group": max(map(len, groups), default=0),
                       "per_kind": per_kind(groups, files)}
    rows = sweep(ours, labels)
    sec = ours["seconds"]
    return {
        "seed": seed,
        "set": {k: v for k, v in truth.items() if k != "files"},
        "imagededup_phash@10": {
            "groups": pair_metrics(idd_groups, labels), "pairs": edge_metrics(idd_edges, labels),
            "per_kind": per_kind(idd_groups, files), "seconds": round(phash["seconds"], 3),
            "images_per_s": round(n / phash["seconds"], 1)},
        "imagededup_phash_curve": idd_curve,
        "imagededup_cnn": ({"runnable": False, "error": cnn["error"], "why": cnn["why"]} if not cnn.get("runnable")
                           else {"runnable": True, "seconds": cnn["seconds"]}),
        "ours@defaults": {
            "hamming_radius": nd.DEFAULT_HAMMING_RADIUS, "cosine_threshold": nd.DEFAULT_COSINE_THRESHOLD,
            "hash_min_cosine": nd.DEFAULT_HASH_MIN_COSINE, "linkage": nd.DEFAULT_LINKAGE,
            "groups": pair_metrics(res.groups, labels), "pairs": edge_metrics(res.edges, labels),
            "per_kind": per_kind(res.groups, files),
            "seconds_one_process": {k: round(v, 3) for k, v in sec.items()},
            "images_per_s_one_process": round(n / sec["total"], 1),
            "workers": workers, "seconds": round(pool_best, 3), "images_per_s": round(n / pool_best, 1),
            "signatures_per_s": round(n / sec["signature"], 1)},
        "ours_linkage": linkage,
        "ours_sweep": rows,
        "ours_pick": pick_defaults(rows, nd.DEFAULT_LINKAGE),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", default=os.environ.get("MMP_PEERS_PYTHON")
                        or str(HERE / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=2000, help="synthetic scenes to check (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--peer-phash", help=argparse.SUPPRESS)
    parser.add_argument("--peer-cnn", help=argparse.SUPPRESS)
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_phash:
        _peer_phash(args.peer_phash, args.peer_out, args.repeats)
        return 0
    if args.peer_cnn:
        _peer_cnn(args.peer_cnn, args.peer_out)
        return 0
    if not Path(args.peers_python).exists():
        parser.error(f"peers python not found: {args.peers_python} (make bench-peers, or --peers-python)")
    sys.path.insert(0, str(HERE.parent))

    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "seeds": {}}
    for seed in args.seeds:
        r = run_seed(seed, args.peers_python, args.repeats)
        report["seeds"][str(seed)] = r
        s = r["set"]
        print(f"\nseed {seed}: {s['originals']} originals x {s['copies'] // s['originals']} copies + "
              f"{s['distractors']} distractors = {s['images']} images, {s['pairs']} pairs, "
              f"{s['positive_pairs']} same-group pairs")
        print(f"{'method':44s} {'groups P  R':>15s}   {'pairs P  R':>15s}   {'img/s':>7s}")
        idd, ours = r["imagededup_phash@10"], r["ours@defaults"]
        print(f"{'imagededup PHash (max_distance 10)':44s} {_fmt(idd['groups'])}   {_fmt(idd['pairs'])}   "
              f"{idd['images_per_s']:7.1f}")
        print(f"{'imagededup CNN':44s} not runnable: {r['imagededup_cnn'].get('error', '')[:60]}")
        label = (f"ours (r {ours['hamming_radius']}, cos {ours['cosine_threshold']}, {ours['linkage']})")
        print(f"{label:44s} {_fmt(ours['groups'])}   {_fmt(ours['pairs'])}   {ours['images_per_s']:7.1f}")
        for lk, m in r["ours_linkage"].items():
            print(f"{'  linkage ' + lk:44s} {_fmt(m['groups'])}   largest group {m['largest_group']}")
        print("  per kind (copy grouped with its original), imagededup | ours:")
        for k in ours["per_kind"]:
            print(f"    {k:14s} {idd['per_kind'][k]:.2f} | {ours['per_kind'][k]:.2f}")
        print("  operating curve (group P / R, connected | star; pair P / R):")
        for x in r["ours_sweep"]:
            off_radius = x["signal"] == "both" and x["hamming_radius"] != ours["hamming_radius"]
            if x["signal"] in ("phash", "whole_view_only") or off_radius:
                continue
            what = ("views only" if x["signal"] == "views" else f"views + phash r {x['hamming_radius']}")
            print(f"    {what:22s} cos {x['cosine_threshold']:.2f}  {_fmt(x['connected'])} | {_fmt(x['star'])}; "
                  f"{_fmt(x['pairs'])}")
        for sig in ("whole_view_only", "views"):
            for lk in ("connected", "star"):
                ok = [x for x in r["ours_sweep"] if x["signal"] == sig and x[lk]["precision"] >= 0.99]
                b = max(ok, key=lambda x: x[lk]["recall"], default=None)
                if b:
                    print(f"  best group recall at precision >= 0.99, {sig:15s} {lk:9s}: {b[lk]['recall']:.4f} "
                          f"(cos {b['cosine_threshold']:.2f}, P {b[lk]['precision']:.4f})")
        print("  pHash alone (ours, group P / R connected):  " + "  ".join(
            f"r{x['hamming_radius']} {x['connected']['precision']:.3f}/{x['connected']['recall']:.3f}"
            for x in r["ours_sweep"] if x["signal"] == "phash"))
        pick = r["ours_pick"]
        if pick:
            m = pick[ours["linkage"]]
            print(f"  pick ({ours['linkage']}, precision >= 0.995): cosine {pick['cosine_threshold']} at radius "
                  f"{pick['hamming_radius']}: P {m['precision']:.4f} R {m['recall']:.4f}")
        else:
            print("  pick: no threshold reaches precision >= 0.995 with recall >= 0.9")
    if args.synthetic:
        report["synthetic"] = synthetic_check(args.synthetic)
        print(f"\nsynthetic scenes ({args.synthetic}, all distinct): quarantined / pairs / largest group")
        for k, v in report["synthetic"].items():
            if k.startswith("phash_pairs"):
                print(f"  {k}: {v}")
            elif k != "images":
                print(f"  {k:34s} {v['quarantined']:5d} {v['pairs']:6d} {v['largest_group']:5d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
