"""Stage clean: safe decoding, exact duplicates, caption filters, quarantine with reason, train/val/test split."""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data import stages
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("clean", p.clean.model_dump()):
        tracking.log_stats(stages.clean("data/interim/annotated", "data/processed/clean", p.clean))


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", body, argv)


if __name__ == "__main__":
    sys.exit(main())
