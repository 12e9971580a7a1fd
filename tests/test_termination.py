"""SIGTERM on a running `mmp run`: the stage's whole process tree stops, the command exits non-zero within 30 s
with one line, params.yaml is the user's again, and dvc.lock is as it was (the stage runs again next time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PARAMS = "# mine\ntrain:\n  epochs: 60  # keep\n"
# The first stage starts a grandchild and both sleep: what a training stage with Ray workers looks like to us.
SLEEPER = """import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
time.sleep(300)
"""


def test_sigterm_stops_the_stage_tree_and_exits_within_30_s(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(PARAMS)
    (ws / "sleeper.py").write_text(SLEEPER)
    stages = {"ingest": "python sleeper.py"} | {s: "python -c pass" for s in (
        "annotate", "clean", "augment", "train", "rl_finetune", "evaluate", "register")}
    (ws / "dvc.yaml").write_text("stages:\n" + "".join(f"  {k}:\n    cmd: {v}\n" for k, v in stages.items()))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}")
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "--workdir", str(ws), "-S", "train.epochs=1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        sleepers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(sleepers) < 2:
            time.sleep(0.5)
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            sleepers = [p for p in tree if "sleep(300)" in " ".join(p.cmdline()) or "sleeper.py" in p.cmdline()]
        assert len(sleepers) == 2, "the stage never started"
        assert "epochs: 1" in (ws / "params.yaml").read_text()  # the override is in place while it runs
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None), out[-2000:]
    assert took < 30, f"exited {took:.0f} s after SIGTERM"
    assert "stopped by a signal" in out
    assert not [p for p in sleepers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert (ws / "params.yaml").read_text() == PARAMS
    assert not (ws / "dvc.lock").exists()  # the stage never finished: nothing recorded, it runs again
