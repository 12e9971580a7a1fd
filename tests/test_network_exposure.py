"""Nothing listens beyond loopback: every socket that the processes of a stage open for listening (the driver,
Ray's GCS, raylet, agents and workers) is on 127.0.0.1 or ::1. An unauthenticated Ray on the network runs any
code it is sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.reliability


# The stages' Ray processes are watched where they already run: Ray Data in tests/test_clean.py, two Ray Train
# workers (and their restart) in tests/test_distributed.py, the ASHA sweep in tests/test_tune.py (netwatch.py).
# In-process Ray there; what a fresh `mmp data clean` would do is decided at import, checked below.


def test_a_fresh_stage_process_gets_loopback_ray_no_pickle_and_no_telemetry():
    """What `mmp data clean` does first, in a fresh interpreter with none of the variables set: import the clean
    module, which imports Ray inside. Ray decides at its import whether its node binds the machine's address;
    before, clean.py imported Ray before the loopback flag was set, and its raylet listened on ::."""
    keys = ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY",
            "HF_HUB_DISABLE_TELEMETRY", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    env = {k: v for k, v in os.environ.items() if k not in keys and k != "RAY_ADDRESS"}
    code = ("import json, os, mmplatform.data.clean, ray; from ray._private import ray_constants, services; "
            f"print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}} | "
            "{'node_ip': services.get_node_ip_address(), 'cluster': ray_constants.ENABLE_RAY_CLUSTER}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                               "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1",
                               "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                               "node_ip": "127.0.0.1", "cluster": False}
