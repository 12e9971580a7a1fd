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
from mmplatform.data.clean import clean_dataset
from mmplatform.data.dataset import check_output_dir, read_dataset, source_domains, write_dataset
from mmplatform.data.ingest import ingest_source
from mmplatform.data.synthetic import generate_synthetic

log = logging.getLogger(__name__)


def ingest(p: IngestParams, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Read every source of ``p`` into the dataset ``out`` (``force``: replace ``out`` even when it is not one
    of our datasets, see :func:`~mmplatform.data.dataset.check_output_dir`)."""
    check_output_dir(out, force=force)
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
            ok, bad = ingest_source(src.format, src.path, src.images)
            kept.extend(ok)
            quarantined.extend(bad)
    manifest = write_dataset(out, kept, stage="ingest", params=p.model_dump(), quarantine=quarantined,
                             force=force)
    stats = {"read": len(kept) + len(quarantined), "kept": len(kept), "quarantined": len(quarantined)}
    log.info("ingest: %s, splits %s", stats, {s or "(unsplit)": n for s, n in manifest["splits"].items()})
    return stats


_WORD = re.compile(r"[a-z]+")


def _jaccard(a: str, b: str) -> float:
    x, y = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(x & y) / len(x | y) if x | y else 1.0


def annotate(inp: str | Path, out: str | Path, annotations_dir: str | Path, *,
             min_agreement: float = 0.5, force: bool = False) -> dict[str, Any]:
    """Merge the Label Studio exports found in ``annotations_dir`` (``*.json``) into the records: every
    annotator's captions, consensus VQA answers, agreement in ``meta["annotations"]``; ties, low agreement
    and tasks that cannot be joined go to ``<out>/review.jsonl``. Also reports caption agreement (mean
    pairwise word-set Jaccard between the captions of one image)."""
    from mmplatform.data.labelstudio import merge_annotations, review_jsonl

    check_output_dir(out, force=force)
    records = read_dataset(inp)
    adir = Path(annotations_dir)
    exports = sorted(adir.glob("*.json")) if adir.is_dir() else []
    merged, ann_stats, review = merge_annotations(records, exports, min_agreement=min_agreement)
    write_dataset(out, merged, stage="annotate",
                  params={"annotations_dir": str(annotations_dir), "min_agreement": min_agreement,
                          "exports": [p.name for p in exports]},
                  extra={"annotation_stats": ann_stats}, files={"review.jsonl": review_jsonl(review)},
                  force=force)
    n_review = len(review)
    if n_review:
        log.warning("annotate: %d items to review in %s", n_review, Path(out) / "review.jsonl")
    agreements = []
    for r in merged:
        pairs = list(itertools.combinations(r["captions"], 2))
        if pairs:
            agreements.append(sum(_jaccard(a, b) for a, b in pairs) / len(pairs))
    n_caps = [len(r["captions"]) for r in merged]
    return {
        "read": len(records), "kept": len(merged), "quarantined": 0,
        "captions_per_image_mean": sum(n_caps) / max(1, len(n_caps)),
        "caption_agreement_mean": sum(agreements) / max(1, len(agreements)),
        "caption_agreement_min": min(agreements, default=1.0),
        "low_agreement_images": sum(a < 0.3 for a in agreements),
        "labelstudio": ann_stats,
    }


def clean(inp: str | Path, out: str | Path, p: CleanParams, *, use_champion: bool = True,
          same_domain_only: bool = True, force: bool = False) -> dict[str, Any]:
    """Clean ``inp`` into ``out``; the alignment filter scores with the registered champion (``use_champion``)
    when there is one and, with ``same_domain_only``, only when it was trained on every source domain of
    ``inp``; the data report is written to ``out/report.html`` (``p.report``)."""
    check_output_dir(out, force=force)
    scorer = None
    if use_champion and p.alignment.mode != "off":
        from mmplatform.data.alignment import load_champion_scorer

        scorer = load_champion_scorer(p.alignment.model_name, p.alignment.alias,
                                      source_domains(inp) if same_domain_only else None)
    stats = clean_dataset(inp, out, p, scorer=scorer, force=force)
    if p.report:
        stats["report"] = write_report(out, Path(out) / "report.html")
    return stats


def write_report(dataset: str | Path, html: str | Path) -> dict[str, float]:
    """The data report of ``dataset`` as ``html`` (figures inline) plus its figures as PNGs in
    ``<html stem>_figures/``; returns the report's flat metrics."""
    from mmplatform.data.report import build_report, render_html, report_figures, summary_metrics

    rep = build_report(dataset)
    figs = report_figures(rep)
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(render_html(rep, figs), encoding="utf-8")
    fig_dir = html.with_name(html.stem + "_figures")
    fig_dir.mkdir(exist_ok=True)
    for name, png in figs.items():
        (fig_dir / name).write_bytes(png)
    return summary_metrics(rep)


def augment(inp: str | Path, out: str | Path, p: AugmentParams, *, force: bool = False) -> dict[str, Any]:
    check_output_dir(out, force=force)
    records = read_dataset(inp)
    result = augment_records(records, **p.model_dump())
    write_dataset(out, result, stage="augment", params=p.model_dump(), force=force)
    return {"read": len(records), "written": len(result), "added": len(result) - len(records)}
