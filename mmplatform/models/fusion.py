"""Fusion of image and text representations into one vector per (image, text) pair.

One interface for every kind::

    forward(img_tokens (B, Ni, Dv), txt_tokens (B, Nt, Dt), txt_mask (B, Nt), img_index=None) -> (B, out_dim)

``img_index`` (B,) long, optional: pair ``j`` is text ``j`` with image ``img_index[j]``, and ``img_tokens`` holds
each image once (M, Ni, Dv). Many pairs share an image in training (ITM's positives and hard negatives, several
VQA questions per image), and what a fusion computes from an image alone (input and key/value projections) is
then computed once per image instead of once per pair. The result equals indexing first.

Token 0 of each sequence is its [CLS] summary; ``txt_mask`` is 1 (or True) at real text tokens and 0 at padding,
and position 0 is always real. Image tokens are never padded. ``out_dim == dim`` for every kind. The fused vector
feeds the image-text matching head (``MultimodalModel.itm_head``); the choice is ``train.fusion`` and comparing the
kinds, quality against compute (:func:`fusion_flops`), is a feature of the platform.

- ``concat`` (late fusion): an MLP over ``[img_cls; txt_cls]`` (Dv + Dt -> dim -> dim).
  Trade-off: cheapest, independent of sequence lengths, but sees only the two summaries, so it cannot ground a word
  in a region.
- ``gated`` (learned weighted sum): the Gated Multimodal Unit of Arevalo et al. 2017, "Gated Multimodal Units for
  Information Fusion" (ICLR workshop, arXiv:1702.01992): ``h_v = tanh(W_v img_cls)``, ``h_t = tanh(W_t txt_cls)``,
  ``z = sigmoid(W_z [img_cls; txt_cls])``, ``h = z * h_v + (1 - z) * h_t`` (per-dimension mix).
  Trade-off: as cheap as ``concat`` and says how much each modality is trusted per feature (``z`` is inspectable),
  but still [CLS]-only and its only cross-modal interaction is the gate.
- ``cross_attention``: ALBEF/BLIP's fusion encoder (Li et al. 2021, arXiv:2107.07651; Li et al. 2022,
  arXiv:2201.12086): ``layers`` blocks (default 2) of text self-attention, text-to-image cross-attention and a
  feed-forward, read out at the text [CLS]. A word is grounded in the region it names, and the next block's
  self-attention lets the [CLS] compare what two words found (spatial relations). Models saved before the
  option have one block without self-attention (``layers=1, self_attention=False``).
  Trade-off: cost grows with Nt x Ni per block; the usual best quality per FLOP for matching.
- ``multimodal_transformer`` (single-stream / "merged attention"): a pre-norm transformer encoder over
  ``[fusion_cls; W_i img_tokens + type_img; W_t txt_tokens + type_txt]`` with text padding masked out of the keys,
  read out at the learned fusion [CLS] (ViLT: Kim et al. 2021, arXiv:2102.03334; METER's merged-attention
  variant: Dou et al. 2022, arXiv:2111.02387). Positions come from the unimodal encoders, so only modality-type
  embeddings are added. Trade-off: most expressive (every token attends to every token, both ways, in every
  layer), cost grows with (1 + Ni + Nt)^2 and with depth.

:func:`fusion_flops` gives the approximate multiply-adds of one (image, text) pair for each kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSION_KINDS: tuple[str, ...] = ("concat", "gated", "cross_attention", "multimodal_transformer")
MT_LAYERS = 2  # default depth of the multimodal transformer (small models on small data; ViLT uses 12)
CA_LAYERS = 2  # default depth of the cross-attention fusion (ALBEF uses 6 on a 12-layer BERT)
MT_HEADS = 4


class ConcatFusion(nn.Module):
    """Late fusion: MLP over the concatenated [CLS] vectors."""

    def __init__(self, vision_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.out_dim = dim
        self.mlp = nn.Sequential(nn.Linear(vision_dim + text_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(torch.cat([_pairs(img_tokens[:, 0], img_index), txt_tokens[:, 0]], dim=-1))


class GatedFusion(nn.Module):
    """Gated Multimodal Unit (Arevalo et al. 2017): a per-dimension sigmoid gate mixes the two [CLS] vectors."""

    def __init__(self, vision_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.out_dim = dim
        self.img = nn.Linear(vision_dim, dim)
        self.txt = nn.Linear(text_dim, dim)
        # The gate sees both inputs: whether to trust the image or the text for a feature can depend on either.
        self.gate = nn.Linear(vision_dim + text_dim, dim)

    def gate_values(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor) -> torch.Tensor:
        """The mixing weights z (B, dim): 1 takes the image feature, 0 the text feature."""
        return torch.sigmoid(self.gate(torch.cat([img_tokens[:, 0], txt_tokens[:, 0]], dim=-1)))

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        img_tokens = _pairs(img_tokens[:, :1], img_index)
        z = self.gate_values(img_tokens, txt_tokens)
        h_img = torch.tanh(self.img(img_tokens[:, 0]))
        h_txt = torch.tanh(self.txt(txt_tokens[:, 0]))
        return z * h_img + (1 - z) * h_txt


class CrossAttentionFusion(nn.Module):
    """ALBEF/BLIP's fusion encoder: ``layers`` blocks of [text self-attention,] text-to-image cross-attention and a
    feed-forward, post-norm as BERT; read out at the text [CLS].

    With one block and no self-attention (what models saved before these options have) the [CLS] query sees the
    image only: one attention hop, enough for "is there a red circle" but not for "is the red circle left of the
    blue square", which needs each named object found (a word's cross-attention) and the two positions compared
    (a later self-attention). Measured on frozen features of the default model, relation questions only:
    2 blocks with self-attention 0.93 / 0.87 (above-below / left-right) after 1,000 steps, 1 block without
    0.80 / 0.54 after 2,000 (docs/results.md)."""

    def __init__(self, vision_dim: int, text_dim: int, dim: int, heads: int = 4, layers: int = CA_LAYERS,
                 self_attention: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"cross_attention: layers must be >= 1, got {layers}")
        self.out_dim = dim
        self.q = nn.Linear(text_dim, dim)
        self.kv = nn.Linear(vision_dim, dim)
        self.layers = nn.ModuleList(_CrossBlock(dim, heads, self_attention) for _ in range(layers))
        # Models saved before ``layers`` existed hold block 0's weights at the top level (attn, norm1, ...).
        self.register_load_state_dict_pre_hook(_nest_single_block)

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_states(img_tokens, txt_tokens, txt_mask, img_index)[:, 0]

    def token_states(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                     img_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Nt, dim): every text token after the blocks (``forward`` reads the [CLS]; ALBEF's MLM reads all)."""
        h = self.q(txt_tokens)
        kv = self.kv(img_tokens)
        pad = txt_mask == 0  # True = padding, ignored as a key of the text self-attention
        for block in self.layers:
            h = block(h, kv, pad, img_index)
        return h


