"""Training through Ray Train: a run that dies mid-epoch is resumed by a re-run of the stage, from its last
checkpoint, to the weights an uninterrupted run reaches (bit for bit, on CPU).

(A worker that fails while the others live, and Ray's restart of the group: tests/test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch
from ray.train import TrainingFailedError
from safetensors.torch import load_file

from mmplatform.config import TrainParams
from mmplatform.data.dataset import write_dataset
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.train.recipe import read_checkpoint, read_journal, read_steps, run_training

pytestmark = pytest.mark.slow

TINY = {"epochs": 2, "batch_size": 32, "embed_dim": 32, "warmup_steps": 2, "lr": 2e-3, "cpus_per_worker": 1,
        "checkpoint_every_steps": 3,
        "vision": {"hidden_size": 32, "layers": 1, "heads": 2},
        "text": {"hidden_size": 32, "layers": 1, "heads": 2},
        "decoder": {"hidden_size": 32, "layers": 1, "heads": 2}}


def test_rerun_after_the_run_died_resumes_from_its_last_checkpoint(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, generate_synthetic(n_train=128, n_val=32, n_test=1, n_test_compositional=1), stage="test")
    p = TrainParams.model_validate({**TINY, "num_workers": 1, "max_failures": 0})
    cache = tmp_path / "cache"

    def train(params: TrainParams, out: str, **kw) -> list[dict]:
        return run_training(params, train_dir=data, val_dir=data, out_dir=tmp_path / out, cache_dir=cache, **kw)

    # 4 steps per epoch, checkpoints after steps 2, 3 (epoch end) and 5; the worker fails before step 6 and,
    # with no restarts allowed, the run fails with it (as when the driver dies).
    with pytest.raises(TrainingFailedError):
        train(p, "model", fault_inject_step=6)
    (ckpt,) = cache.glob("train-*")
    assert (read_checkpoint(ckpt)["epoch"], read_checkpoint(ckpt)["step"]) == (1, 2)

    # The stage runs again: it resumes at epoch 1 step 2. Restarts are an execution setting, not part of
    # the checkpoint's key, so the same checkpoint is found.
    history = train(p.model_copy(update={"max_failures": 2}), "model")
    assert [r["epoch"] for r in history] == [0, 1]
    taken = [r["epoch"] * 4 + r["step"] for r in read_journal(ckpt)]
    assert taken == [0, 1, 2, 3, 4, 5, 6, 7]  # nothing lost, nothing taken twice
    assert [r["epoch"] * 4 + r["step"] for r in read_steps(ckpt)] == list(range(8))
    MultimodalModel.load(tmp_path / "model")

    # An uninterrupted run (Ray Train's local mode: the same loop in this process) takes the same steps to
    # the same weights, bit for bit.
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    reference = run_training(p.model_copy(update={"num_workers": 0}), train_dir=data, val_dir=data,
                             out_dir=tmp_path / "reference", cache_dir=tmp_path / "ref-cache")
    (ref_ckpt,) = (tmp_path / "ref-cache").glob("train-*")
    assert read_steps(ref_ckpt) == read_steps(ckpt)
    assert [r["val_total"] for r in reference] == [r["val_total"] for r in history]
    a, b = load_file(tmp_path / "model" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A re-run after the run finished trains nothing and returns the same history (here in local mode: the
    # worker layout is not part of the key either).
    again = run_training(p.model_copy(update={"num_workers": 0}), train_dir=data, val_dir=data,
                         out_dir=tmp_path / "model2", cache_dir=cache)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    assert again == history
    assert len(read_journal(ckpt)) == 8
