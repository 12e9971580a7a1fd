"""`mmp study fusion`: a base model per fusion strategy, RL of its answer decoder per seed, one MLflow parent."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, TINY, deep_update  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture
def study_workspace(tmp_path):
    from mmplatform.data.dataset import write_dataset
    from mmplatform.data.synthetic import generate_synthetic

    recs = generate_synthetic(seed=0, n_train=64, n_val=8, n_test=4, n_test_compositional=0, max_objects=2)
    write_dataset(tmp_path / "data/processed/clean", recs, stage="clean")
    write_dataset(tmp_path / "data/processed/augmented", recs, stage="augment")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(raw, {"train": TINY["train"] | {"batch_size": 16, "num_workers": 0, "early_stopping_patience": 0}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


@pytest.mark.slow
def test_fusion_study_trains_one_model_per_fusion_and_runs_rl_per_seed(study_workspace, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from mmplatform.models.multimodal import MultimodalModel

    ws = study_workspace
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["study", "fusion", "--workdir", str(ws), "--fusions", "concat,cross_attention", "--seeds", "0,1",
                 "--train-epochs", "1", "--train-images", "48", "--rl-steps", "2",
                 "-S", "rl_finetune.num_workers=0", "-S", "rl_finetune.batch_size=8",
                 "-S", "rl_finetune.samples_per_image=2", "-S", "rl_finetune.heldout_images=4",
                 "-S", "rl_finetune.log_every=1"]) == 0
    out = ws / "reports/rl_study"
    result = json.loads((out / "fusion.json").read_text())
    assert [(r["fusion"], r["seed"]) for r in result["runs"]] == [
        ("concat", 0), ("concat", 1), ("cross_attention", 0), ("cross_attention", 1)]
    for fusion in ("concat", "cross_attention"):
        cfg = MultimodalModel.load(out / "models" / fusion).cfg
        assert cfg.fusion == fusion and cfg.vqa_generative and cfg.vqa_fused_memory
    s = result["summary"]
    # Compute is measured, not assumed: cross-attention's fusion costs more per episode than concatenation's.
    assert 0 < s["concat"]["fusion_flops_per_episode"] < s["cross_attention"]["fusion_flops_per_episode"]
    assert s["cross_attention"]["flops_per_episode"] > s["cross_attention"]["fusion_flops_per_episode"]
    for fusion in s:
        assert 0 <= s[fusion]["heldout_final_mean"] <= 1 and s[fusion]["runs"] == 2
        assert s[fusion]["episode_length_mean"] >= 1 and s[fusion]["train_wall_s"] > 0
    assert "| cross_attention | 2 |" in (out / "fusion.md").read_text()
    assert (out / "fusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("mmplatform").experiment_id])
    [parent] = [r for r in found if r.info.run_name == "rl-fusion-study"]
    children = sorted(r.info.run_name for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["concat-seed0", "concat-seed1", "concat-train", "cross_attention-seed0",
                        "cross_attention-seed1", "cross_attention-train"]
    assert "cross_attention/flops_per_episode" in parent.data.metrics


def test_fusion_study_refuses_an_unknown_fusion(study_workspace, capsys):
    from flows.cli import main

    assert main(["study", "fusion", "--workdir", str(study_workspace), "--fusions", "concat,late"]) != 0
    assert "expected some of concat, gated, cross_attention, multimodal_transformer" in capsys.readouterr().err
