"""Stage ingest: every source in ``ingest.sources`` → ``data/interim/ingested`` (+ quarantine)."""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data import stages
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("ingest", p.ingest.model_dump()):
        tracking.log_stats(stages.ingest(p.ingest, "data/interim/ingested"))


def main(argv: list[str] | None = None) -> int:
    return run_stage("ingest", body, argv)


if __name__ == "__main__":
    sys.exit(main())
