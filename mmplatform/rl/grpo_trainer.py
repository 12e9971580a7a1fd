"""Group relative policy optimisation (GRPO; Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) of the
captioning decoder.

Per image, k captions are sampled (a group). An episode's advantage is its reward standardised within its
group, (r - mean_group) / (std_group + eps), given to every token of the episode: the group replaces PPO's
value network as the baseline. The policy maximises the PPO-clip objective (Schulman et al. 2017) of the
per-token ratio π/π_old over ``epochs_per_batch`` passes with the rollout's log-probs fixed, minus β times the
k3 estimate of KL(π || π_ref) per token (Schulman 2020, "Approximating KL divergence"), as DeepSeekMath puts
the KL in the loss rather than in the reward. Losses are averaged over all tokens of the batch (DAPO, Yu et
al. 2025, arXiv:2503.14476: a per-sequence mean first would weigh a short caption's tokens more).

Logged per step, beside the common telemetry of :mod:`mmplatform.rl.rollout`: ``rl/zero_variance_groups``
(share of groups whose k rewards are all equal: they carry no signal), ``rl/clip_fraction`` (share of tokens
whose ratio left [1-ε, 1+ε], over the update passes), ``rl/approx_kl`` (k3 estimate of KL(π_old || π_new)
after the step's updates) and ``rl/kl_penalty`` (mean k3 to the reference, the penalised quantity).

Stage command: ``dvc repro rl_finetune`` with ``rl_finetune.algorithm: grpo`` in params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmplatform.compute import average_gradients
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.rl.grpo_config import GRPOConfig
from mmplatform.rl.rollout import Prompts, episode_telemetry, k3, masked_mean, run_rl, sample_episodes, worker_loop


def group_advantages(rewards: np.ndarray, k: int, eps: float) -> tuple[np.ndarray, float]:
    """(episode advantages (B*k,), share of zero-variance groups) from image-major rewards (B*k,)."""
    r = rewards.reshape(-1, k)
    std = r.std(1, ddof=1, keepdims=True)  # unbiased, as TRL's GRPOTrainer
    adv = (r - r.mean(1, keepdims=True)) / (std + eps)
    return adv.reshape(-1), float((std[:, 0] <= 1e-12).mean())


def grpo_update(model: MultimodalModel, reference: MultimodalModel, opt: torch.optim.Optimizer,
                params: list[torch.nn.Parameter], images: torch.Tensor, batch_refs: list[list[str]],
                reward_fn, tokenizer, cfg: GRPOConfig, gen: torch.Generator, prompts: Prompts | None = None
                ) -> dict[str, float]:
    """One GRPO rollout on a batch of images (of questions, with ``prompts``) and its ``epochs_per_batch``
    updates; returns the telemetry."""
    k, temp = cfg.samples_per_image, cfg.temperature
    ep = sample_episodes(model, images, batch_refs, reward_fn, tokenizer, k=k, max_length=cfg.max_length,
                         temperature=temp, gen=gen, prompts=prompts)
    adv_np, zero_var = group_advantages(ep.rewards["total"], k, cfg.adv_eps)
    adv = torch.tensor(adv_np, dtype=torch.float32)[:, None]
    with torch.no_grad():
        old = ep.policy(model, temp)
        ref = ep.policy(reference, temp)
    valid = old.valid
    row = episode_telemetry(ep, old, ref.logp, model.cfg.eos_id)

    clip_fracs, losses = [], []
    for _ in range(cfg.epochs_per_batch):
        new = ep.policy(model, temp)
        ratio = torch.exp(new.logp - old.logp)
        clipped = ratio.clamp(1 - cfg.clip_epsilon, 1 + cfg.clip_epsilon)
        per_token = -torch.min(ratio * adv, clipped * adv)
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * k3(new.logp, ref.logp)
        loss = masked_mean(per_token, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        clip_fracs.append(float(masked_mean(((ratio.detach() - 1).abs() > cfg.clip_epsilon).float(), valid)))
        losses.append(float(loss.detach()))

    with torch.no_grad():
        after = ep.policy(model, temp)
        row.update({
            "rl/loss": float(np.mean(losses)),
            "rl/zero_variance_groups": zero_var,
            "rl/clip_fraction": float(np.mean(clip_fracs)),
            # KL(π_old || π_new) from the rollout's own samples: how far this step's updates moved the policy.
            "rl/approx_kl": float(masked_mean(k3(old.logp, after.logp), valid)),
            "rl/kl_penalty": float(masked_mean(k3(old.logp, ref.logp), valid)),
            "rl/advantage_abs_mean": float(np.abs(adv_np).mean()),
        })
    return row


def _make_updater(*, model, reference, params, tokenizer, reward_fn, cfg: GRPOConfig, gen):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def update(images: torch.Tensor, refs: list[list[str]], prompts: Prompts | None = None) -> dict[str, float]:
        return grpo_update(model, reference, opt, params, images, refs, reward_fn, tokenizer, cfg, gen, prompts)

    return update


def grpo_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    worker_loop(config, GRPOConfig, _make_updater)


def run_grpo(cfg: GRPOConfig, *, base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             cache_dir: str | Path, mlflow_run_id: str | None = None) -> list[dict]:
    """Driver side: run GRPO on Ray Train workers; returns the held-out history (``rl_summary.json`` beside
    ``rl_history.json`` in ``out_dir`` says whether the selected policy stayed under ``kl_bound``)."""
    return run_rl(grpo_loop_per_worker, cfg, base_dir=base_dir, data_dir=data_dir, out_dir=out_dir,
                  cache_dir=cache_dir, mlflow_run_id=mlflow_run_id)
