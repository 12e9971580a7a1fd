"""Nothing listens beyond loopback: every socket that the processes of a stage open for listening (the driver,
Ray's GCS, raylet, agents and workers) is on 127.0.0.1 or ::1. An unauthenticated Ray on the network runs any
code it is sent."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import psutil
import pytest
from PIL import Image

from mmplatform.data.dataset import make_record, write_dataset

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: IPv4 loopback on a dual-stack socket


def _listening() -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket on the machine."""
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            try:
                name = " ".join(psutil.Process(c.pid).cmdline()[:3]) if c.pid else "?"
            except psutil.Error:
                name = "?"
            out.add((c.laddr.ip, c.laddr.port, name))
    return out


def _watch(cmd: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, set[tuple[str, int, str]]]:
    """Run ``cmd`` and collect every listening socket that appears on the machine while it runs."""
    before = _listening()
    seen: set[tuple[str, int, str]] = set()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening() - before
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
    exposed = sorted(s for s in seen if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"


TRAIN = """
import sys
from mmplatform.config import TrainParams
from mmplatform.data.dataset import write_dataset
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.train.recipe import run_training

data = sys.argv[1] + "/data"
write_dataset(data, generate_synthetic(n_train=64, n_val=16, n_test=1, n_test_compositional=1), stage="test")
tiny = {"epochs": 1, "batch_size": 32, "embed_dim": 32, "warmup_steps": 1, "cpus_per_worker": 1, "num_workers": 2,
        "vision": {"hidden_size": 32, "layers": 1, "heads": 2}, "text": {"hidden_size": 32, "layers": 1, "heads": 2},
        "decoder": {"hidden_size": 32, "layers": 1, "heads": 2}}
run_training(TrainParams.model_validate(tiny), train_dir=data, val_dir=data, out_dir=sys.argv[1] + "/model",
             cache_dir=sys.argv[1] + "/cache")
"""


def test_training_on_ray_train_listens_on_loopback_only(tmp_path):
    """Two workers: the process group's store and gloo's connections included."""
    done, seen = _watch([sys.executable, "-c", TRAIN, str(tmp_path)], timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen
    exposed = sorted(s for s in seen if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"
