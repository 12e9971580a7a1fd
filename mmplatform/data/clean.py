"""Clean a canonical dataset: safe decoding, image checks, exact and near duplicates, caption filters,
image-text alignment, and a leakage-free train/val/test split.

Two phases, so that the expensive part scales out and the decisions stay exact:

1. **Per record** (:func:`analyse_rows`), with no knowledge of other records: verify the hash, decode
   safely (JPEG with DCT scaling: the whole stream is still parsed, so truncation is still caught), the
   CleanVision-style image statistics, a perceptual hash and a descriptor for near duplicates, and the
   caption and QA normalisation. On the ``ray`` engine this runs in Ray Data ``map_batches`` tasks over
   row ranges of the input shards, so the same code runs on a cluster when ``RAY_ADDRESS`` is set.
2. **Dataset level** (:func:`decide`), on the driver with only the small per-record results in memory:
   exact duplicates (first kept, captions merged), records left without a caption, image issues relative
   to the dataset (odd size) and the ones listed in ``drop_issues``, the alignment filter, near-duplicate
   groups (one representative kept, or all kept in one split), and the split.

Every dropped record goes to quarantine as it was read plus a ``reason``; kept + quarantined = read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmplatform.config import CleanParams
from mmplatform.data import neardup, quality
from mmplatform.data.dataset import SPLITS, read_manifest, write_dataset
from mmplatform.data.images import BadImage
from mmplatform.data.text import clean_caption_detailed, normalize_text, word_count

log = logging.getLogger(__name__)

# When a near-duplicate group spans given splits, it goes to the most held-out one: moving a train image
# into test costs a little training data, moving a test image into train would leak it.
_SPLIT_PRIORITY = {"test_compositional": 3, "test": 2, "val": 1, "train": 0, "": -1}


def assign_split(sample_id: str, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 0) -> str:
    """Deterministic split from sha256 of ``(split_seed, sample_id)``: independent of record order,
    of the process (unlike ``hash()``, which is salted per process) and of the rest of the dataset,
    so adding records never moves existing ones between splits."""
    digest = hashlib.sha256(f"{split_seed}:{sample_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------------- phase 1: per record

def analyse_rows(rows: Iterable[dict[str, Any]], p: CleanParams) -> list[dict[str, Any]]:
    """Per-record analysis; returns small, picklable dicts (no image bytes) in input order."""
    return [_analyse(r, p) for r in rows]


def _analyse(rec: dict[str, Any], p: CleanParams) -> dict[str, Any]:
    data = bytes(rec.get("image") or b"")
    sha = hashlib.sha256(data).hexdigest()
    a: dict[str, Any] = {"sha": sha, "bad": None, "width": 0, "height": 0, "stats": None, "phash": 0,
                         "embedding": None}
    if rec.get("image_sha256") and rec["image_sha256"] != sha:
        a["bad"] = "hash_mismatch"
    else:
        try:
            im, w, h = quality.decode_for_checks(data, max_bytes=p.max_image_bytes, max_pixels=p.max_pixels)
        except BadImage as e:
            a["bad"] = e.reason
        else:
            a["width"], a["height"] = w, h
            a["stats"] = quality.image_stats(im, w, h)
            ph, emb = neardup.image_signature(im)
            a["phash"], a["embedding"] = int(ph), np.asarray(emb, dtype=np.float32)
    # Text: cleaned per record; merged captions of exact duplicates are already clean.
    captions: list[str] = []
    kept: set[str] = set()  # captions' items: a list scan per caption was quadratic (40,000 captions: 22 s)
    drops: Counter[str] = Counter()
    repairs: list[str] = []
    for c in rec.get("captions") or []:
        cleaned, codes = clean_caption_detailed(c)
        if cleaned is None:
            drops[codes[-1] if codes else "empty"] += 1
            continue
        repairs.extend(x for x in codes if x not in repairs)  # a handful of distinct codes
        n = word_count(cleaned)
        if n < p.min_caption_words:
            drops["too_short"] += 1
        elif n > p.max_caption_words:
            drops["too_long"] += 1
        elif cleaned in kept:
            drops["duplicate"] += 1
        else:
            kept.add(cleaned)
            captions.append(cleaned)
    questions, answers = [], []
    qa_drops: Counter[str] = Counter()
    qs, ans = list(rec.get("questions") or []), list(rec.get("answers") or [])
    for q, an in zip(qs, ans, strict=False):
        q2 = normalize_text(q) if isinstance(q, str) else ""
        a2 = normalize_text(an) if isinstance(an, str) else ""
        if not q2 or not a2:
            qa_drops["empty"] += 1
        else:
            questions.append(q2)
            answers.append(a2)
    if len(qs) != len(ans):
        qa_drops["unpaired"] += abs(len(qs) - len(ans))
    a.update(captions=captions, caption_drops=dict(drops), repairs=repairs, questions=questions,
             answers=answers, qa_drops=dict(qa_drops))
    return a


# ---------------------------------------------------------------------------------- phase 2: decisions

def decide(records: list[dict[str, Any]], analyses: list[dict[str, Any]], p: CleanParams, *,
           scorer: Any = None, images: Callable[[list[int]], list[bytes]] | None = None,
           ) -> tuple[dict[int, dict[str, Any]], dict[int, str], dict[str, Any]]:
    """Decide every record. ``records`` need every column but ``image`` (the bytes are fetched through
    ``images(indices)`` only when the alignment scorer needs them). Returns ``(updates, reasons, stats)``:
    the new field values of each kept record by index, the quarantine reason of each dropped one."""
    reasons: dict[int, str] = {}
    stats: dict[str, Any] = {"read": len(records)}
    caption_drops: Counter[str] = Counter()
    repairs: Counter[str] = Counter()
    qa_drops: Counter[str] = Counter()
    for a in analyses:
        caption_drops.update(a["caption_drops"])
        qa_drops.update(a["qa_drops"])
        repairs.update(a["repairs"])

    # Exact duplicates and undecodable images.
    first_by_sha: dict[str, int] = {}
    bad_by_sha: dict[str, str] = {}
    work: dict[int, dict[str, Any]] = {}
    merged = 0
    for i, (rec, a) in enumerate(zip(records, analyses, strict=True)):
        if a["bad"] == "hash_mismatch":
            reasons[i] = "hash_mismatch"
            continue
        if a["sha"] in bad_by_sha or a["bad"]:
            reasons[i] = bad_by_sha.setdefault(a["sha"], a["bad"] or "")
            continue
        if a["sha"] in first_by_sha:
            j = first_by_sha[a["sha"]]
            if p.merge_duplicates:
                merged += _merge_into(work[j], a, rec.get("source", ""))
            reasons[i] = f"exact_duplicate: of {work[j]['sample_id']}"
            continue
        first_by_sha[a["sha"]] = i
        meta = _meta_dict(rec.get("meta"))
        if a["repairs"]:
            meta["caption_repairs"] = sorted(set(meta.get("caption_repairs", [])) | set(a["repairs"]))
        work[i] = {"sample_id": rec.get("sample_id") or a["sha"][:20], "image_sha256": a["sha"],
                   "width": a["width"], "height": a["height"], "captions": list(a["captions"]),
                   "questions": list(a["questions"]), "answers": list(a["answers"]),
                   "split": rec.get("split") or "", "meta": meta}

    # Image issues: scores need the whole dataset (odd size is relative to the median size).
    idx = [i for i in work]
    scored = quality.score_images([analyses[i]["stats"] for i in idx], p.quality)
    issue_counts: Counter[str] = Counter()
    for i, s in zip(idx, scored, strict=True):
        work[i]["meta"]["quality"] = {"scores": {k: round(float(v), 4) for k, v in s["scores"].items()},
                                      "issues": list(s["issues"])}
        issue_counts.update(s["issues"])
        for issue in p.drop_issues:
            if issue in s["issues"]:
                thr = getattr(p.quality, issue)
                reasons[i] = f"{issue}: score {s['scores'][issue]:.4f} < {thr}"
                break

    # Image-text alignment with the champion (DataComp-style); see mmplatform.data.alignment.
    stats["alignment"] = _alignment(work, reasons, p, scorer, images)

    # Records left without a caption.
    for i, w in work.items():
        if i not in reasons and not w["captions"]:
            reasons[i] = "no_valid_caption"

    # Near duplicates among what is left.
    exempt = tuple(p.near_duplicates.exempt_sources)
    alive = [i for i in work
             if i not in reasons and not (exempt and str(records[i].get("source", "")).startswith(exempt))]
    groups_out = 0
    if p.near_duplicates.enabled and len(alive) > 1:
        nd = p.near_duplicates
        found = neardup.find_near_duplicates(
            [work[i]["sample_id"] for i in alive], [analyses[i]["phash"] for i in alive],
            np.stack([analyses[i]["embedding"] for i in alive]),
            hamming_radius=nd.hamming_radius, cosine_threshold=nd.cosine_threshold, linkage=nd.linkage,
            hash_min_cosine=nd.hash_min_cosine)
        info = [{"width": work[i]["width"], "height": work[i]["height"], "captions": len(work[i]["captions"]),
                 "sample_id": work[i]["sample_id"]} for i in alive]
        reps = neardup.choose_representatives(found.groups, info, nd.policy)
        for g, members in enumerate(found.groups):
            groups_out += 1
            rep = alive[reps[g]]
            rep_id = work[rep]["sample_id"]
            ids = [alive[m] for m in members]
            for i in ids:
                work[i]["meta"]["near_duplicate_group"] = rep_id
            work[rep]["meta"]["near_duplicate_members"] = len(ids)
            if nd.action == "drop":
                for m in members:
                    if alive[m] != rep:
                        reasons[alive[m]] = f"near_duplicate: of {rep_id} ({found.how(m, reps[g])})"
            else:
                # Keep all: one split for the group, the most held-out one any member was given.
                given = max((work[i]["split"] for i in ids), key=lambda s: _SPLIT_PRIORITY.get(s, -1))
                split = given or assign_split(rep_id, val_fraction=p.val_fraction,
                                              test_fraction=p.test_fraction, split_seed=p.split_seed)
                for i in ids:
                    if work[i]["split"] and work[i]["split"] != split:
                        work[i]["meta"]["split_moved_from"] = work[i]["split"]
                    work[i]["split"] = split

    # Split: given ones are kept (e.g. COCO Karpathy splits, the synthetic compositional test).
    updates: dict[int, dict[str, Any]] = {}
    for i, w in work.items():
        if i in reasons:
            continue
        if w["split"] not in SPLITS:
            w["split"] = assign_split(w["sample_id"], val_fraction=p.val_fraction,
                                      test_fraction=p.test_fraction, split_seed=p.split_seed)
        w["meta"] = json.dumps(w["meta"], sort_keys=True)
        updates[i] = w

    stats.update({
        "kept": len(updates),
        "quarantined": len(reasons),
        "reasons": dict(sorted(Counter(r.split(":", 1)[0] for r in reasons.values()).items())),
        "image_issues_flagged": dict(sorted(issue_counts.items())),
        "near_duplicate_groups": groups_out,
        "captions_dropped": dict(sorted(caption_drops.items())),
        "caption_repairs": dict(sorted(repairs.items())),
        "qa_dropped": dict(sorted(qa_drops.items())),
        "merged_captions": merged,
        "splits": dict(sorted(Counter(w["split"] for w in updates.values()).items())),
    })
    if stats["kept"] + stats["quarantined"] != stats["read"]:
        raise RuntimeError(f"clean lost records: {stats['kept']} + {stats['quarantined']} != {stats['read']}")
    return updates, reasons, stats


def _alignment(work: dict[int, dict[str, Any]], reasons: dict[int, str], p: CleanParams, scorer: Any,
               images: Callable[[list[int]], list[bytes]] | None) -> dict[str, Any]:
    from mmplatform.data import alignment

    ap = p.alignment
    if ap.mode == "off":
        return {"status": "off"}
    if scorer is None:
        log.info("clean: alignment filter skipped: no %s@%s model to score with (first run?)", ap.model_name,
                 ap.alias)
        return {"status": "skipped: no champion"}
    idx = [i for i in work if i not in reasons and work[i]["captions"]]
    if not idx or images is None:
        return {"status": "nothing to score"}
    scores = alignment.caption_scores(scorer, images(idx), [work[i]["captions"] for i in idx], score=ap.score)
    keep = alignment.keep_mask(scores, mode=ap.mode, min_score=ap.min_score, keep_fraction=ap.keep_fraction)
    dropped = 0
    for i, sc, kp in zip(idx, scores, keep, strict=True):
        w = work[i]
        w["meta"]["alignment"] = {"scores": [round(s, 4) for s in sc], "scorer": getattr(scorer, "source", "")}
        if not any(kp):
            best = max(sc)
            reasons[i] = f"low_alignment: best caption {ap.score} {best:.3f}"
            continue
        dropped += sum(not k for k in kp)
        w["captions"] = [c for c, k in zip(w["captions"], kp, strict=True) if k]
    return {"status": "applied", "scorer": getattr(scorer, "source", ""), "captions_scored": sum(map(len, scores)),
            "captions_dropped": dropped}


def _merge_into(first: dict[str, Any], dup: dict[str, Any], source: str) -> int:
    """Add an exact duplicate's (cleaned) captions and QA pairs to the kept record; returns captions added.
    The duplicate's source is remembered in meta (``merged_sources``) for provenance."""
    added = 0
    for c in dup["captions"]:
        if c not in first["captions"]:
            first["captions"].append(c)
            added += 1
    pairs = set(zip(first["questions"], first["answers"], strict=False))
    for q, a in zip(dup["questions"], dup["answers"], strict=False):
        if (q, a) not in pairs:
            first["questions"].append(q)
            first["answers"].append(a)
            pairs.add((q, a))
    first["meta"].setdefault("merged_sources", []).append(source)
    return added


