"""Training objectives.

``clip_loss``: symmetric InfoNCE (Radford et al. 2021, CLIP) as OpenCLIP computes it: features from
every worker are gathered *with* gradients, each worker scores its local rows against all columns
("local loss"), labels are offset by ``rank * local_batch``.

``itm_loss``: image-text matching with hard negatives drawn from the contrastive similarities
(ALBEF, Li et al. 2021; BLIP): for each image a negative caption sampled in proportion to its
similarity, and for each caption a negative image, so the fusion learns the hard cases.
(:func:`sample_hard_negatives` samples ∝ softmax(sim) with the positive excluded, as ALBEF does; ALBEF
feeds it ``sim / temperature``; ``multitask_loss`` feeds raw cosines, a milder sampling that a fusion trained
from scratch can learn from, see the comment there.)

``triplet_loss``: VSE++ (Faghri et al. 2018) max-of-hinges ranking loss with the hardest in-batch
negative for each anchor, both directions; ``hardest=False`` is the sum-of-hinges of VSE0.

``clip_loss_with_hard_negatives``: NegCLIP (Yuksekgonul et al. 2023): foil captions
(:mod:`mmplatform.data.foils`) are appended as extra columns of the image->text logits only; they have
no image, so the text->image direction is plain CLIP.

``mlm_mask`` / ``mlm_loss``: BERT's masked language modelling (Devlin et al. 2019): 15 % of the real,
non-special tokens are chosen; of those 80 % become [MASK], 10 % a random token, 10 % stay; labels are
-100 elsewhere. With image context (ALBEF/BLIP) the prediction comes from
:class:`mmplatform.models.heads.MLMHead`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributed as dist

MAX_LOGIT_SCALE = math.log(100.0)  # OpenCLIP clamps exp(logit_scale) to 100


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn  # noqa: F401  (registers the autograd-aware collectives)

    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``img``, ``txt``: L2-normalised (B, D) local features; ``logit_scale``: log temperature⁻¹."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    logits_i2t = scale * img @ all_txt.T
    logits_t2i = scale * txt @ all_img.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def sample_hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row of a (B, B) similarity matrix, an index != row sampled ∝ softmax(sim)."""
    w = torch.softmax(sim.detach().float(), dim=1)
    w.fill_diagonal_(0)
    w = w + 1e-8 * (1 - torch.eye(w.shape[0], device=w.device))  # a valid distribution even if peaked
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


IGNORE_INDEX = -100  # PyTorch's cross_entropy default, what mlm_mask writes where there is no target


def _local_vs_all(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local image rows x all texts, local text rows x all images, index of each row's positive)."""
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    pos = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    return img @ all_txt.T, txt @ all_img.T, pos


def triplet_loss(img: torch.Tensor, txt: torch.Tensor, margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """VSE++ hinge-based ranking loss on L2-normalised (B, D) features; row i of each side is a pair.

    For image anchor i: ``[margin + s(i, t_j) - s(i, t_i)]_+`` over captions j != i; for caption anchor i
    the same over images. ``hardest``: only the largest hinge per anchor (VSE++ "MH"), else the sum over
    negatives (VSE0 "SH"). Returns the mean over anchors of (image-anchor + caption-anchor) terms; negatives
    come from every worker (gathered with gradients, as in :func:`clip_loss`)."""
    s_i2t, s_t2i, pos = _local_vs_all(img, txt)
    rows = torch.arange(img.shape[0], device=img.device)
    is_pos = torch.zeros_like(s_i2t, dtype=torch.bool)
    is_pos[rows, pos] = True
    total = torch.zeros((), device=img.device, dtype=s_i2t.dtype)
    for s in (s_i2t, s_t2i):
        positive = s[rows, pos]
        hinge = (margin + s - positive[:, None]).clamp(min=0).masked_fill(is_pos, 0)
        total = total + (hinge.max(dim=1).values if hardest else hinge.sum(dim=1)).mean()
    return total


def clip_loss_with_hard_negatives(img: torch.Tensor, txt: torch.Tensor, neg_txt: torch.Tensor,
                                  logit_scale: torch.Tensor, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """NegCLIP: :func:`clip_loss` whose image->text logits also score ``neg_txt``, L2-normalised foils.

    ``neg_txt`` (M, D): shared negatives, extra columns for every image (NegCLIP appends each pair's foil
    to the batch, M = B; gathered across workers like the captions). ``neg_txt`` (B, K, D): K foils per
    image, each scored by its own image only; ``neg_mask`` (B, K) marks the real ones (a caption with no
    foil). The text->image direction is unchanged: a foil has no image to be matched with."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    s_i2t, s_t2i, pos = _local_vs_all(img, txt)
    if neg_txt.ndim == 2:
        extra = img @ gather_with_grad(neg_txt).T  # (B, M)
    elif neg_txt.ndim == 3:
        extra = torch.einsum("bd,bkd->bk", img, neg_txt)  # (B, K)
        if neg_mask is not None:
            extra = extra.masked_fill(~neg_mask.bool(), float("-inf"))
    else:
        raise ValueError(f"neg_txt must be (M, D) or (B, K, D), got shape {tuple(neg_txt.shape)}")
    logits_i2t = scale * torch.cat([s_i2t, extra], dim=1)
    return (F.cross_entropy(logits_i2t, pos) + F.cross_entropy(scale * s_t2i, pos)) / 2


def mlm_mask(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, special_ids: list[int] | tuple[int, ...],
             mask_id: int, prob: float = 0.15, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT 80/10/10 masking of (B, L) ``ids`` where ``mask`` is 1. Returns ``(inputs, labels)``: labels are
    the original id at chosen positions and -100 elsewhere. Special tokens and padding are never chosen;
    random replacements are drawn from the non-special vocabulary. A row with at least one eligible token
    always gets one target (so a short caption never yields an all-ignored batch and a nan loss)."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    dev = ids.device
    special = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
    special[torch.tensor(list(special_ids), dtype=torch.long, device=dev)] = True
    eligible = mask.bool() & ~special[ids]
    u = torch.rand(ids.shape, generator=generator, device=dev)
    chosen = eligible & (u < prob)
    # rows that drew nothing: take their eligible token with the smallest draw
    empty = ~chosen.any(1) & eligible.any(1)
    if empty.any():
        first = u.masked_fill(~eligible, 2.0).argmin(1)
        chosen[empty.nonzero().squeeze(1), first[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator, device=dev)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    normal = (~special).nonzero().squeeze(1)
    random_ids = normal[torch.randint(len(normal), ids.shape, generator=generator, device=dev)]
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the positions :func:`mlm_mask` chose (labels != -100)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
