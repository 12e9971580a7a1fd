"""Config of group relative policy optimisation (GRPO; Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300);
the ``rl_finetune`` section of params.yaml with ``algorithm: grpo``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmplatform.rl.common_config import KLBoundedConfig


class GRPOConfig(KLBoundedConfig):
    """Shared keys (held-out evaluation, rewards, workers, kl_bound): :mod:`mmplatform.rl.common_config`."""

    algorithm: Literal["grpo"] = Field("grpo", description="RL algorithm")
    seed: int = Field(0, description="seed of sampling and batching")
    steps: int = Field(160, ge=0, description="rollouts (each followed by epochs_per_batch policy updates)")
    batch_size: int = Field(32, ge=1, description="images (groups) per rollout, per worker")
    lr: float = Field(2e-5, gt=0.0, description="AdamW learning rate of the decoder and memory projection")
    max_length: int = Field(40, ge=2, description="longest episode, in tokens")
    temperature: float = Field(
        0.7, gt=0.0, description="sampling temperature; the importance ratios and the KL use the same temperature")
    samples_per_image: int = Field(5, ge=2, description="group size k: sampled episodes per image")
    epochs_per_batch: int = Field(
        2, ge=1, description="passes over each rollout with its old log-probs fixed (DeepSeekMath's μ); with 1 "
        "the ratio is 1 and GRPO is REINFORCE with a group-normalised baseline")
    clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="PPO-clip range of the ratio π/π_old")
    kl_coef: float = Field(
        0.02, ge=0.0, description="β of the k3 KL penalty to the reference policy in the loss (0 = off)")
    adv_eps: float = Field(1e-4, gt=0.0, description="added to the group std before dividing")
