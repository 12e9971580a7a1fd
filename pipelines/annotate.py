"""Stage annotate: merge annotations from ``annotate.annotations_dir``; caption agreement statistics."""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data import stages
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("annotate", p.annotate.model_dump()):
        tracking.log_stats(stages.annotate("data/interim/ingested", "data/interim/annotated",
                                           p.annotate.annotations_dir, min_agreement=p.annotate.min_agreement))


def main(argv: list[str] | None = None) -> int:
    return run_stage("annotate", body, argv)


if __name__ == "__main__":
    sys.exit(main())
