"""Task heads on top of the encoders and the fusion module: masked language modelling with image context,
and visual question answering as answer classification.

``MLMHead`` (ALBEF, Li et al. 2021; BLIP, Li et al. 2022): the text encoder reads a caption in which
:func:`mmplatform.models.losses.mlm_mask` hid some words; its token states then attend over the image
tokens (a transformer decoder block: self-attention over the text, cross-attention to the image, MLP) and
BERT's prediction transform (dense, GELU, LayerNorm, vocabulary projection) scores the hidden words. A
hidden colour word cannot be read off the rest of the caption, so the loss forces grounding.

``VQAClassifier`` (the VQA v2 classifier of Anderson et al. 2018 / ViLT / ALBEF's fine-tuning): an MLP
from the fused (image, question) vector (``model.fusion``'s output) to a fixed answer vocabulary
(:func:`build_answer_vocab`), trained with soft scores (:func:`vqa_soft_targets`, :func:`vqa_loss`).

``vqa_accuracy`` is the VQA metric (Antol et al. 2015): ``min(#references equal to the prediction / 3,
1)``, averaged over the leave-one-out subsets of the references as the official evaluation code does;
with one reference it is exact match. Answers are normalised first (case, punctuation, articles, number
words to digits), as the official code does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- masked language modelling


class MLMHead(nn.Module):
    """Predict masked token ids from text token states with cross-attention to image tokens.

    ``forward(txt_tokens (B, T, text_dim), img_tokens (B, N, vision_dim), txt_mask (B, T)) -> (B, T, V)``.
    ``txt_tokens`` are the text encoder's (or a fusion encoder's) states of the masked caption."""

    def __init__(self, text_dim: int, vision_dim: int, vocab_size: int, dim: int | None = None,
                 heads: int = 4, layers: int = 1):
        super().__init__()
        dim = dim or text_dim
        self.text_in = nn.Linear(text_dim, dim) if text_dim != dim else nn.Identity()
        self.image_in = nn.Linear(vision_dim, dim)
        block = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.blocks = nn.TransformerDecoder(block, layers)
        # BERT's prediction head: transform, then project onto the vocabulary
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, txt_tokens: torch.Tensor, img_tokens: torch.Tensor,
                txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.text_in(txt_tokens)
        memory = self.image_in(img_tokens)
        pad = None if txt_mask is None else ~txt_mask.bool()
        h = self.blocks(h, memory, tgt_key_padding_mask=pad)
        return self.decoder(self.transform(h))


class MLMPrediction(nn.Module):
    """BERT's prediction head alone (transform, then vocabulary), over states that already read the image: the
    fusion encoder's, as ALBEF's MLM does. Each masked colour, shape or position word is then a dense training
    signal for the fusion's cross-attention, the grounding that ITM and VQA read from its [CLS]."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(states))


# --------------------------------------------------------------------------- VQA


class VQAClassifier(nn.Module):
    """MLP over the fused (image, question) representation to ``n_answers`` logits (ViLT's VQA head:
    Linear(d, 2d), LayerNorm, GELU, Linear(2d, n))."""

    def __init__(self, in_dim: int, n_answers: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, n_answers))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.mlp(fused)


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"(?<!\d)[.,](?!\d)|[;/\[\]\"{}()=+\\_\-><@`?!*#$%^&:]")


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation, simplified: lower case, punctuation removed (decimal points and
    thousands separators kept), number words as digits, articles dropped, whitespace collapsed."""
    text = _PUNCT.sub(" ", answer.lower().strip())
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def build_answer_vocab(answers: Iterable[str], min_count: int = 1) -> dict[str, int]:
    """Answer -> class index for every normalised answer seen at least ``min_count`` times, most frequent
    first (ties by text, so the vocabulary is deterministic)."""
    counts = Counter(normalize_answer(a) for a in answers)
    kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(kept)}


def vqa_accuracy(pred: str, answers: str | Sequence[str], *, leave_one_out: bool = True) -> float:
    """VQA accuracy of one predicted answer against one or several reference answers.

    One reference: exact match (after normalisation). Several: ``min(#matching references / 3, 1)``;
    with ``leave_one_out`` (the default, as in the official evaluation code) averaged over the subsets that
    leave one reference out, so 3 of 10 agreeing annotators give 0.9, not 1.0."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    p = normalize_answer(pred)
    match = [normalize_answer(r) == p for r in refs]
    if len(refs) == 1:
        return float(match[0])
    k = sum(match)
    if not leave_one_out:
        return min(k / 3, 1.0)
    return sum(min((k - m) / 3, 1.0) for m in match) / len(refs)


def mean_vqa_accuracy(preds: Sequence[str], answers: Sequence[str | Sequence[str]], **kw) -> float:
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} questions")
    return sum(vqa_accuracy(p, a, **kw) for p, a in zip(preds, answers, strict=True)) / max(1, len(preds))


def vqa_soft_targets(answers: Sequence[str | Sequence[str]], vocab: Mapping[str, int]) -> torch.Tensor:
    """(B, n_answers) training targets: each vocabulary answer scored by :func:`vqa_accuracy` against the
    question's references (1.0 for the answer when there is one reference; out-of-vocabulary answers give
    an all-zero row)."""
    out = torch.zeros(len(answers), len(vocab))
    for i, refs in enumerate(answers):
        refs = [refs] if isinstance(refs, str) else list(refs)
        for cand in {normalize_answer(r) for r in refs}:
            if cand in vocab:
                out[i, vocab[cand]] = vqa_accuracy(cand, refs)
    return out


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with soft targets, summed over answers, mean over questions (Anderson et al.
    2018; ViLT multiplies the mean by the number of answers, the same thing)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / max(1, logits.shape[0])


def predict_answers(logits: torch.Tensor, vocab: Mapping[str, int]) -> list[str]:
    inverse = {i: a for a, i in vocab.items()}
    return [inverse[int(i)] for i in logits.argmax(-1)]
