"""A few optimisation steps on a tiny model: the loss falls and the weights change, for each fusion and
for each head alone; the VQA batches; models saved before the optional heads existed still load."""

from __future__ import annotations

import math

import pytest
import torch

from mmplatform.config import TrainParams
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.heads import build_answer_vocab
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import (
    decode_images,
    foil_table,
    sample_caption_per_image,
    tokenize_captions,
    tokenize_questions,
    tokenizer_texts,
    vqa_batch,
)
from mmplatform.train.objectives import model_config, multitask_loss, trim

TINY = {"embed_dim": 32, "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 8},
        "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_length": 48},
        "decoder": {"hidden_size": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def tiny_data():
    recs = [r for r in generate_synthetic(n_train=32, n_val=1, n_test=1, n_test_compositional=1)
            if r["split"] == "train"]
    tok = train_tokenizer([c for r in recs for c in r["captions"]], 256)
    return recs, tok


@pytest.fixture(scope="module")
def tiny_qa(tiny_data):
    """The same images with a tokenizer trained on captions and VQA questions, as the train stage builds it."""
    recs, _ = tiny_data
    return recs, train_tokenizer(tokenizer_texts(recs), 256)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_multitask_training_lowers_loss_and_changes_weights(tiny_data, fusion):
    recs, tok = tiny_data
    torch.manual_seed(0)
    p = TrainParams.model_validate(TINY | {"fusion": fusion})
    model = MultimodalModel(model_config(p, tok, 64))
    images = decode_images(recs, 64)
    caps = tokenize_captions(tok, recs, 48)
    rows = caps.per_image(len(recs))
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    idx = list(range(len(recs)))
    cap_idx = torch.tensor([r[0] for r in rows])  # fixed batch: the loss on it must fall
    ids, mask = trim(caps.ids[cap_idx], caps.mask[cap_idx])
    losses = []
    for _ in range(40):
        out = multitask_loss(model, images[idx], ids, mask, p.loss_weights, gen)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        losses.append({k: float(v) for k, v in out.items()})
    assert losses[-1]["total"] < 0.7 * losses[0]["total"]
    for k in ("contrastive", "captioning", "itm"):
        assert losses[-1][k] < losses[0][k], k
    for group in ("vision.", "text.", "fusion.", "itm_head.", "decoder.", "img_proj", "txt_proj"):
        changed = [n for n, q in model.named_parameters() if n.startswith(group) and not torch.equal(q, before[n])]
        assert changed, f"no parameter of {group} changed"
    assert sample_caption_per_image(rows, [0, 1], gen).shape == (2,)


def test_negclip_foils_and_triplet_are_wired_into_the_loss(tiny_data):
    """With ``foil_negatives`` the contrastive term is NegCLIP's (each caption's foil scored as an extra
    negative for its image) and the triplet term appears with its weight; a few steps lower the total and
    train the text side. (Whether foils teach binding is measured on the full run: ``aro_*`` metrics.)"""
    from mmplatform.models.losses import clip_loss, clip_loss_with_hard_negatives, triplet_loss

    recs, tok = tiny_data
    torch.manual_seed(0)
    p = TrainParams.model_validate(TINY | {"foil_negatives": True, "loss_weights": {"triplet": 0.5}})
    model = MultimodalModel(model_config(p, tok, 64))
    images = decode_images(recs, 64)
    caps = tokenize_captions(tok, recs, 48)
    foils = foil_table(tok, caps, 48, seed=0)
    assert foils.has.float().mean() > 0.9 and set(foils.kinds) >= {"attribute", "relation", "order"}
    assert all(f != c for f, c, h in zip(tok.batch_decode(foils.ids[:20], skip_special_tokens=True),
                                          caps.texts[:20], foils.has[:20].tolist(), strict=True) if h)
    cap_idx = torch.tensor([r[0] for r in caps.per_image(len(recs))])
    ids, mask = trim(caps.ids[cap_idx], caps.mask[cap_idx])
    f_ids, f_mask = trim(foils.ids[cap_idx], foils.mask[cap_idx])
    batch_foils = (f_ids, f_mask, foils.has[cap_idx])

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = multitask_loss(model, images, ids, mask, p.loss_weights, gen, foils=batch_foils)
        img = model.embed_images(images)
        txt, neg = model.embed_texts(ids, mask), model.embed_texts(f_ids, f_mask)
        expected = clip_loss_with_hard_negatives(img, txt, neg[:, None], model.logit_scale, batch_foils[2][:, None])
    assert torch.allclose(out["contrastive"], expected, atol=1e-5)
    assert out["contrastive"] > clip_loss(img, txt, model.logit_scale)  # the foils are extra negatives
    assert torch.allclose(out["triplet"], triplet_loss(img, txt, p.triplet_margin), atol=1e-5)

    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(30):
        out = multitask_loss(model, images, ids, mask, p.loss_weights, gen, foils=batch_foils)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        totals.append(float(out["total"]))
    assert totals[-1] < 0.8 * totals[0]
    assert any(not torch.equal(q, before[n]) for n, q in model.named_parameters() if n.startswith("text."))


def test_generate_agrees_with_teacher_forced_logprobs_and_roundtrips(tiny_data, tmp_path):
    recs, tok = tiny_data
    torch.manual_seed(0)
    model = MultimodalModel(model_config(TrainParams.model_validate(TINY), tok, 64)).eval()
    images = decode_images(recs[:4], 64)
    with torch.no_grad():
        mem = model.memory(model.image_tokens(images))
        toks, logps = model.generate(mem, 12, greedy=False, generator=torch.Generator().manual_seed(1))
        tf, _, valid = model.sequence_logprobs(mem, toks)
    assert torch.allclose(tf, logps, atol=1e-4)
    assert (valid.sum(1) >= 1).all()
    model.save(tmp_path / "m")
    loaded = MultimodalModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded.embed_images(images), model.embed_images(images), atol=1e-6)


