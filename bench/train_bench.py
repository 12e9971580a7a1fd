"""Benchmark: the training step loop in Ray Train (as ``mmplatform.train.recipe`` runs it) vs a plain torch loop.

    python bench/train_bench.py [--steps 40] [--batch 128] [--repeats 3] [--images 4096] [--no-mlflow]

Both paths run the recipe's own pieces (``mmplatform.train.recipe``): its process set-up
(``configure_process``: 2 threads, deterministic CPU kernels, seeds), data (``load_data`` on a seeded
in-memory synthetic set), model, optimiser and schedule (``build_optimizer``), and per step its batch
(``global_draws``, ``rows_of``), ``forward_backward`` (the multi-task loss) and ``optimizer_step`` (clip, step,
logit-scale clamp): step for step the recipe's inner loop, from the same seed.

- A: a plain single-process loop in this interpreter (the loss module called directly).
- B: ``compute.run_workers`` (the recipe's seam: ``TorchTrainer``, 1 worker, ``cpus_per_worker=2``), the loss
  module through ``ray.train.torch.prepare_model`` as the recipe's ``wrap_ddp`` does (with one worker: no DDP
  wrapper) and, unless ``--no-mlflow``, the recipe's MLflow logging every 20 steps to a run in a temporary
  SQLite store.

Only the training steps are timed (after ``--warmup`` untimed steps), inside the process that runs them;
Ray start-up, worker-group start/stop and the per-worker set-up are reported separately as fixed costs.
Runs alternate A, B, A, B ... for ``--repeats``; each B starts Ray and shuts it down, so A runs with no Ray
process about (as a plain loop would), and B pays for Ray's own processes during its steps (their CPU
seconds in the timed window are reported: driver, GCS, raylet, dashboard, agents, Train's actors).
Per step the loop records the *data wait* (end of one optimiser step to the next batch's tensors being
ready: loss bookkeeping, MLflow call, index sampling, caption draw, gather, trim) and the compute (loss,
backward, optimiser step). Writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmplatform.config import TrainParams
from mmplatform.models.heads import build_answer_vocab
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from mmplatform.train.batches import tokenizer_texts
from mmplatform.train.objectives import model_config
from mmplatform.train.recipe import (
    LOSS,
    PERMUTATION,
    MultitaskLoss,
    autocast_for,
    build_optimizer,
    configure_process,
    forward_backward,
    generator,
    global_draws,
    load_data,
    optimizer_step,
    rows_of,
    save_checkpoint,
    seed_everything,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
LOG_EVERY = 20  # the recipe logs train metrics every 20 steps


# ----------------------------------------------------------------------------- shared by A and B
def setup(config: dict[str, Any], wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> dict[str, Any]:
    """The recipe's ``setup``: seed, decode images once, tokenise, model, optimiser, scheduler. ``wrap``: B
    passes the recipe's DDP wrapping (``prepare_model``; with one worker it wraps nothing)."""
    p = TrainParams.model_validate(config["params"])
    seed_everything(p.seed)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    recs = config["records"]
    answers = build_answer_vocab(a for r in recs for a in r["answers"]) if p.loss_weights.vqa > 0 else {}
    data = load_data(tokenizer, recs, config["image_size"], p, answers, foils=p.foil_negatives)
    model = MultimodalModel(model_config(p, tokenizer, config["image_size"], list(answers)))
    net = MultitaskLoss(model, p)
    net = wrap(net) if wrap else net
    steps_per_epoch = len(recs) // p.batch_size
    opt, sched = build_optimizer(model, p, steps_per_epoch * p.epochs)
    return {"p": p, "data": data, "model": model, "net": net, "opt": opt, "sched": sched,
            "steps_per_epoch": steps_per_epoch, "n": len(recs)}


