"""Hyper-parameter sweep over the train section with Ray Tune: ASHA early stopping, one MLflow child run
per trial, the best config written out as a params file.

    mmp tune               # = dvc repro tune = python -m pipelines.tune; params.yaml's tune section

Read top to bottom:

1. ``search_space`` — ``tune.search_space`` (dotted train keys -> a distribution) as Tune samplers;
2. ``trial``        — one Tune function trainable per sampled config: the train stage's own step
   (``recipe.forward_backward``, ``recipe.optimizer_step``, ``recipe.validate``, same data order and
   schedule) in one process, reporting the epoch's row (``val_t2i_recall@1``, the val losses, ...) to
   Tune and to the trial's MLflow child run after every epoch;
3. ``run_sweep``    — the ``Tuner``: random search (seeded), ASHA (Li et al., "A System for Massively
   Parallel Hyperparameter Tuning", MLSys 2020) with ``max_t`` = the epochs per trial, and as many trials
   at once as the CPUs allow; then the trials' MLflow runs get their final status and the best trial is
   picked;
4. ``write_tuned_params`` — the best trial's whole train section, valid ``TrainParams``.

Why not Ray Train's ``TorchTrainer`` inside each trial (the Train V2 + Tune pattern)? Measured here on
Ray 2.60: when ASHA stops such a trial, Tune ends the trial's driver but the Train worker group it started
keeps its CPUs, and on a small machine the next trial's worker group then waits for them forever (its
start times out and is retried). A function trainable is one actor: stopping it frees everything. Trials
are therefore one process each; the best config then trains data-parallel in the train stage.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmplatform.config import TrainParams, TuneParams

log = logging.getLogger(__name__)
TRIAL_STAGE = "tune-trial"  # the mmp.stage tag of a trial's MLflow run


# ----------------------------------------------------------------------------- search space
def search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """``{"lr": {"loguniform": [1e-4, 3e-3]}}`` -> ``{"lr": tune.loguniform(1e-4, 3e-3)}`` (validated
    by ``TuneParams``: known keys, typed values, low < high)."""
    from ray import tune

    make = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, dist in space.items() for kind, values in dist.items()}


def with_overrides(base: TrainParams, overrides: dict[str, Any], epochs: int | None = None) -> TrainParams:
    """The train section with dotted ``overrides`` set (and ``epochs``, when given), validated."""
    raw = base.model_dump()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    if epochs:
        raw["epochs"] = epochs
    return TrainParams.model_validate(raw)


# ----------------------------------------------------------------------------- one trial
def trial_epochs(p: TrainParams, *, train_dir: str | Path, val_dir: str | Path, threads: int,
                 report: Callable[[dict[str, float]], None]) -> None:
    """Train ``p.epochs`` epochs in this process with the train stage's pieces and call ``report`` with each
    epoch's row (as ``recipe.train_loop_per_worker`` reports it). One worker, no checkpoints: a trial that
    dies is a lost trial, not a run to resume."""
    from mmplatform.data.dataset import read_dataset
    from mmplatform.models.heads import build_answer_vocab
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.train import recipe as R
    from mmplatform.train.batches import tokenizer_texts
    from mmplatform.train.objectives import make_tokenizer, model_config

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # as the train loop: bit-identical runs for a seed (recipe's docstring)
        torch.use_deterministic_algorithms(True, warn_only=True)
    R.seed_everything(p.seed)
    autocast = R.autocast_for(device, p.precision)

    train_recs = read_dataset(train_dir, split="train")
    val_recs = read_dataset(val_dir, split="val")[:R.VAL_IMAGES]
    if len(train_recs) < p.batch_size:
        raise ValueError(f"{train_dir}: {len(train_recs)} training images, fewer than train.batch_size={p.batch_size}")
    # Per trial, since train.text.vocab_size may be swept; deterministic, and cheap (word counts); a pretrained
    # text encoder's own tokenizer when train.text.name_or_path is set.
    tokenizer = make_tokenizer(p, tokenizer_texts(train_recs))
    image_size = int(train_recs[0]["width"])
    answers = build_answer_vocab(a for r in train_recs for a in r["answers"]) if p.loss_weights.vqa > 0 else {}
    data = R.load_data(tokenizer, train_recs, image_size, p, answers, foils=p.foil_negatives)
    val = R.load_data(tokenizer, val_recs, image_size, p, answers)
    n_train = len(train_recs)
    del train_recs, val_recs

    model = MultimodalModel(model_config(p, tokenizer, image_size, list(answers))).to(device)
    net = R.MultitaskLoss(model, p)  # what the train stage wraps in DDP; alone, the module itself
    steps_per_epoch = n_train // p.batch_size
    micro = p.batch_size // p.accum_steps
    opt, sched = R.build_optimizer(model, p, steps_per_epoch * p.epochs)
    step_log: list[dict] = []
    for epoch in range(p.epochs):
        net.train()
        t0 = time.time()
        perm = torch.randperm(n_train, generator=R.generator(p.seed, epoch, 0, R.PERMUTATION))
        for step in range(steps_per_epoch):
            idx = perm[step * p.batch_size:(step + 1) * p.batch_size]
            cap, vqa = R.global_draws(data, idx, p.seed, epoch, step, p.vqa_questions_per_image)
            batches = [R.rows_of(data, idx, cap, vqa, j * micro, (j + 1) * micro).to(device)
                       for j in range(p.accum_steps)]
            gens = [R.generator(p.seed, epoch, step, R.LOSS, 0, j, device=device) for j in range(p.accum_steps)]
            losses = R.forward_backward(net, model, batches, p, gens, autocast)
            R.optimizer_step(model, opt, sched)
            step_log.append({"epoch": epoch, "step": step, **losses})
        net.eval()
        report({"epoch": epoch, "seconds": time.time() - t0, **R.epoch_means(step_log, epoch),
                **R.validate(model, val, p, 0, 1, device, autocast)})


def trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: ``config["overrides"]`` is this trial's sample, ``ctx`` what every trial
    shares (``run_sweep``). Tune may stop it after any report (ASHA); the driver then closes its run."""
    from ray import tune

    from mmplatform import tracking

    os.environ["MLFLOW_TRACKING_URI"] = ctx["tracking_uri"]  # Tune runs trials in their own directory
    overrides = config["overrides"]
    p = with_overrides(TrainParams.model_validate(ctx["train"]), overrides, ctx["epochs"])
    trial_id = tune.get_context().get_trial_id()
    run_id = _start_child_run(ctx, trial_id, p, overrides) if ctx.get("parent_run_id") else None

    def report(row: dict[str, float]) -> None:
        if ctx["metric"] not in row:
            raise ValueError(f"tune.metric={ctx['metric']!r} is not a value of the train loop; it reports "
                             f"{', '.join(sorted(row))}")
        tracking.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))
        tune.report(row)

    trial_epochs(p, train_dir=ctx["train_dir"], val_dir=ctx["val_dir"], threads=ctx["threads"], report=report)


