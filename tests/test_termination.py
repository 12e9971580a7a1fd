"""SIGTERM on a running `mmp run`: the stage's whole process tree stops, the command exits non-zero within 30 s
with one line, and dvc.lock is as it was (the stage runs again next time). SIGTERM or SIGKILL, the run's -S
overrides never reach params.yaml: it stays byte-identical from start to end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mmplatform.config import OVERRIDES_FILE, RUN_PARAMS, read_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PARAMS = "# mine\ntrain:\n  epochs: 60  # keep\n"
# The first stage starts a grandchild and both sleep: what a training stage with Ray workers looks like to us.
SLEEPER = """import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
time.sleep(300)
"""


def _stage_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The sleeping stage's two processes, once both run (up to 240 s: Prefect's local API starts first)."""
    deadline = time.monotonic() + 240
    sleepers: list[psutil.Process] = []
    while time.monotonic() < deadline and len(sleepers) < 2:
        time.sleep(0.5)
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        sleepers = [p for p in tree if "sleep(300)" in " ".join(p.cmdline()) or "sleeper.py" in p.cmdline()]
    return sleepers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_run_exits_within_30_s_and_never_touches_params_yaml(tmp_path, sig):
    ws = tmp_path / "ws"
    (ws / ".mmp").mkdir(parents=True)
    (ws / "params.yaml").write_text(PARAMS)
    (ws / "sleeper.py").write_text(SLEEPER)
    params_stage = ("python -m pipelines.params\n    deps: [params.yaml, .mmp/overrides.yaml]\n"
                    f"    outs: [{{{RUN_PARAMS}: {{cache: false}}}}]")
    stages = {"params": params_stage, "ingest": "python sleeper.py"} | {s: "python -c pass" for s in (
        "annotate", "clean", "augment", "train", "rl_finetune", "evaluate", "register")}
    (ws / "dvc.yaml").write_text("stages:\n" + "".join(f"  {k}:\n    cmd: {v}\n" for k, v in stages.items()))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
               PYTHONPATH=ROOT)
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "--workdir", str(ws), "-S", "train.epochs=1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sleepers: list[psutil.Process] = []
    try:
        sleepers = _stage_tree(proc)
        assert len(sleepers) == 2, "the stage never started"
        assert "epochs: 1" in (ws / RUN_PARAMS).read_text()  # the stages read the override
        assert (ws / "params.yaml").read_text() == PARAMS  # the user's file does not carry it
        tree = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        proc.send_signal(sig)
        if sig == signal.SIGKILL:  # nothing is left to stop the stage and Prefect's server: the test does
            proc.wait(timeout=30)
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None), out[-2000:]
    assert (ws / "params.yaml").read_text() == PARAMS
    assert not (ws / "dvc.lock").exists() or "ingest" not in (ws / "dvc.lock").read_text()  # ingest runs again
    if sig == signal.SIGTERM:
        assert took < 30, f"exited {took:.0f} s after SIGTERM"
        assert "stopped by a signal" in out
        assert not [p for p in sleepers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert read_overrides(ws / OVERRIDES_FILE) == []
        # The next run runs the stopped stage and those after it, not the one that had finished.
        (ws / "sleeper.py").write_text("pass\n")
        again = subprocess.run([sys.executable, "-c", code, "run", "--workdir", str(ws), "-S", "train.epochs=1"],
                               env=env, capture_output=True, text=True, timeout=240)
        ran = [s for s in stages if f"Running stage '{s}'" in again.stdout + again.stderr]
        assert again.returncode == 0 and ran == list(stages)[1:], (ran, again.stderr[-2000:])
        assert "Updating lock file" not in again.stdout + again.stderr  # DVC's chatter: in the log files only
        assert "Updating lock file" in (ws / ".mmp/logs/ingest.log").read_text()  # kept whole there
    else:  # a killed run leaves its overrides; the next run empties them before it starts
        assert read_overrides(ws / OVERRIDES_FILE) == ["train.epochs=1"]
        from flows.retrain import workspace_lock
        with workspace_lock(ws):
            assert read_overrides(ws / OVERRIDES_FILE) == []
