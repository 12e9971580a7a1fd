"""Training objectives.

``clip_loss``: symmetric InfoNCE (Radford et al. 2021, CLIP) as OpenCLIP computes it: features from
every worker are gathered *with* gradients, each worker scores its local rows against all columns
("local loss"), labels are offset by ``rank * local_batch``.

``itm_loss``: image-text matching with hard negatives drawn from the contrastive similarities
(ALBEF, Li et al. 2021; BLIP): for each image a negative caption sampled in proportion to its
similarity, and for each caption a negative image, so the fusion learns the hard cases.
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
