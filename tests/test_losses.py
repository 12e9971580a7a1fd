"""Objectives against values computed by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmplatform.models.losses import MAX_LOGIT_SCALE, caption_loss, clip_loss, sample_hard_negatives


def test_clip_loss_matches_hand_computation():
    # Two pairs; image 0 = text 0 = e1, image 1 = e2, text 1 = (e1 + e2)/sqrt2. Temperature 1.
    s = 1 / math.sqrt(2)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [s, s]])
    # i2t logits: [[1, s], [0, s]]; t2i logits (rows = texts): [[1, 0], [s, s]].
    i2t = -(math.log(math.e ** 1 / (math.e ** 1 + math.e ** s)) + math.log(math.e ** s / (1 + math.e ** s)))
    t2i = -(math.log(math.e / (math.e + 1)) + math.log(0.5))
    expected = (i2t / 2 + t2i / 2) / 2
    got = clip_loss(img, txt, torch.tensor(0.0))
    assert abs(float(got) - expected) < 1e-6


def test_clip_loss_clamps_the_temperature():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    assert torch.allclose(clip_loss(img, txt, torch.tensor(10.0)), clip_loss(img, txt, torch.tensor(MAX_LOGIT_SCALE)))


def test_clip_loss_is_low_for_aligned_pairs():
    x = F.normalize(torch.randn(16, 32), dim=-1)
    aligned = clip_loss(x, x, torch.tensor(MAX_LOGIT_SCALE))
    shuffled = clip_loss(x, x.roll(1, 0), torch.tensor(MAX_LOGIT_SCALE))
    assert aligned < 0.1 < shuffled


def test_hard_negatives_never_pick_the_positive_and_prefer_similar():
    sim = torch.eye(6) * 5 + torch.tensor([[0, 4.0, 0, 0, 0, 0]] * 6)
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_hard_negatives(sim, gen) for _ in range(200)])
    assert not (picks == torch.arange(6)).any()
    # Column 1 is the most similar non-matching caption for every row but its own.
    assert (picks[:, 0] == 1).float().mean() > 0.7 and (picks[:, 2] == 1).float().mean() > 0.7
    assert (picks[:, 1] != 1).all()


def test_caption_loss_ignores_padding():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 10.0
    targets = torch.tensor([[2, 0, 0]])  # pad id 0
    assert float(caption_loss(logits, targets, pad_id=0)) < 1e-3
