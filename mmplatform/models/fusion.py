"""Fusion of image and text representations into one vector per (image, text) pair.

One interface: ``forward(img_tokens (B, Ni, Dv), txt_tokens (B, Nt, Dt), txt_mask (B, Nt)) -> (B, D)``.
Token 0 of each sequence is its [CLS] summary.

- ``concat``: late fusion, an MLP over ``[img_cls; txt_cls]``; cheapest, cannot look inside either side.
- ``cross_attention``: text tokens attend over image patches (one block of ALBEF/BLIP's fusion encoder),
  so a word can be grounded in the region it names; read out at the text [CLS].
"""

from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.out_dim = dim
        self.mlp = nn.Sequential(nn.Linear(vision_dim + text_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([img_tokens[:, 0], txt_tokens[:, 0]], dim=-1))


class CrossAttentionFusion(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, dim: int, heads: int = 4):
        super().__init__()
        self.out_dim = dim
        self.q = nn.Linear(text_dim, dim)
        self.kv = nn.Linear(vision_dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        q = self.q(txt_tokens)
        kv = self.kv(img_tokens)
        h = self.norm1(q + self.attn(q, kv, kv, need_weights=False)[0])
        h = self.norm2(h + self.ff(h))
        return h[:, 0]


FUSIONS = {"concat": ConcatFusion, "cross_attention": CrossAttentionFusion}


def build_fusion(kind: str, vision_dim: int, text_dim: int, dim: int) -> nn.Module:
    if kind not in FUSIONS:
        raise ValueError(f"fusion {kind!r}: expected one of {sorted(FUSIONS)}")
    return FUSIONS[kind](vision_dim, text_dim, dim)
