"""Stage-level data functions: read a canonical dataset (or sources), transform, write one.

Each returns a stats dict that the stage logs to MLflow. Kept + quarantined = read at every stage.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import Any

from mmplatform.config import AugmentParams, CleanParams, IngestParams
from mmplatform.data.augment import augment_records
from mmplatform.data.clean import clean_records
from mmplatform.data.dataset import read_dataset, write_dataset
from mmplatform.data.ingest import ingest_manifest
from mmplatform.data.synthetic import generate_synthetic

log = logging.getLogger(__name__)


def ingest(p: IngestParams, out: str | Path) -> dict[str, Any]:
    kept: list[dict] = []
    quarantined: list[dict] = []
    for src in p.sources:
        if src.format == "synthetic":
            s = p.synthetic
            recs = generate_synthetic(seed=s.seed, n_train=s.n_train, n_val=s.n_val, n_test=s.n_test,
                                      n_test_compositional=s.n_test_compositional, image_size=s.image_size,
                                      captions_per_image=s.captions_per_image)
            kept.extend(recs)
        else:
            if not src.path:
                raise ValueError(f"ingest.sources: format {src.format} needs a path")
            ok, bad = ingest_manifest(src.path, src.images, fmt=src.format)
            kept.extend(ok)
            quarantined.extend(bad)
    manifest = write_dataset(out, kept, stage="ingest", params=p.model_dump(), quarantine=quarantined)
    stats = {"read": len(kept) + len(quarantined), "kept": len(kept), "quarantined": len(quarantined)}
    log.info("ingest: %s, splits %s", stats, manifest["splits"])
    return stats


_WORD = re.compile(r"[a-z]+")


def _jaccard(a: str, b: str) -> float:
    x, y = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(x & y) / len(x | y) if x | y else 1.0


def annotate(inp: str | Path, out: str | Path, annotations_dir: str | Path) -> dict[str, Any]:
    """First cut: pass-through, with caption agreement statistics (mean pairwise word-set Jaccard
    between the captions of one image; low agreement flags images whose annotators disagree)."""
    records = read_dataset(inp)
    agreements = []
    for r in records:
        pairs = list(itertools.combinations(r["captions"], 2))
        if pairs:
            agreements.append(sum(_jaccard(a, b) for a, b in pairs) / len(pairs))
    exports = sorted(Path(annotations_dir).glob("*.json")) if Path(annotations_dir).is_dir() else []
    if exports:
        log.warning("annotate: %d files in %s are not merged yet (Label Studio import is not built)",
                    len(exports), annotations_dir)
    write_dataset(out, records, stage="annotate", params={"annotations_dir": str(annotations_dir)})
    n_caps = [len(r["captions"]) for r in records]
    return {
        "read": len(records), "kept": len(records), "quarantined": 0,
        "captions_per_image_mean": sum(n_caps) / max(1, len(n_caps)),
        "caption_agreement_mean": sum(agreements) / max(1, len(agreements)),
        "caption_agreement_min": min(agreements, default=1.0),
        "low_agreement_images": sum(a < 0.3 for a in agreements),
    }


def clean(inp: str | Path, out: str | Path, p: CleanParams) -> dict[str, Any]:
    records = read_dataset(inp)
    kept, quarantined, stats = clean_records(records, **p.model_dump())
    write_dataset(out, kept, stage="clean", params=p.model_dump(), quarantine=quarantined)
    assert len(kept) + len(quarantined) == len(records), "clean lost records"
    return stats


def augment(inp: str | Path, out: str | Path, p: AugmentParams) -> dict[str, Any]:
    records = read_dataset(inp)
    result = augment_records(records, **p.model_dump())
    write_dataset(out, result, stage="augment", params=p.model_dump())
    return {"read": len(records), "written": len(result), "added": len(result) - len(records)}
