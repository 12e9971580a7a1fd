"""SCST on a tiny task: the reward of the policy rises, and the telemetry is complete."""

from __future__ import annotations

import copy

import torch

from mmplatform.config import TrainParams
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.captioning import greedy_captions
from mmplatform.models.losses import caption_loss
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.rl.rewards import build_rewards
from mmplatform.rl.scst_config import SCSTConfig
from mmplatform.rl.scst_trainer import scst_update, trainable_parameters
from mmplatform.train.batches import decode_images, tokenize_captions
from mmplatform.train.objectives import model_config, trim

TINY = {"embed_dim": 32, "vision": {"hidden_size": 32, "layers": 1, "heads": 2},
        "text": {"hidden_size": 32, "layers": 1, "heads": 2}, "decoder": {"hidden_size": 32, "layers": 1, "heads": 2}}


def _cross_entropy_warmup(model, tok, recs, images, steps: int = 40) -> None:
    """A short teacher-forced start, as SCST starts from a cross-entropy model (Rennie et al. 2017)."""
    caps = tokenize_captions(tok, recs, 48)
    first = torch.tensor([r[0] for r in caps.per_image(len(recs))])
    ids, mask = trim(caps.ids[first], caps.mask[first])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        mem = model.memory(model.image_tokens(images))
        loss = caption_loss(model.caption_logits(mem, ids[:, :-1], mask[:, :-1]), ids[:, 1:], model.cfg.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_scst_raises_reward_on_tiny_task():
    torch.manual_seed(0)
    recs = [r for r in generate_synthetic(n_train=16, n_val=1, n_test=1, n_test_compositional=1)
            if r["split"] == "train"]
    refs = [r["captions"] for r in recs]
    tok = train_tokenizer([c for r in refs for c in r], 128)
    model = MultimodalModel(model_config(TrainParams.model_validate(TINY), tok, 64))
    images = decode_images(recs, 64)
    _cross_entropy_warmup(model, tok, recs, images)
    reference = copy.deepcopy(model).eval()
    params = trainable_parameters(model)
    frozen_before = model.vision.model.embeddings.patch_embeddings.projection.weight.clone()
    cfg = SCSTConfig(batch_size=16, max_length=16, samples_per_image=4, lr=3e-4)
    reward_fn = build_rewards({"cider_d": 1.0}, refs)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def greedy_reward() -> float:
        return float(reward_fn(greedy_captions(model, tok, images, cfg.max_length), refs)["total"].mean())

    start = greedy_reward()
    rows = [scst_update(model, reference, opt, params, images, refs, reward_fn, tok, cfg, gen) for _ in range(80)]
    end = greedy_reward()
    assert end > 1.2 * start, (start, end)
    for key in ("rl/reward_std", "rl/episode_length_mean", "rl/kl_to_reference", "rl/entropy",
                "rl/truncation_rate", "rl/reward_cider_d_mean"):
        assert key in rows[-1]
    assert rows[-1]["rl/kl_to_reference"] > 0  # the policy moved away from the reference
    # The vision encoder is frozen: RL only moves the captioner.
    assert torch.equal(model.vision.model.embeddings.patch_embeddings.projection.weight, frozen_before)
