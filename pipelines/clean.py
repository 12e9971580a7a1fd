"""Stage clean: safe decoding, image checks, exact/near duplicates, caption and alignment filters, split;
dropped records to quarantine with a reason; the data report to MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data import stages
from pipelines._common import run_stage

OUT = "data/processed/clean"


def body(p: Params) -> None:
    with tracking.stage_run("clean", p.clean.model_dump()):
        tracking.log_stats(stages.clean("data/interim/annotated", OUT, p.clean))
        # The report (HTML with its figures inline, and the figures as PNGs) beside the run, for auditors.
        if (Path(OUT) / "report.html").is_file():
            tracking.log_artifact(Path(OUT) / "report.html", "data_report")
            for png in sorted((Path(OUT) / "report_figures").glob("*.png")):
                tracking.log_artifact(png, "data_report")


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", body, argv)


if __name__ == "__main__":
    sys.exit(main())