class _CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int, self_attention: bool):
        super().__init__()
        if self_attention:
            self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm0 = nn.LayerNorm(dim)
        else:
            self.self_attn = None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.self_attn is not None:
            h = self.norm0(h + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
        h = self.norm1(h + self.cross_attention(h, kv, img_index))
        return self.norm2(h + self.ff(h))

    def cross_attention(self, h: torch.Tensor, kv: torch.Tensor, img_index: torch.Tensor | None) -> torch.Tensor:
        """``self.attn(h, kv, kv)`` (``nn.MultiheadAttention``'s weights and arithmetic), with the image side's
        key and value projections computed once per image and then gathered per pair (``img_index``)."""
        attn = self.attn
        d, heads = attn.embed_dim, attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.split(d)
        b_q, b_k, b_v = attn.in_proj_bias.split(d)
        k = _pairs(F.linear(kv, w_k, b_k), img_index)
        v = _pairs(F.linear(kv, w_v, b_v), img_index)
        q = F.linear(h, w_q, b_q)
        b, nt, ni = q.shape[0], q.shape[1], k.shape[1]
        split = lambda x, n: x.view(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q, nt), split(k, ni), split(v, ni))
        return attn.out_proj(out.transpose(1, 2).reshape(b, nt, d))


def _nest_single_block(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for part in ("attn.", "norm1.", "ff.", "norm2."):
        for k in [k for k in state_dict if k.startswith(prefix + part)]:
            state_dict[prefix + "layers.0." + k[len(prefix):]] = state_dict.pop(k)


class MultimodalTransformerFusion(nn.Module):
    """Single-stream fusion (ViLT / METER merged attention): one encoder over [fusion CLS; image; text]."""

    def __init__(self, vision_dim: int, text_dim: int, dim: int, layers: int = MT_LAYERS, heads: int = MT_HEADS,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"multimodal_transformer: dim {dim} is not divisible by heads {heads}")
        self.out_dim = dim
        self.img_proj = nn.Linear(vision_dim, dim)
        self.txt_proj = nn.Linear(text_dim, dim)
        # Row 0: image, row 1: text. The fusion [CLS] is itself learned, so it needs no type of its own.
        self.type_emb = nn.Parameter(torch.zeros(2, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.type_emb, std=0.02)  # ViT/BERT initialisation of learned embeddings
        nn.init.trunc_normal_(self.cls, std=0.02)
        # Pre-norm (as ViT): stable without warm-up for small models; dropout 0 as in the rest of the model.
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor,
                img_index: torch.Tensor | None = None) -> torch.Tensor:
        img = _pairs(self.img_proj(img_tokens), img_index)
        b, ni = img.shape[:2]
        x = torch.cat([
            self.cls.expand(b, -1, -1),
            img + self.type_emb[0],
            self.txt_proj(txt_tokens) + self.type_emb[1],
        ], dim=1)
        # True = ignored as a key. The fusion [CLS] and the image tokens are never masked, so no row is all-masked.
        pad = torch.cat([torch.zeros(b, 1 + ni, dtype=torch.bool, device=x.device), txt_mask == 0], dim=1)
        h = self.encoder(x, src_key_padding_mask=pad)
        return self.norm(h[:, 0])


def _pairs(x: torch.Tensor, img_index: torch.Tensor | None) -> torch.Tensor:
    """Per-image rows -> per-pair rows (``img_index``; None: already one row per pair)."""
    return x if img_index is None else x[img_index]


FUSIONS: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "cross_attention": CrossAttentionFusion,
    "multimodal_transformer": MultimodalTransformerFusion,
}


