"""Clean a list of records: safe decode, exact de-duplication, caption normalisation and filtering,
deterministic split assignment.

Dropped records are returned unchanged (as they were read) plus a ``reason``, so that
``len(kept) + len(quarantined) == len(records)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from mmplatform.data.dataset import SPLITS
from mmplatform.data.images import BadImage, decode_image
from mmplatform.data.text import clean_caption, normalize_text, word_count

log = logging.getLogger(__name__)


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


def clean_records(
    records: Iterable[dict[str, Any]],
    *,
    min_caption_words: int = 1,
    max_caption_words: int = 60,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    merge_duplicates: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Return ``(kept, quarantined, stats)``.

    Per record, in order:

    1. the image is decoded safely (quarantine reason: the :class:`BadImage` reason); a record whose
       ``image_sha256`` does not match its bytes is quarantined as ``hash_mismatch``;
    2. ``width``/``height`` are refreshed from the decoded image;
    3. exact duplicates by ``image_sha256``: the first is kept, later ones are quarantined as
       ``"exact_duplicate: of <sample_id>"``. With ``merge_duplicates`` (default) their captions and
       QA pairs are first added to the kept record — manifests often list one caption per line, and
       dropping those captions would lose most of the text;
    4. captions are normalised (NFC, no control characters, collapsed whitespace); empty ones, ones
       outside ``[min_caption_words, max_caption_words]`` words, and repeats within a record are
       dropped and counted in ``stats["captions_dropped"]``; QA pairs are normalised and a pair with
       an empty side is dropped (``stats["qa_dropped"]``);
    5. a record left with no caption is quarantined as ``no_valid_caption``;
    6. split: a record already in one of train/val/test/test_compositional keeps it, others get
       :func:`assign_split`.

    ``stats``: ``read``, ``kept``, ``quarantined``, ``reasons`` (count per reason code, the part
    before any ``":"``), ``captions_dropped`` and ``qa_dropped`` (per reason), ``splits``
    (kept records per split), ``merged_captions``.
    """
    if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    if min_caption_words > max_caption_words:
        raise ValueError(f"min_caption_words {min_caption_words} > max_caption_words {max_caption_words}")

    records = list(records)
    quarantined: list[dict[str, Any]] = []
    caption_drops: Counter[str] = Counter()
    qa_drops: Counter[str] = Counter()
    merged = 0

    def drop(rec: dict[str, Any], reason: str) -> None:
        log.debug("quarantined %s (%s): %s", rec.get("sample_id"), rec.get("source"), reason)
        quarantined.append(dict(rec, reason=reason))

    # Pass 1: decode + de-duplicate. Work on copies; the originals go to quarantine untouched.
    first_by_sha: dict[str, dict[str, Any]] = {}
    bad_by_sha: dict[str, str] = {}  # identical bytes fail identically: decode once
    candidates: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (original, working copy)
    for rec in records:
        data = bytes(rec.get("image") or b"")
        sha = hashlib.sha256(data).hexdigest()
        if rec.get("image_sha256") and rec["image_sha256"] != sha:
            drop(rec, "hash_mismatch")
            continue
        if sha in bad_by_sha:
            drop(rec, bad_by_sha[sha])
            continue
        if sha in first_by_sha:
            first = first_by_sha[sha]
            if merge_duplicates:
                merged += _merge_into(first, rec)
            drop(rec, f"exact_duplicate: of {first['sample_id']}")
            continue
        try:
            im = decode_image(data, max_bytes=max_image_bytes, max_pixels=max_pixels)
        except BadImage as e:
            bad_by_sha[sha] = e.reason
            drop(rec, e.reason)
            continue
        work = dict(rec, image=data, image_sha256=sha, sample_id=rec.get("sample_id") or sha[:20],
                    width=im.width, height=im.height, captions=list(rec.get("captions") or []),
                    questions=list(rec.get("questions") or []), answers=list(rec.get("answers") or []))
        first_by_sha[sha] = work
        candidates.append((rec, work))

    # Pass 2: text, then split. Done after de-duplication so merged captions are filtered the same way.
    kept: list[dict[str, Any]] = []
    for orig, work in candidates:
        captions: list[str] = []
        for c in work["captions"]:
            cleaned = clean_caption(c)
            if cleaned is None:
                caption_drops["empty"] += 1
                continue
            n = word_count(cleaned)
            if n < min_caption_words:
                caption_drops["too_short"] += 1
            elif n > max_caption_words:
                caption_drops["too_long"] += 1
            elif cleaned in captions:
                caption_drops["duplicate"] += 1
            else:
                captions.append(cleaned)
        questions, answers = [], []
        for q, a in zip(work["questions"], work["answers"], strict=False):
            q2 = normalize_text(q) if isinstance(q, str) else ""
            a2 = normalize_text(a) if isinstance(a, str) else ""
            if not q2 or not a2:
                qa_drops["empty"] += 1
            else:
                questions.append(q2)
                answers.append(a2)
        if len(work["questions"]) != len(work["answers"]):
            # Only reachable for records not built by ingest; zip() above dropped the unpaired tail.
            qa_drops["unpaired"] += abs(len(work["questions"]) - len(work["answers"]))
        if not captions:
            drop(orig, "no_valid_caption")
            continue
        split = work.get("split") or ""
        if split not in SPLITS:
            split = assign_split(work["sample_id"], val_fraction=val_fraction,
                                 test_fraction=test_fraction, split_seed=split_seed)
        work.update(captions=captions, questions=questions, answers=answers, split=split)
        kept.append(work)

    stats = {
        "read": len(records),
        "kept": len(kept),
        "quarantined": len(quarantined),
        "reasons": dict(sorted(Counter(q["reason"].split(":", 1)[0] for q in quarantined).items())),
        "captions_dropped": dict(sorted(caption_drops.items())),
        "qa_dropped": dict(sorted(qa_drops.items())),
        "merged_captions": merged,
        "splits": dict(sorted(Counter(r["split"] for r in kept).items())),
    }
    assert stats["kept"] + stats["quarantined"] == stats["read"]
    log.info("clean: read %d, kept %d, quarantined %d %s", stats["read"], stats["kept"],
             stats["quarantined"], stats["reasons"])
    return kept, quarantined, stats


def _merge_into(first: dict[str, Any], dup: dict[str, Any]) -> int:
    """Append the duplicate's captions and QA pairs to the kept record; returns captions added.
    The duplicate's source is remembered in meta (``merged_sources``) for provenance."""
    added = 0
    for c in dup.get("captions") or []:
        if c not in first["captions"]:
            first["captions"].append(c)
            added += 1
    pairs = set(zip(first["questions"], first["answers"], strict=False))
    for q, a in zip(dup.get("questions") or [], dup.get("answers") or [], strict=False):
        if (q, a) not in pairs:
            first["questions"].append(q)
            first["answers"].append(a)
            pairs.add((q, a))
    meta = _meta_dict(first.get("meta"))
    meta.setdefault("merged_sources", []).append(dup.get("source", ""))
    first["meta"] = json.dumps(meta, sort_keys=True)
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
