"""Nothing listens beyond loopback: every socket that the processes of a stage open for listening (the driver,
Ray's GCS, raylet, agents and workers) is on 127.0.0.1 or ::1. An unauthenticated Ray on the network runs any
code it is sent."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from netwatch import exposed, listening
from PIL import Image

from mmplatform.data.dataset import make_record, write_dataset

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _watch(cmd: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, set[tuple[str, int, str]]]:
    """Run ``cmd`` and collect every listening socket that appears on the machine while it runs."""
    before = listening()
    seen: set[tuple[str, int, str]] = set()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= listening() - before
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seen


def test_clean_on_ray_listens_on_loopback_only(tmp_path):
    recs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(buf, format="PNG")
        recs.append(make_record(buf.getvalue(), 32, 32, [f"a picture number {i}"], split="train"))
    write_dataset(tmp_path / "in", recs, stage="ingest")
    # The stage's own process: `mmp data clean` imports the clean module (and Ray) as a user's shell would.
    code = ("import sys; from flows.cli import main; sys.exit(main(['data', 'clean', sys.argv[1], sys.argv[2], "
            "'-S', 'engine=ray', '--no-report']))")
    done, seen = _watch([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "out")],
                        timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert seen, "Ray started no listening socket at all: the test saw nothing"
    assert not exposed(seen), f"listening beyond loopback: {exposed(seen)}"


# Training on two Ray Train workers is watched the same way during tests/test_distributed.py's runs
# (test_two_worker_training_listens_on_loopback_only), so no training is paid for twice.


def test_importing_the_package_sets_loopback_no_pickle_and_no_telemetry():
    """In a fresh interpreter with none of the variables set, before anything imports Ray or MLflow."""
    keys = ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY",
            "HF_HUB_DISABLE_TELEMETRY", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    env = {k: v for k, v in os.environ.items() if k not in keys and k != "RAY_ADDRESS"}
    code = f"import json, os, mmplatform.data.clean; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                               "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1",
                               "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
