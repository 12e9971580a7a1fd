"""VQA accuracy of the answer classifier on a split, overall and per question type.

``vqa_metrics(model, tokenizer, records)`` asks every question of every record about its image and scores
the predicted answer with :func:`mmplatform.models.heads.vqa_accuracy` (Antol et al. 2015): with one
reference answer per question, as the synthetic data and the canonical dataset have, that is exact match
after the official answer normalisation ("two" = "2"). Question types come from ``meta.question_types``
(count, color, shape, size, exist, left_right, above_below for the synthetic scenes); records that do not
give them count as ``other``.

A model whose decoder was also trained to answer (``cfg.vqa_generative``, the ``vqa_generative`` loss) is
scored a second time on the answers it generates after the question: ``vqa_generative_accuracy`` (and per
type). Its vocabulary is open, so a wrong answer can also be a word that is no answer at all.

The model needs only ``cfg.image_size``, ``cfg.max_length``, ``vqa_head`` and
``answer_questions(images, ids, mask) -> list[str]`` (:class:`~mmplatform.models.multimodal.MultimodalModel`),
plus ``generate_answers`` for the generative figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from mmplatform.models.heads import vqa_accuracy
from mmplatform.train.batches import decode_images, question_types


@torch.no_grad()
def vqa_predictions(model, tokenizer, records: Sequence[dict], *, images: torch.Tensor | None = None,
                    batch: int = 256, generative: bool = False) -> list[tuple[str, str, str]]:
    """``(predicted answer, reference answer, question type)`` for every question, in record order; by the
    classifier, or with ``generative`` by the decoder."""
    items: list[tuple[int, str, str, str]] = []  # (image index, question, answer, type)
    for i, r in enumerate(records):
        qs, ans = list(r.get("questions") or ()), list(r.get("answers") or ())
        if len(qs) != len(ans):
            raise ValueError(f"record {r.get('sample_id', i)}: {len(qs)} questions but {len(ans)} answers")
        items += [(i, q, a, t) for q, a, t in zip(qs, ans, question_types(r), strict=True)]
    if not items:
        return []
    if images is None:
        images = decode_images(records, model.cfg.image_size)
    preds: list[str] = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        enc = tokenizer([q for _, q, _, _ in chunk], padding=True, truncation=True,
                        max_length=model.cfg.max_length, return_tensors="pt")
        idx = torch.tensor([i for i, _, _, _ in chunk])
        if generative:
            toks = model.generate_answers(images[idx], enc["input_ids"], enc["attention_mask"])
            preds += [tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in toks]
        else:
            preds += model.answer_questions(images[idx], enc["input_ids"], enc["attention_mask"])
    return [(p, a, t) for p, (_, _, a, t) in zip(preds, items, strict=True)]


def vqa_metrics(model, tokenizer, records: Sequence[dict], *, images: torch.Tensor | None = None,
                batch: int = 256, suffix: str = "") -> dict[str, float]:
    """``vqa_accuracy``, ``vqa_accuracy_<type>`` for each question type and ``n_vqa_questions`` (each key
    with ``suffix``); ``vqa_generative_accuracy[_<type>]`` too for a model trained to generate answers.
    Empty when the model answers neither way or the records have no questions."""
    classifier = getattr(model, "vqa_head", None) is not None
    generative = bool(getattr(model.cfg, "vqa_generative", False))
    if not (classifier or generative) or not any(r.get("questions") for r in records):
        return {}
    if images is None:
        images = decode_images(records, model.cfg.image_size)
    out: dict[str, float] = {}
    for on, key in ((classifier, "vqa_accuracy"), (generative, "vqa_generative_accuracy")):
        if on:
            rows = vqa_predictions(model, tokenizer, records, images=images, batch=batch,
                                   generative=key != "vqa_accuracy")
            out |= {f"n_vqa_questions{suffix}": len(rows)} | _accuracy(rows, key, suffix)
    return out


def _accuracy(rows: list[tuple[str, str, str]], key: str, suffix: str) -> dict[str, float]:
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for pred, ref, kind in rows:
        score = vqa_accuracy(pred, ref)
        scores.append(score)
        by_type[kind].append(score)
    out = {f"{key}{suffix}": sum(scores) / len(scores)}
    for kind in sorted(by_type):
        out[f"{key}_{kind}{suffix}"] = sum(by_type[kind]) / len(by_type[kind])
    return out