def _meta_dict(meta: Any) -> dict[str, Any]:
    if isinstance(meta, dict):
        return dict(meta)
    if isinstance(meta, str) and meta:
        try:
            parsed = json.loads(meta)
        except ValueError:
            return {"meta_unparsed": meta}
        return parsed if isinstance(parsed, dict) else {"meta_unparsed": meta}
    return {}


# ------------------------------------------------------------------------------------------ drivers

def clean_records(records: Iterable[dict[str, Any]], p: CleanParams | None = None, *, scorer: Any = None,
                  **overrides: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """In-memory clean (tests, small data): ``(kept, quarantined, stats)``. ``overrides`` are
    :class:`CleanParams` fields, e.g. ``clean_records(recs, min_caption_words=2)``."""
    p = _params(p, overrides)
    records = list(records)
    analyses = analyse_rows(records, p)
    updates, reasons, stats = decide(records, analyses, p, scorer=scorer,
                                     images=lambda idx: [bytes(records[i]["image"]) for i in idx])
    kept, quarantined = _assemble(records, updates, reasons)
    _log(stats)
    return kept, quarantined, stats


def _params(p: CleanParams | None, overrides: dict[str, Any]) -> CleanParams:
    p = p or CleanParams()
    if overrides:
        p = CleanParams.model_validate({**p.model_dump(), **overrides})
    if p.val_fraction + p.test_fraction > 1:
        raise ValueError(f"clean: val_fraction {p.val_fraction} + test_fraction {p.test_fraction} > 1")
    if p.min_caption_words > p.max_caption_words:
        raise ValueError(f"clean: min_caption_words {p.min_caption_words} > max_caption_words {p.max_caption_words}")
    return p


def _assemble(records: list[dict[str, Any]], updates: dict[int, dict[str, Any]], reasons: dict[int, str]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    kept, quarantined = [], []
    for i, rec in enumerate(records):
        if i in updates:
            kept.append({**rec, **updates[i]})
        else:
            quarantined.append(dict(rec, reason=reasons[i]))
    return kept, quarantined


def _log(stats: dict[str, Any]) -> None:
    log.info("clean: read %d, kept %d, quarantined %d %s; image issues flagged %s; alignment %s",
             stats["read"], stats["kept"], stats["quarantined"], stats["reasons"], stats["image_issues_flagged"],
             stats["alignment"].get("status"))


def _tasks(inp: Path, rows_per_task: int) -> list[dict[str, Any]]:
    tasks = []
    for s, shard in enumerate(sorted((inp / "shards").glob("*.parquet"))):
        n = pq.ParquetFile(shard).metadata.num_rows
        for start in range(0, n, rows_per_task):
            tasks.append({"shard": str(shard), "shard_index": s, "start": start, "stop": min(n, start + rows_per_task)})
    return tasks


def _analyse_task_batch(batch: dict[str, Any], params_json: str) -> dict[str, Any]:
    """Ray Data ``map_batches`` UDF: one row per row range of a shard in, one row per record out."""
    p = CleanParams.model_validate_json(params_json)
    out: dict[str, list] = {"shard_index": [], "row": [], "analysis": []}
    for shard, si, start, stop in zip(batch["shard"], batch["shard_index"], batch["start"], batch["stop"],
                                      strict=True):
        table = pq.read_table(shard).slice(int(start), int(stop) - int(start))
        for k, a in enumerate(analyse_rows(table.to_pylist(), p)):
            a["embedding"] = None if a["embedding"] is None else a["embedding"].tolist()
            out["shard_index"].append(int(si))
            out["row"].append(int(start) + k)
            out["analysis"].append(json.dumps(a))
    return {k: np.array(v, dtype=object) if k == "analysis" else np.array(v) for k, v in out.items()}


def _analyse_dataset(inp: Path, p: CleanParams) -> list[dict[str, Any]]:
    tasks = _tasks(inp, p.rows_per_task)
    if not tasks:
        return []
    if p.engine == "local":
        results = []
        for t in tasks:
            part = _analyse_task_batch({k: [t[k]] for k in t}, p.model_dump_json())
            results.extend(zip(part["shard_index"], part["row"], part["analysis"], strict=True))
    else:
        import ray

        from mmplatform.compute import init_ray

        init_ray()
        ds = ray.data.from_items(tasks).map_batches(
            _analyse_task_batch, fn_kwargs={"params_json": p.model_dump_json()}, batch_size=1, num_cpus=1)
        results = []
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            results.extend(zip(b["shard_index"], b["row"], b["analysis"], strict=True))
    results.sort(key=lambda t: (int(t[0]), int(t[1])))
    analyses = []
    for _, _, js in results:
        a = json.loads(js)
        if a["embedding"] is not None:
            a["embedding"] = np.asarray(a["embedding"], dtype=np.float32)
        analyses.append(a)
    return analyses


def clean_dataset(inp: str | Path, out: str | Path, p: CleanParams, *, scorer: Any = None,
                  force: bool = False) -> dict[str, Any]:
    """The clean stage: dataset ``inp`` → ``out`` (+ ``out/quarantine``), per-record work on Ray Data
    (``p.engine``). Returns the stats (also stored in ``out/manifest.json``)."""
    inp, out = Path(inp), Path(out)
    p = _params(p, {})
    read_manifest(inp)
    t0 = time.perf_counter()
    analyses = _analyse_dataset(inp, p)
    t_analyse = time.perf_counter() - t0
    # One read of the input: the decisions, the alignment scorer and the output all use these rows.
    records = [r for s in sorted((inp / "shards").glob("*.parquet")) for r in pq.read_table(s).to_pylist()]
    if len(records) != len(analyses):
        raise RuntimeError(f"clean: {len(analyses)} analyses for {len(records)} records in {inp}")
    updates, reasons, stats = decide(records, analyses, p, scorer=scorer,
                                     images=lambda idx: [bytes(records[i]["image"]) for i in idx])
    kept, quarantined = _assemble(records, updates, reasons)
    stats["seconds_analyse"] = round(t_analyse, 2)
    stats["images_per_second"] = round(len(records) / t_analyse, 1) if t_analyse > 0 and records else 0.0
    stats["engine"] = p.engine
    write_dataset(out, kept, stage="clean", params=p.model_dump(), quarantine=quarantined,
                  extra={"stats": stats}, force=force)
    _log(stats)
    return stats

