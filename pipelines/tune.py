"""Stage tune: a Ray Tune sweep over the train section -> ``params/tuned_train.yaml`` and ``reports/tune/``.

Not part of the retraining flow: ``mmp tune`` (or ``dvc repro tune``) runs it. The stage's MLflow run is the
parent of one child run per trial.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.reports import write_history
from mmplatform.train.tune import run_sweep, write_tuned_params
from pipelines._common import run_stage

TUNED = "params/tuned_train.yaml"
REPORTS = Path("reports/tune")


def body(p: Params) -> None:
    with tracking.stage_run("tune", {"tune": p.tune.model_dump(), "train": p.train.model_dump()}) as run:
        tracking.log_dataset("data/processed/augmented", "training")
        tracking.log_dataset("data/processed/clean", "validation")
        result = run_sweep(p.train, p.tune, train_dir="data/processed/augmented", val_dir="data/processed/clean",
                           cache_dir=".cache/mmp", parent_run_id=run.info.run_id)
        write_tuned_params(result, TUNED)
        rows = [{k: v for k, v in t.items() if k != "overrides"} | {f"param.{k}": v for k, v in t["overrides"].items()}
                for t in result.trials]
        write_history(rows, REPORTS / "trials.csv")
        summary = result.summary()
        (REPORTS / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracking.log_stats(summary, "best.json")
        tracking.log_artifact(TUNED)
        tracking.log_artifact(REPORTS / "trials.csv")


def main(argv: list[str] | None = None) -> int:
    return run_stage("tune", body, argv)


if __name__ == "__main__":
    sys.exit(main())
