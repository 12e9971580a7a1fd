"""Config of PPO (Schulman et al. 2017) for captioning, as RL from human preferences fine-tunes language
models (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020): a value head, GAE, the clipped objective,
and a per-token KL penalty to the reference policy in the reward with an adaptive coefficient. The
``rl_finetune`` section of params.yaml with ``algorithm: ppo``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmplatform.rl.common_config import KLBoundedConfig


class PPOConfig(KLBoundedConfig):
    """Shared keys (held-out evaluation, rewards, workers, kl_bound): :mod:`mmplatform.rl.common_config`."""

    algorithm: Literal["ppo"] = Field("ppo", description="RL algorithm")
    seed: int = Field(0, description="seed of sampling, batching and minibatch order")
    steps: int = Field(160, ge=0, description="rollouts (each followed by ppo_epochs × minibatches updates)")
    batch_size: int = Field(32, ge=1, description="images per rollout, per worker")
    lr: float = Field(2e-5, gt=0.0, description="AdamW learning rate of the decoder and memory projection")
    value_lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of the value head")
    max_length: int = Field(40, ge=2, description="longest episode, in tokens")
    temperature: float = Field(
        0.7, gt=0.0, description="sampling temperature; the ratios, the KL and the entropy use the same temperature")
    samples_per_image: int = Field(5, ge=1, description="sampled episodes per image (the encoder runs once)")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    minibatches: int = Field(2, ge=1, description="minibatches per pass (episodes shuffled each pass)")
    clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="PPO-clip range of the ratio π/π_old")
    value_clip: float = Field(0.2, gt=0.0, description="clip range of the value update around the rollout's values")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="discount (1: an episode is short and its reward terminal)")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ (Schulman et al. 2016)")
    kl_coef: float = Field(0.05, ge=0.0, description="initial β of the per-token KL penalty in the reward")
    adaptive_kl: bool = Field(True, description="adapt β towards kl_target (Ziegler et al. 2019); off: β fixed")
    kl_target: float = Field(0.1, gt=0.0, description="KL to the reference the controller aims at (nats/token)")
    kl_horizon: int = Field(10000, ge=1, description="controller horizon in episodes (Ziegler et al. 2019: 10000)")

    @model_validator(mode="after")
    def _target_under_bound(self) -> PPOConfig:
        if self.adaptive_kl and self.kl_target > self.kl_bound:
            raise ValueError(f"kl_target {self.kl_target} is above kl_bound {self.kl_bound}: the controller would "
                             "steer the policy past the bound")
        return self
