"""RL fine-tuning of the captioner: SCST, PPO and GRPO (``<algo>_trainer.py`` beside ``<algo>_config.py``)."""

from __future__ import annotations

from collections.abc import Callable


def runner(algorithm: str) -> Callable[..., list[dict]]:
    """``run_<algorithm>`` (imported on demand: a stage imports only the trainer it runs)."""
    if algorithm == "ppo":
        from mmplatform.rl.ppo_trainer import run_ppo

        return run_ppo
    if algorithm == "grpo":
        from mmplatform.rl.grpo_trainer import run_grpo

        return run_grpo
    if algorithm == "scst":
        from mmplatform.rl.scst_trainer import run_scst

        return run_scst
    raise ValueError(f"unknown RL algorithm {algorithm!r} (known: scst, ppo, grpo)")
