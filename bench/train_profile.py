"""Benchmark: where a training step's time goes, and how close it runs to the machine's matmul peak.

    python bench/train_profile.py [--recipes default,fast] [--steps 5] [--threads 2]

For each recipe (names as in ``bench/time_to_quality.py``: ``default``, ``fast``, optionally ``name:key=value,...``):

- FLOPs of one optimiser step (torch's FlopCounterMode: matmuls and attention), the step's median time over
  ``--steps`` timed steps after one warm-up step, and the achieved FLOP/s against the peak below;
- the time of each module's forward (vision, text, fusion, decoder, heads; torch profiler, forward only) and the
  top operators by self time (forward and backward);
- the cost of each objective: ms per sample with that objective switched off, so the difference is what it
  costs (NegCLIP foils counted as one).

The peak is fp32 ``torch.mm`` of 2048 x 2048 matrices with ``--threads`` threads, the best of 5: what this CPU's
kernels reach on large, well-shaped matrices. Writes ``bench/results/train_profile.json`` and prints a table.
Measure alone: on a 2-core machine anything else running is in the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mmplatform.config import TrainParams, apply_overrides
from mmplatform.models.heads import build_answer_vocab
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import tokenizer_texts
from mmplatform.train.objectives import model_config
from mmplatform.train.recipe import (
    LOSS,
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
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_quality import _split_specs, cpu_info, recipe_params, synthetic_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_profile.json"
MODULES = ("vision", "text", "fusion", "decoder", "memory_proj", "itm_head", "vqa_head", "mlm_head")
OBJECTIVES = {"contrastive+foils": "foil_negatives=false", "itm": "loss_weights.itm=0",
              "vqa": "loss_weights.vqa=0", "captioning": "loss_weights.captioning=0"}


def matmul_peak(threads: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Setup:
    """The recipe's model, optimiser and a fixed sequence of batches of the built-in data."""

    def __init__(self, p: TrainParams, recs: list[dict], tokenizer, threads: int):
        p = p.model_copy(update={"threads_per_worker": threads})
        configure_process(p, torch.device("cpu"))
        self.p = p
        answers = build_answer_vocab(a for r in recs for a in r["answers"])
        self.data = load_data(tokenizer, recs, int(recs[0]["width"]), p, answers, foils=p.foil_negatives)
        self.model = MultimodalModel(model_config(p, tokenizer, int(recs[0]["width"]), list(answers)))
        self.opt, self.sched = build_optimizer(self.model, p, 1000)
        self.autocast = autocast_for(torch.device("cpu"), p.precision)
        self.n = len(recs)

    def batch(self, step: int):
        p = self.p
        idx = torch.arange(step * p.batch_size, (step + 1) * p.batch_size) % self.n
        cap, vqa = global_draws(self.data, idx, p.seed, 0, step, p.vqa_questions_per_image)
        micro = p.batch_size // p.accum_steps
        return ([rows_of(self.data, idx, cap, vqa, j * micro, (j + 1) * micro) for j in range(p.accum_steps)],
                [generator(p.seed, 0, step, LOSS, 0, j) for j in range(p.accum_steps)])

    def step(self, step: int) -> float:
        micro, gens = self.batch(step)
        t0 = time.perf_counter()
        forward_backward(MultitaskLoss(self.model, self.p), self.model, micro, self.p, gens, self.autocast)
        optimizer_step(self.model, self.opt, self.sched)
        return time.perf_counter() - t0

    def flops(self) -> float:
        micro, gens = self.batch(0)
        with FlopCounterMode(display=False) as counter:
            forward_backward(MultitaskLoss(self.model, self.p), self.model, micro, self.p, gens, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def median_step(self, steps: int) -> float:
        self.step(0)
        return statistics.median(self.step(s) for s in range(1, steps + 1))


def module_times(s: Setup, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """ms per step of each module's forward, and the top operators by self time (ms per step)."""
    hooks = []
    for name in MODULES:
        mod = getattr(s.model, name, None)
        if mod is None:
            continue
        for method in ("forward", "tokens"):  # the encoders are called through .tokens
            if hasattr(mod, method):
                hooks.append((mod, method, getattr(mod, method)))
                setattr(mod, method, _labelled(f"module:{name}", getattr(mod, method)))
    s.step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, steps + 1):
            s.step(i)
    for mod, method, fn in hooks:
        setattr(mod, method, fn)
    events = prof.key_averages()
    modules = {e.key.removeprefix("module:"): e.cpu_time_total / steps / 1e3 for e in events
               if e.key.startswith("module:")}
    ops = sorted(((e.key, e.self_cpu_time_total / steps / 1e3) for e in events if not e.key.startswith("module:")),
                 key=lambda kv: -kv[1])[:12]
    return modules, ops


def _labelled(label: str, fn):
    def call(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return call


def objective_costs(p: TrainParams, recs, tokenizer, threads: int, steps: int, full_ms: float) -> dict[str, float]:
    out = {}
    for name, override in OBJECTIVES.items():
        q = TrainParams.model_validate(apply_overrides({"train": p.model_dump()}, [f"train.{override}"])["train"])
        if q == p:
            continue
        ms = Setup(q, recs, tokenizer, threads).median_step(steps) * 1e3 / p.batch_size
        out[name] = full_ms - ms
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default,fast")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cpu = cpu_info()
    peak = matmul_peak(args.threads)
    print(f"CPU: {cpu['model']} ({cpu.get('cpus', '?')} CPUs), SIMD: {cpu['simd']}; fp32 matmul peak with "
          f"{args.threads} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)
    recs, _ = synthetic_data(args.images, 0)
    results = []
    for spec in _split_specs(args.recipes):
        label, p = recipe_params(spec)
        tokenizer = train_tokenizer(tokenizer_texts(recs), p.text.vocab_size)
        s = Setup(p, recs, tokenizer, args.threads)
        flops = s.flops()
        step_s = s.median_step(args.steps)
        modules, ops = module_times(s, 3)
        ms = step_s * 1e3 / p.batch_size
        row = {"recipe": label, "batch_size": p.batch_size, "gflop_per_step": flops / 1e9,
               "gflop_per_sample": flops / 1e9 / p.batch_size, "step_s": step_s, "ms_per_sample": ms,
               "achieved_gflops": flops / step_s / 1e9, "share_of_peak": flops / step_s / peak,
               "module_forward_ms": modules, "top_ops_ms": ops,
               "objective_ms_per_sample": objective_costs(p, recs, tokenizer, args.threads, args.steps, ms)}
        results.append(row)
        print(f"\n{label}: {row['gflop_per_step']:.1f} GFLOP/step ({row['gflop_per_sample']:.2f}/sample), "
              f"{step_s:.2f} s/step ({ms:.2f} ms/sample), {row['achieved_gflops']:.1f} GFLOP/s = "
              f"{100 * row['share_of_peak']:.0f} % of peak")
        print("  module forward ms/step: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      sorted(modules.items(), key=lambda kv: -kv[1])))
        print("  top ops ms/step: " + ", ".join(f"{k} {v:.0f}" for k, v in ops[:8]))
        print("  objective ms/sample: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                   row["objective_ms_per_sample"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "matmul_peak_gflops": peak / 1e9,
                                    "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
