"""Reward registry (mmplatform.rl.rewards): known values of each reward, weighting into "total", a user reward
given by import path, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmplatform.config import TrainParams
from mmplatform.evaluate.captions import CiderD
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.rl.rewards import REWARDS, build_rewards, register_reward
from mmplatform.train.objectives import model_config

REFS = [["a dog runs on the grass", "a brown dog running in a field"],
        ["a cat sleeps on a sofa", "a grey cat asleep on the couch"]]
CANDS = ["a dog runs in the grass", "a cat a cat a cat"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_cider_d_as_before_and_total_is_the_weighted_sum() -> None:
    out = build_rewards({"cider_d": 1.0}, REFS)(CANDS, REFS)
    assert set(out) == {"cider_d", "total"}
    expected = CiderD(df_corpus=REFS).score(CANDS, REFS)
    np.testing.assert_allclose(out["cider_d"], expected, atol=1e-12)
    np.testing.assert_array_equal(out["total"], out["cider_d"])
    assert out["total"].dtype == np.float64

    weights = {"cider_d": 2.0, "length_penalty": 0.5, "repetition_penalty": -3.0}
    mixed = build_rewards(weights, REFS)(CANDS, REFS)
    assert set(mixed) == set(weights) | {"total"}
    np.testing.assert_allclose(mixed["total"], sum(w * mixed[k] for k, w in weights.items()), atol=1e-12)
    np.testing.assert_allclose(mixed["cider_d"], expected, atol=1e-12)


def test_length_penalty_known_values() -> None:
    fn = build_rewards({"length_penalty": 1.0}, None)
    refs = [["one two three", "one two three four five"]] * 4  # mean length 4 words
    out = fn(["a b c d", "a b", "a b c d e f g h", ""], refs)["length_penalty"]
    np.testing.assert_allclose(out, [0.0, -0.5, -1.0, -1.0])
    # Words are counted after CIDEr-D's tokenisation: punctuation is not a word.
    np.testing.assert_allclose(fn(["A, b. C d!"], refs[:1])["length_penalty"], [0.0])


def test_repetition_penalty_known_values() -> None:
    fn = build_rewards({"repetition_penalty": 1.0}, None)
    out = fn(["a b a b", "a b c d", "a a a a a", "word", ""], [["x"]] * 5)["repetition_penalty"]
    # "a b a b": bigrams ab, ba, ab -> 1 of 3 repeats.  "a a a a a": aa x4 -> 3 of 4 repeat.
    np.testing.assert_allclose(out, [-1 / 3, 0.0, -0.75, 0.0, 0.0])


def test_vqa_exact_match_uses_normalised_answers() -> None:
    fn = build_rewards({"vqa_exact_match": 1.0}, None)
    out = fn(["Two", "a red car", "blue", "yes"], [["-"]] * 4,
             answers=[["2", "two dogs"], ["red car"], ["green"], "yes"])
    # "Two" -> "2" (number words as digits); articles dropped; no match -> 0; a bare string is one answer.
    np.testing.assert_array_equal(out["vqa_exact_match"], [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(out["total"], out["vqa_exact_match"])


def _tiny_model():
    torch.manual_seed(0)
    texts = [c for rs in REFS for c in rs] + CANDS
    tok = train_tokenizer(texts, 64)
    tiny = {"embed_dim": 16, "vision": {"hidden_size": 16, "layers": 1, "heads": 2},
            "text": {"hidden_size": 16, "layers": 1, "heads": 2},
            "decoder": {"hidden_size": 16, "layers": 1, "heads": 2}}
    return MultimodalModel(model_config(TrainParams.model_validate(tiny), tok, 32)), tok


def test_clip_score_is_2_5_times_clipped_cosine_of_our_model() -> None:
    model, tok = _tiny_model()
    model.train()  # the reward must score in eval mode and give the mode back
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cands = CANDS + ["a dog", "grass and a sofa"]
    out = build_rewards({"clip_score": 1.0, "cider_d": 0.0}, REFS, model=model, tokenizer=tok)(
        cands, REFS * 2, images=images)
    assert model.training
    model.eval()
    enc = tok(cands, padding=True, truncation=True, max_length=model.cfg.max_length, return_tensors="pt")
    with torch.no_grad():
        cos = (model.embed_images(images) * model.embed_texts(enc["input_ids"], enc["attention_mask"])).sum(-1)
    expected = 2.5 * np.maximum(cos.double().numpy(), 0.0)
    np.testing.assert_allclose(out["clip_score"], expected, atol=1e-6)
    np.testing.assert_allclose(out["total"], out["clip_score"], atol=1e-12)  # cider_d has weight 0
    # Batching (here 3 at a time) does not change the values.
    small = REWARDS["clip_score"](REFS, model=model, tokenizer=tok, batch_size=3)
    np.testing.assert_allclose(small(cands, REFS * 2, images=images), out["clip_score"], atol=1e-6)


def test_user_reward_by_import_path_is_used_and_weighted() -> None:
    weights = {"cider_d": 1.0, "rewards_example:n_chars": 0.1}
    out = build_rewards(weights, REFS)(CANDS, REFS, questions=["q1", "q2"])
    np.testing.assert_array_equal(out["rewards_example:n_chars"], [len(c) for c in CANDS])
    np.testing.assert_allclose(out["total"], out["cider_d"] + 0.1 * np.array([len(c) for c in CANDS]))

    # Only the context keys a function accepts are passed; **kwargs gets them all.
    out = build_rewards({"rewards_example:mentions_question": 1.0,
                         "rewards_example:sees_everything": 1.0}, REFS)(
        CANDS, REFS, questions=["dog or cat?", "what is it?"], answers=[["dog"], ["cat"]])
    np.testing.assert_array_equal(out["rewards_example:mentions_question"], [1.0, 0.0])
    np.testing.assert_array_equal(out["rewards_example:sees_everything"], [2.0, 2.0])


def test_register_reward_adds_a_named_reward() -> None:
    @register_reward("test_constant")
    def _factory(train_refs, *, model=None, tokenizer=None):
        return lambda cands, refs, **ctx: np.full(len(cands), float(len(train_refs)))

    try:
        out = build_rewards({"test_constant": 2.0}, REFS)(CANDS, REFS)
        np.testing.assert_array_equal(out["total"], [4.0, 4.0])
    finally:
        del REWARDS["test_constant"]


@pytest.mark.parametrize(("weights", "needle"), [
    ({"nope": 1.0}, "unknown reward 'nope' (known: cider_d, clip_score, length_penalty"),
    ({"no_such_module:f": 1.0}, "cannot import 'no_such_module'"),
    ({"rewards_example:missing": 1.0}, "has no attribute 'missing'"),
    ({"rewards_example:NOT_CALLABLE": 1.0}, "is not callable"),
    ({"rewards_example:": 1.0}, "must look like 'package.module:function'"),
    ({"clip_score": 1.0}, "needs model= and tokenizer="),
    ({"cider_d": float("nan")}, "weight must be a finite number"),
])
def test_build_errors_are_one_line_and_name_the_problem(weights, needle) -> None:
    with pytest.raises(ValueError) as exc:
        build_rewards(weights, REFS)
    assert needle in _one_line(exc)


def test_call_errors_are_one_line_and_name_the_problem() -> None:
    cases = [
        ({"vqa_exact_match": 1.0}, {}, "reward 'vqa_exact_match' needs the context key 'answers'"),
        ({"vqa_exact_match": 1.0}, {"answers": [["a"]]}, "'answers' has 1 entries for 2 candidates"),
        ({"rewards_example:mentions_question": 1.0}, {},
         "reward 'rewards_example:mentions_question' needs the context key 'questions'"),
        ({"rewards_example:wrong_length": 1.0}, {}, "must return one number per candidate: got shape (3,)"),
        ({"rewards_example:not_numbers": 1.0}, {}, "must return one number per candidate, got list"),
    ]
    for weights, ctx, needle in cases:
        with pytest.raises(ValueError) as exc:
            build_rewards(weights, REFS)(CANDS, REFS, **ctx)
        assert needle in _one_line(exc)
    model, tok = _tiny_model()
    with pytest.raises(ValueError) as exc:
        build_rewards({"clip_score": 1.0}, REFS, model=model, tokenizer=tok)(CANDS, REFS)
    assert "reward 'clip_score' needs the context key 'images'" in _one_line(exc)
