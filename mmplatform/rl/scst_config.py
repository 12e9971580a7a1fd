"""Config of self-critical sequence training (Rennie et al. 2017, "Self-critical Sequence Training for
Image Captioning"); it is the ``rl_finetune`` section of params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmplatform.rl.common_config import RLCommonConfig


class SCSTConfig(RLCommonConfig):
    """Shared keys (held-out evaluation, rewards, workers): :mod:`mmplatform.rl.common_config`."""

    algorithm: Literal["scst"] = Field("scst", description="RL algorithm")
    seed: int = Field(0, description="seed of sampling and batching")
    steps: int = Field(160, ge=0, description="policy updates")
    batch_size: int = Field(32, ge=2, description="images per update")
    lr: float = Field(5e-5, gt=0.0, description="AdamW learning rate of the decoder")
    max_length: int = Field(40, ge=4, description="longest episode, in tokens")
    temperature: float = Field(
        0.7, gt=0.0, description="sampling temperature of the episodes; below 1 keeps samples near the mode, "
        "so the k samples of an image differ in the details CIDEr-D judges")
    samples_per_image: int = Field(5, ge=1, description="sampled captions per image")
    baseline: Literal["greedy", "loo"] = Field(
        "loo", description="greedy: reward of the greedy caption (Rennie et al. 2017); loo: mean reward "
        "of the image's other samples (Luo 2020), needs samples_per_image >= 2")

    @model_validator(mode="after")
    def _loo_needs_samples(self) -> SCSTConfig:
        if self.baseline == "loo" and self.samples_per_image < 2:
            raise ValueError("baseline 'loo' needs samples_per_image >= 2")
        return self
