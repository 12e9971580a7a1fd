"""CIDEr-D ceilings: known values on references that agree, the local search beating the references where they
disagree, the generator's wordings, and `mmp study ceiling` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmplatform.data.synthetic import (
    _TEMPLATES,
    generate_synthetic,
    recombined_templates,
    template_captions,
    write_templates,
)
from mmplatform.evaluate.captions import CiderD
from mmplatform.evaluate.ceiling import cider_ceiling, climb, headroom_table, record_objects

# Three images with five references each: the first image's references all agree, the others disagree.
REFS = [
    ["a red square on the left"] * 5,
    ["a blue circle at the top", "there is a blue circle at the top", "a picture of a blue circle",
     "a small blue circle at the top", "the image contains a blue circle at the top"],
    ["a green triangle in the bottom right", "an image with a green triangle", "a large green triangle",
     "there is a green triangle in the bottom right", "a picture of a large green triangle on the right"],
]


def test_references_that_agree_cap_cider_d_at_ten_and_the_climb_finds_them():
    # Candidate equal to every reference: each n-gram cosine is 1 and the length penalty 1, so 10 x 1.
    scorer = CiderD(df_corpus=REFS)
    caption, score = climb(scorer, REFS[0], "a blue square at the left side")
    assert caption == "a red square on the left"
    assert score == pytest.approx(10.0)
    c = cider_ceiling(REFS[:1] * 1, df_refs=REFS)
    assert c["best_reference"] == pytest.approx(10.0) and c["local_search"] == pytest.approx(10.0)


def test_local_search_is_at_least_the_best_reference_and_stops_at_a_local_maximum():
    scorer = CiderD(df_corpus=REFS)
    c = cider_ceiling(REFS, df_refs=REFS)
    best_ref = np.mean([scorer.score(r, [r] * 5).max() for r in REFS])
    assert c["best_reference"] == pytest.approx(best_ref)
    assert c["local_search"] >= c["best_reference"]
    # Where references disagree, a caption mixing their words beats each of them.
    found = c["per_image"][1]
    assert found["cider_d"] > scorer.score(REFS[1], [REFS[1]] * 5).max()
    assert found["cider_d"] == pytest.approx(scorer.score([found["caption"]], [REFS[1]])[0])
    # No single edit of the found caption scores higher (what the climb promises).
    again, score = climb(scorer, REFS[1], found["caption"])
    assert again == found["caption"] and score == pytest.approx(found["cider_d"])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_ceiling([["a"], []])


def test_generator_wordings_cover_its_captions_and_bound_them_per_image():
    recs = generate_synthetic(seed=3, n_train=30, n_val=0, n_test=0, n_test_compositional=0, max_objects=3)
    objects = record_objects(recs)
    for r, objs in zip(recs, objects, strict=True):
        wordings = template_captions(objs)
        assert wordings[0] == r["captions"][0]  # the reading-order caption comes first
        assert set(r["captions"]) <= set(wordings)  # two-object scenes add the relation caption
        assert len(wordings) == 10 + (len(objs) == 2)
    refs = [r["captions"] for r in recs]
    c = cider_ceiling(refs, objects=objects, search=False)
    scorer = CiderD(df_corpus=refs)
    assert "local_search" not in c
    assert len(c["template_means"]) == 10
    assert c["best_template"] == pytest.approx(max(c["template_means"]))
    # Choosing per object count can only help, and per image (reading the references) more so.
    assert c["best_template_per_image"] >= c["best_template_by_count"] >= c["best_template"]
    # The recombinations include every template, so their best is at least the best template's.
    assert set(_TEMPLATES) <= set(recombined_templates())
    assert c["best_recombined_by_count"] >= c["best_recombined"] >= c["best_template"]
    assert c["best_recombined"] == pytest.approx(
        scorer.score([write_templates(o, [tuple(c["best_recombined_template"])])[0] for o in objects], refs).mean())
    first = scorer.score([r["captions"][0] for r in recs], refs).mean()
    assert c["template_means"][0] == pytest.approx(first)
    assert record_objects([{"meta": "{}"}]) is None


def test_headroom_table_says_which_targets_are_out_of_reach():
    table = headroom_table({"best_reference": 8.6, "local_search": 8.68}, 8.0)
    assert "| start (the model's greedy captions) | 8.000 | +0.0% |" in table
    assert "| local search per image (reads the references; an estimate of the maximum) | 8.680 | +8.5% |" in table
    assert "| target +5% | 8.400 | below the local-search estimate |" in table
    assert "| target +9% | 8.720 | above the local-search estimate |" in table
    assert "| target +9% | 8.720 | above the best reference per image |" in headroom_table({"best_reference": 8.6}, 8)
    table = headroom_table({"best_reference": 8.6, "local_search": 8.68, "best_recombined_by_count": 8.5}, 8.0)
    assert "| target +5% | 8.400 | below the local-search estimate; needs 80% of the way to the best recombination" \
           " per object count |" in table
    assert "| target +9% | 8.720 | above the local-search estimate; above every wording written without the" \
           " references |" in table


def test_study_ceiling_command_writes_its_report(tmp_path, capsys):
    from flows.cli import main
    from mmplatform.data.dataset import write_dataset

    recs = generate_synthetic(seed=0, n_train=20, n_val=6, n_test=5, n_test_compositional=0, max_objects=2)
    write_dataset(tmp_path / "data/processed/clean", recs, stage="clean")
    assert main(["study", "ceiling", "--workdir", str(tmp_path), "--split", "val", "--images", "4",
                 "--df", "train"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["df"] == "train" and "model_cider_d" not in out
    saved = json.loads((tmp_path / "reports/rl_study/ceiling.json").read_text())
    assert saved["local_search"] == pytest.approx(out["local_search"])
    lines = (tmp_path / "reports/rl_study/ceiling_captions.jsonl").read_text().splitlines()
    assert [json.loads(x)["sample_id"] for x in lines] == [r["sample_id"] for r in recs if r["split"] == "val"][:4]
    assert "4 val images" in (tmp_path / "reports/rl_study/ceiling.md").read_text()
    assert main(["study", "ceiling", "--workdir", str(tmp_path), "--df", "nope"]) == 2
    assert "--df 'nope'" in capsys.readouterr().err
    assert main(["study", "ceiling", "--workdir", str(tmp_path / "missing")]) == 2


def test_heldout_ceiling_is_in_the_reward_units_and_only_for_cider_d_alone(tmp_path):
    from mmplatform.data.dataset import write_dataset
    from mmplatform.evaluate.ceiling import heldout_ceiling

    recs = generate_synthetic(seed=1, n_train=20, n_val=6, n_test=0, n_test_compositional=0, max_objects=2)
    write_dataset(tmp_path, recs, stage="clean")
    val = [r for r in recs if r["split"] == "val"][:5]
    train = [r["captions"] for r in recs if r["split"] == "train"]
    c = cider_ceiling([r["captions"] for r in val], df_refs=train, objects=record_objects(val), search=False)
    got = heldout_ceiling(tmp_path, 5, {"cider_d": 0.5})
    assert got == pytest.approx({"heldout_ceiling_reference": 0.5 * c["best_reference"],
                                 "heldout_ceiling_blind": 0.5 * c["best_recombined_by_count"]})
    assert heldout_ceiling(tmp_path, 5, {"cider_d": 1.0, "length_penalty": 0.1}) == {}
