"""Stage evaluate: retrieval and captioning metrics on the test split → ``reports/eval``."""

from __future__ import annotations

import sys

import mlflow

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.evaluate.evaluate import evaluate
from pipelines._common import run_stage

OUT = "reports/eval"


def body(p: Params) -> None:
    with tracking.stage_run("evaluate", p.evaluate.model_dump()):
        metrics = evaluate("models/base", "models/rl", "data/processed/clean", OUT, split=p.evaluate.split,
                           max_length=p.evaluate.max_length, grid_images=p.evaluate.grid_images,
                           batch_size=p.evaluate.batch_size, rerank_top_k=p.evaluate.rerank_top_k)
        tracking.log_stats(metrics, "metrics.json")
        mlflow.log_artifacts(OUT, "eval")


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", body, argv)


if __name__ == "__main__":
    sys.exit(main())
