"""Training checkpoints: loaded without pickle (a planted file cannot run code), written so that a kill at
any point leaves a whole one, and a torn newest one falls back to the one before."""

from __future__ import annotations

import functools
import os
import pathlib
import random

import numpy as np
import pytest
import torch

from mmplatform.train.recipe import (
    CKPT,
    PREVIOUS_CKPT,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

pytestmark = pytest.mark.reliability


class _Canary:
    """Unpickling this creates a file: proof that a load path ran code from the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _state(tag: int) -> dict:
    return {"model": {"w": torch.full((4,), float(tag))}, "epoch": tag, "step": 0, "history": [{"val": 0.5}],
            "rng": [rng_state()]}


def test_a_planted_checkpoint_never_runs_code(tmp_path):
    canary = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {}, "epoch": 0, "payload": _Canary(str(canary))}, ckpt / CKPT)
    assert read_checkpoint(ckpt) is None
    assert not canary.exists()
    save_checkpoint(ckpt, _state(1))
    save_checkpoint(ckpt, _state(2))  # state 1 is now the previous one: the planted newest is skipped for it
    torch.save({"payload": _Canary(str(canary))}, ckpt / CKPT)
    assert read_checkpoint(ckpt)["epoch"] == 1
    assert not canary.exists()


def test_a_torn_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    assert read_checkpoint(tmp_path)["epoch"] == 2
    data = (tmp_path / CKPT).read_bytes()
    (tmp_path / CKPT).write_bytes(data[: len(data) // 2])
    assert read_checkpoint(tmp_path)["epoch"] == 1
    (tmp_path / PREVIOUS_CKPT).write_bytes(b"")
    assert read_checkpoint(tmp_path) is None


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    save_checkpoint(tmp_path, {"rng": [rng_state()]})
    expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(read_checkpoint(tmp_path)["rng"][0])
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]) == expected


def _killed_at(k: int, fn) -> int:
    """Run ``fn`` in a forked child that dies (``os._exit``, no clean-up, as SIGKILL) at its k-th fsync or
    rename; returns the child's exit status (9: killed, 0: ``fn`` finished first)."""
    pid = os.fork()
    if pid == 0:  # child
        calls = {"n": 0}

        def counted(real):
            def wrapper(*a, **kw):
                calls["n"] += 1
                if calls["n"] == k:
                    os._exit(9)
                return real(*a, **kw)
            return wrapper

        try:
            os.fsync, os.replace = counted(os.fsync), counted(os.replace)
            fn()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_checkpoint_write_killed_at_any_point_leaves_a_whole_checkpoint(tmp_path):
    seen = set()
    for k in range(1, 7):
        ckpt = tmp_path / f"k{k}"
        for epoch in (0, 1):
            save_checkpoint(ckpt, {"model": {"w": torch.full((1000,), float(epoch))}, "epoch": epoch})
        new = {"model": {"w": torch.full((1000,), 2.0)}, "epoch": 2}
        status = _killed_at(k, functools.partial(save_checkpoint, ckpt, new))
        assert status in (0, 9)
        state = read_checkpoint(ckpt)
        assert state is not None and state["epoch"] in (1, 2)
        assert torch.equal(state["model"]["w"], torch.full((1000,), float(state["epoch"])))
        seen.add(state["epoch"])
    assert seen == {1, 2}


def test_the_resume_directory_changes_with_the_code(tmp_path):
    """After a change to the training code, a re-run must not resume (and re-publish) the old code's weights."""
    from mmplatform.config import TrainParams
    from mmplatform.train.recipe import checkpoint_key, code_fingerprint

    lib = tmp_path / "lib"
    (lib / "train").mkdir(parents=True)
    (lib / "train" / "objectives.py").write_text("LOSS = 'a'\n")
    before = code_fingerprint(lib)
    assert code_fingerprint(lib) == before
    (lib / "train" / "objectives.py").write_text("LOSS = 'b'\n")
    after = code_fingerprint(lib)
    assert after != before
    p = TrainParams()
    assert checkpoint_key(p, "data", before) != checkpoint_key(p, "data", after)
    assert checkpoint_key(p, "data", before) == checkpoint_key(p, "data", before)
    assert checkpoint_key(p, "data") == checkpoint_key(p, "data", code_fingerprint())