# ----------------------------------------------------------------------------- every head on its own

# Per head: the parameters its loss must move (the captioner reads only the image, so its encoder is the
# vision one), its steps, learning rate and the share of its first loss the mean of the last 5 must be below.
# A freshly initialised text encoder gives nearly the same state at every position for every caption (std across
# captions ~1e-3), so the contrastive loss sits at ln(B) for a few dozen steps before the embeddings separate.
# VSE++'s max-of-hinges triplet loss never leaves that collapsed point (every hinge equals the margin, loss
# 2 x margin) and, from weakly separated features, is drawn back to it: Faghri et al. 2018 start from
# pretrained encoders. So its test starts from a contrastive warm-up and trains on the triplet loss alone.
# ITM too: its negatives are mined from the contrastive similarities (ALBEF), which mean nothing before the
# embeddings separate (from scratch it stays at its prior, 0.6365, for 100 steps); and the fusion reads the
# text [CLS], which the mean-pooled contrastive warm-up does not train. Its escape from the prior is chaotic:
# at lr 2e-3 and 150 steps the mean of the last 5 ranged 0.44-0.64 over seeds, thread counts and CPU kernels
# (ATEN_CPU_CAPABILITY avx512/avx2/default), and CI's CPU failed a 0.8 x first-loss bound at 0.54. At lr 1e-3
# and 200 steps it left the prior in all 10 of those runs: mean of the last 20 0.25-0.56, pair AUC 0.77-0.97.
# So ITM is held to its prior, not its (noisy, 0.64-0.87) first loss, and to ranking its pairs.
# Measured margins (mean of the last 5 / first, at 1 and 2 threads): triplet 0.73.
HEADS = {
    "contrastive": (("vision.", "text.", "img_proj", "txt_proj", "logit_scale"), 80, 2e-3, 0.8),
    "triplet": (("vision.", "text.", "img_proj", "txt_proj"), 25, 5e-4, 0.85),
    "itm": (("vision.", "text.", "fusion.", "itm_head."), 120, 1e-3, 0.95),
    "captioning": (("vision.", "decoder.", "memory_proj."), 25, 2e-3, 0.8),
    "mlm": (("vision.", "text.", "mlm_head."), 25, 2e-3, 0.8),
    "vqa": (("vision.", "text.", "fusion.", "vqa_head."), 25, 2e-3, 0.8),
    "vqa_generative": (("vision.", "decoder.", "memory_proj."), 25, 2e-3, 0.8),
}
WARM_UP = {"triplet": ("contrastive", 120), "itm": ("contrastive", 120)}
# the ITM loss of a head that predicts the share of matches (1 in 3): the entropy of Bernoulli(1/3)
ITM_PRIOR = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


@torch.no_grad()
def itm_pair_auc(model, images, ids, mask) -> float:
    """How often a matching pair scores above a mismatched one sharing its image or its caption: over all
    n x n (image, caption) pairs of the batch, 0.5 for a head that cannot tell them apart."""
    model.eval()
    img_tok, txt_tok = model.image_tokens(images), model.text_tokens(ids, mask)
    n = len(images)
    i, j = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    score = model.itm_logits(img_tok[i], txt_tok[j], mask[j]).log_softmax(-1)[:, 1].view(n, n)
    model.train()
    off = ~torch.eye(n, dtype=torch.bool)
    pos = score.diag()
    return float(torch.cat([(pos[:, None] > score)[off], (pos[None, :] > score)[off]]).float().mean())


