"""Data-quality report of a canonical dataset: what is in it, what was dropped and why, how sparse and
how diverse its text is. One self-contained HTML file (inline CSS, images as data URIs, no script, nothing
fetched) plus flat numbers for MLflow.

Usage::

    rep = build_report("data/processed/clean")      # a dict, JSON-serialisable
    write_html(rep, "reports/data/clean.html")
    summary_metrics(rep)                            # {"data_quarantined": 12.0, "data_distinct_2": 0.31, ...}

Why these figures: a multimodal model trained on sparse, repetitive or generic captions learns a bag of
frequent words, not grounded concepts. The report shows the long tail of concepts (rank-frequency,
coverage, hapax legomena) and the colour x shape pairs of the synthetic scenes (CLEVR-CoGenT-style held-out
pairs show up as empty cells), lexical diversity (distinct-n, Li et al. 2016, "A Diversity-Promoting
Objective Function for Neural Conversation Models"), agreement between an image's captions (COCO has five
per image) and specificity (captions that could describe any image carry little signal for contrastive
training). Image issues follow the names and score convention of CleanVision (lower score = worse).

Memory stays bounded: the image column is never read for the whole dataset. Every shard is read without
it; only the rows chosen as examples are fetched again (one shard at a time), decoded with the safe
:func:`mmplatform.data.images.decode_image` and shrunk to thumbnails. An image that does not decode shows
as a placeholder: a bad image never makes the report fail.

Definitions (all text figures are over kept records; tokens are lowercased runs of letters/digits):

* ``distinct_n``: distinct n-grams / total n-grams over all captions (n-grams do not cross captions;
  stop words included). ``distinct_1`` is the corpus type-token ratio.
* ``type_token_ratio``: mean over captions of (distinct tokens / tokens) within one caption: 1.0 means no
  word is repeated inside a caption; degenerate captions ("a red a red a red") score low.
* ``unique_caption_share``: distinct captions / captions, captions compared as their token sequences
  (case and punctuation ignored).
* ``intra_image_similarity``: mean over images with >= 2 captions of the mean pairwise Jaccard similarity
  of the captions' concept sets (first 20 captions of an image).
* ``mean_idf``: mean over concept tokens of ln(N / df(w)), N = images with a caption, df(w) = images whose
  captions mention w; ``idf_specificity`` = mean_idf / ln N in [0, 1] (1: every word names one image only).
* ``image_specific_caption_share``: share of captions whose text occurs for exactly one image.
* Concepts: tokens minus :data:`STOP_WORDS`; ``concept_coverage_50``/``_90``: fewest most-frequent
  concepts that make up 50% / 90% of all concept mentions; ``hapax_share``: concepts seen exactly once /
  concepts.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import time
import warnings
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmplatform.data.dataset import SPLITS, read_manifest
from mmplatform.data.images import decode_image

log = logging.getLogger(__name__)

# Image issue names, exactly as the clean stage writes them in meta["quality"] (CleanVision's names).
IMAGE_ISSUES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")

# English function words (a compact NLTK-style list). Spatial words (left, right, above, below, top,
# bottom, behind, front, over, under, between, near) are kept on purpose: they are concepts here.
STOP_WORDS = frozenset(
    """a an the and or but nor so yet if then than that this these those there here is are was were be been
    being am do does did doing have has had having of in on at to for from by with without into onto upon
    about as it its it's he she they them their theirs his her hers him we us our you your i me my mine
    what which who whom whose when where why how all any both each few more most other some such no not
    only own same too very can will just should would could may might must shall s t d ll m o re ve y
    also while during through again further once out up down off against until because per via""".split()
)

_TOKEN = re.compile(r"[^\W_]+")
_SCORE = re.compile(r"score\s+([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_DUP = re.compile(r"^\s*of\s+(\S+)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_METRIC_SAFE = re.compile(r"[^\w.-]+")

THUMB_SIZE = 96
MAX_CAPTIONS_COMPARED = 20  # per image, for intra-image similarity (pairs grow quadratically)
TOP_CONCEPTS = 30
EXTREME_CAPTIONS = 5  # shortest and longest captions listed

_KEPT_COLS = ("sample_id", "image_sha256", "width", "height", "captions", "questions", "answers", "source",
              "split", "meta")
_QUAR_COLS = _KEPT_COLS + ("reason", "stage")

DEFINITIONS: dict[str, str] = {
    "records": "rows of the dataset (one image each)",
    "images": "distinct image_sha256 among the records",
    "captions": "caption strings over all records",
    "qa_pairs": "question/answer pairs (aligned by position)",
    "quarantined": "rows under quarantine/ (dropped by a stage, with a reason)",
    "distinct_1": "distinct unigrams / total unigrams over all captions (the corpus type-token ratio)",
    "distinct_2": "distinct bigrams / total bigrams over all captions (bigrams never cross captions)",
    "type_token_ratio": "mean over captions of distinct tokens / tokens within the caption (1 = no repeats)",
    "unique_caption_share": "distinct captions / captions (compared case- and punctuation-insensitively)",
    "intra_image_similarity": "mean over images with >= 2 captions of the mean pairwise Jaccard similarity "
                              "of their captions' concept sets (agreement between an image's captions)",
    "mean_idf": "mean over concept mentions of ln(N / df), N = images with captions, df = images mentioning "
                "the concept (higher = more specific words)",
    "idf_specificity": "mean_idf / ln N, in [0, 1]: 1 when every concept names a single image",
    "image_specific_caption_share": "share of captions whose text occurs for exactly one image (the rest "
                                    "could describe several images: unspecific)",
    "vocabulary": "distinct concepts (lowercased words minus stop words)",
    "mentions": "concept tokens over all captions",
    "concept_coverage_50": "fewest most-frequent concepts that make up 50% of all concept mentions",
    "concept_coverage_90": "fewest most-frequent concepts that make up 90% of all concept mentions",
    "hapax_share": "concepts seen exactly once / concepts (the long tail)",
}


# ----------------------------------------------------------------------------- text helpers
def tokens(text: str) -> list[str]:
    """Lowercased runs of letters/digits (punctuation and underscores split words)."""
    return _TOKEN.findall(text.lower())


def concepts(toks: list[str]) -> list[str]:
    return [t for t in toks if t not in STOP_WORDS]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _coverage(freqs: list[int], share: float) -> int:
    """Fewest of the (descending) ``freqs`` whose sum reaches ``share`` of the total."""
    total = sum(freqs)
    if not total:
        return 0
    cum = np.cumsum(freqs)
    return int(np.searchsorted(cum, share * total - 1e-9) + 1)


def _meta(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        m = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _strs(v: Any) -> list[str]:
    return [x for x in (v or []) if isinstance(x, str)]


def _split_reason(reason: str) -> tuple[str, str]:
    code, _, detail = (reason or "").partition(":")
    return code.strip() or "unknown", detail.strip()


def _quality(meta: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    q = meta.get("quality")
    if not isinstance(q, dict):
        return [], {}
    issues = [i for i in q.get("issues") or [] if isinstance(i, str)]
    scores = {}
    for k, v in (q.get("scores") or {}).items() if isinstance(q.get("scores"), dict) else ():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            scores[str(k)] = float(v)
    return issues, scores


# ----------------------------------------------------------------------------- reading
def _shards(dataset_dir: Path) -> list[Path]:
    return sorted((dataset_dir / "shards").glob("*.parquet"))


def _read_rows(dataset_dir: Path, kind: str, wanted: tuple[str, ...]) -> list[dict[str, Any]]:
    """All rows without the image column; each carries ``_loc`` = (kind, shard index, row index)."""
    rows: list[dict[str, Any]] = []
    for si, shard in enumerate(_shards(dataset_dir)):
        names = set(pq.read_schema(shard).names)
        table = pq.read_table(shard, columns=[c for c in wanted if c in names])
        for ri, r in enumerate(table.to_pylist()):
            r["_loc"] = (kind, si, ri)
            rows.append(r)
    return rows


def _thumbnail(data: bytes | None) -> str | None:
    """A small data-URI thumbnail, or None when the bytes do not decode safely."""
    if not data:
        return None
    try:
        im = decode_image(data)
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        # Few colours (synthetic scenes, icons): lossless PNG is small; photos: JPEG is ~5x smaller.
        if im.getcolors(256) is not None:
            im.save(buf, format="PNG", optimize=False)
            mime = "image/png"
        else:
            im.save(buf, format="JPEG", quality=85)
            mime = "image/jpeg"
    except Exception as exc:  # noqa: BLE001 - a bad image must never break the report
        log.debug("no thumbnail: %s", exc)
        return None
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fetch_thumbnails(dirs: dict[str, Path], locs: set[tuple[str, int, int]]) -> dict[tuple, str | None]:
    """Read the image column only for the example rows, one shard at a time."""
    out: dict[tuple, str | None] = {}
    by_shard: dict[tuple[str, int], list[int]] = defaultdict(list)
    for kind, si, ri in locs:
        by_shard[(kind, si)].append(ri)
    for (kind, si), rows in sorted(by_shard.items()):
        shard = _shards(dirs[kind])[si]
        rows = sorted(rows)
        col = pq.read_table(shard, columns=["image"]).column("image").take(rows).to_pylist()
        for ri, data in zip(rows, col, strict=True):
            out[(kind, si, ri)] = _thumbnail(data)
    return out


# ----------------------------------------------------------------------------- building
def build_report(dataset_dir: str | Path, *, max_examples: int = 8) -> dict[str, Any]:
    """Everything the HTML shows, as a JSON-serialisable dict (thumbnails are data-URI strings).

    Keys: ``dataset``, ``counts``, ``quarantine``, ``issues``, ``duplicates``, ``captions``, ``concepts``,
    ``diversity``, ``caption_repairs``, ``definitions``, ``timing_s``. Undefined ratios (no captions, one image) are
    None. See the module docstring for the definitions. Raises FileNotFoundError if ``dataset_dir`` is
    not a dataset.
    """
    t0 = time.perf_counter()
    root = Path(dataset_dir)
    manifest = read_manifest(root)
    qdir = root / "quarantine"
    dirs = {"kept": root, "quarantine": qdir}
    kept = _read_rows(root, "kept", _KEPT_COLS)
    quar = _read_rows(qdir, "quarantine", _QUAR_COLS) if (qdir / "manifest.json").is_file() else []
    for r in kept + quar:  # parse meta, count QA pairs and drop those strings early
        r["_meta"] = _meta(r.pop("meta", None))
        r["_qa"] = min(len(r.pop("questions", None) or []), len(r.pop("answers", None) or []))
        r["captions"] = _strs(r.get("captions"))
        r["source"] = r.get("source") or ""
        r["sample_id"] = r.get("sample_id") or ""
    # Tokenise once; every text figure reuses these. Tokens are interned through ``vocab`` so that a
    # million mentions cost a million pointers, not a million string objects.
    vocab: dict[str, str] = {}
    for r in kept:
        r["_toks"] = [[vocab.setdefault(t, t) for t in tokens(c)] for c in r["captions"]]
        r["_concepts"] = [concepts(t) for t in r["_toks"]]
    for r in quar:
        r["_code"], r["_detail"] = _split_reason(r.get("reason") or "")
    index = _CaptionIndex(kept)
    examples: set[tuple[str, int, int]] = set()

    report: dict[str, Any] = {
        "dataset": {"path": str(root), "stage": manifest.get("stage", ""),
                    "content_hash": manifest.get("content_hash", ""),
                    "schema_version": manifest.get("schema_version")},
        "counts": _counts(kept, quar),
        "quarantine": _quarantine(quar, max_examples, examples),
        "issues": _issues(kept, quar, max_examples, examples),
        "duplicates": _duplicates(kept, quar, max_examples, examples),
        "captions": _caption_stats(kept, index),
        "concepts": _concepts(kept),
        "diversity": _diversity(kept, index),
        "caption_repairs": _repairs(kept),
        "definitions": dict(DEFINITIONS),
    }
    thumbs = _fetch_thumbnails(dirs, examples)
    _fill_thumbs(report, thumbs)
    report["timing_s"] = round(time.perf_counter() - t0, 3)
    log.info("data report of %s: %d records, %d quarantined, %d thumbnails in %.2fs", root, len(kept),
             len(quar), len(thumbs), report["timing_s"])
    return report


def _fill_thumbs(obj: Any, thumbs: dict[tuple, str | None]) -> None:
    if isinstance(obj, dict):
        loc = obj.pop("_loc", None)
        if loc is not None:
            obj["thumb"] = thumbs.get(tuple(loc))
        for v in obj.values():
            _fill_thumbs(v, thumbs)
    elif isinstance(obj, list):
        for v in obj:
            _fill_thumbs(v, thumbs)


def _example(r: dict[str, Any], examples: set, **extra: Any) -> dict[str, Any]:
    examples.add(r["_loc"])
    caps = r["captions"]
    return {"sample_id": r["sample_id"], "source": r["source"], "split": r.get("split") or "",
            "caption": caps[0] if caps else "", "_loc": r["_loc"], **extra}


def _counts(kept: list[dict], quar: list[dict]) -> dict[str, Any]:
    splits: dict[str, dict[str, int]] = {}
    for r in kept:
        s = splits.setdefault(r.get("split") or "", {"records": 0, "captions": 0, "qa_pairs": 0})
        s["records"] += 1
        s["captions"] += len(r["captions"])
        s["qa_pairs"] += r["_qa"]
    order = {s: i for i, s in enumerate(SPLITS)}
    splits = dict(sorted(splits.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return {
        "records": len(kept),
        "images": len({r.get("image_sha256") or r["sample_id"] for r in kept}),
        "captions": sum(s["captions"] for s in splits.values()),
        "qa_pairs": sum(s["qa_pairs"] for s in splits.values()),
        "splits": splits,
        "quarantined": len(quar),
        "read": len(kept) + len(quar),
    }


def _quarantine(quar: list[dict], max_examples: int, examples: set) -> dict[str, Any]:
    by_code: dict[str, list[dict]] = defaultdict(list)
    for r in quar:
        by_code[r["_code"]].append(r)
    reasons = {}
    for code, rows in sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        reasons[code] = {
            "count": len(rows),
            "stages": dict(Counter(r.get("stage") or "" for r in rows).most_common()),
            "examples": [_example(r, examples, detail=r["_detail"], stage=r.get("stage") or "")
                         for r in rows[:max_examples]],
        }
    return {"total": len(quar), "reasons": reasons}


def _issues(kept: list[dict], quar: list[dict], max_examples: int, examples: set) -> dict[str, Any]:
    """Per image issue: kept records flagged in meta["quality"], quarantined rows whose reason code is the
    issue, and the worst-scoring examples of both."""
    cands: dict[str, list[tuple[float | None, str, dict]]] = defaultdict(list)
    flagged: Counter[str] = Counter()
    for r in kept:
        issues, scores = _quality(r["_meta"])
        for issue in dict.fromkeys(issues):
            flagged[issue] += 1
            cands[issue].append((scores.get(issue), "kept", r))
    dropped: Counter[str] = Counter()
    for r in quar:
        code = r["_code"]
        if code in DUPLICATE_KINDS:
            dropped[code] += 1
            continue
        _, scores = _quality(r["_meta"])
        m = _SCORE.search(r["_detail"])
        score = float(m.group(1)) if m else scores.get(code)
        if code in IMAGE_ISSUES or code in flagged:
            dropped[code] += 1
            cands[code].append((score, "quarantined", r))
    # Known issues first (always listed, so runs compare), then any other flagged name, then duplicates.
    others = (set(flagged) | set(dropped)) - set(IMAGE_ISSUES) - set(DUPLICATE_KINDS)
    names = list(IMAGE_ISSUES) + sorted(others) + list(DUPLICATE_KINDS)
    out: dict[str, Any] = {}
    for name in names:
        worst = sorted(cands.get(name, []), key=lambda c: (c[0] is None, c[0] if c[0] is not None else 0.0))
        out[name] = {
            "kept_flagged": flagged.get(name, 0),
            "quarantined": dropped.get(name, 0),
            "total": flagged.get(name, 0) + dropped.get(name, 0),
            "examples": [_example(r, examples, score=s, status=status) for s, status, r in worst[:max_examples]],
        }
    return out


def _duplicates(kept: list[dict], quar: list[dict], max_examples: int, examples: set) -> dict[str, Any]:
    """Duplicate groups: a kept representative beside the members dropped as ``<kind>: of <id>``."""
    by_id: dict[str, dict] = {}
    for r in quar + kept:  # kept rows win when an id is in both
        by_id[r["sample_id"]] = r
    out: dict[str, Any] = {}
    for kind in DUPLICATE_KINDS:
        groups: dict[str, list[tuple[dict, str]]] = defaultdict(list)
        for r in quar:
            if r["_code"] != kind:
                continue
            m = _DUP.match(r["_detail"])
            rep = m.group(1) if m else ""
            groups[rep].append((r, (m.group(2) or "") if m else r["_detail"]))
        if kind == "near_duplicate":
            reps_meta = {str(r["_meta"]["near_duplicate_group"]) for r in kept
                         if r["_meta"].get("near_duplicate_group")}
        else:
            reps_meta = set()
        ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        shown = []
        for rep_id, members in ranked[:max_examples]:
            rep = by_id.get(rep_id)
            shown.append({
                "representative": (_example(rep, examples, status="kept" if rep["_loc"][0] == "kept"
                                            else "quarantined") if rep
                                   else {"sample_id": rep_id, "source": "", "caption": "", "thumb": None,
                                         "status": "missing"}),
                "members": [_example(r, examples, how=how) for r, how in members[:max_examples]],
                "size": len(members) + 1,
            })
        out[kind] = {
            "groups": len(set(groups) | reps_meta),
            "dropped": sum(len(v) for v in groups.values()),
            "largest": max((len(v) + 1 for v in groups.values()), default=0),
            "examples": shown,
        }
    return out


def _hist(values: list[int]) -> dict[str, list[int]]:
    c = Counter(values)
    keys = sorted(c)
    return {"value": keys, "count": [c[k] for k in keys]}


class _CaptionIndex:
    """Each distinct caption (as its token sequence) -> how often, and on how many images. Memory stays
    small when most captions are unique: the set of images is only kept for captions seen on several."""

    def __init__(self, kept: list[dict]):
        self.count: Counter[str] = Counter()
        self.first_image: dict[str, str] = {}
        self.first_form: dict[str, str] = {}
        self.other_images: dict[str, set[str]] = {}
        for r in kept:
            sid = r["sample_id"]
            for c, toks in zip(r["captions"], r["_toks"], strict=True):
                key = " ".join(toks)
                self.count[key] += 1
                first = self.first_image.setdefault(key, sid)
                self.first_form.setdefault(key, c)
                if first != sid:
                    self.other_images.setdefault(key, set()).add(sid)

    def images(self, key: str) -> int:
        return 1 + len(self.other_images.get(key, ()))


def _caption_stats(kept: list[dict], index: _CaptionIndex) -> dict[str, Any]:
    lengths = [len(c.split()) for r in kept for c in r["captions"]]
    per_image = [len(r["captions"]) for r in kept]
    a = np.asarray(lengths, dtype=float)
    words = ({"mean": float(a.mean()), "median": float(np.median(a)), "p05": float(np.percentile(a, 5)),
              "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "min": int(a.min()),
              "max": int(a.max())} if len(a) else None)
    # Captions that occur for several images: the most generic ones (case/punctuation-insensitive).
    generic = sorted(((index.images(k), k) for k in index.other_images), key=lambda t: (-t[0], t[1]))
    flat = [(c, r["sample_id"]) for r in kept for c in r["captions"]]  # same order as ``lengths``
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    picks = order[:EXTREME_CAPTIONS] + order[EXTREME_CAPTIONS:][-EXTREME_CAPTIONS:]
    outliers = [{"caption": flat[i][0][:300], "words": lengths[i], "sample_id": flat[i][1]} for i in picks]
    return {
        "length_hist": _hist(lengths),
        "per_image_hist": _hist(per_image),
        "words": words,
        "captions_per_image_mean": float(np.mean(per_image)) if per_image else None,
        "images_without_captions": sum(1 for n in per_image if n == 0),
        "most_shared": [{"caption": index.first_form[k][:300], "images": n} for n, k in generic[:10]],
        "shortest_longest": outliers,
    }


def _concepts(kept: list[dict]) -> dict[str, Any]:
    freq: Counter[str] = Counter()
    for r in kept:
        for cl in r["_concepts"]:
            freq.update(cl)
    ranked = freq.most_common()
    freqs = [n for _, n in ranked]
    vocab, mentions = len(freqs), sum(freqs)
    hapax = sum(1 for n in freqs if n == 1)
    return {
        "vocabulary": vocab,
        "mentions": mentions,
        "top": [[w, n] for w, n in ranked[:TOP_CONCEPTS]],
        "frequencies": freqs,
        "concept_coverage_50": _coverage(freqs, 0.5),
        "concept_coverage_90": _coverage(freqs, 0.9),
        "hapax": hapax,
        "hapax_share": _ratio(hapax, vocab),
        "color_shape": _color_shape(kept),
    }


def _color_shape(kept: list[dict]) -> dict[str, Any] | None:
    """Object counts per (colour, shape) from synthetic scene graphs (meta["objects"]), all and per split."""
    from mmplatform.data.synthetic import COLORS, SHAPES

    pairs: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for r in kept:
        objs = r["_meta"].get("objects")
        if not isinstance(objs, list):
            continue
        for o in objs:
            if isinstance(o, dict) and isinstance(o.get("color"), str) and isinstance(o.get("shape"), str):
                pair = (o["color"], o["shape"])
                pairs["all"][pair] += 1
                pairs[r.get("split") or ""][pair] += 1
    if not pairs:
        return None
    seen_c = {c for c, _ in pairs["all"]}
    seen_s = {s for _, s in pairs["all"]}
    colors = [c for c in COLORS if c in seen_c] + sorted(seen_c - set(COLORS))
    shapes = [s for s in SHAPES if s in seen_s] + sorted(seen_s - set(SHAPES))
    counts = {name: [[cnt[(c, s)] for s in shapes] for c in colors] for name, cnt in pairs.items()}
    zero = {name: [[c, s] for c in colors for s in shapes if not cnt[(c, s)]] for name, cnt in pairs.items()}
    return {"colors": colors, "shapes": shapes, "counts": counts, "zero_pairs": zero}


def _diversity(kept: list[dict], index: _CaptionIndex) -> dict[str, Any]:
    uni_total = bi_total = 0
    uni: set[str] = set()
    bi: set[tuple[str, str]] = set()
    ttrs: list[float] = []
    df: Counter[str] = Counter()  # images whose captions mention the concept
    cfreq: Counter[str] = Counter()  # concept mentions
    sims: list[float] = []
    n_images = 0
    for r in kept:
        for toks in r["_toks"]:
            if toks:
                ttrs.append(len(set(toks)) / len(toks))
            uni_total += len(toks)
            uni.update(toks)
            bi_total += max(len(toks) - 1, 0)
            bi.update(zip(toks, toks[1:], strict=False))  # bigrams: the tokens beside themselves shifted by one
        sets = [set(cl) for cl in r["_concepts"]]
        for cl in r["_concepts"]:
            cfreq.update(cl)
        if sets:
            n_images += 1
            df.update(set().union(*sets))
        pair_sims = [len(a & b) / len(a | b) for a, b in combinations(sets[:MAX_CAPTIONS_COMPARED], 2) if a | b]
        if pair_sims:
            sims.append(sum(pair_sims) / len(pair_sims))
    n_caps = sum(index.count.values())

    mean_idf = idf_spec = None
    mentions = sum(cfreq.values())
    if n_images > 1 and mentions:
        mean_idf = sum(n * math.log(n_images / df[w]) for w, n in cfreq.items()) / mentions
        idf_spec = mean_idf / math.log(n_images)
    specific = sum(n for key, n in index.count.items() if key not in index.other_images)
    return {
        "distinct_1": _ratio(len(uni), uni_total),
        "distinct_2": _ratio(len(bi), bi_total),
        "unigrams": uni_total,
        "bigrams": bi_total,
        "type_token_ratio": float(np.mean(ttrs)) if ttrs else None,
        "unique_caption_share": _ratio(len(index.count), n_caps),
        "intra_image_similarity": float(np.mean(sims)) if sims else None,
        "images_compared": len(sims),
        "mean_idf": mean_idf,
        "idf_specificity": idf_spec,
        "image_specific_caption_share": _ratio(specific, n_caps),
    }


def _repairs(kept: list[dict]) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    records = 0
    for r in kept:
        rep = r["_meta"].get("caption_repairs")
        if isinstance(rep, list) and rep:
            records += 1
            codes.update(str(x) for x in rep)
    return {"records": records, "codes": dict(sorted(codes.items(), key=lambda kv: (-kv[1], kv[0])))}


# ----------------------------------------------------------------------------- metrics
def _metric_key(*parts: str) -> str:
    return "_".join(_METRIC_SAFE.sub("_", p).strip("_") or "none" for p in parts)


def summary_metrics(report: dict[str, Any]) -> dict[str, int | float]:
    """Flat numeric figures for MLflow (names are ``[\\w.-]`` only, prefixed ``data_``); undefined ratios
    are left out. Every known image issue is present (0 when absent) so that runs are comparable."""
    c, d, k = report["counts"], report["diversity"], report["concepts"]
    out: dict[str, float] = {
        "data_records": c["records"], "data_images": c["images"], "data_captions": c["captions"],
        "data_qa_pairs": c["qa_pairs"], "data_quarantined": c["quarantined"],
        "data_vocabulary": k["vocabulary"], "data_concept_mentions": k["mentions"],
        "data_concept_coverage_50": k["concept_coverage_50"], "data_concept_coverage_90": k["concept_coverage_90"],
        "data_hapax_share": k["hapax_share"],
        "data_caption_repaired_records": report["caption_repairs"]["records"],
        "data_captions_per_image_mean": report["captions"]["captions_per_image_mean"],
        "data_images_without_captions": report["captions"]["images_without_captions"],
    }
    words = report["captions"]["words"]
    if words:
        out["data_caption_words_mean"] = words["mean"]
        out["data_caption_words_p95"] = words["p95"]
    for name in ("distinct_1", "distinct_2", "type_token_ratio", "unique_caption_share", "intra_image_similarity",
                 "mean_idf", "idf_specificity", "image_specific_caption_share"):
        out[f"data_{name}"] = d[name]
    for split, s in c["splits"].items():
        out[_metric_key("data_split", split or "unsplit", "records")] = s["records"]
    for code, q in report["quarantine"]["reasons"].items():
        out[_metric_key("data_quarantine", code)] = q["count"]
    for issue, v in report["issues"].items():
        out[_metric_key("data_issue", issue)] = v["total"]
    for kind, v in report["duplicates"].items():
        out[_metric_key("data", kind, "groups")] = v["groups"]
    for code, n in report["caption_repairs"]["codes"].items():
        out[_metric_key("data_caption_repairs", code)] = n
    # Counts stay integers ("data_records": 544, not 544.0); ratios and means are floats.
    return {key: v if isinstance(v, int) and not isinstance(v, bool) else float(v)
            for key, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- figures
def _figure(width: float = 6.0, height: float = 3.2):
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bar_hist(hist: dict[str, list[int]], title: str, xlabel: str, ylabel: str, clip: float | None = None):
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    x, y = np.asarray(hist["value"]), np.asarray(hist["count"])
    hidden = 0
    if clip is not None and len(x) and x.max() > 2 * max(clip, 1):
        keep = x <= clip
        hidden = int(y[~keep].sum())
        x, y = x[keep], y[keep]
    ax.bar(x, y, width=0.9 if len(x) < 80 else 1.0, color="#4c72b0")
    ax.set_title(title + (f" ({hidden} beyond {int(clip)} not shown)" if hidden else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    return fig


def report_figures(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG figures of the report, by file name (only those with data to show). Dataset words (tick labels)
    are drawn with mathtext off, so a caption word such as ``$x$`` is never parsed as TeX."""
    import matplotlib

    figs: dict[str, bytes] = {}
    cap, con = report["captions"], report["concepts"]
    with matplotlib.rc_context({"font.size": 9}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic scripts are not worth a warning each
        if cap["length_hist"]["value"]:
            clip = cap["words"]["p99"] if cap["words"] else None
            figs["caption_length.png"] = _png(_bar_hist(cap["length_hist"], "Caption length",
                                                        "words per caption", "captions", clip))
        if cap["per_image_hist"]["value"]:
            figs["captions_per_image.png"] = _png(_bar_hist(cap["per_image_hist"], "Captions per image",
                                                            "captions", "images"))
        if con["top"]:
            words = [w for w, _ in con["top"]][::-1]
            counts = [n for _, n in con["top"]][::-1]
            fig = _figure(6.0, max(2.5, 0.18 * len(words) + 0.8))
            ax = fig.add_subplot()
            ax.barh(range(len(words)), counts, color="#55a868")
            ax.set_yticks(range(len(words)), [w[:30] for w in words], parse_math=False)
            ax.set_title(f"Top {len(words)} concepts (of {con['vocabulary']})", fontsize=10)
            ax.set_xlabel("mentions")
            ax.grid(axis="x", alpha=0.3)
            figs["concepts_top.png"] = _png(fig)
        if con["frequencies"]:
            f = np.asarray(con["frequencies"], dtype=float)
            r = np.arange(1, len(f) + 1)
            fig = _figure(5.0, 3.6)
            ax = fig.add_subplot()
            ax.loglog(r, f, marker=".", linestyle="-", color="#c44e52", label="concepts")
            ax.loglog(r, f[0] / r, linestyle="--", color="grey", label="Zipf (1/rank)")
            for share, key in ((0.5, "concept_coverage_50"), (0.9, "concept_coverage_90")):
                k = con[key]
                ax.axvline(k, color="#8172b2", alpha=0.5, linestyle=":")
                ax.annotate(f"{int(share * 100)}% of mentions", (k, f.min()), rotation=90, va="bottom",
                            ha="right", fontsize=8, color="#8172b2")
            ax.set_title(f"Rank-frequency; hapax share {con['hapax_share']:.2f}", fontsize=10)
            ax.set_xlabel("rank")
            ax.set_ylabel("mentions")
            ax.legend(fontsize=8)
            figs["concepts_rank_frequency.png"] = _png(fig)
        cs = con.get("color_shape")
        if cs:
            panels = ["all"] + (["train"] if "train" in cs["counts"] and len(cs["counts"]) > 2 else [])
            fig = _figure(4.2 * len(panels) + 0.6, 0.45 * len(cs["colors"]) + 1.6)
            axes = fig.subplots(1, len(panels), squeeze=False)[0]
            for ax, name in zip(axes, panels, strict=True):
                m = np.asarray(cs["counts"][name], dtype=float)
                im = ax.imshow(m, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(cs["shapes"])), cs["shapes"], rotation=30, ha="right", parse_math=False)
                ax.set_yticks(range(len(cs["colors"])), cs["colors"], parse_math=False)
                hi = m.max() if m.size else 0
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        v = int(m[i, j])
                        ax.text(j, i, str(v) if v else "0 (none)", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 * hi else "white")
                ax.set_title(f"objects per colour x shape ({name})", fontsize=10)
                fig.colorbar(im, ax=ax, shrink=0.8)
            figs["color_shape.png"] = _png(fig)
    return figs


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}
.card{width:112px;font-size:11px;border:1px solid #e2e2e2;border-radius:4px;padding:4px;overflow-wrap:anywhere}
.card.q{border-color:#d9534f}.thumb{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;
background:#eee;display:block;margin:auto}
.noimg{width:96px;height:96px;background:#f8e0e0;color:#a33;display:flex;align-items:center;
justify-content:center;text-align:center;font-size:11px;margin:auto}
.fig{max-width:100%;border:1px solid #eee;margin:4px 8px 4px 0}.muted{color:#777}.dup{display:flex;gap:16px;
align-items:flex-start;margin:8px 0;padding:6px;border-bottom:1px dashed #ddd}
.def{color:#555;font-size:0.9em}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _card(ex: dict[str, Any], lines: list[str], quarantined: bool = False) -> str:
    thumb = ex.get("thumb")
    img = (f'<img class="thumb" src="{thumb}" alt="{_e(ex.get("sample_id"))}">' if thumb
           else '<div class="noimg">no preview</div>')
    body = "<br>".join(lines)
    return f'<div class="card{" q" if quarantined else ""}" title="{_e(ex.get("caption"))}">{img}{body}</div>'


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{_fmt(v)}</td>' if isinstance(v, int | float) and
                                    not isinstance(v, bool) or v is None else f"<td>{_e(v)}</td>" for v in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fig_tag(figs: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figs:
        return ""
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(figs[name]).decode()}">'


def _defs(keys: list[str], report: dict[str, Any]) -> str:
    d = report.get("definitions", DEFINITIONS)
    return '<ul class="def">' + "".join(f"<li><b>{_e(k)}</b>: {_e(d[k])}</li>" for k in keys if k in d) + "</ul>"


def render_html(report: dict[str, Any], figures: dict[str, bytes] | None = None) -> str:
    """The report as one self-contained HTML page (all dataset text escaped)."""
    figs = report_figures(report) if figures is None else figures
    c, q, d, k, cap = (report["counts"], report["quarantine"], report["diversity"], report["concepts"],
                       report["captions"])
    ds = report["dataset"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Data report: {_e(ds['path'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Data report: {_e(ds['path'])}</h1>",
             f"<p class='muted'>stage {_e(ds['stage']) or 'n/a'} · content hash {_e(ds['content_hash'])[:16]}"
             f" · schema v{_e(ds['schema_version'])}</p>"]

    # Summary
    dup = report["duplicates"]
    summary = [("records", c["records"]), ("images", c["images"]), ("captions", c["captions"]),
               ("qa_pairs", c["qa_pairs"]), ("quarantined", c["quarantined"]),
               ("near-duplicate groups", dup["near_duplicate"]["groups"]),
               ("vocabulary", k["vocabulary"]), ("hapax_share", k["hapax_share"]),
               ("distinct_1", d["distinct_1"]), ("distinct_2", d["distinct_2"]),
               ("unique_caption_share", d["unique_caption_share"]),
               ("intra_image_similarity", d["intra_image_similarity"]),
               ("idf_specificity", d["idf_specificity"]),
               ("caption-repaired records", report["caption_repairs"]["records"])]
    parts += ["<h2 id='summary'>Summary</h2>", _table(summary, ("figure", "value")),
              _defs(["records", "images", "captions", "qa_pairs", "quarantined"], report)]
    rows = [(s or "(unsplit)", v["records"], v["captions"], v["qa_pairs"]) for s, v in c["splits"].items()]
    parts += ["<h3>Per split</h3>", _table(rows, ("split", "records", "captions", "QA pairs")) if rows
              else "<p class='muted'>no records</p>"]

    # Quarantine
    parts.append("<h2 id='quarantine'>Quarantine</h2>")
    if not q["reasons"]:
        parts.append("<p class='muted'>nothing quarantined</p>")
    else:
        parts.append(_table([(code, v["count"], ", ".join(f"{s or '?'}: {n}" for s, n in v["stages"].items()))
                             for code, v in q["reasons"].items()], ("reason", "rows", "stage")))
        for code, v in q["reasons"].items():
            cards = [_card(ex, [_e(ex["sample_id"][:12]), _e(ex["detail"][:80]), f"<span class='muted'>"
                                f"{_e(ex['source'][-60:])}</span>"], True) for ex in v["examples"]]
            parts.append(f"<h3>{_e(code)} ({v['count']:,})</h3><div class='grid'>{''.join(cards)}</div>")

    # Image issues
    parts.append("<h2 id='issues'>Image issues</h2><p class='def'>Scores in [0, 1], lower = worse "
                 "(CleanVision convention); worst first; red border = quarantined.</p>")
    parts.append(_table([(name, v["kept_flagged"], v["quarantined"], v["total"])
                         for name, v in report["issues"].items()],
                        ("issue", "kept (flagged)", "quarantined", "total")))
    for name, v in report["issues"].items():
        if not v["examples"]:
            continue
        cards = [_card(ex, [f"score {_fmt(ex['score'])}", _e(ex["status"]), _e(ex["sample_id"][:12])],
                       ex["status"] == "quarantined") for ex in v["examples"]]
        parts.append(f"<h3>{_e(name)} ({v['total']:,})</h3><div class='grid'>{''.join(cards)}</div>")

    # Duplicates
    parts.append("<h2 id='duplicates'>Duplicate groups</h2>")
    for kind, v in dup.items():
        parts.append(f"<h3>{_e(kind)}: {v['groups']:,} groups, {v['dropped']:,} dropped, "
                     f"largest {v['largest']:,}</h3>")
        for g in v["examples"]:
            rep = g["representative"]
            left = _card(rep, [f"<b>representative</b> ({_e(rep.get('status'))})", _e(rep["sample_id"][:12])])
            right = "".join(_card(m, ["dropped", _e(m["sample_id"][:12]), _e(m.get("how", "")[:60])], True)
                            for m in g["members"])
            parts.append(f"<div class='dup'>{left}<div class='grid'>{right}</div></div>")

    # Captions
    parts.append("<h2 id='captions'>Captions</h2>")
    if cap["words"]:
        w = cap["words"]
        parts.append(_table([("words per caption: mean", w["mean"]), ("median", w["median"]),
                             ("5th / 95th percentile", f"{w['p05']:g} / {w['p95']:g}"),
                             ("min / max", f"{w['min']} / {w['max']}"),
                             ("captions per image: mean", cap["captions_per_image_mean"]),
                             ("images without captions", cap["images_without_captions"])], ("figure", "value")))
    else:
        parts.append("<p class='muted'>no captions</p>")
    parts.append(_fig_tag(figs, "caption_length.png", "caption length histogram")
                 + _fig_tag(figs, "captions_per_image.png", "captions per image histogram"))
    if cap["shortest_longest"]:
        parts.append("<h3>Shortest and longest captions</h3>"
                     + _table([(m["words"], m["caption"], m["sample_id"]) for m in cap["shortest_longest"]],
                              ("words", "caption", "sample_id")))
    if cap["most_shared"]:
        parts.append("<h3>Captions shared by several images (least specific)</h3>"
                     + _table([(m["caption"], m["images"]) for m in cap["most_shared"]], ("caption", "images")))

    # Concepts
    parts.append("<h2 id='concepts'>Concepts (sparsity)</h2>")
    parts.append(_table([("vocabulary", k["vocabulary"]), ("mentions", k["mentions"]),
                         ("concept_coverage_50", k["concept_coverage_50"]),
                         ("concept_coverage_90", k["concept_coverage_90"]),
                         ("hapax (seen once)", k["hapax"]), ("hapax_share", k["hapax_share"])], ("figure", "value")))
    parts.append(_defs(["vocabulary", "mentions", "concept_coverage_50", "concept_coverage_90", "hapax_share"],
                       report))
    parts.append(_fig_tag(figs, "concepts_top.png", "top concepts")
                 + _fig_tag(figs, "concepts_rank_frequency.png", "rank-frequency plot"))
    cs = k.get("color_shape")
    if cs:
        parts.append("<h3>Colour x shape (synthetic scene graphs)</h3>"
                     + _fig_tag(figs, "color_shape.png", "colour x shape heatmap"))
        zero = cs["zero_pairs"].get("train")
        if zero:
            parts.append("<p>Pairs never seen in train: " + ", ".join(f"{_e(a)} {_e(b)}" for a, b in zero) + "</p>")

    # Diversity
    parts.append("<h2 id='diversity'>Caption diversity and specificity</h2>")
    names = ["distinct_1", "distinct_2", "type_token_ratio", "unique_caption_share", "intra_image_similarity",
             "mean_idf", "idf_specificity", "image_specific_caption_share"]
    parts.append(_table([(n, d[n], report.get("definitions", DEFINITIONS).get(n, "")) for n in names],
                        ("figure", "value", "definition")))

    # Repairs
    parts.append("<h2 id='repairs'>Caption repairs</h2>")
    rep = report["caption_repairs"]
    if rep["codes"]:
        parts.append(f"<p>{rep['records']:,} records had captions repaired.</p>"
                     + _table(list(rep["codes"].items()), ("repair", "occurrences")))
    else:
        parts.append("<p class='muted'>no caption repairs recorded</p>")
    parts.append("</body></html>")  # no timestamp or timing: the same dataset gives the same page
    return "\n".join(p for p in parts if p)


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`render_html` to ``path`` (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_html(report), encoding="utf-8")
    return p
