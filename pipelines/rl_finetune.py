"""Stage rl_finetune: SCST on the captioner of ``models/base`` → ``models/rl``."""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.reports import write_history
from mmplatform.rl.scst_trainer import run_scst
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("rl_finetune", p.rl_finetune.model_dump()) as run:
        history = run_scst(p.rl_finetune, base_dir="models/base", data_dir="data/processed/clean",
                           out_dir="models/rl", cache_dir=".cache/mmp", mlflow_run_id=run.info.run_id)
        write_history(history, "reports/rl/history.csv")
        selected = next(h for h in history if h["selected"])
        tracking.log_stats({"heldout_reward_start": history[0]["heldout_reward"],
                            "heldout_reward_selected": selected["heldout_reward"], "selected_step": selected["step"]})


def main(argv: list[str] | None = None) -> int:
    return run_stage("rl_finetune", body, argv)


if __name__ == "__main__":
    sys.exit(main())