@pytest.mark.parametrize("head", list(HEADS))
def test_each_head_alone_lowers_its_loss_and_trains_its_weights_and_the_encoders(tiny_qa, head):
    """Only ``head``'s weight is non-zero; Adam steps (no weight decay, so a parameter with no gradient stays
    put) on a fixed batch lower that loss and move the head's own parameters and the encoders'."""
    recs, tok = tiny_qa
    torch.manual_seed(0)
    weights = dict.fromkeys(HEADS, 0.0) | {head: 1.0}
    p = TrainParams.model_validate(TINY | {"loss_weights": weights})
    answers = build_answer_vocab(a for r in recs for a in r["answers"])
    model = MultimodalModel(model_config(p, tok, 64, list(answers)))
    assert (model.vqa_head is not None) == (head == "vqa") and (model.mlm_head is not None) == (head == "mlm")
    images = decode_images(recs, 64)
    caps = tokenize_captions(tok, recs, 48)
    cap_idx = torch.tensor([r[0] for r in caps.per_image(len(recs))])
    ids, mask = trim(caps.ids[cap_idx], caps.mask[cap_idx])
    qa = tokenize_questions(tok, recs, 48, answers)
    vqa = vqa_batch(qa, qa.per_image(len(recs)), range(len(recs)), torch.Generator().manual_seed(0))

    def train(w, key: str, steps: int, lr: float = 2e-3) -> list[float]:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        losses = []
        for step in range(steps):
            # ITM samples fresh negatives each step; MLM's masks stay fixed so its loss is comparable
            gen = torch.Generator().manual_seed(step if key == "itm" else 0)
            out = multitask_loss(model, images, ids, mask, w, gen, vqa=vqa)
            opt.zero_grad()
            out["total"].backward()
            opt.step()
            losses.append(float(out[key]))
        return losses

    if head in WARM_UP:
        first, n = WARM_UP[head]
        train(TrainParams.model_validate({"loss_weights": dict.fromkeys(HEADS, 0.0) | {first: 1.0}}).loss_weights,
              first, n)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    groups, steps, lr, share = HEADS[head]
    losses = train(p.loss_weights, head, steps, lr)
    if head == "itm":
        # fresh negatives each step make one step's loss noisy: the mean of the last 20
        assert sum(losses[-20:]) / 20 < share * ITM_PRIOR, losses
        assert itm_pair_auc(model, images, ids, mask) > 0.7
    else:
        assert sum(losses[-5:]) / 5 < share * losses[0], losses
    for group in groups:
        changed = [n for n, q in model.named_parameters() if n.startswith(group) and not torch.equal(q, before[n])]
        assert changed, f"{head}: no parameter of {group} changed"
    # a head switched off contributes no gradient: e.g. the decoder stays put unless it is trained
    if head not in ("captioning", "vqa_generative"):
        assert all(torch.equal(q, before[n]) for n, q in model.named_parameters() if n.startswith("decoder."))


