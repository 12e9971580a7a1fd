"""Turn canonical records into tensors: images decoded once into a uint8 tensor, captions and VQA
questions tokenized, one caption and one question per image sampled each step."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmplatform.models.heads import normalize_answer


def decode_images(records: Sequence[dict], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8; images of another size are resized (bicubic) to ``image_size``."""
    out = np.empty((len(records), image_size, image_size, 3), dtype=np.uint8)
    for i, r in enumerate(records):
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@dataclass
class CaptionTable:
    """All captions of a set of images, flattened: ``owner[j]`` is the image index of caption ``j``."""

    ids: torch.Tensor  # (M, L) long
    mask: torch.Tensor  # (M, L) long
    owner: torch.Tensor  # (M,) long
    texts: list[str]

    def per_image(self, n_images: int) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in range(n_images)]
        for j, i in enumerate(self.owner.tolist()):
            rows[i].append(j)
        return rows


def tokenize_captions(tokenizer, records: Sequence[dict], max_length: int) -> CaptionTable:
    texts, owner = [], []
    for i, r in enumerate(records):
        for c in r["captions"]:
            texts.append(c)
            owner.append(i)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return CaptionTable(enc["input_ids"], enc["attention_mask"], torch.tensor(owner, dtype=torch.long), texts)


def sample_caption_per_image(rows: list[list[int]], idx: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """One caption index for each image in ``idx``, drawn uniformly (seeded) among its captions."""
    pick = torch.randint(0, 1 << 30, (len(idx),), generator=gen).tolist()
    return torch.tensor([rows[i][p % len(rows[i])] for i, p in zip(idx, pick, strict=True)], dtype=torch.long)


@dataclass
class FoilTable:
    """One composition foil per caption of a :class:`CaptionTable` (NegCLIP), aligned by caption index;
    ``has[j]`` is False where no foil applies (its row is then a copy of the caption and is masked out)."""

    ids: torch.Tensor
    mask: torch.Tensor
    has: torch.Tensor  # (M,) bool
    kinds: list[str]


def foil_table(tokenizer, caps: CaptionTable, max_length: int, seed: int = 0) -> FoilTable:
    """Draw one foil kind per caption among those that apply (seeded), as NegCLIP samples one per pair."""
    import numpy as np

    from mmplatform.data.foils import foils

    rng = np.random.default_rng(seed)
    texts, has, kinds = [], [], []
    for c in caps.texts:
        options = foils(c, rng)
        if options:
            kind = sorted(options)[int(rng.integers(len(options)))]
            texts.append(options[kind])
            has.append(True)
            kinds.append(kind)
        else:
            texts.append(c)
            has.append(False)
            kinds.append("")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return FoilTable(enc["input_ids"], enc["attention_mask"], torch.tensor(has), kinds)


def tokenizer_texts(records: Sequence[dict]) -> Iterator[str]:
    """What the tokenizer is trained on: every caption, VQA question and answer. A question word that no
    caption uses ("what", "how") would otherwise be [UNK], and so would an answer such as "yes", which the
    decoder could then never generate."""
    for r in records:
        yield from r["captions"]
        yield from r.get("questions") or ()
        yield from r.get("answers") or ()


def question_types(record: dict) -> list[str]:
    """The type of each of the record's questions (``meta.question_types``, written by the synthetic
    generator); ``"other"`` where the record does not say."""
    n = len(record.get("questions") or ())
    try:
        kinds = json.loads(record.get("meta") or "{}").get("question_types") or []
    except (json.JSONDecodeError, AttributeError):
        kinds = []
    return [str(k) for k in kinds] if len(kinds) == n else ["other"] * n


@dataclass
class QuestionTable:
    """All VQA pairs of a set of images, flattened like :class:`CaptionTable`: ``owner[j]`` is the image of
    question ``j``; ``label[j]`` its answer's class in the answer vocabulary (-1: not in it)."""

    ids: torch.Tensor  # (Q, L) long
    mask: torch.Tensor  # (Q, L) long
    owner: torch.Tensor  # (Q,) long
    label: torch.Tensor  # (Q,) long
    answers: list[str]
    types: list[str]
    answer_ids: torch.Tensor  # (Q, La) the answers tokenized ([CLS] answer [SEP]), for generative VQA
    answer_mask: torch.Tensor

    def per_image(self, n_images: int, *, labelled_only: bool = True) -> list[list[int]]:
        """Question indices of each image; by default only those whose answer is in the vocabulary."""
        rows: list[list[int]] = [[] for _ in range(n_images)]
        for j, (i, y) in enumerate(zip(self.owner.tolist(), self.label.tolist(), strict=True)):
            if y >= 0 or not labelled_only:
                rows[i].append(j)
        return rows


def tokenize_questions(tokenizer, records: Sequence[dict], max_length: int,
                       answer_vocab: Mapping[str, int]) -> QuestionTable:
    texts, owner, answers, types = [], [], [], []
    for i, r in enumerate(records):
        qs, ans = list(r.get("questions") or ()), list(r.get("answers") or ())
        if len(qs) != len(ans):
            raise ValueError(f"record {r.get('sample_id', i)}: {len(qs)} questions but {len(ans)} answers")
        texts += qs
        answers += ans
        owner += [i] * len(qs)
        types += question_types(r)
    label = torch.tensor([answer_vocab.get(normalize_answer(a), -1) for a in answers], dtype=torch.long)
    if texts:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        enc = tokenizer(answers, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        a_ids, a_mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = mask = torch.zeros((0, max_length), dtype=torch.long)
        a_ids = a_mask = torch.zeros((0, 2), dtype=torch.long)
    return QuestionTable(ids, mask, torch.tensor(owner, dtype=torch.long), label, answers, types, a_ids, a_mask)


def sample_question_per_image(rows: list[list[int]], idx: Sequence[int], gen: torch.Generator, per_image: int = 1
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` questions for each image in ``idx`` that has one, drawn uniformly (seeded) without
    replacement among its questions (all of them when it has fewer), as captions are. Returns
    ``(question indices, positions in idx of the images they belong to)``, grouped by image in ``idx`` order."""
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    pick = torch.randint(0, 1 << 30, (len(idx),), generator=gen).tolist()
    q, pos = [], []
    for k, (i, p) in enumerate(zip(idx, pick, strict=True)):
        if not rows[i]:
            continue
        if per_image == 1:
            chosen = [rows[i][p % len(rows[i])]]
        else:
            chosen = [rows[i][int(j)] for j in torch.randperm(len(rows[i]), generator=gen)[:per_image]]
        q += chosen
        pos += [k] * len(chosen)
    return torch.tensor(q, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


@dataclass
class VQABatch:
    """The VQA part of a step (one or more questions per image): question ``j`` (``ids[j]``, ``mask[j]``; row
    ``index[j]`` of the :class:`QuestionTable`) is about batch image ``pos[j]``; its answer class is
    ``label[j]`` and its answer tokens ``answer_ids[j]``."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor


def vqa_batch(table: QuestionTable, rows: list[list[int]], idx: Sequence[int], gen: torch.Generator,
              per_image: int = 1) -> VQABatch:
    q, pos = sample_question_per_image(rows, idx, gen, per_image)
    ids, mask = table.ids[q], table.mask[q]
    a_ids, a_mask = table.answer_ids[q], table.answer_mask[q]
    if len(q):  # dynamic padding, as for captions
        n, m = int(mask.sum(1).max()), int(a_mask.sum(1).max())
        ids, mask, a_ids, a_mask = ids[:, :n], mask[:, :n], a_ids[:, :m], a_mask[:, :m]
    return VQABatch(ids, mask, pos, table.label[q], q, a_ids, a_mask)
