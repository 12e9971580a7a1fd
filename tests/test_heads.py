"""Heads (MLM with image context, VQA classifier), VQA accuracy, and the triplet / NegCLIP / MLM-masking
objectives: values computed by hand, and a few optimiser steps on tiny tensors (loss fell, weights changed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmplatform.models.heads import (
    MLMHead,
    VQAClassifier,
    build_answer_vocab,
    mean_vqa_accuracy,
    normalize_answer,
    predict_answers,
    vqa_accuracy,
    vqa_loss,
    vqa_soft_targets,
)
from mmplatform.models.losses import (
    IGNORE_INDEX,
    MAX_LOGIT_SCALE,
    clip_loss,
    clip_loss_with_hard_negatives,
    mlm_loss,
    mlm_mask,
    triplet_loss,
)

S = 1 / math.sqrt(2)

# ----------------------------------------------------------------------------- triplet loss (VSE++)


def test_triplet_loss_two_pairs_by_hand():
    # img = e1, e2; txt = e1, (e1+e2)/sqrt2. s(img, txt) = [[1, s], [0, s]].
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [S, S]])
    # margin 0.2: image anchors: 0.2+s-1 < 0, 0.2+0-s < 0 -> 0. Caption anchors: caption 0: 0.2+0-1 < 0;
    # caption 1 (positive image 1, s): negative image 0 scores s too -> 0.2. Mean over anchors: 0.1.
    assert float(triplet_loss(img, txt, margin=0.2)) == pytest.approx(0.1, abs=1e-6)
    # margin 0.5: image anchor 0: 0.5+s-1; caption anchor 1: 0.5.
    assert float(triplet_loss(img, txt, margin=0.5)) == pytest.approx((0.5 + S - 1) / 2 + 0.5 / 2, abs=1e-6)


def test_triplet_loss_hardest_against_sum_of_hinges():
    # img = identity, so s(i, j) = sim[i, j] exactly.
    sim = torch.tensor([[1.0, 0.9, 0.95], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    img, txt = torch.eye(3), sim.T.clone()
    # image 0 violates with both captions: hinges 0.1 and 0.15; caption 1 by 0.1, caption 2 by 0.15.
    assert float(triplet_loss(img, txt, 0.2, hardest=True)) == pytest.approx(0.15 / 3 + 0.25 / 3, abs=1e-6)
    assert float(triplet_loss(img, txt, 0.2, hardest=False)) == pytest.approx(0.25 / 3 + 0.25 / 3, abs=1e-6)


def test_triplet_loss_is_zero_beyond_the_margin_and_trains():
    torch.manual_seed(0)
    assert float(triplet_loss(torch.eye(4), torch.eye(4), margin=0.2)) == 0.0
    img_w = torch.nn.Parameter(torch.randn(6, 8))
    txt_w = torch.nn.Parameter(torch.randn(6, 8))
    opt = torch.optim.SGD([img_w, txt_w], lr=0.5)
    first = None
    for _ in range(30):
        loss = triplet_loss(F.normalize(img_w, dim=-1), F.normalize(txt_w, dim=-1))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


# ----------------------------------------------------------------------------- NegCLIP


def test_negclip_shared_foil_by_hand():
    img = torch.eye(2)
    txt = torch.eye(2)
    neg = torch.tensor([[S, S]])  # one foil scored by both images
    # scale 1: i2t rows [1, 0, s] and [0, 1, s]; t2i rows [1, 0], [0, 1].
    i2t = -math.log(math.e / (math.e + 1 + math.e ** S))
    t2i = -math.log(math.e / (math.e + 1))
    got = clip_loss_with_hard_negatives(img, txt, neg, torch.tensor(0.0))
    assert float(got) == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_negclip_equals_clip_when_foils_are_far_and_grows_when_a_foil_is_the_positive():
    img = txt = torch.eye(4)
    scale = torch.tensor(MAX_LOGIT_SCALE)
    far = -img[:, None, :]  # per-image foil at cosine -1
    assert torch.allclose(clip_loss_with_hard_negatives(img, txt, far, scale), clip_loss(img, txt, scale), atol=1e-6)
    same = txt[:, None, :].clone()  # the foil reads exactly like the positive: i2t CE = log 2 per row
    got = clip_loss_with_hard_negatives(img, txt, same, scale)
    assert float(clip_loss(img, txt, scale)) < 1e-6
    assert float(got) == pytest.approx(math.log(2) / 2, abs=1e-4)
    # a foil with no real caption behind it (masked) counts for nothing
    masked = clip_loss_with_hard_negatives(img, txt, same, scale, neg_mask=torch.zeros(4, 1, dtype=torch.bool))
    assert torch.allclose(masked, clip_loss(img, txt, scale), atol=1e-6)
    with pytest.raises(ValueError, match="neg_txt"):
        clip_loss_with_hard_negatives(img, txt, torch.zeros(4), scale)


def test_negclip_text_to_image_direction_ignores_foils():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 5), dim=-1)
    txt = F.normalize(torch.randn(3, 5), dim=-1)
    neg = F.normalize(torch.randn(3, 5), dim=-1).requires_grad_(True)
    loss = clip_loss_with_hard_negatives(img, txt, neg, torch.tensor(1.0))
    s = math.e
    t2i = F.cross_entropy(s * txt @ img.T, torch.arange(3))
    i2t = F.cross_entropy(s * torch.cat([img @ txt.T, img @ neg.T], 1), torch.arange(3))
    assert torch.allclose(loss, (i2t + t2i) / 2, atol=1e-6)


# ----------------------------------------------------------------------------- MLM masking

SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
MASK_ID, VOCAB = 4, 50


def _batch(b: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (b, n), generator=gen)
    ids[:, 0], ids[:, -3] = 2, 3  # [CLS] ... [SEP] [PAD] [PAD]
    ids[:, -2:] = 0
    mask = (ids != 0).long()
    return ids, mask


def test_mlm_mask_80_10_10_and_never_special():
    gen = torch.Generator().manual_seed(0)
    ids, mask = _batch(200, 40, gen)
    inputs, labels = mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 0.15, gen)
    chosen = labels != IGNORE_INDEX
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # untouched elsewhere
    eligible = (~special).sum()
    assert 0.13 < chosen.sum() / eligible < 0.17
    n = chosen.sum()
    masked = (inputs[chosen] == MASK_ID).sum() / n
    kept = (inputs[chosen] == ids[chosen]).sum() / n
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.13
    assert not torch.isin(inputs[chosen & (inputs != MASK_ID)], torch.tensor(SPECIAL)).any()
    again = mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 0.15, torch.Generator().manual_seed(0))
    first = mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_mlm_mask_every_row_gets_a_target_and_prob_one_takes_all():
    gen = torch.Generator().manual_seed(1)
    ids, mask = _batch(8, 6, gen)
    _, labels = mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 1e-6, gen)
    assert ((labels != IGNORE_INDEX).sum(1) == 1).all()
    _, labels = mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 1.0, gen)
    assert torch.equal(labels != IGNORE_INDEX, ~torch.isin(ids, torch.tensor(SPECIAL)))
    with pytest.raises(ValueError, match="prob"):
        mlm_mask(ids, mask, VOCAB, SPECIAL, MASK_ID, 0.0, gen)


def test_mlm_loss_only_counts_targets():
    logits = torch.zeros(1, 3, 5)
    logits[0, 1, 2] = 20.0
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    assert float(mlm_loss(logits, labels)) < 1e-6
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX]])
    assert float(mlm_loss(logits, labels)) == pytest.approx(20.0 + math.log(1 + 4 * math.exp(-20)), abs=1e-4)


# ----------------------------------------------------------------------------- MLM head


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return all(not torch.equal(before[n], q.detach()) for n, q in module.named_parameters())


def test_mlm_head_learns_a_word_only_the_image_shows():
    # The hidden word (ids 5..8) is written nowhere in the text; image token 0 carries it as a one-hot.
    torch.manual_seed(0)
    b, vocab, dim = 32, 10, 16
    target = torch.randint(5, 9, (b,))
    img = torch.randn(b, 3, 8) * 0.1
    img[torch.arange(b), 0, target - 5] += 3.0
    ids = torch.tensor([[2, MASK_ID, 7, 3, 0]] * b)
    mask = (ids != 0).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1] = target
    emb = torch.nn.Embedding(vocab, dim)
    head = MLMHead(text_dim=dim, vision_dim=8, vocab_size=vocab, dim=16, heads=2)
    params = list(emb.parameters()) + list(head.parameters())
    before = {n: q.detach().clone() for n, q in head.named_parameters()}
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(60):
        logits = head(emb(ids), img, mask)
        assert logits.shape == (b, 5, vocab)
        loss = mlm_loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert _changed(before, head)
    # far below chance among the 4 candidates (log 4 = 1.39): the head reads the word from the image
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.3, losses[::10]  # ~0.97 with a blank image
    # padding is masked: changing a padded position's input does not change the real positions' logits
    with torch.no_grad():
        x = emb(ids)
        y = x.clone()
        y[:, 4] += 5.0
        assert torch.allclose(head(x, img, mask)[:, :4], head(y, img, mask)[:, :4], atol=1e-5)


def test_mlm_head_and_vqa_head_on_the_real_model_pass_gradients_to_the_encoders():
    from mmplatform.models.multimodal import ModelConfig, MultimodalModel

    torch.manual_seed(0)
    vocab = build_answer_vocab(["yes", "no", "two"])
    cfg = ModelConfig(vocab_size=VOCAB, pad_id=0, bos_id=2, eos_id=3, image_size=32, patch_size=8,
                      vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1,
                      text_heads=2, max_length=16, decoder_hidden=16, decoder_layers=1, decoder_heads=2,
                      embed_dim=16, fusion="cross_attention", banned_ids=[0, 1, 2, 4], vqa_answers=list(vocab),
                      mlm=True, mask_id=MASK_ID)
    model = MultimodalModel(cfg)
    assert isinstance(model.mlm_head, MLMHead) and isinstance(model.vqa_head, VQAClassifier)
    assert model.special_ids() == SPECIAL
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ids, mask = _batch(4, 10, gen)
    img_tok = model.image_tokens(images)
    inputs, labels = mlm_mask(ids, mask, cfg.vocab_size, model.special_ids(), MASK_ID, 0.15, gen)
    logits = model.mlm_logits(img_tok, inputs, mask)
    assert logits.shape == (4, 10, VOCAB)
    l_mlm = mlm_loss(logits, labels)
    answers = ["yes", "no", "2", "yes"]
    assert model.answer_index(answers + ["purple"]).tolist() == [vocab[a] for a in answers] + [-1]
    l_vqa = vqa_loss(model.vqa_logits(img_tok, model.text_tokens(ids, mask), mask), vqa_soft_targets(answers, vocab))
    (l_mlm + l_vqa).backward()
    assert torch.isfinite(l_mlm) and torch.isfinite(l_vqa)
    assert model.text.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.vision.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert set(model.answer_questions(images, ids, mask)) <= set(vocab)
    # without the config keys there are no heads, and asking for them says so
    plain = MultimodalModel(ModelConfig(**{**cfg.__dict__, "vqa_answers": [], "mlm": False}))
    assert plain.vqa_head is None and plain.mlm_head is None
    with pytest.raises(ValueError, match="no VQA head"):
        plain.vqa_logits(img_tok, model.text_tokens(ids, mask), mask)
    with pytest.raises(ValueError, match="mask_id"):
        MultimodalModel(ModelConfig(**{**cfg.__dict__, "mask_id": None}))


# ----------------------------------------------------------------------------- VQA


def test_vqa_classifier_trains():
    torch.manual_seed(0)
    answers = ["yes", "no", "red", "two"]
    vocab = build_answer_vocab(answers)
    x = torch.randn(64, 12)
    truth = (x @ torch.randn(12, 4)).argmax(1)
    targets = vqa_soft_targets([answers[i] for i in truth], vocab)
    head = VQAClassifier(12, len(vocab))
    before = {n: q.detach().clone() for n, q in head.named_parameters()}
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = vqa_loss(head(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert _changed(before, head)
    assert losses[-1] < 0.3 * losses[0]
    preds = predict_answers(head(x), vocab)
    assert mean_vqa_accuracy(preds, [answers[i] for i in truth]) > 0.9


def test_answer_normalisation_and_vocab():
    assert normalize_answer(" The Two. ") == "2"
    assert normalize_answer("1,000") == "1,000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("red!") == "red"
    vocab = build_answer_vocab(["yes", "no", "yes", "Two", "2", "three", "blue"], min_count=2)
    assert vocab == {"2": 0, "yes": 1}  # tie broken by text
    assert build_answer_vocab(["b", "c", "b", "a"]) == {"b": 0, "c": 1}  # "a" is an article: empty, dropped


@pytest.mark.parametrize(("k", "loo", "simple"), [
    (0, 0.0, 0.0),
    (1, 0.3, 1 / 3),            # 9 subsets keep the match: (9 * 1/3) / 10
    (2, 0.6, 2 / 3),            # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9, 1.0),              # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0, 1.0),
])
def test_vqa_accuracy_ten_annotators(k, loo, simple):
    refs = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("Yes", refs) == pytest.approx(loo)
    assert vqa_accuracy("yes", refs, leave_one_out=False) == pytest.approx(simple)


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("two", "2") == 1.0
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("three", "2") == 0.0
    assert mean_vqa_accuracy(["yes", "no"], ["yes", "yes"]) == 0.5
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_vqa_soft_targets():
    vocab = {"yes": 0, "no": 1, "2": 2}
    t = vqa_soft_targets([["yes"] * 2 + ["no"] * 8, "two", "purple"], vocab)
    assert torch.allclose(t, torch.tensor([[0.6, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