def _start_child_run(ctx: dict[str, Any], trial_id: str, p: TrainParams, overrides: dict[str, Any]) -> str:
    """A child of the stage's run: the trial's whole train section as params (comparable with the train
    stage's runs), the sampled keys as a tag."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from mmplatform import tracking

    client = MlflowClient(ctx["tracking_uri"])
    run = client.create_run(ctx["experiment_id"], run_name=f"trial-{trial_id}",
                            tags={"mlflow.parentRunId": ctx["parent_run_id"], "mmp.stage": TRIAL_STAGE,
                                  "tune.trial_id": trial_id, "tune.sampled": ",".join(sorted(overrides))})
    params = [Param(k, str(v)[:6000]) for k, v in tracking.flatten(p.model_dump()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    metric: str
    mode: str
    max_t: int
    max_concurrent: int
    cpus_per_trial: int
    trials: list[dict[str, Any]]  # one row per trial: id, status, epochs, metric, sampled values, run id
    best: dict[str, Any]  # the best trial's row
    best_params: TrainParams  # the base train section with the best trial's values

    def summary(self) -> dict[str, Any]:
        counts = {s: sum(t["status"] == s for t in self.trials) for s in ("completed", "stopped_early", "error")}
        return {"metric": self.metric, "mode": self.mode, f"best_{self.metric}": self.best[self.metric],
                "best_trial": self.best["trial_id"], "best_mlflow_run_id": self.best.get("mlflow_run_id"),
                "best_overrides": self.best["overrides"], "trials": len(self.trials),
                **{f"trials_{k}": v for k, v in counts.items()}, "max_t": self.max_t,
                "max_concurrent": self.max_concurrent, "cpus_per_trial": self.cpus_per_trial}


def concurrency(cpus_per_trial: int) -> tuple[dict[str, float], int]:
    """Per-trial resources and how many trials run at once: ``available CPUs // cpus_per_trial``, at least 1
    (and at most one per GPU where there are GPUs). A trial asking for more CPUs than the cluster has would
    never be placed, so it is given all of them instead; and trials beyond ``max_concurrent`` are not started
    at all, so none sits PENDING holding a place."""
    import ray

    total = ray.cluster_resources()
    cpus_total = max(1, int(total.get("CPU", 1)))
    cpus = min(cpus_per_trial, cpus_total)
    if cpus < cpus_per_trial:
        log.warning("tune: %d CPUs per trial asked, the cluster has %d; using %d", cpus_per_trial, cpus_total, cpus)
    max_concurrent = max(1, int(ray.available_resources().get("CPU", cpus_total)) // cpus)
    resources: dict[str, float] = {"cpu": cpus}
    gpus = int(total.get("GPU", 0))
    if gpus and torch.cuda.is_available():
        resources["gpu"] = 1
        max_concurrent = min(max_concurrent, gpus)
    return resources, max_concurrent


def run_sweep(train: TrainParams, tp: TuneParams, *, train_dir: str | Path, val_dir: str | Path,
              cache_dir: str | Path, parent_run_id: str | None = None) -> SweepResult:
    """Run the sweep; each trial logs to an MLflow child run of ``parent_run_id`` (none without it)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from mmplatform import tracking
    from mmplatform.compute import init_ray

    max_t = tp.epochs or train.epochs
    if tp.grace_period > max_t:
        raise ValueError(f"tune.grace_period={tp.grace_period} exceeds the {max_t} epochs per trial")
    if not tp.search_space:
        raise ValueError("tune.search_space is empty: nothing to sweep")
    init_ray()
    resources, max_concurrent = concurrency(tp.cpus_per_trial or train.cpus_per_worker)
    log.info("tune: %d trials, %d at once, %s each, ASHA max_t=%d grace=%d rf=%d", tp.num_samples,
             max_concurrent, resources, max_t, tp.grace_period, tp.reduction_factor)
    ctx = {"train": train.model_dump(), "epochs": max_t, "metric": tp.metric, "threads": int(resources["cpu"]),
           "train_dir": str(Path(train_dir).resolve()), "val_dir": str(Path(val_dir).resolve()),
           "parent_run_id": parent_run_id, "tracking_uri": tracking.tracking_uri(),
           "experiment_id": tracking.setup() if parent_run_id else None}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, ctx=ctx), resources),
        param_space={"overrides": search_space(tp.search_space)},
        tune_config=tune.TuneConfig(
            # The random/grid search is a SearchGenerator: it takes the concurrency limit itself (Tune
            # ignores TuneConfig.max_concurrent_trials for it). Reused actors keep their imports.
            metric=tp.metric, mode=tp.mode, num_samples=tp.num_samples, reuse_actors=True,
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=tp.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=tp.grace_period,
                                    reduction_factor=tp.reduction_factor)),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((Path(cache_dir) / "tune").resolve()), verbose=1),
    )
    grid = tuner.fit()

    trials = [_trial_row(r, tp.metric, tp.mode, max_t) for r in grid]
    runs = _close_child_runs(parent_run_id, trials) if parent_run_id else {}
    for t in trials:
        t["mlflow_run_id"] = runs.get(t["trial_id"])
    scored = [t for t in trials if t["status"] != "error" and _finite(t[tp.metric])]
    if not scored:
        errors = [t["error"] for t in trials if t.get("error")]
        raise ValueError(f"tune: no trial reported {tp.metric}" + (f"; first error: {errors[0]}" if errors else ""))
    # Ranked on the last epoch's value among the trials that ran all epochs (ASHA lets at least one through):
    # a stopped trial's early value is not what the train stage would end with.
    pool = [t for t in scored if t["status"] == "completed"] or scored
    best = (max if tp.mode == "max" else min)(pool, key=lambda t: t[tp.metric])
    return SweepResult(tp.metric, tp.mode, max_t, max_concurrent, int(resources["cpu"]), trials, best,
                       with_overrides(train, best["overrides"]))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _trial_row(r, metric: str, mode: str, max_t: int) -> dict[str, Any]:
    m = r.metrics or {}
    epochs = int(m.get("training_iteration", 0))
    status = "error" if r.error else "completed" if epochs >= max_t else "stopped_early"
    hist = r.metrics_dataframe
    values = hist[metric].tolist() if hist is not None and metric in hist else []
    best_value = (max if mode == "max" else min)(values) if values else float("nan")
    row = {"trial_id": m.get("trial_id") or Path(r.path).name, "status": status, "epochs": epochs,
           metric: m.get(metric, float("nan")), f"best_{metric}": best_value,
           "overrides": dict(r.config.get("overrides", {}))}
    if r.error:
        row["error"] = str(r.error).strip().splitlines()[-1][:500]
    return row


