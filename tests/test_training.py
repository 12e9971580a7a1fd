"""A few optimisation steps on a tiny model: the loss falls and the weights change, for each fusion."""

from __future__ import annotations

import pytest
import torch

from mmplatform.config import TrainParams
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import decode_images, foil_table, sample_caption_per_image, tokenize_captions
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