def run_steps(s: dict[str, Any], steps: int, warmup: int, run_id: str | None,
              others_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """The recipe's inner loop (world size 1), instrumented; the first ``warmup`` steps are not counted.

    ``others_cpu`` returns the CPU seconds used so far by the other processes of interest (B: Ray's);
    it is read at the start and end of the timed window.
    """
    from mmplatform import tracking

    p, model, net, opt, sched, data = s["p"], s["model"], s["net"], s["opt"], s["sched"], s["data"]
    spe, batch = s["steps_per_epoch"], p.batch_size
    device = torch.device("cpu")
    autocast = autocast_for(device, p.precision)
    micro_batch = batch // p.accum_steps
    net.train()
    wait, compute, logging_s, losses_seen = [], [], [], []
    perm = None
    t_end = time.perf_counter()
    for gstep in range(warmup + steps):
        if gstep == warmup:
            cpu0, others0, load0 = time.process_time(), others_cpu() if others_cpu else 0.0, os.getloadavg()[0]
            t_end = time.perf_counter()  # the snapshot above is the bench's, not the step's
        epoch, step = divmod(gstep, spe)
        if step == 0:
            perm = torch.randperm(s["n"], generator=generator(p.seed, epoch, 0, PERMUTATION))
        idx = perm[step * batch:(step + 1) * batch]
        cap, vqa = global_draws(data, idx, p.seed, epoch, step, p.vqa_questions_per_image)
        micro = [rows_of(data, idx, cap, vqa, j * micro_batch, (j + 1) * micro_batch) for j in range(p.accum_steps)]
        gens = [generator(p.seed, epoch, step, LOSS, 0, j) for j in range(p.accum_steps)]
        t_ready = time.perf_counter()
        losses = forward_backward(net, model, micro, p, gens, autocast)
        optimizer_step(model, opt, sched)
        t_step = time.perf_counter()
        t_log = time.perf_counter()
        if step % LOG_EVERY == 0:
            tracking.log_metrics(run_id, {f"train/{k}": v for k, v in losses.items()}
                                 | {"train/lr": sched.get_last_lr()[0],
                                    "train/logit_scale": float(model.logit_scale.detach().exp())}, gstep)
        t_logged = time.perf_counter()
        if gstep >= warmup:
            wait.append(t_ready - t_end)  # bookkeeping + logging of the previous step + this batch
            compute.append(t_step - t_ready)
            logging_s.append(t_logged - t_log)  # this step's MLflow call (counted in the next step's wait)
            losses_seen.append(losses["total"])
        t_end = t_logged
    cpu = time.process_time() - cpu0
    others = (others_cpu() if others_cpu else 0.0) - others0
    step_time = [w + c for w, c in zip(wait, compute, strict=True)]
    total = sum(step_time)
    return {"steps": steps, "batch": batch, "seconds": total, "samples_per_s": steps * batch / total,
            "data_wait_s": sum(wait), "data_wait_share": sum(wait) / total, "compute_s": sum(compute),
            "mlflow_log_s": sum(logging_s),
            "median_step_s": statistics.median(step_time),
            "p10_step_s": sorted(step_time)[len(step_time) // 10], "step_s": step_time, "cpu_s": cpu,
            "cpu_ms_per_sample": cpu / (steps * batch) * 1e3, "others_cpu_s": others,
            "loadavg_1min": [load0, os.getloadavg()[0]], "first_loss": losses_seen[0], "last_loss": losses_seen[-1],
            "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def env_info() -> dict[str, Any]:
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"pid": os.getpid(), "cpu_affinity": aff, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"), "torch_threads_at_entry": torch.get_num_threads()}


# ----------------------------------------------------------------------------- A: plain loop
def run_plain(config: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    env = env_info()
    configure_process(TrainParams.model_validate(config["params"]), torch.device("cpu"))
    t0 = time.perf_counter()
    s = setup(config)
    setup_s = time.perf_counter() - t0
    out = run_steps(s, steps, warmup, None)
    return {**out, "setup_s": setup_s, "env": env}


# ----------------------------------------------------------------------------- B: Ray Train worker
class RayTreeCPU:
    """CPU seconds of the driver and every process under it (Ray's GCS, raylet, dashboard, agents, idle
    workers, Train's controller actors), this worker excluded; a process that appears counts in full.
    Each call takes a snapshot; :meth:`by_name` gives the per-process split between the first and last."""

    def __init__(self, driver_pid: int) -> None:
        import psutil

        self.root, self.me = psutil.Process(driver_pid), os.getpid()
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.snaps: list[dict[int, float]] = []

    def __call__(self) -> float:
        import psutil

        for pr in [self.root, *self.root.children(recursive=True)]:
            if pr.pid == self.me:
                continue
            try:
                t = pr.cpu_times()
                self.last[pr.pid] = t.user + t.system
                if pr.pid not in self.names:
                    name = pr.name() if pr.pid != self.root.pid else "driver (trainer.fit)"
                    cmd = " ".join(pr.cmdline()[:3])
                    self.names[pr.pid] = name if name.startswith(("ray::", "driver", "gcs", "raylet")) else cmd[-60:]
            except psutil.Error:
                pass
        self.snaps.append(dict(self.last))
        return sum(self.last.values())

    def by_name(self) -> dict[str, float]:
        if len(self.snaps) < 2:
            return {}
        first, last = self.snaps[0], self.snaps[-1]
        out: dict[str, float] = {}
        for pid, t in last.items():
            name = self.names.get(pid, str(pid))
            out[name] = out.get(name, 0.0) + t - first.get(pid, 0.0)
        return dict(sorted(((k, round(v, 3)) for k, v in out.items() if v > 0.005), key=lambda kv: -kv[1]))


def ray_worker(config: dict[str, Any]) -> None:
    """Runs on the Ray Train worker: the recipe's per-worker preamble, then the same set-up and loop."""
    import ray.train
    import ray.train.torch

    t_enter = time.time()
    if config.get("mlflow_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    env = env_info()
    p = TrainParams.model_validate(config["params"])
    ctx = ray.train.get_context()
    configure_process(p, torch.device("cpu"))  # as train_loop_per_worker does
    t0 = time.perf_counter()
    s = setup(config, wrap=ray.train.torch.prepare_model)  # as the recipe's wrap_ddp does with one worker
    setup_s = time.perf_counter() - t0
    ray_cpu = RayTreeCPU(config["driver_pid"])
    out = run_steps(s, config["steps"], config["warmup"], config.get("mlflow_run_id"), ray_cpu)
    out["others_cpu_by_process"] = ray_cpu.by_name()
    out["worker_niceness"] = os.nice(0)
    # Per-epoch costs of the recipe, timed once here (not in the step figures).
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), {"model": s["model"].state_dict(), "optimizer": s["opt"].state_dict(),
                                  "scheduler": s["sched"].state_dict(), "epoch": 0, "step": 0})
    ckpt_s = time.perf_counter() - t0
    out |= {"setup_s": setup_s, "checkpoint_s": ckpt_s, "env": env, "world_size": ctx.get_world_size(),
            "t_enter": t_enter}
    t0 = time.perf_counter()
    ray.train.report({"bench_ok": 1.0})
    out["report_s"] = time.perf_counter() - t0
    out["t_exit"] = time.time()
    Path(config["result_path"]).write_text(json.dumps(out))


def run_ray(config: dict[str, Any], steps: int, warmup: int, work: Path, i: int) -> dict[str, Any]:
    """Start Ray (as ``run_workers`` would), fit, shut Ray down: A then runs with no Ray processes about."""
    import psutil
    import ray

    from mmplatform.compute import init_ray, run_workers

    p = TrainParams.model_validate(config["params"])
    result_path = work / f"ray-{i}.json"
    cfg = {**config, "steps": steps, "warmup": warmup, "result_path": str(result_path), "driver_pid": os.getpid()}
    t0 = time.perf_counter()
    if config.get("lean_ray"):  # experiment: Ray without its dashboard processes (run_workers then joins it)
        ray.init(num_cpus=max(os.cpu_count() or 1, p.num_workers * p.cpus_per_worker), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    init_ray(max(os.cpu_count() or 1, p.num_workers * p.cpus_per_worker))
    ray_init_s = time.perf_counter() - t0
    t0 = time.time()
    run_workers(ray_worker, cfg, num_workers=p.num_workers, cpus_per_worker=p.cpus_per_worker,
                storage_path=work / "ray", name=f"bench-{i}")
    t1 = time.time()
    ray.shutdown()
    shutdown_s = time.time() - t1
    out = json.loads(result_path.read_text())
    out |= {"fit_s": t1 - t0, "ray_init_s": ray_init_s, "ray_shutdown_s": shutdown_s,
            "ray_processes_left": len(psutil.Process().children(recursive=True))}
    out["worker_start_s"] = out["t_enter"] - t0  # trainer.fit() to our function running on the worker
    out["worker_stop_s"] = t1 - out["t_exit"]  # our function returning to trainer.fit() returning
    return out


# ----------------------------------------------------------------------------- driver
def build_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from mmplatform.data.synthetic import generate_synthetic

    p = TrainParams(batch_size=args.batch)
    if args.vision_layers:
        p.vision.layers = args.vision_layers
    recs = generate_synthetic(seed=args.seed, n_train=args.images, n_val=1, n_test=1, n_test_compositional=0)
    recs = [r for r in recs if r["split"] == "train"]
    tok = train_tokenizer(tokenizer_texts(recs), p.text.vocab_size)
    save_tokenizer(tok, work / "tokenizer")
    answers = build_answer_vocab(a for r in recs for a in r["answers"]) if p.loss_weights.vqa > 0 else {}
    n_params = sum(q.numel() for q in MultimodalModel(model_config(p, tok, int(recs[0]["width"]),
                                                                  list(answers))).parameters())
    return {"params": p.model_dump(), "tokenizer_dir": str(work / "tokenizer"), "records": recs,
            "image_size": int(recs[0]["width"]), "n_params": n_params}


def mlflow_run(work: Path) -> tuple[str, str]:
    """A run in a throw-away SQLite store (the recipe logs to the stage's run by id)."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # before Ray starts, so its workers inherit it as in the stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("train-bench", artifact_location=(work / "mlartifacts").as_uri())
    return uri, client.create_run(exp).info.run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=128, help="batch size (TrainParams default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs, alternating")
    parser.add_argument("--images", type=int, default=4096, help="synthetic training images")
    parser.add_argument("--vision-layers", type=int, default=0, help="override vision.layers (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mlflow", action="store_true", help="B without the recipe's MLflow logging")
    parser.add_argument("--worker-niceness", type=int, default=None,
                        help="set RAY_worker_niceness before Ray starts (Ray's default: 15)")
    parser.add_argument("--lean-ray", action="store_true",
                        help="experiment: Ray without dashboard and log forwarding (not what the recipe does)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        config = build_config(args, work)
        build_s = time.perf_counter() - t0
        uri, run_id = (None, None) if args.no_mlflow else mlflow_run(work)
        config |= {"mlflow_uri": uri, "mlflow_run_id": run_id, "lean_ray": args.lean_ray}
        runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for i in range(args.repeats):
            runs["A"].append(run_plain(config, args.steps, args.warmup))
            print(f"  repeat {i}: A {runs['A'][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            runs["B"].append(run_ray(config, args.steps, args.warmup, work, i))
            print(f"  repeat {i}: B {runs['B'][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)

    def med(path: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[path])

    a, b = med("A", "samples_per_s"), med("B", "samples_per_s")
    pair_ratios = [rb["samples_per_s"] / ra["samples_per_s"] for ra, rb in zip(runs["A"], runs["B"], strict=True)]
    b_no_log = statistics.median(r["steps"] * r["batch"] / (r["seconds"] - r["mlflow_log_s"]) for r in runs["B"])
    summary: dict[str, Any] = {
        "A_samples_per_s": a, "B_samples_per_s": b, "ratio_B_over_A": b / a, "pair_ratios": pair_ratios,
        "ratio_B_without_mlflow_over_A": b_no_log / a, "target": 0.90,
        "A_data_wait_share": med("A", "data_wait_share"), "B_data_wait_share": med("B", "data_wait_share"),
        "B_mlflow_log_s_per_run": med("B", "mlflow_log_s"), "B_checkpoint_s": med("B", "checkpoint_s"),
        "A_cpu_ms_per_sample": med("A", "cpu_ms_per_sample"), "B_cpu_ms_per_sample": med("B", "cpu_ms_per_sample"),
        "B_ray_others_cpu_s": med("B", "others_cpu_s"),
        "B_ray_others_cpu_share": statistics.median(r["others_cpu_s"] / r["seconds"] for r in runs["B"]),
        "ray_init_s": med("B", "ray_init_s"), "ray_shutdown_s": med("B", "ray_shutdown_s"),
        "B_worker_start_s": med("B", "worker_start_s"),
        "B_worker_stop_s": med("B", "worker_stop_s"), "B_fit_s": med("B", "fit_s"),
        "A_setup_s": med("A", "setup_s"), "B_setup_s": med("B", "setup_s"),
        "ratio_by_median_step": med("A", "median_step_s") / med("B", "median_step_s"),
        # On a shared machine the fastest steps are the least disturbed ones (best-of, as timeit does).
        "A_p10_step_s": min(r["p10_step_s"] for r in runs["A"]),
        "B_p10_step_s": min(r["p10_step_s"] for r in runs["B"]),
        "B_threads_in_worker": runs["B"][0]["torch_threads"], "B_worker_env": runs["B"][0]["env"],
    }
    summary["ratio_by_p10_step"] = summary["A_p10_step_s"] / summary["B_p10_step_s"]
    # Same model, data, seed and loss: both paths must see the same losses (up to float reordering).
    summary["max_loss_difference"] = max(abs(ra[k] - rb[k]) for ra in runs["A"] for rb in runs["B"]
                                         for k in ("first_loss", "last_loss"))
    report = {
        "setup": {"images": len(config["records"]), "image_size": config["image_size"], "steps": args.steps,
                  "warmup": args.warmup, "batch": args.batch, "repeats": args.repeats, "seed": args.seed,
                  "model_params": config["n_params"], "train_params": config["params"],
                  "mlflow_logging_in_B": not args.no_mlflow,
                  "worker_niceness": runs["B"][0]["worker_niceness"], "lean_ray": args.lean_ray,
                  "cpu_count": os.cpu_count(),
                  "torch": torch.__version__, "python": platform.python_version(), "dataset_build_s": build_s},
        "summary": summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"{len(config['records'])} synthetic images {config['image_size']}px, model {config['n_params'] / 1e6:.2f}M "
          f"params, batch {args.batch}, {args.steps} timed steps (+{args.warmup} warm-up), "
          f"{args.repeats} x A/B alternating, medians; load average (1 min) during the runs "
          f"{min(x for r in runs['A'] + runs['B'] for x in r['loadavg_1min']):.1f}.."
          f"{max(x for r in runs['A'] + runs['B'] for x in r['loadavg_1min']):.1f}")
    header = (f"{'path':40s} {'samples/s':>10s} {'step ms':>8s} {'p10 ms':>7s} {'data wait':>10s} "
              f"{'CPU ms/sample':>14s} {'Ray procs CPU':>14s} {'threads':>8s}")
    print(header)
    print("-" * len(header))
    for key, name in (("A", "A plain torch loop, 2 threads"), ("B", "B Ray Train, 1 worker x 2 CPU (recipe)")):
        others = f"{summary['B_ray_others_cpu_share']:.1%}" if key == "B" else "-"
        print(f"{name:40s} {med(key, 'samples_per_s'):10.1f} {med(key, 'median_step_s') * 1e3:8.0f} "
              f"{summary[key + '_p10_step_s'] * 1e3:7.0f} "
              f"{med(key, 'data_wait_share'):10.2%} {med(key, 'cpu_ms_per_sample'):14.2f} {others:>14s} "
              f"{runs[key][0]['torch_threads']:8d}")
    print(f"ratio B/A = {b / a:.3f} (per pair: {', '.join(f'{r:.3f}' for r in pair_ratios)}; target >= 0.90); "
          f"by median step time {summary['ratio_by_median_step']:.3f}, by fastest-10% step time "
          f"{summary['ratio_by_p10_step']:.3f}; B/A without the MLflow calls "
          f"{b_no_log / a:.3f}")
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(runs["B"][0]["others_cpu_by_process"].items())[:5])
    print(f"Ray's other processes during B's steps (CPU s, first run, {runs['B'][0]['seconds']:.0f} s of steps): "
          f"{top}; "
          f"worker niceness {runs['B'][0]['worker_niceness']}")
    print(f"same run in both paths: loss {runs['A'][0]['first_loss']:.4f} -> {runs['A'][0]['last_loss']:.4f}, "
          f"largest A/B difference {summary['max_loss_difference']:.1e}")
    print(f"fixed costs per B run: ray.init {summary['ray_init_s']:.1f} s, worker group start "
          f"{summary['B_worker_start_s']:.1f} s, stop {summary['B_worker_stop_s']:.1f} s, ray.shutdown "
          f"{summary['ray_shutdown_s']:.1f} s; set-up (decode, tokenise, model) A {summary['A_setup_s']:.1f} s, "
          f"B {summary['B_setup_s']:.1f} s; checkpoint {summary['B_checkpoint_s']:.2f} s per epoch; "
          f"MLflow calls {summary['B_mlflow_log_s_per_run']:.2f} s per {args.steps} steps")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
