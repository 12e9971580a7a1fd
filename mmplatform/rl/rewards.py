"""Reward functions for RL fine-tuning: a registry of named rewards plus user functions by import path,
combined with the weights of params (the ``reward: {name: weight}`` field of the RL configs).

The contract every trainer relies on::

    fn = build_rewards({"cider_d": 1.0, "clip_score": 0.5}, train_refs, model=reference, tokenizer=tok)
    out = fn(candidates, refs, images=images, questions=questions, answers=answers)
    out["cider_d"], out["clip_score"], out["total"]  # float64 arrays, one value per candidate

``refs[i]`` is the reference set (list of strings) of ``candidates[i]``. Context keywords are optional and
hold one entry per candidate: ``images`` (uint8 tensor (N, 3, H, W)), ``questions`` (list[str]) and
``answers`` (list[list[str]], the gold VQA answers). A reward that needs a key it was not given raises a
one-line ``ValueError`` naming the reward and the key; rewards ignore the keys they do not use.
``total`` is ``sum(weight * value)`` over the rewards.

Built-in rewards (``REWARDS``; add one with ``@register_reward(name)`` on a factory
``factory(train_refs, *, model, tokenizer) -> reward(candidates, refs, **context) -> array``):

- ``cider_d``: CIDEr-D (Vedantam et al. 2015) with document frequencies from the training captions, as
  self-critical sequence training uses it (Rennie et al. 2017).
- ``clip_score``: CLIPScore (Hessel et al. 2021, arXiv:2104.08718), ``2.5 * max(cos(image, caption), 0)``,
  with our own contrastive model's embeddings. Needs ``model``, ``tokenizer`` and ``images``.
- ``vqa_exact_match``: 1 if the normalised answer equals a normalised gold answer. Needs ``answers``.
- ``length_penalty``: ``-|words(candidate) - mean words(refs)| / mean words(refs)``.
- ``repetition_penalty``: minus the share of the candidate's word bigrams that repeat an earlier one.

Any other key containing ``:`` is a user function ``package.module:function``, imported with importlib and
called as ``function(candidates, refs, **context)`` with only the context keys its signature accepts (all of
them if it takes ``**kwargs``); it must return one number per candidate.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmplatform.evaluate.captions import CiderD, tokenize

__all__ = ["CONTEXT_KEYS", "REWARDS", "Reward", "RewardFn", "build_rewards", "register_reward"]

# reward(candidates, refs, **context) -> one float per candidate
Reward = Callable[..., np.ndarray]
# fn(candidates, refs, **context) -> {name: array, ..., "total": array}
RewardFn = Callable[..., dict[str, np.ndarray]]
# factory(train_refs, *, model, tokenizer) -> Reward
RewardFactory = Callable[..., Reward]

CONTEXT_KEYS = ("images", "questions", "answers")
REWARDS: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: register ``factory(train_refs, *, model, tokenizer) -> reward`` under ``name``."""
    if not name or ":" in name or name == "total":
        raise ValueError(f"invalid reward name {name!r} (non-empty, no ':', not 'total')")

    def deco(factory: RewardFactory) -> RewardFactory:
        REWARDS[name] = factory
        return factory

    return deco


def _context(ctx: dict[str, Any], reward: str, key: str, n: int) -> Any:
    """``ctx[key]``, checked to be present and to hold one entry per candidate."""
    value = ctx.get(key)
    if value is None:
        raise ValueError(f"reward {reward!r} needs the context key {key!r} (one entry per candidate)")
    if len(value) != n:
        raise ValueError(f"reward {reward!r}: context {key!r} has {len(value)} entries for {n} candidates")
    return value


# ---------------------------------------------------------------------------------------------- built-ins
@register_reward("cider_d")
def _cider_d(train_refs: Sequence[Sequence[str]] | None, **_: Any) -> Reward:
    # Document frequencies from the training captions, as SCST uses CIDEr-D's corpus statistics; without
    # train_refs, df comes from each call's reference sets (pycocoevalcap's compute_score).
    scorer = CiderD(df_corpus=train_refs)

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        return scorer.score(candidates, refs)

    return reward


