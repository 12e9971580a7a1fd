"""PPO (Schulman et al. 2017, arXiv:1707.06347) of the captioning decoder, the way RL from human feedback
fine-tunes language models (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020, arXiv:2009.01325).

- An episode is one sampled caption; a state is the image and the caption's prefix, an action the next token.
- Reward: the caption's reward (mmplatform.rl.rewards) at its last token, minus β·(log π_old − log π_ref) at
  every token: the KL penalty to the reference policy lives in the reward (Ziegler et al. 2019, eq. 2).
- β is adapted towards ``kl_target`` (Ziegler et al. 2019, §2.2): e = clip(KL/target − 1, −0.2, 0.2),
  β ← β·(1 + e·n/horizon) after each rollout of n episodes, KL averaged over the data-parallel workers.
- Value head: a small MLP on the decoder's last hidden state at each position (the state before the token).
  It reads the hidden states detached, so its loss does not shape the policy's representation (Stiennon et al.
  2020 keep policy and value function apart); its own learning rate ``value_lr``.
- Advantages: GAE (Schulman et al. 2016, arXiv:1506.02438) with ``gamma``, ``lam``, whitened over the batch.
- Updates: ``ppo_epochs`` passes × ``minibatches`` minibatches of the clipped surrogate, plus the clipped value
  loss max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) / 2, gradients averaged across workers.

Logged per step, beside the common telemetry of :mod:`mmplatform.rl.rollout`: ``rl/value_loss``,
``rl/explained_variance`` (1 − Var[R − V]/Var[R] of the rollout's values), ``rl/clip_fraction``,
``rl/approx_kl`` (k3 estimate of KL(π_old || π_new) after the updates), ``rl/kl_coef`` (β).

Stage command: ``dvc repro rl_finetune`` with ``rl_finetune.algorithm: ppo`` in params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmplatform.compute import average_gradients
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.rl.ppo_config import PPOConfig
from mmplatform.rl.rollout import (
    Prompts,
    all_mean,
    episode_telemetry,
    k3,
    masked_mean,
    run_rl,
    sample_episodes,
    worker_loop,
    world,
)


class ValueHead(nn.Module):
    """V(s_t) from the decoder's hidden state at position t: Linear → GELU → Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)  # start at V = 0: no spurious baseline before it has learnt
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.detach()).squeeze(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β_{t+1} = β_t (1 + K_β e_t), e_t = clip(KL_t/KL_target − 1, −0.2, 0.2),
    K_β = n / horizon for a rollout of n episodes."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool = True):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n_episodes: int) -> None:
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.value *= 1.0 + error * n_episodes / self.horizon


def gae(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (N, T), of per-token ``rewards`` and ``values`` (0 outside the episode, so
    the value after the last token is 0: the episode has ended)."""
    values = values * valid
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * valid[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_update(model: MultimodalModel, reference: MultimodalModel, value_head: ValueHead,
               opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], ctl: AdaptiveKLController,
               images: torch.Tensor, batch_refs: list[list[str]], reward_fn, tokenizer, cfg: PPOConfig,
               gen: torch.Generator, prompts: Prompts | None = None) -> dict[str, float]:
    """One PPO rollout on a batch of images (of questions, with ``prompts``) and its updates; returns the
    step's telemetry."""
    k, temp = cfg.samples_per_image, cfg.temperature
    ep = sample_episodes(model, images, batch_refs, reward_fn, tokenizer, k=k, max_length=cfg.max_length,
                         temperature=temp, gen=gen, prompts=prompts)
    with torch.no_grad():
        old = ep.policy(model, temp, hidden=True)
        ref = ep.policy(reference, temp)
        valid = old.valid
        old_values = value_head(old.hidden) * valid
        # Per-token reward: −β·k1 KL estimate everywhere, the caption's reward at its last token.
        kl_tok = (old.logp - ref.logp) * valid
        beta = ctl.value
        rewards = -beta * kl_tok
        last = (valid.sum(1).long() - 1).clamp(min=0)
        score = torch.tensor(ep.rewards["total"], dtype=torch.float32)
        rewards[torch.arange(len(last)), last] += score
        adv, returns = gae(rewards, old_values, valid, cfg.gamma, cfg.lam)
        adv = whiten(adv, valid)
        ret_var = masked_mean((returns - masked_mean(returns, valid)) ** 2, valid)
        res = returns - old_values
        res_var = masked_mean((res - masked_mean(res, valid)) ** 2, valid)
        explained_var = float(1 - res_var / ret_var) if ret_var > 0 else float("nan")
    row = episode_telemetry(ep, old, ref.logp, model.cfg.eos_id)

    n = len(ep.tokens)
    clip_fracs, pg_losses, v_losses = [], [], []
    all_params = params + list(value_head.parameters())
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen)
        for mb in perm.chunk(cfg.minibatches):
            new = ep.policy(model, temp, hidden=True, rows=mb)
            m = valid[mb]
            ratio = torch.exp(new.logp - old.logp[mb])
            clipped = ratio.clamp(1 - cfg.clip_epsilon, 1 + cfg.clip_epsilon)
            pg_loss = masked_mean(-torch.min(ratio * adv[mb], clipped * adv[mb]), m)
            v = value_head(new.hidden)
            v_clipped = old_values[mb] + (v - old_values[mb]).clamp(-cfg.value_clip, cfg.value_clip)
            v_loss = 0.5 * masked_mean(torch.max((v - returns[mb]) ** 2, (v_clipped - returns[mb]) ** 2), m)
            opt.zero_grad(set_to_none=True)
            (pg_loss + v_loss).backward()  # disjoint parameters: the value head reads detached states
            average_gradients(all_params)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(value_head.parameters(), cfg.max_grad_norm)
            opt.step()
            clip_fracs.append(float(masked_mean(((ratio.detach() - 1).abs() > cfg.clip_epsilon).float(), m)))
            pg_losses.append(float(pg_loss.detach()))
            v_losses.append(float(v_loss.detach()))

    with torch.no_grad():
        after = ep.policy(model, temp)
        approx_kl = float(masked_mean(k3(old.logp, after.logp), valid))
    # Every worker must move β the same way: the controller sees the KL averaged over workers.
    ctl.update(all_mean(row["rl/kl_to_reference"]), n * world()[1])
    row.update({
        "rl/policy_loss": float(np.mean(pg_losses)), "rl/value_loss": float(np.mean(v_losses)),
        "rl/explained_variance": explained_var, "rl/clip_fraction": float(np.mean(clip_fracs)),
        "rl/approx_kl": approx_kl, "rl/kl_coef": beta, "rl/value_mean": float(masked_mean(old_values, valid)),
    })
    return row


def _make_updater(*, model, reference, params, tokenizer, reward_fn, cfg: PPOConfig, gen):
    value_head = ValueHead(model.cfg.decoder_hidden)
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)

    def update(images: torch.Tensor, refs: list[list[str]], prompts: Prompts | None = None) -> dict[str, float]:
        return ppo_update(model, reference, value_head, opt, params, ctl, images, refs, reward_fn, tokenizer,
                          cfg, gen, prompts)

    update.value_head = value_head  # for tests and inspection
    return update


def ppo_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    worker_loop(config, PPOConfig, _make_updater)


def run_ppo(cfg: PPOConfig, *, base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
            cache_dir: str | Path, mlflow_run_id: str | None = None) -> list[dict]:
    """Driver side: run PPO on Ray Train workers; returns the held-out history (``rl_summary.json`` beside
    ``rl_history.json`` in ``out_dir`` says whether the selected policy stayed under ``kl_bound``)."""
    return run_rl(ppo_loop_per_worker, cfg, base_dir=base_dir, data_dir=data_dir, out_dir=out_dir,
                  cache_dir=cache_dir, mlflow_run_id=mlflow_run_id)
