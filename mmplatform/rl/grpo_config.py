"""Config of group relative policy optimisation (GRPO; Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300);
the ``rl_finetune`` section of params.yaml with ``algorithm: grpo``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    max_grad_norm: float = Field(1.0, gt=0.0)
    kl_bound: float = Field(
        0.5, gt=0.0, description="largest mean KL to the reference (nats/token, at the sampling temperature) the "
        "selected policy may have; the stage reports whether it stayed under it")
    log_every: int = Field(20, ge=1, description="steps between held-out evaluations")
    heldout_images: int = Field(200, ge=1, description="val images scored by the held-out reward")
    reward: dict[str, float] = Field(default_factory=lambda: {"cider_d": 1.0},
                                     description="reward name or package.module:function → weight "
                                                 "(see mmplatform.rl.rewards)")
    num_workers: int = Field(1, ge=0, description="Ray Train workers; 0 = Ray Train's local mode (this process)")
    cpus_per_worker: int = Field(2, ge=1)
