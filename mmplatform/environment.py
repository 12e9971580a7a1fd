"""Process settings that must be in place before Ray, MLflow or Hugging Face code is imported.

The package's ``__init__`` applies :func:`configure` on the first import of anything in ``mmplatform``, so every
path that reaches Ray through our code (a stage, a test, a notebook) has it set before its first ``import ray``.
This module imports nothing of ours: it is the ground floor.

- **Ray on loopback.** Without ``RAY_ADDRESS`` the stages start Ray in-process for this machine; it must not listen
  on the network (unauthenticated Ray runs any code it is sent). Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
  once, when ``ray`` is imported, and with it off binds its node (GCS, raylet, workers, the runtime-env agent)
  to 127.0.0.1 instead of the machine's outward address. A deployment that joins a cluster sets ``RAY_ADDRESS``
  and this is left alone.
- **No pickle.** MLflow may unpickle model flavours it loads; ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` refuses
  it (the registered model is logged as code, :mod:`mmplatform.serving`, and needs none).
- **No telemetry.** Ray's usage stats, MLflow's and Hugging Face's telemetry are off: an unattended job on
  someone's network does not phone out. A user who wants them sets the variables to other values first.
"""

from __future__ import annotations

import os

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
NO_TELEMETRY = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def configure() -> None:
    """Set the defaults above (``setdefault``: a value the user set wins)."""
    settings = NO_PICKLE | NO_TELEMETRY
    if not os.environ.get("RAY_ADDRESS"):
        settings |= LOOPBACK_RAY
    for key, value in settings.items():
        os.environ.setdefault(key, value)