def test_vqa_term_is_the_head_bce_and_in_the_total(tiny_qa):
    from mmplatform.models.heads import vqa_loss, vqa_soft_targets

    recs, tok = tiny_qa
    torch.manual_seed(0)
    p = TrainParams.model_validate(TINY | {"loss_weights": {"vqa": 0.5}})
    answers = build_answer_vocab(a for r in recs for a in r["answers"])
    model = MultimodalModel(model_config(p, tok, 64, list(answers))).eval()
    assert model.cfg.vqa_answers == list(answers) and model.cfg.mask_id == tok.mask_token_id
    images = decode_images(recs, 64)
    caps = tokenize_captions(tok, recs, 48)
    ids, mask = trim(caps.ids[:len(recs)], caps.mask[:len(recs)])
    qa = tokenize_questions(tok, recs, 48, answers)
    vqa = vqa_batch(qa, qa.per_image(len(recs)), range(len(recs)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = multitask_loss(model, images, ids, mask, p.loss_weights, torch.Generator().manual_seed(0), vqa=vqa)
        img_tok = model.image_tokens(images)
        logits = model.vqa_logits(img_tok[vqa.pos], model.text_tokens(vqa.ids, vqa.mask), vqa.mask)
        refs = [qa.answers[j] for j in vqa.index.tolist()]
        expected = vqa_loss(logits, vqa_soft_targets(refs, answers))
        no_vqa = multitask_loss(model, images, ids, mask, p.loss_weights, torch.Generator().manual_seed(0))
    assert torch.allclose(out["vqa"], expected, atol=1e-5)
    assert "vqa" not in no_vqa  # no questions given: no term
    assert torch.allclose(out["total"] - no_vqa["total"], 0.5 * expected, atol=1e-4)
    # a batch without any question still touches the head (a zero), so data-parallel workers all-reduce alike
    empty = vqa_batch(qa, [[] for _ in recs], range(len(recs)), torch.Generator())
    zero = multitask_loss(model, images, ids, mask, p.loss_weights, torch.Generator().manual_seed(0), vqa=empty)
    zero["vqa"].backward()
    assert float(zero["vqa"]) == 0.0 and all(q.grad is not None for q in model.vqa_head.parameters())


def test_vqa_batches_one_question_per_image_with_its_answer(tiny_qa):
    recs, tok = tiny_qa
    answers = build_answer_vocab(a for r in recs for a in r["answers"])
    qa = tokenize_questions(tok, recs, 48, answers)
    assert len(qa.answers) == sum(len(r["questions"]) for r in recs) and (qa.label >= 0).all()
    assert set(qa.types) <= {"count", "color", "shape", "size", "exist", "left_right", "above_below"}
    # no question word is unknown to the tokenizer, which was trained on captions and questions
    assert (qa.ids != tok.unk_token_id).all()
    rows = qa.per_image(len(recs))
    rows[3] = []  # an image without questions is skipped
    idx = [5, 3, 0, 7]
    b = vqa_batch(qa, rows, idx, torch.Generator().manual_seed(0))
    assert b.pos.tolist() == [0, 2, 3] and b.ids.shape[0] == 3
    assert b.mask[:, -1].any() and b.ids.shape[1] < 48  # trimmed to the longest question
    n = b.ids.shape[1]
    digits = {"one": "1", "two": "2", "three": "3", "four": "4"}
    for j, pos, row, label in zip(b.index.tolist(), b.pos.tolist(), b.ids, b.label.tolist(), strict=True):
        assert int(qa.owner[j]) == idx[pos] and torch.equal(qa.ids[j, :n], row)
        assert label == int(qa.label[j]) == answers[digits.get(qa.answers[j], qa.answers[j])]
    # seeded: the same generator state gives the same questions; over many draws every question comes up
    again = vqa_batch(qa, rows, idx, torch.Generator().manual_seed(0))
    assert torch.equal(again.ids, b.ids)
    gen = torch.Generator().manual_seed(1)
    seen = {j for _ in range(60) for j in vqa_batch(qa, rows, [0], gen).index.tolist()}
    assert seen == set(rows[0])


def test_vqa_batches_several_distinct_questions_per_image(tiny_qa):
    recs, tok = tiny_qa
    qa = tokenize_questions(tok, recs, 48, build_answer_vocab(a for r in recs for a in r["answers"]))
    rows = qa.per_image(len(recs))
    rows[1] = rows[1][:2]  # fewer questions than asked for: all of them
    idx = [0, 1, 2]
    b = vqa_batch(qa, rows, idx, torch.Generator().manual_seed(0), per_image=3)
    assert b.pos.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # grouped by image, in batch order
    for k, i in enumerate(idx):
        mine = b.index[b.pos == k].tolist()
        assert len(set(mine)) == len(mine) and set(mine) <= set(rows[i])  # distinct, the image's own
        assert all(int(qa.owner[j]) == i for j in mine)
    assert torch.equal(vqa_batch(qa, rows, idx, torch.Generator().manual_seed(0), per_image=3).index, b.index)
    with pytest.raises(ValueError, match="per_image"):
        vqa_batch(qa, rows, idx, torch.Generator(), per_image=0)


def test_itm_negatives_are_sampled_from_cosine_similarities(tiny_qa, monkeypatch):
    """The sampler gets raw cosines (not cosines x exp(logit_scale) as in ALBEF; see objectives.multitask_loss)."""
    from mmplatform.train import objectives

    recs, tok = tiny_qa
    torch.manual_seed(0)
    p = TrainParams.model_validate(TINY)
    model = MultimodalModel(model_config(p, tok, 64)).eval()
    seen = []
    real = objectives.sample_hard_negatives
    monkeypatch.setattr(objectives, "sample_hard_negatives", lambda sim, gen: seen.append(sim) or real(sim, gen))
    images = decode_images(recs[:8], 64)
    caps = tokenize_captions(tok, recs[:8], 48)
    ids, mask = trim(caps.ids[:8], caps.mask[:8])
    with torch.no_grad():
        objectives.multitask_loss(model, images, ids, mask, p.loss_weights, torch.Generator().manual_seed(0))
        cos = model.embed_images(images) @ model.embed_texts(ids, mask).T
    # raw cosines, not cosines / temperature: see the comment in objectives.multitask_loss
    assert torch.allclose(seen[0], cos, atol=1e-5) and torch.allclose(seen[1], cos.T, atol=1e-5)


def test_a_model_saved_before_the_optional_heads_still_loads(tiny_qa, tmp_path):
    import json

    recs, tok = tiny_qa
    torch.manual_seed(0)
    old = MultimodalModel(model_config(TrainParams.model_validate(TINY | {"loss_weights": {"vqa": 0.0}}), tok, 64))
    old.save(tmp_path / "old")
    raw = json.loads((tmp_path / "old/model_config.json").read_text())
    for key in ("vqa_answers", "mlm", "mask_id", "vqa_generative", "banned_ids"):  # what model_config.json
        raw.pop(key)                                                                # looked like before them
    raw["extra"] = {}  # the first version's (always empty) key, since retired
    (tmp_path / "old/model_config.json").write_text(json.dumps(raw))
    loaded = MultimodalModel.load(tmp_path / "old")
    assert loaded.vqa_head is None and loaded.mlm_head is None
    images = decode_images(recs[:4], 64)
    with torch.no_grad():
        assert torch.allclose(loaded.embed_images(images), old.embed_images(images), atol=1e-6)
    # a model with both heads round-trips with them, and answers the same
    answers = build_answer_vocab(a for r in recs for a in r["answers"])
    p = TrainParams.model_validate(TINY | {"loss_weights": {"vqa": 1.0, "mlm": 1.0}})
    new = MultimodalModel(model_config(p, tok, 64, list(answers))).eval()
    new.save(tmp_path / "new")
    back = MultimodalModel.load(tmp_path / "new")
    assert back.cfg == new.cfg and back.mlm_head is not None
    qa = tokenize_questions(tok, recs[:4], 48, answers)
    assert back.answer_questions(images[qa.owner], qa.ids, qa.mask) == new.answer_questions(
        images[qa.owner], qa.ids, qa.mask)
    # a key from a newer version is named, not a bare TypeError
    raw["from_the_future"] = 1
    (tmp_path / "old/model_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="from_the_future"):
        MultimodalModel.load(tmp_path / "old")


def test_generative_vqa_sequences_and_greedy_answers_agree_with_teacher_forcing(tiny_qa):
    recs, tok = tiny_qa
    torch.manual_seed(0)
    p = TrainParams.model_validate(TINY | {"loss_weights": {"vqa_generative": 1.0}})
    model = MultimodalModel(model_config(p, tok, 64, ["yes"])).eval()
    assert model.cfg.vqa_generative
    q = tok(["is there a red circle?", "what color is the square?"], padding=True, return_tensors="pt")
    a = tok(["yes", "light blue"], padding=True, return_tensors="pt")
    ids, attn, labels = model.answer_sequences(q["input_ids"], q["attention_mask"], a["input_ids"],
                                               a["attention_mask"])
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    q0 = tok("is there a red circle?")["input_ids"]  # [CLS] ... [SEP], 8 tokens
    q1 = tok("what color is the square?")["input_ids"]  # 8 tokens
    yes, light, blue = tok.convert_tokens_to_ids(["yes", "light", "blue"])
    assert ids.tolist() == [q0 + [yes, sep, pad], q1 + [light, blue, sep]]
    assert labels.tolist() == [[-100] * 8 + [yes, sep, -100], [-100] * 8 + [light, blue, sep]]
    assert attn.tolist() == [[1] * 10 + [0], [1] * 11]
    assert ids[0, 0] == cls
    # greedy decoding after the prefix picks, at each step, the teacher-forced argmax given the same prefix
    images = decode_images(recs[:2], 64)
    answers = model.generate_answers(images, q["input_ids"], q["attention_mask"], max_length=3)
    with torch.no_grad():
        mem = model.memory(model.image_tokens(images))
        for i, ans in enumerate(answers):
            n = int(q["attention_mask"][i].sum())
            seq = q["input_ids"][i:i + 1, :n]
            for t in ans.tolist():
                logits = model._allowed(model.caption_logits(mem[i:i + 1], seq, torch.ones_like(seq))[:, -1])
                assert int(logits.argmax(-1)) == t
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
            assert len(ans) <= 3 and sep not in ans.tolist()
