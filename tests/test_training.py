"""A few optimisation steps on a tiny model: the loss falls and the weights change, for each fusion."""

from __future__ import annotations

import pytest
import torch

from mmplatform.config import TrainParams
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import decode_images, sample_caption_per_image, tokenize_captions
from mmplatform.train.recipe import model_config, multitask_loss, trim

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
