"""The MLflow seam.

Default store: ``sqlite:///<workspace>/mlflow.db`` with artifacts in ``<workspace>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides it. A flow run opens one parent run and exports its id as
``MMP_PARENT_RUN_ID``; each stage (a separate process started by DVC) opens a child run under it.
Ray workers log per-step metrics to a run by id through :func:`log_metrics`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "mmplatform"
PARENT_ENV = "MMP_PARENT_RUN_ID"


def workspace() -> Path:
    return Path(os.environ.get("MMP_WORKSPACE", os.getcwd())).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace() / 'mlflow.db'}"


def setup() -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so Ray workers and child processes use the same store
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        kwargs = {}
        if uri.startswith("sqlite:"):
            kwargs["artifact_location"] = (workspace() / "mlartifacts").as_uri()
        exp_id = mlflow.create_experiment(EXPERIMENT, **kwargs)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, *, system_metrics: bool = False) -> Iterator[Any]:
    """A child run of the flow's parent run (or a top-level run when a stage runs alone). ``system_metrics``:
    MLflow samples CPU, memory, disk and network (GPU too, where there is one) into the run every 10 s."""
    import mlflow

    setup()
    parent = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name=stage, parent_run_id=parent or None, log_system_metrics=system_metrics,
                          tags={"mmp.stage": stage}) as run:
        if params:
            flat = {metric_name(k): str(v)[:6000] for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        yield run


def metric_name(key: str) -> str:
    r"""MLflow names allow ``[\w./ :-]`` only: ``t2i_recall@5`` is logged as ``t2i_recall_at_5``."""
    return key.replace("@", "_at_")


def log_metrics(run_id: str | None, metrics: dict[str, float], step: int) -> None:
    """Log from any process (e.g. a Ray worker) to a run by id; no-op without a run."""
    if not run_id:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    batch = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()]
    MlflowClient(tracking_uri()).log_batch(run_id, metrics=batch)


def log_stats(stats: dict[str, Any], artifact: str = "stats.json") -> None:
    """Numeric entries as metrics of the active run; the whole dict as a JSON artifact."""
    import mlflow

    flat = flatten(stats)
    nums = {metric_name(k): float(v) for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
    if nums:
        mlflow.log_metrics(nums)
    mlflow.log_dict(stats, artifact)


def log_dataset(path: str | Path, context: str, name: str | None = None) -> None:
    """Record a canonical dataset as an input of the active run (``mlflow.data``): its rows without the image
    bytes, named after the folder, with the manifest's content hash as the digest, so an auditor sees exactly
    which data version a model was trained on."""
    import mlflow
    import mlflow.data
    import pandas as pd

    from mmplatform.data.dataset import read_dataset, read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    rows = read_dataset(path, columns=["sample_id", "image_sha256", "captions", "split", "source"])
    df = pd.DataFrame({"sample_id": [r["sample_id"] for r in rows],
                       "image_sha256": [r["image_sha256"] for r in rows],
                       "captions": [" | ".join(r["captions"]) for r in rows],
                       "split": [r["split"] for r in rows], "source": [r["source"] for r in rows]})
    ds = mlflow.data.from_pandas(df, source=str(path.resolve()), name=name or path.name,
                                 digest=manifest["content_hash"][:16])
    mlflow.log_input(ds, context=context)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file (e.g. the data report) to the active run."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


FLOW_RUN_ENV = "MMP_PREFECT_FLOW_RUN_ID"


def git_commit(cwd: str | Path | None = None) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or workspace(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or workspace(),
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def dvc_data_hashes(lock: str | Path | None = None) -> dict[str, str]:
    """``{out path: md5}`` of every stage output recorded in ``dvc.lock`` (the data versions)."""
    import yaml

    path = Path(lock) if lock else workspace() / "dvc.lock"
    if not path.is_file():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    hashes = {}
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            hashes[out["path"]] = out.get("md5") or out.get("hash") or ""
    return hashes


def lineage_tags() -> dict[str, str]:
    """Code version, data versions and the Prefect flow run: what an auditor needs to reproduce a run."""
    tags = {"git_commit": git_commit(), "prefect_flow_run_id": os.environ.get(FLOW_RUN_ENV, "none")}
    for p, h in dvc_data_hashes().items():
        tags[f"dvc.{p}"] = h
    return tags
