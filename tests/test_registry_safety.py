"""The registry holds no pickle of ours, and none is ever loaded: the model is logged as code with its
requirements pinned, and the champion is read from its safetensors files, whatever else its version holds."""

from __future__ import annotations

import pathlib

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mmplatform import champion
from mmplatform.registry import MODEL_CODE, SERVING_PACKAGES, pinned_requirements

pytestmark = pytest.mark.reliability


class _Canary(mlflow.pyfunc.PythonModel):
    """Unpickling this creates a file: proof that a load path ran code from the registry."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))

    def predict(self, context, model_input, params=None):
        return model_input


def test_requirements_are_pinned_and_do_not_fetch_the_package():
    reqs = pinned_requirements()
    assert [r.split("==")[0] for r in reqs] == list(SERVING_PACKAGES)
    assert all("==" in r and "+" not in r for r in reqs)
    assert not any(r.startswith("mmplatform") for r in reqs)
    assert "set_model(" in MODEL_CODE.read_text()  # models from code: no pickled python_model


def test_a_pickled_champion_never_runs_through_our_load_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MMP_WORKSPACE", str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("canary")  # not an experiment id an earlier test left active in another store
    canary = tmp_path / "pwned"
    files = tmp_path / "base"
    files.mkdir()
    (files / "model_config.json").write_text("{}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_Canary(str(canary)),
                                       artifacts={"model": str(files)}, pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "mmplatform")
    MlflowClient().set_registered_model_alias("mmplatform", "champion", version.version)
    assert not canary.exists()
    found = champion.champion_model_dir()
    assert found is not None and found[0].name == "base"
    with pytest.raises(Exception):  # noqa: B017 - an empty config is not a model; what matters is the canary
        champion.load_model(found[0])
    assert not canary.exists()