def _close_child_runs(parent_run_id: str, trials: list[dict[str, Any]]) -> dict[str, str]:
    """Give each trial's run its final status (a trial stopped by ASHA is ended by Tune, mid-run from its
    own point of view): FINISHED, KILLED (stopped early) or FAILED, and a ``tune.status`` tag."""
    from mlflow.tracking import MlflowClient

    from mmplatform import tracking

    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                             f"and tags.`mmp.stage` = '{TRIAL_STAGE}'")
    status = {t["trial_id"]: t["status"] for t in trials}
    runs = {}
    for run in found:
        tid = run.data.tags.get("tune.trial_id", "")
        s = status.get(tid, "error")
        client.set_tag(run.info.run_id, "tune.status", s)
        client.set_terminated(run.info.run_id, {"completed": "FINISHED", "stopped_early": "KILLED"}.get(s, "FAILED"))
        runs[tid] = run.info.run_id
    return runs


# ----------------------------------------------------------------------------- outputs
def write_tuned_params(result: SweepResult, path: str | Path) -> None:
    """A params file whose ``train:`` section is the base train section with the best trial's values: the
    train stage takes it whole (``python -m pipelines.train --params FILE``), or merge it into params.yaml."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b = result.best
    header = [f"# Best trial of the Ray Tune sweep (stage tune): {result.metric} = {b[result.metric]:.4f} "
              f"({result.mode}) after {b['epochs']} epochs, trial {b['trial_id']}, MLflow run "
              f"{b.get('mlflow_run_id') or '-'}.",
              f"# Tuned: {', '.join(f'{k}={v!r}' for k, v in sorted(b['overrides'].items()))}; the rest is "
              "params.yaml's train section.",
              "# Use: python -m pipelines.train --params <this file>, or copy the tuned keys into params.yaml."]
    body = yaml.safe_dump({"train": result.best_params.model_dump(mode="json")}, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + body)
    os.replace(tmp, path)
