"""Shared fixtures: a throw-away DVC workspace with tiny params, for end-to-end runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Ray Data (clean) and Ray Train's worker group (rl_finetune) are tested on their own (test_clean.py,
# test_rl.py, test_network_exposure.py); here the clean and RL stages run without starting Ray again (~35 s).
TINY = {
    "ingest": {"synthetic": {"n_train": 384, "n_val": 64, "n_test": 64, "n_test_compositional": 32}},
    "clean": {"engine": "local"},
    "train": {"epochs": 4, "batch_size": 32, "lr": 2e-3, "warmup_steps": 10, "embed_dim": 64,
              "vision": {"hidden_size": 64, "layers": 1, "heads": 2},
              "text": {"hidden_size": 64, "layers": 1, "heads": 2},
              "decoder": {"hidden_size": 64, "layers": 1, "heads": 2}},
    "rl_finetune": {"steps": 4, "batch_size": 8, "heldout_images": 16, "log_every": 2, "num_workers": 0},
    "evaluate": {"grid_images": 4},
}



# torch's thread count when the test session started: every test starts from it, whatever a test module did
# at import (collection imports every module before the first test runs).
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """The train loop sets process-wide torch state (threads, deterministic algorithms) and some tests run it
    in-process (Ray Train's local mode, Tune trials); each test starts from the session's starting state and
    the RNG is restored after it, so a test's numerics do not depend on which tests ran before it."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    state = torch.get_rng_state()
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(state)


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def make_workspace(path: Path, params: dict | None = None) -> Path:
    """A copy of the pipeline (dvc.yaml, code, params) with ``params`` merged in, as its own DVC repo."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("mmplatform", "pipelines"):
        shutil.copytree(ROOT / d, path / d, ignore=ignore)
    for f in ("dvc.yaml", ".dvcignore", ".mmp/overrides.yaml"):
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, path / f)
    (path / "data/annotations").mkdir(parents=True)
    (path / "data/annotations/README.md").write_text("exports go here\n")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (path / "params.yaml").write_text(yaml.safe_dump(deep_update(raw, params or {}), sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=path, check=True)
    return path


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws", TINY)


def pytest_sessionfinish(session, exitstatus):
    # Prefect stops its temporary API server at interpreter exit and logs that to the console handler it
    # set up while pytest captured stderr, a stream closed by then; don't print that as a logging error.
    import logging

    logging.raiseExceptions = False
