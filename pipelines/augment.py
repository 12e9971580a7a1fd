"""Stage augment: caption-aware horizontal flips and hue-preserving colour jitter of the train split."""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data import stages
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("augment", p.augment.model_dump()):
        tracking.log_stats(stages.augment("data/processed/clean", "data/processed/augmented", p.augment))


def main(argv: list[str] | None = None) -> int:
    return run_stage("augment", body, argv)


if __name__ == "__main__":
    sys.exit(main())
