"""How far can CIDEr-D go on a set of references? Upper-bound estimates that say, before any RL is run, whether
a target gain over a cross-entropy model is reachable at all.

SCST's +9 % on COCO (Rennie et al. 2017, arXiv:1612.00563) came from references that disagree: five human
captions per image, each in its own words, while a cross-entropy model writes the most likely wording. When the
references are close to one caption (templated data) the cross-entropy model is already near their consensus
and the room RL has is what these estimates measure:

- ``best_reference``: per image, the best of its own references scored against all of them (itself included):
  what a policy that wrote, for every image, the one reference wording the others agree with most would score;
- ``local_search``: per image, a hill climb from each reference over one-word edits (delete one or two adjacent
  words, substitute or insert a word of the image's references) until no edit raises CIDEr-D. It reads the
  references, so no policy can expect to beat it; it is an estimate of the maximum, not a proof (a climb can stop
  at a local optimum), and it is reported as such;
- for the synthetic generator's records, its wordings written correctly for each scene: ``best_template`` (the
  one template that scores best over all images), ``best_recombined`` (the best recombination of the templates'
  frames, object orders and list styles), each also chosen per object count (``*_by_count``: a captioner sees
  the scene, so ``best_recombined_by_count`` is the best a policy that cannot read the references can do with
  the generator's words), and ``best_template_per_image`` (the best of its own wordings per image: reads the
  references).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmplatform.evaluate.captions import CiderD, tokenize


def _edits(words: list[str], vocab: Sequence[str]) -> list[list[str]]:
    """Every caption one edit away: delete one word or two adjacent words, substitute or insert a word."""
    out: list[list[str]] = []
    n = len(words)
    for p in range(n):
        out.append(words[:p] + words[p + 1:])
        if p + 1 < n:
            out.append(words[:p] + words[p + 2:])
        out.extend(words[:p] + [w] + words[p + 1:] for w in vocab if w != words[p])
    for p in range(n + 1):
        out.extend(words[:p] + [w] + words[p:] for w in vocab)
    return [c for c in out if c]


def climb(scorer: CiderD, refs: Sequence[str], start: str, max_rounds: int = 100) -> tuple[str, float]:
    """Hill climb from ``start`` over :func:`_edits` with words of ``refs``, taking the best edit each round,
    until none raises the score (or ``max_rounds``). Returns the caption and its CIDEr-D."""
    vocab = sorted({w for r in refs for w in tokenize(r)})
    words = tokenize(start)
    score = float(scorer.score([" ".join(words)], [refs])[0])
    for _ in range(max_rounds):
        cands = _edits(words, vocab)
        values = scorer.score([" ".join(c) for c in cands], [refs] * len(cands))
        j = int(np.argmax(values))
        if values[j] <= score + 1e-9:
            break
        words, score = cands[j], float(values[j])
    return " ".join(words), score


def _wording_ceilings(scorer: CiderD, refs: list[list[str]], objects: Sequence[Sequence[dict]]) -> dict[str, Any]:
    """The synthetic generator's wordings, written correctly for each scene: its templates, and every
    recombination of their parts; the best single one, the best per object count, the best per image."""
    from mmplatform.data.synthetic import recombined_templates, template_captions, write_templates

    counts = np.array([len(o) for o in objects])

    def table(captions: list[list[str]]) -> np.ndarray:  # images x wordings (as many for every image)
        return np.stack([scorer.score([c[t] for c in captions], refs) for t in range(len(captions[0]))], axis=1)

    def by_count(t: np.ndarray) -> float:
        # A captioner sees the scene, so it can pick a wording per object count without reading references.
        return float(sum(t[counts == n].mean(axis=0).max() * (counts == n).sum() for n in np.unique(counts))
                     / len(counts))

    own = [template_captions(o) for o in objects]  # two-object scenes add the relation caption
    own_best = [scorer.score(w, [r] * len(w)).max() for w, r in zip(own, refs, strict=True)]
    k = min(len(w) for w in own)  # the templates every scene has
    gen = table([w[:k] for w in own])
    combos = recombined_templates()
    mixed = table([write_templates(o, combos) for o in objects])
    j = int(mixed.mean(axis=0).argmax())
    return {"best_template": float(gen.mean(axis=0).max()), "best_template_index": int(gen.mean(axis=0).argmax()),
            "template_means": [float(m) for m in gen.mean(axis=0)], "best_template_by_count": by_count(gen),
            "best_recombined": float(mixed[:, j].mean()), "best_recombined_template": list(combos[j]),
            "best_recombined_by_count": by_count(mixed), "best_template_per_image": float(np.mean(own_best))}


def cider_ceiling(refs: Sequence[Sequence[str]], *, df_refs: Sequence[Sequence[str]] | None = None,
                  objects: Sequence[Sequence[dict]] | None = None, search: bool = True,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Mean CIDEr-D of the upper-bound captions of each image of ``refs`` (see the module doc).

    ``df_refs``: the document-frequency corpus (the RL reward's is the training captions; the evaluate
    stage's is the scored split itself, the default). ``objects``: per image, the synthetic generator's objects
    (``meta["objects"]``), to score its wordings too. ``progress(i)`` is called after each image's climb.
    Returns the means, and per image the local-search caption and score (``per_image``)."""
    refs = [list(r) for r in refs]
    if not refs or any(not r for r in refs):
        raise ValueError("cider_ceiling: every image needs at least one reference")
    scorer = CiderD(df_corpus=df_refs if df_refs is not None else refs)
    best_ref = np.array([scorer.score(r, [r] * len(r)).max() for r in refs])
    out: dict[str, Any] = {"images": len(refs), "best_reference": float(best_ref.mean())}
    if objects is not None:
        out.update(_wording_ceilings(scorer, refs, objects))
    if search:
        per_image = []
        for i, r in enumerate(refs):
            best = max((climb(scorer, r, s) for s in dict.fromkeys(r)), key=lambda cs: cs[1])
            per_image.append({"caption": best[0], "cider_d": best[1]})
            if progress is not None:
                progress(i)
        out["local_search"] = float(np.mean([p["cider_d"] for p in per_image]))
        out["per_image"] = per_image
    return out


