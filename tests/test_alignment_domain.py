"""The alignment filter judges captions only with a model that saw their kind of data: off for a standalone
`mmp data clean` unless asked for, and in the pipeline only with a champion trained on the same source domains."""

from __future__ import annotations

import io
import json
import logging

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from flows.cli import main
from mmplatform.data.alignment import load_champion_scorer
from mmplatform.data.dataset import make_record, source_domain, write_dataset
from mmplatform.registry import MODEL_CODE


@pytest.mark.parametrize(("source", "domain"), [
    ("synthetic:seed=0", "synthetic"),
    ("synthetic:seed=7", "synthetic"),
    ("coco:/data/captions.json:123", "coco:/data/captions.json"),
    ("jsonl:/home/me/photos.jsonl:4", "jsonl:/home/me/photos.jsonl"),
    ("webdataset:/s/shard-000.tar:key:x", "webdataset:/s/shard-000.tar:key"),
    ("", ""),
])
def test_source_domain(source, domain):
    assert source_domain(source) == domain


@pytest.fixture
def synthetic_champion(tmp_path, monkeypatch):
    """A registered champion whose version says it was trained on synthetic scenes only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MMP_WORKSPACE", str(tmp_path))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("domains")
    files = tmp_path / "rl"
    files.mkdir()
    (files / "model_config.json").write_text("{}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={"model": str(files)},
                                       pip_requirements=[])
    v = mlflow.register_model(info.model_uri, "mmplatform")
    client = MlflowClient()
    client.set_model_version_tag("mmplatform", v.version, "data_domains", json.dumps(["synthetic"]))
    client.set_registered_model_alias("mmplatform", "champion", v.version)
    return tmp_path


def test_a_champion_that_never_saw_the_domain_is_not_used(synthetic_champion, caplog):
    caplog.set_level(logging.INFO)
    assert load_champion_scorer("mmplatform", "champion", {"jsonl:/home/me/photos.jsonl"}) is None
    assert "not trained on jsonl:/home/me/photos.jsonl" in caplog.text


def test_standalone_clean_does_not_align_unless_asked(synthetic_champion, caplog, capsys):
    tmp = synthetic_champion
    recs = []
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 90)).save(buf, "PNG")
        recs.append(make_record(buf.getvalue(), 32, 32, [f"my photo number {i}"], source=f"jsonl:/me/p.jsonl:{i}"))
    write_dataset(tmp / "in", recs, stage="ingest")
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert main(["data", "clean", str(tmp / "in"), str(tmp / "out"), "-S", "engine=local", "--no-report"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["alignment"]["status"] == "off" and stats["kept"] == 4
    assert "alignment filter off" in caplog.text
    assert main(["data", "clean", str(tmp / "in"), str(tmp / "out2"), "-S", "engine=local", "--no-report",
                 "--align-with", "mmplatform@champion"]) == 2
