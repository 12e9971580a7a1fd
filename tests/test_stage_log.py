"""What a person watching `mmp run` sees of a stage's output: the stage's own lines, not DVC's hints and skips
or Ray Train's echo of each result (those stay in the stage's log file)."""

from __future__ import annotations

import pytest

from flows.retrain import is_noise


@pytest.mark.parametrize("line", [
    "Stage 'ingest' didn't change, skipping",
    "Updating lock file 'dvc.lock'",
    "Use `dvc push` to send your updates to remote storage.",
    "To track the changes with git, run:",
    "\tgit add dvc.lock",
    "To enable auto staging, run:",
    "\tdvc config core.autostage true",
    "",
    "\x1b[36m(RayTrainWorker pid=28565)\x1b[0m Reporting training result 3: TrainingReport(checkpoint=None, metrics={",
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026/12/07 12:14:02 INFO mlflow.system_metrics.system_metrics_monitor: Stopping system metrics monitoring.",
    "Downloading artifacts:  17%|█▋        | 1/6 [00:00<00:00, 15363.75it/s]",
    "2026-12-07 12:40:40,073     INFO train_fn_utils.py:255 -- Reported metrics: {'heldout_reward': 0.05}",
])
def test_noise_is_kept_out_of_the_run_log(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", [
    "Running stage 'train':",
    "> python -m pipelines.train",
    "\x1b[36m(RayTrainWorker pid=28565)\x1b[0m epoch 3: {'epoch': 3, 'seconds': 3.6658, 'train_contrastive': 2.5398}",
    "2026-12-07 12:14:39,917 register INFO mmplatform.registry: register: no champion yet",
    "error: clean: data/interim/annotated: not a dataset",
    "Traceback (most recent call last):",
])
def test_the_stage_s_own_lines_are_shown(line):
    assert not is_noise(line)
