"""The in-process Ray that the stages start: no dashboard unless asked, and Train's cleaner kept quiet."""

import logging

import psutil
import pytest
import ray

from mmplatform.compute import init_ray, ray_dashboard

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("0", False), ("1", True), ("true", True),
                                                 ("no", False)])
def test_dashboard_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MMP_RAY_DASHBOARD", raising=False)
    else:
        monkeypatch.setenv("MMP_RAY_DASHBOARD", value)
    assert ray_dashboard() is expected


@ray.remote(num_cpus=0)
def _cleaner_log_level() -> int:
    return logging.getLogger(CLEANER_LOGGER).getEffectiveLevel()


def _dashboard_servers() -> list[str]:
    """Ray's dashboard processes that serve it (without the dashboard Ray still runs a stub of it, started with
    ``--disable-frontend`` and one usage-stats module)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "dashboard/dashboard.py" in cmd and "--disable-frontend" not in cmd:
            found.append(cmd)
    return found


def test_local_ray_starts_without_dashboard_and_workers_silence_the_cleaner(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MMP_RAY_DASHBOARD", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    init_ray(1)
    try:
        assert _dashboard_servers() == []
        # The hook ran in the worker process: the cleaner's per-second "state API unavailable" warning is off.
        assert ray.get(_cleaner_log_level.remote()) == logging.ERROR
    finally:
        ray.shutdown()
