"""The promotion gate compares like with like and remembers: the champion is judged on the challenger's test
split, guardrails stop a promotion that costs too much elsewhere, and every decision is kept in the registry."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mmplatform.champion import champion_source
from mmplatform.config import RegisterParams
from mmplatform.registry import gate, history, register

P = RegisterParams(primary_metric="t2i_recall@5", min_improvement=0.01,
                   guardrails={"cider_d_rl": 0.05, "i2t_recall@5": 0.02})


def _m(r5: float, cider: float = 0.5, i2t: float = 0.3) -> dict[str, float]:
    return {"t2i_recall@5": r5, "cider_d_rl": cider, "i2t_recall@5": i2t}


def test_first_version_is_promoted():
    assert gate(_m(0.1), P, None, None, None)[0] is True


def test_the_champion_is_judged_on_this_split_not_on_its_stored_figure():
    # Stored 0.60 came from an easier split; on this split the champion scores 0.30, the challenger 0.40.
    promote, reason, theirs = gate(_m(0.40), P, 3, _m(0.30), 0.60)
    assert promote and theirs["t2i_recall@5"] == 0.30 and "on this run's test split" in reason
    # The same challenger against the stored figure alone would have lost.
    promote, reason, _ = gate(_m(0.40), P, 3, None, 0.60)
    assert not promote and "stored figure" in reason


@pytest.mark.parametrize(("challenger", "promoted"), [
    (_m(0.40), True),                      # beats by 0.10, guardrails held
    (_m(0.305), False),                    # +0.005 is not more than min_improvement 0.01
    (_m(0.40, cider=0.44), False),         # cider_d_rl drops 0.06 > 0.05
    (_m(0.40, cider=0.46), True),          # drops 0.04: allowed
    (_m(0.40, i2t=0.27), False),           # i2t_recall@5 drops 0.03 > 0.02
])
def test_primary_margin_and_guardrails(challenger, promoted):
    promote, reason, _ = gate(challenger, P, 1, _m(0.30), 0.30)
    assert promote is promoted, reason
    assert ("guardrail broken" in reason) == (challenger["cider_d_rl"] < 0.45 or challenger["i2t_recall@5"] < 0.28)


def test_register_keeps_both_sets_of_numbers_and_the_history(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("gate")
    files = tmp_path / "rl"
    files.mkdir()
    (files / "model_config.json").write_text("{}")
    client = MlflowClient()

    def run(metrics, champion_metrics, weights=None):
        (files / "model.safetensors").write_bytes(weights or f"weights {history_len()}".encode())
        champ = client.get_model_version_by_alias("mmplatform", "champion") if history_len() else None
        scored = {"champion": champion_source("mmplatform", "champion", champ.version) if champ else None,
                  "metrics": champion_metrics}
        with mlflow.start_run():
            return register(files, metrics, P, champion=scored, out=tmp_path / "registry.json",
                            tags={"prefect_flow_run_id": f"flow-{history_len() + 1}", "dvc.data/x": "abc"})

    def history_len():
        try:
            return len(history(client, "mmplatform"))
        except mlflow.exceptions.MlflowException:
            return 0

    first = run(_m(0.30), {})
    assert first["promoted"] and first["compared_on"] == "no champion"
    worse = run(_m(0.35, cider=0.30), _m(0.30))  # better primary, but captioning collapsed
    assert not worse["promoted"] and "guardrail broken: cider_d_rl" in worse["reason"]
    assert worse["champion_metrics"]["cider_d_rl"] == 0.5 and worse["metrics"]["cider_d_rl"] == 0.30
    better = run(_m(0.45), _m(0.30))
    assert better["promoted"] and better["compared_on"] == "this run's test split"
    assert int(client.get_model_version_by_alias("mmplatform", "champion").version) == better["version"]
    # The champion's own files again (a re-run that changed no weight): nothing registered, nothing decided.
    again = run(_m(0.45), _m(0.45), weights=b"weights 2")
    assert again["unchanged"] and again["version"] == 3 and len(client.search_model_versions("name='mmplatform'")) == 3

    hist = history(client, "mmplatform")
    assert len(hist) == 3
    assert [(h["from"], h["to"], h["promoted"]) for h in hist] == [(None, 1, True), (1, 1, False), (1, 3, True)]
    assert [h["flow_run"] for h in hist] == ["flow-1", "flow-2", "flow-3"]
    assert better["history"] == hist and better["champion_metrics"]["t2i_recall@5"] == 0.30
    v2 = client.get_model_version("mmplatform", "2")
    assert v2.tags["decision"] == "challenger" and v2.tags["champion_before.cider_d_rl"] == "0.500000"
    card = mlflow.artifacts.load_text(v2.tags["model_card"])
    assert "Registered, not promoted" in card and "| cider_d_rl | 0.3000 | 0.5000 |" in card and "data/x" in card


def test_a_guarded_metric_the_data_does_not_measure_is_named_not_fatal():
    # Captions-only data has no VQA questions, so no vqa_accuracy on either side.
    p = RegisterParams(primary_metric="t2i_recall@5", guardrails={"vqa_accuracy": 0.02, "cider_d_rl": 0.05})
    promote, reason, _ = gate(_m(0.40), p, 1, _m(0.30), 0.30)
    assert promote and "not measured on both, so not guarded: vqa_accuracy" in reason
    assert gate(_m(0.40), p, None, None, None)[0]  # and a first version registers without it
