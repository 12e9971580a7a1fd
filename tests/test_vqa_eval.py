"""VQA metrics: accuracy overall and per question type on hand-made cases (a stub stands in for the model
so the arithmetic is checked exactly), and on a real tiny model (batching does not change the answers)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mmplatform.evaluate.vqa import vqa_metrics, vqa_predictions
from mmplatform.models.tokenizer import train_tokenizer


class FixedAnswer:
    """Answers every question with ``answer``; records the image rows it was asked about."""

    def __init__(self, answer: str):
        self.answer = answer
        self.cfg = SimpleNamespace(image_size=8, max_length=16)
        self.vqa_head = object()
        self.seen: list[int] = []

    def answer_questions(self, images, ids, mask):
        self.seen += images[:, 0, 0, 0].tolist()
        return [self.answer] * len(ids)


def _record(qa: list[tuple[str, str, str]], types_in_meta: bool = True) -> dict:
    meta = {"question_types": [t for _, _, t in qa]} if types_in_meta else {}
    return {"questions": [q for q, _, _ in qa], "answers": [a for _, a, _ in qa], "meta": json.dumps(meta)}


RECORDS = [
    _record([("is there a red circle?", "yes", "exist"), ("how many shapes are there?", "two", "count")]),
    _record([("is there a blue square?", "no", "exist"), ("what color is the circle?", "red", "color"),
             ("is the red circle left of the blue square?", "Yes", "left_right")]),
    _record([("how many objects are in the image?", "2", "count")]),
]
TOKENIZER = train_tokenizer([q for r in RECORDS for q in r["questions"]], 64)
# image i is filled with the value i, so the stub can tell which image each question came with
IMAGES = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 8, 8).contiguous()


def test_fixed_answer_accuracy_is_the_share_of_questions_with_that_answer():
    m = vqa_metrics(FixedAnswer("yes"), TOKENIZER, RECORDS, images=IMAGES)
    # 6 questions, 2 answered "yes" (one written "Yes": answers are normalised)
    assert m["n_vqa_questions"] == 6
    assert m["vqa_accuracy"] == pytest.approx(2 / 6)
    assert m["vqa_accuracy_exist"] == 0.5 and m["vqa_accuracy_left_right"] == 1.0
    assert m["vqa_accuracy_count"] == 0.0 and m["vqa_accuracy_color"] == 0.0
    assert set(m) == {"vqa_accuracy", "n_vqa_questions", "vqa_accuracy_exist", "vqa_accuracy_count",
                      "vqa_accuracy_color", "vqa_accuracy_left_right"}


def test_number_words_and_digits_match_and_each_question_goes_with_its_own_image():
    stub = FixedAnswer("2")
    m = vqa_metrics(stub, TOKENIZER, RECORDS, images=IMAGES, batch=4, suffix="_compositional")
    assert m["vqa_accuracy_count_compositional"] == 1.0  # "two" and "2" both match "2"
    assert m["vqa_accuracy_compositional"] == pytest.approx(2 / 6)
    assert stub.seen == [0, 0, 1, 1, 1, 2]  # question order, across two batches of 4 and 2
    preds = vqa_predictions(FixedAnswer("no"), TOKENIZER, RECORDS, images=IMAGES)
    assert [r for _, r, _ in preds] == ["yes", "two", "no", "red", "Yes", "2"]


def test_records_without_types_or_questions_and_models_without_a_head():
    recs = [_record([("is there a red circle?", "yes", "exist")], types_in_meta=False), _record([])]
    m = vqa_metrics(FixedAnswer("yes"), TOKENIZER, recs, images=IMAGES[:2])
    assert m == {"vqa_accuracy": 1.0, "n_vqa_questions": 1, "vqa_accuracy_other": 1.0}
    assert vqa_metrics(FixedAnswer("yes"), TOKENIZER, [_record([])], images=IMAGES[:1]) == {}
    headless = FixedAnswer("yes")
    headless.vqa_head = None
    assert vqa_metrics(headless, TOKENIZER, RECORDS, images=IMAGES) == {}
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        vqa_metrics(FixedAnswer("yes"), TOKENIZER, [{"questions": ["a?", "b?"], "answers": ["x"], "meta": "{}"}],
                    images=IMAGES[:1])


def test_real_model_answers_in_its_vocabulary_and_batching_does_not_change_them():
    from mmplatform.config import TrainParams
    from mmplatform.data.synthetic import generate_synthetic
    from mmplatform.models.heads import build_answer_vocab
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.train.batches import tokenizer_texts
    from mmplatform.train.objectives import model_config

    recs = [r for r in generate_synthetic(n_train=1, n_val=1, n_test=6, n_test_compositional=1)
            if r["split"] == "test"]
    tok = train_tokenizer(tokenizer_texts(recs), 256)
    answers = build_answer_vocab(a for r in recs for a in r["answers"])
    torch.manual_seed(0)
    p = TrainParams.model_validate({"embed_dim": 16, "vision": {"hidden_size": 16, "layers": 1, "heads": 2},
                                    "text": {"hidden_size": 16, "layers": 1, "heads": 2},
                                    "decoder": {"hidden_size": 16, "layers": 1, "heads": 2},
                                    "loss_weights": {"vqa_generative": 1.0}})
    model = MultimodalModel(model_config(p, tok, 64, list(answers))).eval()
    one = vqa_predictions(model, tok, recs, batch=1)
    assert one == vqa_predictions(model, tok, recs, batch=256)  # padding to the batch's longest is masked
    assert {p for p, _, _ in one} <= set(answers)
    # generated answers: questions of different lengths in one batch decode as they do alone
    gen = vqa_predictions(model, tok, recs, batch=256, generative=True)
    assert gen == vqa_predictions(model, tok, recs, batch=1, generative=True)
    assert len({len(q) for r in recs for q in r["questions"]}) > 1
    m = vqa_metrics(model, tok, recs)
    assert m["n_vqa_questions"] == sum(len(r["questions"]) for r in recs)
    kinds = {k for r in recs for k in json.loads(r["meta"])["question_types"]}
    assert {f"vqa_accuracy_{k}" for k in kinds} <= set(m)
    assert {f"vqa_generative_accuracy_{k}" for k in kinds} | {"vqa_generative_accuracy"} <= set(m)
    # the overall figure is the question-weighted mean of the per-type ones
    n = {k: sum(t == k for _, _, t in one) for k in kinds}
    assert m["vqa_accuracy"] == pytest.approx(sum(m[f"vqa_accuracy_{k}"] * n[k] for k in kinds) / sum(n.values()))
