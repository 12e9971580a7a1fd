"""One run per workspace, and -S overrides that never touch the user's params.yaml, whatever kills a run."""

from __future__ import annotations

import os
import time

import pytest

from flows import retrain as rt
from flows.cli import main
from mmplatform.config import (
    OVERRIDES_FILE,
    RUN_PARAMS,
    ConfigError,
    load_params,
    overrides_text,
    read_overrides,
    write_run_params,
)

pytestmark = pytest.mark.reliability

PARAMS = "# my notes: keep lr low\ntrain:\n  lr: 0.001  # tuned by hand\n  epochs: 60\n"


def _workspace(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; returns its pid (the caller waits)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _hold_lock_in_child(wd, seconds: float, detail: str | None = None) -> int:
    """A forked child takes the workspace lock (naming ``detail`` as its flow run) and keeps it ``seconds``;
    returns its pid once it holds the lock."""
    ready = wd / "ready"

    def hold():
        with rt.workspace_lock(wd):
            if detail:
                rt.name_lock_holder(wd, detail)
            ready.touch()
            time.sleep(seconds)

    pid = _in_child(hold)
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    return pid


@pytest.fixture
def _keep_environ():
    saved = dict(os.environ)  # `mmp run` sets Prefect's variables for its workspace
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_a_second_run_in_the_same_workspace_fails_at_once_with_one_line(tmp_path, capsys, _keep_environ):
    wd = _workspace(tmp_path)
    pid = _hold_lock_in_child(wd, seconds=30)
    try:
        with pytest.raises(rt.WorkspaceBusy, match=f"pid {pid}"):
            with rt.workspace_lock(wd):
                pass
        rc = main(["run", "--workdir", str(wd), "-S", "train.lr=0.5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "another mmp run" in err[0]
        assert (wd / "params.yaml").read_text() == PARAMS  # the refused run touched nothing
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    with rt.workspace_lock(wd):  # the holder died: the kernel released its lock
        with rt.workspace_lock(wd):  # and this process may re-enter its own
            pass


def test_the_refusal_names_the_flow_run_and_wait_queues_behind_the_holder(tmp_path):
    wd = _workspace(tmp_path)
    pid = _hold_lock_in_child(wd, seconds=2, detail="Prefect flow run 1234-abcd")
    try:
        with pytest.raises(rt.WorkspaceBusy, match=f"pid {pid}, started .*, Prefect flow run 1234-abcd"):
            with rt.workspace_lock(wd):
                pass
        t0 = time.monotonic()
        with rt.workspace_lock(wd, wait=True):  # queues until the holder ends, then runs
            waited = time.monotonic() - t0
        assert waited > 1  # the holder kept it 2 s
    finally:
        if _alive(pid):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def _alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


@pytest.mark.parametrize("k", range(1, 6))
def test_a_run_killed_at_any_point_of_its_overrides_leaves_params_yaml_and_no_overrides(tmp_path, k):
    """The child writes its overrides, 'runs', empties them; it dies at its k-th fsync or rename. params.yaml is
    never written, and the next run (the lock) finds no override left, so it reads the user's values."""
    wd = _workspace(tmp_path)
    seen = wd / "seen"

    def run():
        calls = {"n": 0}

        def counted(real):
            def wrapper(*a, **kw):
                calls["n"] += 1
                if calls["n"] == k:
                    os._exit(9)
                return real(*a, **kw)
            return wrapper

        os.fsync, os.replace = counted(os.fsync), counted(os.replace)
        with rt.workspace_lock(wd), rt.run_overrides(wd, ["train.lr=0.5", "train.epochs=1"]):
            write_run_params(wd / "params.yaml", wd / OVERRIDES_FILE, wd / RUN_PARAMS)
            seen.write_text(str(load_params(wd / RUN_PARAMS).train.lr))

    pid = _in_child(run)
    os.waitpid(pid, 0)
    assert (wd / "params.yaml").read_text() == PARAMS
    with rt.workspace_lock(wd):
        assert read_overrides(wd / OVERRIDES_FILE) == []
        assert write_run_params(wd / "params.yaml", wd / OVERRIDES_FILE, wd / RUN_PARAMS).train.lr == 0.001
    assert (wd / "params.yaml").read_text() == PARAMS
    assert not seen.exists() or seen.read_text() == "0.5"  # the run itself saw its overrides


def test_the_params_stage_merges_overrides_and_writes_the_same_bytes_for_the_same_values(tmp_path):
    wd = _workspace(tmp_path)
    (wd / OVERRIDES_FILE).parent.mkdir()
    (wd / OVERRIDES_FILE).write_text(overrides_text(["train.epochs=1", "clean.alignment.mode=off"]))
    p = write_run_params(wd / "params.yaml", wd / OVERRIDES_FILE, wd / RUN_PARAMS)
    assert (p.train.epochs, p.train.lr, p.clean.alignment.mode) == (1, 0.001, "off")
    first = (wd / RUN_PARAMS).read_bytes()
    write_run_params(wd / "params.yaml", wd / OVERRIDES_FILE, wd / RUN_PARAMS)
    assert (wd / RUN_PARAMS).read_bytes() == first
    assert (wd / "params.yaml").read_text() == PARAMS
    (wd / OVERRIDES_FILE).write_text(overrides_text(["train.no_such_key=1"]))
    with pytest.raises(ConfigError, match="train.no_such_key: unknown key"):
        write_run_params(wd / "params.yaml", wd / OVERRIDES_FILE, wd / RUN_PARAMS)


def test_a_workspace_is_made_only_where_it_destroys_nothing_and_refreshing_changes_no_byte(tmp_path):
    from flows.workspace import demo_profile, make_workspace

    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not an mmp workspace"):
        make_workspace(mine, demo_profile())
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    ws = make_workspace(tmp_path / "demo", demo_profile())
    assert load_params(ws / "params.yaml").train.epochs == demo_profile()["train"]["epochs"]
    before = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}
    make_workspace(ws, demo_profile())  # a second `mmp demo`: nothing rewritten, so DVC skips every stage
    assert {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file() and p.name != "workspace"} == \
        {p: t for p, t in before.items() if p.name != "workspace"}
