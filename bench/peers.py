"""Run code in the peers venv (CleanVision, imagededup, scikit-image...) from a benchmark.

Peer tools are never imported by the project: their pinned versions conflict with ours (torch,
numpy, pandas). A benchmark writes a small script, runs it with the peers' interpreter and reads back
JSON. The interpreter is ``--peers-python``, else ``$MMP_PEERS_PYTHON``, else
``bench/.venv-peers/bin/python`` (created by ``make bench-peers``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_PEERS_PYTHON = Path(__file__).resolve().parent / ".venv-peers" / "bin" / "python"


def peers_python(explicit: str | None = None) -> str:
    """The peers interpreter to use; exits with a one-line message when it does not exist."""
    path = explicit or os.environ.get("MMP_PEERS_PYTHON") or str(DEFAULT_PEERS_PYTHON)
    if not Path(path).exists():
        sys.exit(f"peers python not found: {path} (run `make bench-peers`, or pass --peers-python / "
                 "set MMP_PEERS_PYTHON)")
    return path


def run_peers(python: str, code: str, args: dict[str, Any], *, timeout: float = 3600,
              env: dict[str, str] | None = None) -> Any:
    """Run ``code`` with ``python``. The script gets ``ARGS`` (a dict, from JSON) and must assign its
    JSON-serialisable answer to ``RESULT``. Its stdout/stderr are passed through to ours (stderr)."""
    with tempfile.TemporaryDirectory(prefix="mmp-peers-") as tmp:
        script = Path(tmp) / "script.py"
        out = Path(tmp) / "result.json"
        script.write_text(
            "import json, sys\n"
            f"ARGS = json.loads({json.dumps(json.dumps(args))})\n"
            "RESULT = None\n"
            f"{code}\n"
            f"with open({str(out)!r}, 'w') as _f:\n"
            "    json.dump(RESULT, _f)\n"
        )
        proc = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise RuntimeError(f"peers script failed with exit code {proc.returncode}")
        return json.loads(out.read_text())
