"""Ray Tune sweep (stage tune): the search space is checked like any params key; a tiny sweep runs the real
training step per trial, ASHA stops the hopeless trials, every trial is an MLflow child run of the stage's
run, and the best trial's train section is written as a valid params file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from netwatch import TreeWatch, exposed

from mmplatform.config import ConfigError, TrainParams, TuneParams, load_params, validate
from mmplatform.train import tune as tune_mod
from mmplatform.train.tune import concurrency, with_overrides

ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = {
    "epochs": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "embed_dim": 32, "cpus_per_worker": 1,
    "vision": {"hidden_size": 32, "layers": 1, "heads": 2},
    "text": {"hidden_size": 32, "layers": 1, "heads": 2},
    "decoder": {"hidden_size": 32, "layers": 1, "heads": 2},
}
GOOD_LR, BAD_LR = 3e-3, 1e-8  # 1e-8: the weights do not move, so its val loss stays at the initial one


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"no_such_key": {"choice": [1]}}, "no_such_key: not a train key"),
        ({"vision": {"choice": [1]}}, "vision: a section, not a value"),
        ({"lr": {"loguniform": [0.0, 1e-3]}}, "lr: 0.0: Input should be greater than 0"),
        ({"lr": {"uniform": [1e-2, 1e-3]}}, "lr: uniform takes [low, high] with low < high"),
        ({"fusion": {"choice": ["concat", "telepathy"]}}, "fusion: 'telepathy': Input should be"),
        ({"epochs": {"choice": [1, 2]}}, "epochs: not tunable"),
        ({"lr": {"choice": [1e-3], "grid": [1e-3]}}, "lr: give exactly one of"),
    ],
)
def test_search_space_is_checked_against_the_train_section(space, expected):
    with pytest.raises(ConfigError) as info:
        validate({"tune": {"search_space": space}})
    assert str(info.value).startswith("params.yaml: tune.search_space: ") and expected in str(info.value)
    assert "\n" not in str(info.value)


def test_search_space_values_come_back_typed_and_map_to_tune_samplers():
    # PyYAML reads 1e-4 (no dot) as a string; the section types it as the train key it names.
    raw = yaml.safe_load("search_space: {lr: {loguniform: [1e-4, 3e-3]}, vision.layers: {randint: [1, 3]},"
                         " fusion: {grid: [concat, gated]}}")
    assert raw["search_space"]["lr"]["loguniform"] == ["1e-4", "3e-3"]
    tp = TuneParams.model_validate(raw)
    assert tp.search_space["lr"] == {"loguniform": [1e-4, 3e-3]}
    space = tune_mod.search_space(tp.search_space)
    assert space["lr"].lower == 1e-4 and space["lr"].upper == 3e-3
    assert space["vision.layers"].lower == 1 and space["vision.layers"].upper == 3
    assert space["fusion"] == {"grid_search": ["concat", "gated"]}
    p = with_overrides(TrainParams(), {"lr": 2e-4, "loss_weights.itm": 0.25, "vision.layers": 2}, epochs=5)
    assert (p.lr, p.loss_weights.itm, p.vision.layers, p.epochs) == (2e-4, 0.25, 2, 5)
    assert p.text == TrainParams().text


def test_concurrency_fits_the_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    assert concurrency(1) == ({"cpu": 1}, 4)
    assert concurrency(3) == ({"cpu": 3}, 1)
    assert concurrency(8) == ({"cpu": 4}, 1)  # more than exists would never be placed: all of it instead
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    assert concurrency(2) == ({"cpu": 2}, 1)  # busy now: still one trial, it waits for CPUs that exist


@pytest.mark.slow
def test_sweep_stops_bad_trials_logs_child_runs_and_writes_best_params(tmp_path, monkeypatch):
    import mlflow

    from mmplatform import tracking
    from mmplatform.data.dataset import write_dataset
    from mmplatform.data.synthetic import generate_synthetic
    from pipelines import tune as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMP_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    records = generate_synthetic(n_train=96, n_val=16, n_test=1, n_test_compositional=1)
    for d in ("data/processed/augmented", "data/processed/clean"):
        write_dataset(d, records, stage="test")
    # A grid of a good and a hopeless learning rate, twice: ASHA (grace 1, reduction factor 2) keeps the
    # better half at each rung, so the second hopeless trial, which meets both earlier trials' values at
    # the first rung, is stopped whatever order the two concurrent trials report in. val_total is ranked
    # (not val R@1) because among 16 val images R@1 after one epoch is too close to chance to order them.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": TINY_TRAIN, "tune": {
        "search_space": {"lr": {"grid": [GOOD_LR, BAD_LR]}}, "num_samples": 2, "metric": "val_total",
        "mode": "min", "grace_period": 1, "reduction_factor": 2, "cpus_per_trial": 1}}))

    with TreeWatch() as sockets:
        assert stage.main(["--params", "params.yaml"]) == 0
    # Ray Tune's trials (and this process's Ray) listen on loopback only.
    assert sockets.seen and not exposed(sockets.seen), f"listening beyond loopback: {exposed(sockets.seen)}"

    # --------------------------------------------------------------- the trials and ASHA
    best = json.loads((tmp_path / "reports/tune/best.json").read_text())
    with (tmp_path / "reports/tune/trials.csv").open() as fh:
        trials = list(csv.DictReader(fh))
    assert len(trials) == best["trials"] == 4
    by_status = {s: [t for t in trials if t["status"] == s] for s in ("completed", "stopped_early", "error")}
    assert not by_status["error"], trials
    assert by_status["stopped_early"], f"ASHA stopped no trial: {trials}"
    assert all(float(t["param.lr"]) == BAD_LR and int(t["epochs"]) < 3 for t in by_status["stopped_early"])
    assert any(float(t["param.lr"]) == GOOD_LR and int(t["epochs"]) == 3 for t in by_status["completed"])
    good = [float(t["val_total"]) for t in trials if float(t["param.lr"]) == GOOD_LR]
    bad = [float(t["val_total"]) for t in trials if float(t["param.lr"]) == BAD_LR]
    assert max(good) < min(bad)  # the good rate learned; the hopeless one did not
    assert best["best_overrides"] == {"lr": GOOD_LR} and best["best_val_total"] == pytest.approx(min(good))
    assert best["max_concurrent"] >= 1 and best["cpus_per_trial"] == 1

    # --------------------------------------------------------------- MLflow: one child run per trial
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    parent = client.get_run(best["best_mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).data.tags["mmp.stage"] == "tune"
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4
    rows = {t["trial_id"]: t for t in trials}
    for run in children:
        t = rows[run.data.tags["tune.trial_id"]]
        assert t["mlflow_run_id"] == run.info.run_id
        assert float(run.data.params["lr"]) == float(t["param.lr"])  # its params: the whole train section
        assert run.data.params["vision.hidden_size"] == "32"
        curve = client.get_metric_history(run.info.run_id, "val_total")
        assert [m.step for m in curve] == list(range(int(t["epochs"])))  # its metric, every epoch it ran
        assert curve[-1].value == pytest.approx(float(t["val_total"]))
        assert run.info.status == ("FINISHED" if t["status"] == "completed" else "KILLED")
        assert run.data.tags["tune.status"] == t["status"]

    # --------------------------------------------------------------- the best config as a params file
    tuned = tmp_path / "params/tuned_train.yaml"
    doc = yaml.safe_load(tuned.read_text())
    assert set(doc) == {"train"}
    p = TrainParams.model_validate(doc["train"])
    base = TrainParams.model_validate(TINY_TRAIN)
    assert p == with_overrides(base, {"lr": GOOD_LR})  # the best trial's value, the rest as given
    assert load_params(tuned).train == p  # what `python -m pipelines.train --params FILE` reads
    assert tuned.read_text().startswith("# Best trial of the Ray Tune sweep")


def test_mmp_tune_rejects_a_bad_override_with_one_line_and_is_not_in_the_retraining_flow(capsys):
    from flows.cli import main
    from flows.retrain import DATA_STAGES, TRAIN_STAGES

    rc = main(["tune", "--workdir", str(ROOT), "-S", "tune.search_space={lr: {uniform: [1e-2, 1e-3]}}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "tune.search_space" in err and "low < high" in err, err
    assert "tune" not in DATA_STAGES + TRAIN_STAGES


@pytest.mark.slow
def test_a_trial_trains_exactly_as_the_train_stage_on_one_worker(tmp_path):
    """A trial is the train stage's step in one process (no Ray Train worker group): same data order, losses,
    schedule and validation, so on CPU (deterministic kernels, same thread count) its epoch rows equal the
    train stage's with one worker bit for bit. This guards the trial loop against drifting from the recipe."""
    from mmplatform.data.dataset import write_dataset
    from mmplatform.data.synthetic import generate_synthetic
    from mmplatform.train.recipe import run_training
    from mmplatform.train.tune import trial_epochs

    data = tmp_path / "data"
    write_dataset(data, generate_synthetic(n_train=64, n_val=16, n_test=1, n_test_compositional=1), stage="test")
    p = with_overrides(TrainParams.model_validate(TINY_TRAIN), {"lr": GOOD_LR}, epochs=2)
    rows: list[dict] = []
    trial_epochs(p, train_dir=data, val_dir=data, threads=p.cpus_per_worker, report=rows.append)
    history = run_training(p, train_dir=data, val_dir=data, out_dir=tmp_path / "model", cache_dir=tmp_path / "cache")
    assert len(rows) == len(history) == 2
    for ours, theirs in zip(rows, history, strict=True):
        assert {k: v for k, v in ours.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    assert rows[-1]["train_total"] < rows[0]["train_total"]