@register_reward("clip_score")
def _clip_score(train_refs: Any = None, *, model: Any = None, tokenizer: Any = None, batch_size: int = 256,
                **_: Any) -> Reward:
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(E_img, E_txt), 0)`` with ``w = 2.5``, which the paper
    chooses to stretch the cosines of CLIP ViT-B/32 over roughly [0, 1]; here the embeddings are those of our
    own contrastive model (its ``embed_images`` / ``embed_texts``, L2-normalised)."""
    if model is None or tokenizer is None:
        raise ValueError("reward 'clip_score' needs model= and tokenizer= (our contrastive model and its tokenizer)")
    import torch

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        images = _context(ctx, "clip_score", "images", len(candidates))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = np.empty(len(candidates), dtype=np.float64)
        try:
            with torch.no_grad():
                for a in range(0, len(candidates), batch_size):
                    b = min(a + batch_size, len(candidates))
                    enc = tokenizer(list(candidates[a:b]), padding=True, truncation=True,
                                    max_length=model.cfg.max_length, return_tensors="pt")
                    txt = model.embed_texts(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                    img = model.embed_images(torch.as_tensor(images[a:b]).to(device))
                    cos = (img.float() * txt.float()).sum(-1)
                    out[a:b] = (2.5 * cos.clamp_min(0.0)).double().cpu().numpy()
        finally:
            model.train(was_training)
        return out

    return reward


@register_reward("vqa_exact_match")
def _vqa_exact_match(train_refs: Any = None, **_: Any) -> Reward:
    from mmplatform.models.heads import normalize_answer

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        answers = _context(ctx, "vqa_exact_match", "answers", len(candidates))
        out = np.zeros(len(candidates), dtype=np.float64)
        for i, (cand, gold) in enumerate(zip(candidates, answers, strict=True)):
            golds = [gold] if isinstance(gold, str) else gold
            out[i] = float(normalize_answer(cand) in {normalize_answer(g) for g in golds})
        return out

    return reward


@register_reward("length_penalty")
def _length_penalty(train_refs: Any = None, **_: Any) -> Reward:
    """Relative distance of the caption's word count from its references' mean: 0 at the mean, -1 at an empty
    caption or at twice the length. Words are counted after ``tokenize`` (the CIDEr-D tokenisation)."""

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        if len(refs) != len(candidates):
            raise ValueError(f"reward 'length_penalty': {len(candidates)} candidates but {len(refs)} reference sets")
        out = np.empty(len(candidates), dtype=np.float64)
        for i, (cand, rs) in enumerate(zip(candidates, refs, strict=True)):
            target = sum(len(tokenize(r)) for r in rs) / max(len(rs), 1)
            # max(., 1): references with no words would divide by zero; the penalty is then the word count.
            out[i] = -abs(len(tokenize(cand)) - target) / max(target, 1.0)
        return out

    return reward


@register_reward("repetition_penalty")
def _repetition_penalty(train_refs: Any = None, **_: Any) -> Reward:
    """Degenerate RL captions loop ("a man on a man on a ..."); this is minus the share of word bigrams that
    already occurred earlier in the same caption ("a b a b": 1 of 3 bigrams repeats → -1/3)."""

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        out = np.zeros(len(candidates), dtype=np.float64)
        for i, cand in enumerate(candidates):
            words = tokenize(cand)
            bigrams = list(zip(words, words[1:], strict=False))
            if bigrams:
                out[i] = -(len(bigrams) - len(set(bigrams))) / len(bigrams)
        return out

    return reward


# ---------------------------------------------------------------------------------------------- user rewards
def _import_reward(path: str) -> Reward:
    """``package.module:function`` → a reward that passes the function only the context keys it accepts."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"reward {path!r}: an import path must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported as a config error
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ValueError(f"reward {path!r}: cannot import {module_name!r}: {why}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {attr!r} is not callable")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: pass no context
        params = []
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    # Keyword-passable parameters after the two positional ones (candidates, refs).
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params[2:] if p.kind in keyword]
    accepted = {p.name for p in named}
    required = [p.name for p in named if p.default is inspect.Parameter.empty]

    def reward(candidates: Sequence[str], refs: Sequence[Sequence[str]], **ctx: Any) -> np.ndarray:
        given = {k: v for k, v in ctx.items() if v is not None}
        for key in required:
            if key not in given:
                raise ValueError(f"reward {path!r} needs the context key {key!r} (one entry per candidate)")
        kwargs = given if takes_all else {k: v for k, v in given.items() if k in accepted}
        result = fn(candidates, refs, **kwargs)
        try:
            arr = np.asarray(result, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"reward {path!r} must return one number per candidate, got {type(result).__name__}") from e
        if arr.shape != (len(candidates),):
            raise ValueError(
                f"reward {path!r} must return one number per candidate: got shape {arr.shape} for {len(candidates)}")
        return arr

    return reward


# ---------------------------------------------------------------------------------------------- combination
def build_rewards(weights: dict[str, float], train_refs: Sequence[Sequence[str]] | None, *, model: Any = None,
                  tokenizer: Any = None) -> RewardFn:
    """→ ``fn(candidates, refs, **context) -> {name: array, ..., "total": array}`` (see the module doc)."""
    if not weights:
        raise ValueError("reward: at least one reward is needed (name -> weight)")
    fns: dict[str, Reward] = {}
    for name, weight in weights.items():
        if not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        if ":" in name:
            fns[name] = _import_reward(name)
        elif name in REWARDS:
            fns[name] = REWARDS[name](train_refs, model=model, tokenizer=tokenizer)
        else:
            raise ValueError(f"reward: unknown reward {name!r} (known: {', '.join(sorted(REWARDS))}, "
                             "or 'package.module:function')")

    def combined(candidates: Sequence[str], refs: Sequence[Sequence[str]], **context: Any) -> dict[str, np.ndarray]:
        parts = {n: np.asarray(f(candidates, refs, **context), dtype=np.float64) for n, f in fns.items()}
        total = np.zeros(len(candidates), dtype=np.float64)
        for n, v in parts.items():
            total += weights[n] * v
        parts["total"] = total
        return parts

    return combined
