"""Prefect flows: ``data`` (ingest → annotate → clean → augment), ``train`` (train → rl_finetune →
evaluate → register) and ``retrain`` (both, under one MLflow parent run).

Each stage is a Prefect task that runs ``dvc repro <stage>`` in the workspace, so DVC decides what is
stale and unchanged stages are skipped; stages run one at a time (one ``repro`` per workspace).
Run: ``mmp run`` (Prefect's local API, nothing to start by hand) or ``mmp serve`` for a schedule.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from mmplatform import tracking
from mmplatform.config import OVERRIDES_FILE, ConfigError, load_params, overrides_text, read_overrides

DATA_STAGES = ("params", "ingest", "annotate", "clean", "augment")
TRAIN_STAGES = ("train", "rl_finetune", "evaluate", "register")


class StageFailed(RuntimeError):
    pass


def stage_env(workdir: Path, parent_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python`: make it this environment's interpreter whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MMP_WORKSPACE"] = str(workdir)
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    run_id = flow_run.get_id()
    if run_id:
        env[tracking.FLOW_RUN_ENV] = str(run_id)
    return env


# Lines of a stage's output that say nothing to the person watching: DVC's hints and skips, Ray Train's echo of
# every reported result, library start-up chatter. They go to the stage's log file only (.mmp/logs/<stage>.log).
NOISE = re.compile("|".join([
    r"^\s*$", r"^Stage '.*' didn't change, skipping$", r"^Updating lock file", r"^Use `dvc push`",
    r"^To track the changes with git", r"^\s*git add ", r"^To enable auto staging", r"^\s*dvc config core\.autostage",
    r"Reporting training result \d+: TrainingReport\(", r"^Token authentication is enabled for this Ray cluster",
    r"mlflow\.system_metrics\.system_metrics_monitor", r"UserWarning: ", r"^\s+(color_warning|return _dataset_source)",
    r"Moving model to device", r"Requesting resources: ", r"Attempting to start training worker group",
    r"Started training worker group", r"world_rank=\d+, local_rank=\d+", r"^Generating lock file",
    r"Downloading artifacts: ", r"core_worker\.cc:\d+", r"train_fn_utils\.py:\d+ -- Reported metrics",
    r"-- Running in local mode",
]))
LOG_DIR = ".mmp/logs"


def is_noise(line: str) -> bool:
    return bool(NOISE.search(re.sub(r"\x1b\[[0-9;]*m", "", line)))


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def dvc_stage(stage: str, workdir: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one DVC stage; its output streams into the Prefect log, less :data:`NOISE`, and whole into
    ``.mmp/logs/<stage>.log``. A failed try is retried once (a training stage resumes from its last checkpoint)."""
    logger = get_run_logger()
    log_path = Path(workdir) / LOG_DIR / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Its own session: a Ctrl-C in the terminal reaches mmp, which then stops the stage's whole tree itself.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: deque[str] = deque(maxlen=20)
    ran = False
    started = time.monotonic()
    assert proc.stdout is not None
    try:
        with open(log_path, "w") as full:
            for line in proc.stdout:
                full.write(line)
                line = line.rstrip()
                tail.append(line)
                ran = ran or line.startswith(f"Running stage '{stage}'")
                if not is_noise(line):
                    logger.info("%s", line)
    except BaseException:  # SIGTERM/SIGINT (Prefect's TerminationSignal, KeyboardInterrupt): stop the stage first
        stop_tree(proc.pid)
        raise
    if proc.wait() != 0:
        errors = [ln for ln in tail if ln.startswith(("error:", "ERROR"))]
        raise StageFailed(f"stage {stage} failed: {(errors or list(tail) or ['no output'])[-1]} (whole log: "
                          f"{log_path})")
    logger.info("%s: %s in %.0f s (whole log: %s)", stage, "ran" if ran else "unchanged, skipped",
                time.monotonic() - started, log_path)
    return {"stage": stage, "ran": ran}


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a stage's process and every process below it (DVC, the stage's Python, Ray's workers), then
    SIGKILL whatever is left after ``grace_s``. DVC writes dvc.lock only after a stage succeeds, so the stopped
    stage, and those after it, run again next time."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@flow(name="data")
