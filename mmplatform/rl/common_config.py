"""What every RL algorithm's config shares: held-out evaluation, rewards and the Ray worker layout; and, for
the clipped-ratio algorithms (PPO, GRPO), gradient clipping and the KL bound their selected policy must keep."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RLCommonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    task: Literal["captioning", "vqa"] = Field(
        "captioning", description="captioning: an episode is a caption of an image, references its captions; "
        "vqa: an episode is an answer decoded after its question (generative VQA; the base model must be trained "
        "with train.loss_weights.vqa_generative > 0), the reference its gold answer; pair with the "
        "vqa_exact_match reward and a short max_length")
    log_every: int = Field(20, ge=1, description="steps between held-out evaluations")
    heldout_images: int = Field(200, ge=1, description="val images scored by the held-out reward")
    reward: dict[str, float] = Field(default_factory=lambda: {"cider_d": 1.0},
                                     description="reward name or package.module:function → weight "
                                                 "(see mmplatform.rl.rewards)")
    num_workers: int = Field(1, ge=0, description="Ray Train workers; 0 = Ray Train's local mode (this process)")
    cpus_per_worker: int = Field(2, ge=1)


class KLBoundedConfig(RLCommonConfig):
    max_grad_norm: float = Field(1.0, gt=0.0)
    kl_bound: float = Field(
        0.5, gt=0.0, description="largest mean KL to the reference (nats/token, at the sampling temperature) the "
        "selected policy may have; the stage reports whether it stayed under it")
