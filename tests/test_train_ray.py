"""Training through Ray Train: a worker killed mid-run is restarted and resumes from the last checkpoint."""

from __future__ import annotations

import pytest

from mmplatform.config import TrainParams
from mmplatform.data.dataset import read_dataset, write_dataset
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.train.recipe import CKPT, run_training

pytestmark = pytest.mark.slow


def test_worker_failure_resumes_from_checkpoint_without_losing_or_repeating_epochs(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, generate_synthetic(n_train=96, n_val=16, n_test=1, n_test_compositional=1), stage="test")
    p = TrainParams.model_validate({
        "epochs": 3, "batch_size": 32, "embed_dim": 32, "warmup_steps": 2,
        "vision": {"hidden_size": 32, "layers": 1, "heads": 2},
        "text": {"hidden_size": 32, "layers": 1, "heads": 2},
        "decoder": {"hidden_size": 32, "layers": 1, "heads": 2},
    })
    cache = tmp_path / "cache"
    history = run_training(p, train_dir=data, val_dir=data, out_dir=tmp_path / "model", cache_dir=cache,
                           fault_inject_epoch=0)
    assert [h["epoch"] for h in history] == [0, 1, 2]  # nothing lost, nothing repeated
    assert list(cache.glob("train-*/fault_injected")), "the fault was not injected"
    assert history[-1]["train_total"] < history[0]["train_total"]
    MultimodalModel.load(tmp_path / "model")  # the final model was written

    # A re-run of the stage (e.g. after the driver died) resumes: nothing left to train, same history.
    again = run_training(p, train_dir=data, val_dir=data, out_dir=tmp_path / "model2", cache_dir=cache)
    assert again == history
    assert len(read_dataset(data)) == 114 and list(cache.glob(f"train-*/{CKPT}"))
