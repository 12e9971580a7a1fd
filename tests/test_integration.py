"""End to end: the retrain flow through real Prefect (local API), DVC, Ray and MLflow on tiny params."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_retrain_flow_end_to_end(tiny_workspace, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    ws = tiny_workspace
    monkeypatch.setenv("PREFECT_HOME", str(ws / ".prefect"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--workdir", str(ws)]) == 0

    metrics = json.loads((ws / "reports/eval/metrics.json").read_text())
    for key in ("t2i_recall@1", "t2i_recall@5", "t2i_recall@10", "i2t_recall@1", "i2t_recall@5",
                "i2t_recall@10", "cider_d_xe", "cider_d_rl", "bleu4_xe", "bleu4_rl"):
        assert key in metrics
    # Learned something: retrieval clearly above chance (5/64 for R@5 on 64 test images).
    assert metrics["t2i_recall@5"] > 2 * metrics["chance_t2i_recall@5"]

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("mmplatform", "champion")
    assert int(champion.version) == 1
    decision = json.loads((ws / "reports/registry.json").read_text())
    assert decision["promoted"] is True

    # The registered champion serves: captions for images, embeddings for texts.
    import mlflow
    import pandas as pd

    from mmplatform.data.dataset import read_dataset

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/mmplatform@champion")
    test = read_dataset(ws / "data/processed/clean", split="test")[:2]
    captions = served.predict(pd.DataFrame({"image": [r["image"] for r in test]}))
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert served.predict(pd.DataFrame({"text": ["a red circle"]})).shape == (1, 64)

    # Lineage on the parent run: git commit, DVC data hashes, Prefect flow run id; children per stage.
    parents = client.search_runs([client.get_experiment_by_name("mmplatform").experiment_id],
                                 filter_string="tags.`mmp.flow` = 'retrain'")
    assert len(parents) == 1
    tags = parents[0].data.tags
    assert "git_commit" in tags and tags["prefect_flow_run_id"] not in ("", "none", "None")
    assert any(k.startswith("dvc.data/processed/clean") for k in tags)
    children = client.search_runs([parents[0].info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.data.tags["mmp.stage"] for r in children} >= {"ingest", "clean", "train", "rl_finetune",
                                                           "evaluate", "register"}
    train_run = next(r for r in children if r.data.tags["mmp.stage"] == "train")
    assert "train/total" in train_run.data.metrics  # per-step metrics from the Ray worker

    # Nothing changed: every stage skipped, no new model version.
    assert main(["run", "--workdir", str(ws)]) == 0
    assert len(client.search_model_versions("name='mmplatform'")) == 1

    # One params key changed: only that stage and the ones after it run again.
    assert main(["run", "--workdir", str(ws), "-S", "evaluate.grid_images=2"]) == 0
    versions = client.search_model_versions("name='mmplatform'")
    assert len(versions) == 1  # evaluate re-ran; its metrics did not change, so register was skipped
