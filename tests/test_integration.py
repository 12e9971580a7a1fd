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
    # Logged as code: no pickled Python object, the package shipped with it, every requirement pinned.
    from pathlib import Path

    local = Path(mlflow.artifacts.download_artifacts("models:/mmplatform@champion"))
    assert not list(local.rglob("*.pkl")) and (local / "code" / "mmplatform" / "registry.py").is_file()
    reqs = (local / "requirements.txt").read_text().split()
    assert reqs and all("==" in r for r in reqs if not r.startswith("mlflow")) and "mmplatform" not in reqs

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
    assert any(k.startswith("system/cpu") for k in train_run.data.metrics)  # MLflow system metrics

    # Nothing changed: every stage skipped, no new model version.
    assert main(["run", "--workdir", str(ws)]) == 0
    assert len(client.search_model_versions("name='mmplatform'")) == 1

    # One params key changed: only that stage and the ones after it run again.
    user_params = (ws / "params.yaml").read_bytes()
    assert main(["run", "--workdir", str(ws), "-S", "evaluate.grid_images=2"]) == 0
    versions = client.search_model_versions("name='mmplatform'")
    assert len(versions) == 1  # evaluate re-ran; register found the champion's own files and registered nothing
    # The override reached the stage and dvc.lock, never params.yaml.
    import yaml

    from mmplatform.config import RUN_PARAMS
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["evaluate"]["params"][RUN_PARAMS]["evaluate.grid_images"] == 2
    assert (ws / "params.yaml").read_bytes() == user_params

    # The clean run carries the data report for auditors.
    clean_run = next(r for r in children if r.data.tags["mmp.stage"] == "clean")
    logged = {a.path for a in client.list_artifacts(clean_run.info.run_id, "data_report")}
    assert "data_report/report.html" in logged
    assert "report.data_records" in clean_run.data.metrics

    # With a champion registered, the clean stage's alignment filter scores captions with it: captions moved
    # to another image are dropped far more often than the image's own.
    from mmplatform.config import CleanParams
    from mmplatform.data import stages
    from mmplatform.data.dataset import write_dataset

    monkeypatch.chdir(ws)
    recs = read_dataset(ws / "data/processed/clean", split="test")
    for i, r in enumerate(recs):  # every image keeps its first caption and gets the next image's second
        r["captions"] = [r["captions"][0], recs[(i + 1) % len(recs)]["captions"][1] + " "]
    write_dataset(ws / "swapped", recs, stage="annotate")
    st = stages.clean(ws / "swapped", ws / "swapped_clean", CleanParams(engine="local", report=False))
    assert st["alignment"]["status"] == "applied" and "mmplatform@champion" in st["alignment"]["scorer"]
    kept = read_dataset(ws / "swapped_clean")
    own = sum(c == r["captions"][0] for r in kept for c in r["captions"])
    moved = sum(len(r["captions"]) for r in kept) - own
    assert own > 2 * moved, (own, moved)

    # Model-assisted annotation: the exported Label Studio tasks carry the champion's captions.
    assert main(["annotate", "export-labelstudio", str(ws / "swapped_clean"), str(ws / "tasks.json")]) == 0
    tasks = json.loads((ws / "tasks.json").read_text())
    pred = tasks[0]["predictions"][0]
    assert "mmplatform@champion" in pred["model_version"]
    assert pred["result"][0]["from_name"] == "caption" and pred["result"][0]["value"]["text"][0]

    # The served model also embeds images (params.task=embed), per its signature.
    emb = served.predict(pd.DataFrame({"image": [r["image"] for r in test]}), params={"task": "embed"})
    assert emb.shape == (2, 64)
    assert served.metadata.get_input_schema().input_names() == ["image", "text"]
    # The training data is recorded with mlflow.data, digest = the dataset manifest's content hash.
    from mmplatform.data.dataset import read_manifest

    inputs = {d.dataset.name: d.dataset for d in train_run.inputs.dataset_inputs}
    assert inputs["augmented"].digest == read_manifest(ws / "data/processed/augmented")["content_hash"][:16]

    # New data (another split seed): the gate scores the champion on this run's test split, beside the challenger.
    assert main(["run", "--workdir", str(ws), "-S", "clean.split_seed=7", "-S", "train.epochs=2"]) == 0
    decision = json.loads((ws / "reports/registry.json").read_text())
    champ_scored = json.loads((ws / "reports/eval/champion_metrics.json").read_text())
    assert decision["version"] == 2 and decision["compared_on"] == "this run's test split"
    assert champ_scored["champion"] == "models:/mmplatform@champion (v1)" and not champ_scored.get("same_as_challenger")
    assert decision["champion_metrics"]["t2i_recall@5"] == champ_scored["metrics"]["t2i_recall@5"]
    assert [h["version"] for h in decision["history"]] == [1, 2]
