"""Stage train: multi-task training on Ray Train → ``models/base`` and ``reports/train/history.csv``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.reports import write_history
from mmplatform.train.recipe import run_training, training_summary
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("train", p.train.model_dump(), system_metrics=True) as run:
        tracking.log_dataset("data/processed/augmented", "training")
        tracking.log_dataset("data/processed/clean", "validation")
        history = run_training(p.train, train_dir="data/processed/augmented", val_dir="data/processed/clean",
                               out_dir="models/base", cache_dir=".cache/mmp", mlflow_run_id=run.info.run_id)
        write_history(history, "reports/train/history.csv")
        # when training stopped and why: the RL stage's gain is judged against a model trained to its plateau
        summary = training_summary(history, p.train)
        Path("reports/train/summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracking.log_stats({"epochs": len(history), **{f"final_{k}": v for k, v in history[-1].items()},
                            **{f"summary_{k}": v for k, v in summary.items()}})


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", body, argv)


if __name__ == "__main__":
    sys.exit(main())
