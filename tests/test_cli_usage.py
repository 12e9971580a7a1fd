"""Every wrong use of `mmp` gets one line naming the argument and the reason, exit 2, and no traceback; help and
version answer as a user expects. Run through the console script's entry point, `flows.cli.main`."""

from __future__ import annotations

import pytest

from flows.cli import main


@pytest.mark.parametrize(("argv", "needle"), [
    (["nosuch"], "No such command 'nosuch'"),
    (["flow"], "mmp flow: Missing argument 'name'"),
    (["data", "report"], "mmp data report: Missing argument 'path'"),
    (["data", "ingest"], "mmp data ingest: Missing option '--format'"),
    (["ui", "--port", "abc"], "mmp ui: Invalid value for '--port'"),
    (["run", "--no-such-option"], "No such option: --no-such-option"),
    (["data", "ingest", "--format", "parquet", "--out", "x"], "--format parquet: Input should be 'synthetic'"),
    (["serve", "--cron", "every day"], "--cron 'every day': Invalid cron string"),
    (["flow", "nosuch"], "flow 'nosuch': expected data, train or retrain"),
])
def test_a_wrong_use_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("argv", [[], ["data"], ["study"]])
def test_a_command_group_alone_prints_its_help(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: mmp") and "Commands:" in err and "Traceback" not in err


def test_version_and_short_help(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mmp {version('mmplatform')}"
    assert main(["-h"]) == 0
    assert "Usage: mmp" in capsys.readouterr().out
    assert main(["data", "clean", "-h"]) == 0
    assert "-S drop_issues=[dark,blurry]" in capsys.readouterr().out  # printed as written, not as markup


@pytest.mark.slow
def test_a_local_api_that_does_not_start_in_time_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    env = dict(os.environ, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", PREFECT_HOME=str(tmp_path / ".p"))
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "run", "--workdir", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "error: Prefect's local API did not start within 0 s" in r.stderr
