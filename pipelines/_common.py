"""Shared plumbing of the stage entry points: params, logging, one-line errors, the MLflow child run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from mmplatform.config import RUN_PARAMS, ConfigError, Params, load_params


def run_stage(stage: str, body: Callable[[Params], None], argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m pipelines.{stage}")
    # The params stage's output: params.yaml with the run's -S overrides (``dvc repro`` makes it first); a stage
    # run by hand before any params stage has no overrides to miss, and reads params.yaml.
    ap.add_argument("--params", default=None)
    args = ap.parse_args(argv)
    if args.params is None:
        args.params = RUN_PARAMS if Path(RUN_PARAMS).is_file() else "params.yaml"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        body(params)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # A bad input is the user's to fix: one line naming what and why, no traceback.
        sys.stderr.write(f"error: {stage}: {exc}\n")
        return 2
    return 0
