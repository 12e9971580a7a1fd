"""Turn canonical records into tensors: images decoded once into a uint8 tensor, captions tokenized."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


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
