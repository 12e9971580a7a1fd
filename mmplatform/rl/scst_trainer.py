"""Self-critical sequence training (SCST; Rennie et al. 2017) of the captioning decoder.

An episode is one sampled caption. Its advantage is its reward minus the reward of the greedy caption
of the same image (the "self-critical" baseline: no value network, and only samples that beat the
test-time policy are reinforced). The vision encoder and the contrastive parts stay frozen, so
retrieval is untouched; the decoder and its memory projection learn.

Logged per step (:func:`mmplatform.rl.rollout.episode_telemetry`): reward mean/std (total and per reward),
episode length, truncation rate, KL to the starting policy (sample estimate of E[log π − log π_ref] at the
sampling temperature), token entropy, and a held-out reward (greedy captions of val images) beside the
training reward, so reward hacking shows as the two diverging. Episodes, telemetry, the Ray worker loop and
best-policy selection are shared with PPO and GRPO in :mod:`mmplatform.rl.rollout`.

Stage command: ``dvc repro rl_finetune`` (= ``python -m pipelines.rl_finetune``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmplatform.compute import average_gradients
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.rl.rollout import (
    Prompts,
    at_temperature,
    episode_telemetry,
    run_rl,
    sample_episodes,
    score,
    trainable_parameters,
    worker_loop,
)
from mmplatform.rl.scst_config import SCSTConfig

__all__ = ["run_scst", "scst_loop_per_worker", "scst_update", "trainable_parameters"]


def scst_update(model: MultimodalModel, reference: MultimodalModel, opt: torch.optim.Optimizer,
                params: list[torch.nn.Parameter], images: torch.Tensor, batch_refs: list[list[str]],
                reward_fn, tokenizer, cfg: SCSTConfig, gen: torch.Generator, prompts: Prompts | None = None
                ) -> dict[str, float]:
    """One SCST policy update on a batch of images (of questions, with ``prompts``); returns the telemetry."""
    k = cfg.samples_per_image
    ep = sample_episodes(model, images, batch_refs, reward_fn, tokenizer, k=k, max_length=cfg.max_length,
                         temperature=cfg.temperature, gen=gen, prompts=prompts)
    rewards = ep.rewards["total"].reshape(-1, k)
    greedy_r = None
    if cfg.baseline == "loo":
        # Leave-one-out: each sample is judged against the mean of the image's other k-1 samples
        # (Luo 2020, "A Better Variant of Self-Critical Sequence Training"); advantages sum to zero per image.
        baseline = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
    else:
        # images= lets image-conditioned rewards (clip_score) score the captions; the others ignore it.
        greedy_r = score(reward_fn, ep.greedy_texts(model, tokenizer, cfg.max_length), batch_refs, images,
                         prompts is not None)
        baseline = np.repeat(greedy_r["total"][:, None], k, 1)  # Rennie et al. 2017: the greedy caption
    adv = torch.tensor((rewards - baseline).reshape(-1), dtype=torch.float32)

    tp = ep.policy(model)  # temperature 1: the policy's own log-probs
    # REINFORCE with the baseline, averaged over the tokens of the batch.
    loss = -(adv[:, None] * tp.logp).sum() / tp.valid.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

    with torch.no_grad():
        # Telemetry at the sampling temperature, the distribution the episodes came from (as PPO and GRPO).
        ref = ep.policy(reference, cfg.temperature)
        row = episode_telemetry(ep, at_temperature(tp, ep.tokens, cfg.temperature), ref.logp, model.cfg.eos_id)
    row["rl/advantage_mean"] = float(adv.mean())
    row["rl/loss"] = float(loss.detach())
    if greedy_r is not None:
        row["rl/greedy_reward_mean"] = float(greedy_r["total"].mean())
    return row


def _make_updater(*, model, reference, params, tokenizer, reward_fn, cfg: SCSTConfig, gen):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return partial(_update, model, reference, opt, params, reward_fn=reward_fn, tokenizer=tokenizer, cfg=cfg, gen=gen)


def _update(model, reference, opt, params, images, refs, *, reward_fn, tokenizer, cfg, gen, prompts=None):
    return scst_update(model, reference, opt, params, images, refs, reward_fn, tokenizer, cfg, gen, prompts)


def scst_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    worker_loop(config, SCSTConfig, _make_updater)


def run_scst(cfg: SCSTConfig, *, base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             cache_dir: str | Path, mlflow_run_id: str | None = None) -> list[dict]:
    """Driver side: run SCST on Ray Train workers; returns the held-out history."""
    return run_rl(scst_loop_per_worker, cfg, base_dir=base_dir, data_dir=data_dir, out_dir=out_dir,
                  cache_dir=cache_dir, mlflow_run_id=mlflow_run_id)
