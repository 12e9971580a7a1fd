"""User rewards for tests/test_rewards.py, loaded by import path ("rewards_example:<name>": pytest puts tests/
on sys.path)."""

from __future__ import annotations

import numpy as np


def n_chars(candidates, refs):
    """Characters in each candidate: a reward that takes no context."""
    return [float(len(c)) for c in candidates]


def mentions_question(candidates, refs, questions):
    """1 where the candidate repeats the first word of its question: takes only ``questions``."""
    return np.array([float(q.split()[0] in c.split()) for c, q in zip(candidates, questions, strict=True)])


def sees_everything(candidates, refs, **context):
    """The number of context keys it was given (a **kwargs reward gets all of them)."""
    return [float(len(context))] * len(candidates)


def wrong_length(candidates, refs):
    return [1.0] * (len(candidates) + 1)


def not_numbers(candidates, refs):
    return ["high"] * len(candidates)


NOT_CALLABLE = 3