def build_fusion(kind: str, vision_dim: int, text_dim: int, dim: int, **kwargs) -> nn.Module:
    """The fusion module ``kind`` (one of :data:`FUSION_KINDS`); ``kwargs`` go to its constructor
    (e.g. ``layers``/``heads`` for ``multimodal_transformer``, ``heads`` for ``cross_attention``)."""
    if kind not in FUSIONS:
        raise ValueError(f"fusion {kind!r}: expected one of {list(FUSION_KINDS)}")
    return FUSIONS[kind](vision_dim, text_dim, dim, **kwargs)


def fusion_flops(kind: str, ni: int, nt: int, dim: int, *, vision_dim: int | None = None,
                 text_dim: int | None = None, layers: int | None = None, self_attention: bool = True) -> int:
    """Approximate multiply-adds of one forward pass for ONE (image, text) pair.

    Counts the matrix products only (linear layers and attention scores/mixing); biases, norms, activations and
    softmax are left out (lower order). ``ni``/``nt`` are token counts including [CLS]; ``vision_dim``/``text_dim``
    default to ``dim``; ``layers`` to the kind's default depth (:data:`CA_LAYERS`, :data:`MT_LAYERS`). With
    ``Dv, Dt, d = vision_dim, text_dim, dim``:

    - concat:                 ``(Dv + Dt) d + d^2``
    - gated:                  ``2 (Dv + Dt) d``  (two tanh projections + the gate)
    - cross_attention:        ``nt Dt d + ni Dv d`` (input projections), then per block:
                              ``4 nt d^2 + 2 nt^2 d`` (text self-attention, when on)
                              ``+ nt d^2 + 2 ni d^2`` (cross-attention's q, k, v in-projections)
                              ``+ 2 nt ni d`` (scores and weighted sum)
                              ``+ nt d^2 + 8 nt d^2`` (out-projection, 4x feed-forward); every text token is computed
                              although only the [CLS] is read out
    - multimodal_transformer: ``ni Dv d + nt Dt d + layers (12 n d^2 + 2 n^2 d)`` with ``n = 1 + ni + nt``
                              (per layer: q, k, v, out projections 4 n d^2, feed-forward 8 n d^2, attention 2 n^2 d)

    FLOPs are about twice these numbers. Padding is counted as computed (the sequence length is the padded one).
    """
    dv = dim if vision_dim is None else vision_dim
    dt = dim if text_dim is None else text_dim
    d = dim
    if kind == "concat":
        return (dv + dt) * d + d * d
    if kind == "gated":
        return 2 * (dv + dt) * d
    if kind == "cross_attention":
        per_block = nt * d * d + 2 * ni * d * d + 2 * nt * ni * d + 9 * nt * d * d
        if self_attention:
            per_block += 4 * nt * d * d + 2 * nt * nt * d
        return nt * dt * d + ni * dv * d + (CA_LAYERS if layers is None else layers) * per_block
    if kind == "multimodal_transformer":
        n = 1 + ni + nt
        return ni * dv * d + nt * dt * d + (MT_LAYERS if layers is None else layers) * (12 * n * d * d + 2 * n * n * d)
    raise ValueError(f"fusion {kind!r}: expected one of {list(FUSION_KINDS)}")
