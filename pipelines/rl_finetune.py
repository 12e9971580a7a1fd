"""Stage rl_finetune: RL fine-tuning of the captioner of ``models/base`` → ``models/rl``.

The algorithm is ``rl_finetune.algorithm`` in params.yaml: ``scst`` (mmplatform/rl/scst_trainer.py), ``ppo``
(ppo_trainer.py) or ``grpo`` (grpo_trainer.py); the rest of the section is that algorithm's config.
"""

from __future__ import annotations

import sys

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.reports import write_history
from mmplatform.rl import runner
from mmplatform.rl.rollout import read_summary
from pipelines._common import run_stage


def body(p: Params) -> None:
    cfg = p.rl_finetune
    with tracking.stage_run("rl_finetune", cfg.model_dump()) as run:
        history = runner(cfg.algorithm)(cfg, base_dir="models/base", data_dir="data/processed/clean",
                                        out_dir="models/rl", cache_dir=".cache/mmp", mlflow_run_id=run.info.run_id)
        write_history(history, "reports/rl/history.csv")
        selected = next(h for h in history if h["selected"])
        summary = read_summary("models/rl")
        tracking.log_stats({"heldout_reward_start": history[0]["heldout_reward"],
                            "heldout_reward_selected": selected["heldout_reward"], "selected_step": selected["step"],
                            **{k: int(v) if isinstance(v, bool) else v for k, v in summary.items()
                               if k not in ("heldout_reward_start", "selected_step")}})


def main(argv: list[str] | None = None) -> int:
    return run_stage("rl_finetune", body, argv)


if __name__ == "__main__":
    sys.exit(main())