def headroom_table(ceiling: dict[str, Any], start: float, targets: Sequence[float] = (0.05, 0.09)) -> str:
    """Markdown: each estimate's score and the gain over ``start`` it stands for, then what each target gain
    needs; a target above ``local_search`` is out of reach on these references."""
    rows = [("start (the model's greedy captions)", start)]
    names = {"best_template": "best single wording of the generator, written correctly",
             "best_template_by_count": "best wording per object count, written correctly",
             "best_recombined": "best recombination of the generator's parts, written correctly",
             "best_recombined_by_count": "best recombination per object count, written correctly",
             "best_template_per_image": "best wording per image (reads the references)",
             "best_reference": "best own reference per image (reads the references)",
             "local_search": "local search per image (reads the references; an estimate of the maximum)"}
    rows += [(label, ceiling[key]) for key, label in names.items() if key in ceiling]
    lines = ["| caption | CIDEr-D | gain over start |", "|---|---|---|"]
    lines += [f"| {label} | {v:.3f} | {v / start - 1:+.1%} |" if start > 0 else f"| {label} | {v:.3f} | n/a |"
              for label, v in rows]
    top, what = ((ceiling["local_search"], "the local-search estimate") if "local_search" in ceiling
                 else (ceiling["best_reference"], "the best reference per image"))
    blind = ceiling.get("best_recombined_by_count")
    for t in targets:
        need = start * (1 + t)
        verdict = f"{'above' if need > top else 'below'} {what}"
        if blind is not None:
            verdict += (f"; needs {(need - start) / (blind - start):.0%} of the way to the best recombination per "
                        "object count" if blind > need else "; above every wording written without the references")
        lines.append(f"| target +{t:.0%} | {need:.3f} | {verdict} |")
    return "\n".join(lines)


def record_objects(records: Sequence[dict]) -> list[list[dict]] | None:
    """The synthetic generator's objects of each record, or None when any record lacks them."""
    out = []
    for r in records:
        meta = r.get("meta")
        meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
        if not meta.get("objects"):
            return None
        out.append(meta["objects"])
    return out