def data_flow(workdir: str = ".", env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    env = env or stage_env(Path(workdir).resolve(), None)
    return [dvc_stage(s, workdir, env) for s in DATA_STAGES]


@flow(name="train")
def train_flow(workdir: str = ".", env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    env = env or stage_env(Path(workdir).resolve(), None)
    return [dvc_stage(s, workdir, env) for s in TRAIN_STAGES]


class WorkspaceBusy(RuntimeError):
    pass


STATE_DIR = ".mmp"  # inside the workspace: the run lock, the run's overrides and its params file
_held: dict[Path, int] = {}  # workspaces this process holds, with a count (retrain inside mmp run re-enters)


@contextlib.contextmanager
def workspace_lock(workdir: str | Path, wait: bool = False) -> Iterator[None]:
    """One run at a time per workspace: an exclusive ``flock`` on ``<workdir>/.mmp/run.lock`` for the run. A
    second run fails at once with one line naming the holder (pid, start time, Prefect flow run once it has
    one), or with ``wait`` queues behind it; the kernel releases the lock when its holder dies, however it
    dies, so a killed run's lock is taken over by the next."""
    wd = Path(workdir).resolve()
    if wd in _held:
        _held[wd] += 1
        try:
            yield
        finally:
            _held[wd] -= 1
        return
    (wd / STATE_DIR).mkdir(exist_ok=True)
    f = open(wd / STATE_DIR / "run.lock", "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise WorkspaceBusy(f"{wd}: another mmp run ({holder}) is using this workspace; wait for it to "
                                    "end (--wait) or stop it") from None
            logging.getLogger(__name__).warning("%s: waiting for the run that holds this workspace (%s)", wd, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        f.flush()
        _held[wd] = 1
        clear_interrupted_overrides(wd)
        try:
            yield
        finally:
            del _held[wd]
    finally:
        f.close()  # closing releases the flock


def name_lock_holder(workdir: str | Path, detail: str) -> None:
    """Add ``detail`` (the Prefect flow run, once there is one) to the holder line that a refused run prints."""
    lock = Path(workdir).resolve() / STATE_DIR / "run.lock"
    with open(lock, "a") as f:
        f.write(f", {detail}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clear_interrupted_overrides(workdir: Path) -> bool:
    """A run killed before it could empty ``.mmp/overrides.yaml`` left its ``-S`` values there: empty the list
    (called under the workspace lock, so no run is using it), so that no later run inherits them."""
    path = workdir / OVERRIDES_FILE
    try:
        left = read_overrides(path)
    except ConfigError:
        left = ["(unreadable)"]
    if not left:
        return False
    _atomic_write(path, overrides_text([]))
    logging.getLogger(__name__).warning("%s: emptied the -S overrides a killed run left: %s", OVERRIDES_FILE,
                                        " ".join(left))
    return True


@contextlib.contextmanager
def run_overrides(workdir: Path, overrides: list[str]) -> Iterator[None]:
    """This run's ``-S`` values in ``.mmp/overrides.yaml``, where the params stage merges them with params.yaml
    into the file the stages read; emptied when the run ends. params.yaml itself is only ever read, so no kill
    can change it. Callers hold :func:`workspace_lock`."""
    path = workdir / OVERRIDES_FILE
    path.parent.mkdir(exist_ok=True)
    text = overrides_text(overrides)
    if not path.is_file() or path.read_text() != text:
        _atomic_write(path, text)
    try:
        yield
    finally:
        if overrides:
            _atomic_write(path, overrides_text([]))


@flow(name="retrain")
def retrain(workdir: str = ".", overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline under one MLflow parent run tagged with code, data and flow-run lineage."""
    import mlflow

    wd = Path(workdir).resolve()
    overrides = list(overrides or [])
    load_params(wd / "params.yaml", overrides)  # fail fast, one line, before anything runs
    os.environ["MMP_WORKSPACE"] = str(wd)
    tracking.setup()
    name = f"retrain-{flow_run.get_name() or 'local'}"
    with workspace_lock(wd), run_overrides(wd, overrides), \
            mlflow.start_run(run_name=name) as parent:
        name_lock_holder(wd, f"Prefect flow run {flow_run.get_id()}")
        mlflow.set_tags({"mmp.flow": "retrain", "prefect_flow_run_id": str(flow_run.get_id()),
                         "overrides": " ".join(overrides) or "none"})
        env = stage_env(wd, parent.info.run_id)
        results = data_flow(str(wd), env) + train_flow(str(wd), env)
        os.environ[tracking.FLOW_RUN_ENV] = str(flow_run.get_id())
        mlflow.set_tags(tracking.lineage_tags() | {"stages_run": ",".join(r["stage"] for r in results if r["ran"])
                                                   or "none"})
        metrics_path = wd / "reports/eval/metrics.json"
        summary: dict[str, Any] = {"stages": results, "mlflow_parent_run_id": parent.info.run_id}
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            tracking.log_stats(metrics, "metrics.json")
            summary["metrics"] = metrics
        registry = wd / "reports/registry.json"
        if registry.exists():
            mlflow.log_artifact(str(registry))
            summary["registry"] = json.loads(registry.read_text())
    return summary
