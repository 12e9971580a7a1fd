"""Reward functions for RL fine-tuning, by name, combined with weights from params.

A reward takes ``(candidates: list[str], refs: list[list[str]])`` and returns one float per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmplatform.evaluate.captions import CiderD

Reward = Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]


def build_rewards(weights: dict[str, float], train_refs: Sequence[Sequence[str]]) -> Callable[..., dict]:
    """→ ``fn(candidates, refs) -> {"total": array, name: array, ...}``."""
    fns: dict[str, Reward] = {}
    for name in weights:
        if name == "cider_d":
            # Document frequencies from the training captions, as SCST uses CIDEr-D's corpus statistics.
            fns[name] = CiderD(df_corpus=train_refs).score
        else:
            raise ValueError(f"rl_finetune.reward: unknown reward {name!r} (known: cider_d)")

    def combined(candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        parts = {n: np.asarray(f(candidates, refs), dtype=np.float64) for n, f in fns.items()}
        parts["total"] = sum(weights[n] * v for n, v in parts.items())
        return parts

    return combined