def _split_refs(data_dir, split: str, images: int, df: str
                ) -> tuple[list[dict], list[list[str]], list[list[str]]]:
    """The first ``images`` records of ``split`` (0 = all), their references, and the df corpus: the training
    captions (``df="train"``, the RL reward's) or the whole split (``"split"``, even when scoring its first
    images, so a subset estimates the figures of the evaluate stage, which scores all of it at once)."""
    from mmplatform.data.dataset import read_dataset

    if df not in ("split", "train"):
        raise ValueError(f"df must be 'split' or 'train', got {df!r}")
    cols = ["sample_id", "captions", "meta", "split"]  # not the image bytes
    recs = read_dataset(data_dir, columns=cols, split=split)
    if not recs:
        raise ValueError(f"{data_dir}: no {split!r} records")
    df_recs = read_dataset(data_dir, columns=["captions", "split"], split="train") if df == "train" else recs
    df_refs = [list(r["captions"]) for r in df_recs]
    recs = recs[:images] if images else recs
    return recs, [list(r["captions"]) for r in recs], df_refs


def heldout_ceiling(data_dir, heldout_images: int, reward: dict[str, float]) -> dict[str, float]:
    """The cheap ceilings (no local search) of the RL stage's held-out set, in the reward's units: the best own
    reference per image and, for the synthetic generator's records, the best wording a reference-blind policy
    can write (``best_recombined_by_count``). Empty unless the reward is CIDEr-D alone."""
    if set(reward) != {"cider_d"}:
        return {}
    recs, refs, df_refs = _split_refs(data_dir, "val", heldout_images, "train")
    c = cider_ceiling(refs, df_refs=df_refs, objects=record_objects(recs), search=False)
    w = reward["cider_d"]
    out = {"heldout_ceiling_reference": w * c["best_reference"]}
    if "best_recombined_by_count" in c:
        out["heldout_ceiling_blind"] = w * c["best_recombined_by_count"]
    return out


def ceiling_study(data_dir, out_dir, *, split: str = "test", images: int = 0, df: str = "split",
                  model_dir=None, max_length: int = 40, search: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:func:`cider_ceiling` of a split of the clean dataset (its first ``images``, 0 = all; the RL held-out set
    is ``split="val", images=heldout_images, df="train"``), beside the greedy captions of ``model_dir`` when given.
    Writes ``ceiling.json`` (without the per-image captions, which go to ``ceiling_captions.jsonl``) and
    ``ceiling.md`` to ``out_dir``. ``progress(done, total)`` follows the local search."""
    from pathlib import Path

    recs, refs, df_refs = _split_refs(data_dir, split, images, df)
    total = len(refs)
    result = cider_ceiling(refs, df_refs=df_refs, objects=record_objects(recs), search=search,
                           progress=(lambda i: progress(i + 1, total)) if progress else None)
    result.update(split=split, df=df)
    if model_dir is not None:
        from mmplatform.data.dataset import read_dataset
        from mmplatform.models.captioning import greedy_captions
        from mmplatform.models.multimodal import MultimodalModel
        from mmplatform.models.tokenizer import load_tokenizer
        from mmplatform.train.batches import decode_images

        model = MultimodalModel.load(model_dir).eval()
        caps = greedy_captions(model, load_tokenizer(Path(model_dir) / "tokenizer"),
                               decode_images(read_dataset(data_dir, columns=["image", "split"], split=split)[:total],
                                             model.cfg.image_size), max_length)
        result["model"] = str(model_dir)
        result["model_cider_d"] = float(CiderD(df_corpus=df_refs).score(caps, refs).mean())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_image = result.pop("per_image", None)
    if per_image is not None:
        with open(out / "ceiling_captions.jsonl", "w") as f:
            for r, p in zip(recs, per_image, strict=True):
                f.write(json.dumps({"sample_id": r["sample_id"], **p}) + "\n")
    (out / "ceiling.json").write_text(json.dumps(result, indent=2))
    head = (f"CIDEr-D ceilings of {total} {split} images (document frequencies: "
            f"{'the training captions' if df == 'train' else 'the split'}).\n\n")
    start = result.get("model_cider_d")
    body = headroom_table(result, start) if start else "\n".join(
        f"- {k}: {result[k]:.3f}" for k in ("best_template", "best_template_by_count", "best_recombined",
                                            "best_recombined_by_count", "best_template_per_image", "best_reference",
                                            "local_search") if k in result)
    (out / "ceiling.md").write_text(head + body + "\n")
    return result
