"""Stage register: new version of the registered model; champion alias only if it beats the champion, both
scored by the evaluate stage on this run's test split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmplatform import tracking
from mmplatform.config import Params
from mmplatform.data.dataset import source_domains
from mmplatform.registry import register
from pipelines._common import run_stage


def body(p: Params) -> None:
    with tracking.stage_run("register", p.register_.model_dump()):
        metrics = json.loads(Path("reports/eval/metrics.json").read_text())
        champion = json.loads(Path("reports/eval/champion_metrics.json").read_text())
        # The data domains it learnt from: the clean stage lets only a champion that saw its data judge it.
        domains = json.dumps(sorted(source_domains("data/processed/clean")))
        decision = register("models/rl", metrics, p.register_, champion=champion, out="reports/registry.json",
                            tags=tracking.lineage_tags() | {"data_domains": domains})
        tracking.log_stats({"promoted": int(decision["promoted"]), "version": decision["version"]},
                           "registry.json")


def main(argv: list[str] | None = None) -> int:
    return run_stage("register", body, argv)


if __name__ == "__main__":
    sys.exit(main())
