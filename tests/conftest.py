"""Shared fixtures: a throw-away DVC workspace with tiny params, for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows import workspace as flows_workspace
from flows.workspace import deep_update, demo_profile  # noqa: F401 - tests import deep_update from here

ROOT = Path(__file__).resolve().parents[1]

# The demo profile (params/demo.yaml): ~2 minutes for the whole flow. Ray Data (clean) and Ray Train's worker
# group (rl_finetune) are tested on their own (test_clean.py, test_rl.py, test_network_exposure.py).
TINY = demo_profile()


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


def make_workspace(path: Path, params: dict | None = None) -> Path:
    """A copy of the pipeline (dvc.yaml, code, params) with ``params`` merged in, as its own DVC repo."""
    return flows_workspace.make_workspace(path, params)


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws", TINY)


def pytest_sessionfinish(session, exitstatus):
    # Prefect stops its temporary API server at interpreter exit and logs that to the console handler it
    # set up while pytest captured stderr, a stream closed by then; don't print that as a logging error.
    import logging

    logging.raiseExceptions = False
