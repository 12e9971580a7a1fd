"""Stage evaluate: retrieval and captioning metrics on the test split → ``reports/eval``; the current champion
scored on the same split → ``reports/eval/champion_metrics.json`` (the register stage's gate compares both)."""

from __future__ import annotations

import sys

import mlflow

from mmplatform import tracking
from mmplatform.champion import champion_model_dir
from mmplatform.config import Params
from mmplatform.evaluate.evaluate import evaluate, evaluate_champion
from pipelines._common import run_stage

OUT = "reports/eval"


def body(p: Params) -> None:
    with tracking.stage_run("evaluate", p.evaluate.model_dump()):
        metrics = evaluate("models/base", "models/rl", "data/processed/clean", OUT, split=p.evaluate.split,
                           max_length=p.evaluate.max_length, grid_images=p.evaluate.grid_images,
                           batch_size=p.evaluate.batch_size, rerank_top_k=p.evaluate.rerank_top_k)
        tracking.log_stats(metrics, "metrics.json")
        champion = evaluate_champion(champion_model_dir(p.register_.model_name, p.register_.alias),
                                     "data/processed/clean", f"{OUT}/champion_metrics.json",
                                     challenger=("models/rl", metrics), split=p.evaluate.split,
                                     max_length=p.evaluate.max_length, batch_size=p.evaluate.batch_size,
                                     rerank_top_k=p.evaluate.rerank_top_k)
        tracking.log_stats({f"champion.{k}": v for k, v in champion["metrics"].items()}, "champion_metrics.json")
        mlflow.log_artifacts(OUT, "eval")


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", body, argv)


if __name__ == "__main__":
    sys.exit(main())
