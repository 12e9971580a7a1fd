"""Benchmark: validation quality against training wall-clock seconds, for two or more train recipes side by side.

    python bench/time_to_quality.py [--recipes default,fast] [--budget 600] [--eval-every 60] [--train-images 8000]
    python bench/time_to_quality.py --recipes default,default:lr=0.002,default:batch_size=64 --budget 300

A recipe is a named train section, optionally with ``key=value`` overrides after a colon (dotted keys reach
nested sections: ``loss_weights.itm=1.0``); the names are ``default`` (``params.yaml``'s train section) and
``fast`` (``bench/recipes/fast_train.yaml``: convolutional stem, patch 16, batch 32, 5 epochs).

Every recipe trains with the recipe's own pieces (``mmplatform.train.recipe``: ``configure_process``, ``load_data``,
``global_draws`` / ``rows_of``, ``forward_backward``, ``optimizer_step``; the schedule spans the recipe's
``epochs``) in this process on the built-in synthetic data (seeded; the training images with the augment stage's
flips, as the train stage sees them), until ``--budget`` seconds of training or the recipe's last epoch. Every
``--eval-every`` seconds of training (the clock stops while it evaluates) it scores the val split (500 images,
as the train stage's validation): text->image R@1 (first caption), VQA accuracy overall and per question type
(relations included), ARO attribution / relation / order, and the val losses (captioning, VQA, ...).

Writes ``bench/results/time_to_quality.json`` (every evaluation of every recipe, the machine's CPU model and
flags) and ``docs/img/time_to_quality.png`` (the curves of every recipe, one panel per metric). Measure alone:
on a 2-core machine anything else running is in the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mmplatform.config import TrainParams, apply_overrides
from mmplatform.data.augment import augment_records
from mmplatform.data.synthetic import generate_synthetic
from mmplatform.evaluate.evaluate import aro_metrics
from mmplatform.evaluate.vqa import vqa_metrics
from mmplatform.models.heads import build_answer_vocab
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import train_tokenizer
from mmplatform.train.batches import tokenizer_texts, vqa_batch
from mmplatform.train.objectives import model_config, multitask_loss, recall_at_1
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
)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"default": ROOT / "params.yaml", "fast": ROOT / "bench" / "recipes" / "fast_train.yaml"}
RESULTS = ROOT / "bench" / "results" / "time_to_quality.json"
PLOT = ROOT / "docs" / "img" / "time_to_quality.png"
PANELS = ("val_t2i_recall@1", "vqa_accuracy", "vqa_accuracy_above_below", "vqa_accuracy_left_right",
          "aro_attribution", "val_captioning")


def cpu_info() -> dict[str, str]:
    """The CPU model and the flags that decide kernel speed (timings differ 2-4x between AVX-512 and AVX2 parts)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": platform.processor() or "unknown", "simd": ""}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    return {"model": fields.get("Model name", "unknown").strip(), "cpus": fields.get("CPU(s)", "").strip(),
            "simd": " ".join(simd)}


def recipe_params(spec: str) -> tuple[str, TrainParams]:
    """``name[:key=value,key=value]`` -> (label, train params)."""
    name, _, overrides = spec.partition(":")
    if name not in RECIPES:
        raise SystemExit(f"error: recipe {name!r}: expected one of {sorted(RECIPES)}")
    raw = yaml.safe_load(RECIPES[name].read_text())
    raw = apply_overrides({"train": raw["train"]}, [f"train.{o}" for o in filter(None, overrides.split(","))])
    return spec, TrainParams.model_validate(raw["train"])


def synthetic_data(n_train: int, n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    recs = generate_synthetic(seed=seed, n_train=n_train, n_val=n_val, n_test=0, n_test_compositional=0)
    recs = augment_records(recs, seed=0, flip_fraction=0.25)  # what the train stage reads
    return [r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "val"]


@torch.no_grad()
def evaluate(model: MultimodalModel, tokenizer, val, val_recs: list[dict], p: TrainParams, autocast) -> dict:
    model.eval()
    first = torch.tensor([r[0] for r in val.cap_rows])
    out: dict[str, float] = {}
    with autocast:
        out["val_t2i_recall@1"] = recall_at_1(model, val.images, val.caps.ids[first], val.caps.mask[first])
        n = min(256, len(val_recs))
        vqa = vqa_batch(val.qa, val.q_rows, range(n), torch.Generator().manual_seed(0), p.vqa_questions_per_image) \
            if val.qa else None
        b = rows_of(val, torch.arange(n), first[:n], vqa, 0, n)
        losses = multitask_loss(model, b.images, b.ids, b.mask, p.loss_weights, torch.Generator().manual_seed(0),
                                vqa=b.vqa)
        out |= {f"val_{k}": float(v) for k, v in losses.items()}
        out |= {k: v for k, v in vqa_metrics(model, tokenizer, val_recs, images=val.images).items()
                if k.startswith("vqa_accuracy")}
        out |= {k: v for k, v in aro_metrics(model, tokenizer, val_recs, val.images).items() if not k.endswith("_n")}
    model.train()
    return out


def run_recipe(label: str, p: TrainParams, train_recs: list[dict], val_recs: list[dict], budget: float,
               eval_every: float, tokenizer) -> dict[str, Any]:
    device = torch.device("cpu")
    configure_process(p, device)
    autocast = autocast_for(device, p.precision)
    answers = build_answer_vocab(a for r in train_recs for a in r["answers"])
    image_size = int(train_recs[0]["width"])
    data = load_data(tokenizer, train_recs, image_size, p, answers, foils=p.foil_negatives)
    val = load_data(tokenizer, val_recs, image_size, p, answers)
    model = MultimodalModel(model_config(p, tokenizer, image_size, list(answers)))
    steps_per_epoch = len(train_recs) // p.batch_size
    opt, sched = build_optimizer(model, p, steps_per_epoch * p.epochs)
    model.train()
    points: list[dict[str, Any]] = []
    clock, samples, next_eval = 0.0, 0, eval_every
    flops_per_step = None
    print(f"[{label}] {steps_per_epoch} steps/epoch x {p.epochs} epochs, budget {budget:.0f} s", flush=True)
    for epoch in range(p.epochs):
        perm = torch.randperm(len(train_recs), generator=generator(p.seed, epoch, 0, PERMUTATION))
        for step in range(steps_per_epoch):
            idx = perm[step * p.batch_size:(step + 1) * p.batch_size]
            cap, vqa = global_draws(data, idx, p.seed, epoch, step, p.vqa_questions_per_image)
            micro_batch = p.batch_size // p.accum_steps
            micro = [rows_of(data, idx, cap, vqa, j * micro_batch, (j + 1) * micro_batch) for j in range(p.accum_steps)]
            gens = [generator(p.seed, epoch, step, LOSS, 0, j) for j in range(p.accum_steps)]
            if flops_per_step is None:
                flops_per_step = count_flops(model, micro, p, gens, autocast)
                opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            losses = forward_backward(model_loss(model, p), model, micro, p, gens, autocast)
            optimizer_step(model, opt, sched)
            clock += time.perf_counter() - t0
            samples += p.batch_size
            if clock >= next_eval or clock >= budget:
                row = {"seconds": round(clock, 2), "epoch": epoch + (step + 1) / steps_per_epoch,
                       "samples": samples, "train_total": losses["total"],
                       **evaluate(model, tokenizer, val, val_recs, p, autocast)}
                points.append(row)
                print(f"[{label}] {clock:7.1f}s ep {row['epoch']:.2f} R@1 {row['val_t2i_recall@1']:.3f} "
                      f"vqa {row.get('vqa_accuracy', 0):.3f} rel {row.get('vqa_accuracy_above_below', 0):.3f}/"
                      f"{row.get('vqa_accuracy_left_right', 0):.3f} aro {row.get('aro_attribution', 0):.3f}/"
                      f"{row.get('aro_relation', 0):.3f}/{row.get('aro_order', 0):.3f} "
                      f"cap {row.get('val_captioning', 0):.3f}", flush=True)
                next_eval = clock + eval_every
            if clock >= budget:
                break
        if clock >= budget:
            break
    return {"label": label, "params": p.model_dump(), "steps_per_epoch": steps_per_epoch,
            "flops_per_step": flops_per_step, "samples_per_s": samples / max(clock, 1e-9),
            "achieved_flops": (flops_per_step or 0) * (samples / p.batch_size) / max(clock, 1e-9),
            "points": points}


def model_loss(model: MultimodalModel, p: TrainParams) -> MultitaskLoss:
    return MultitaskLoss(model, p)


def count_flops(model, micro, p, gens, autocast) -> float:
    """FLOPs of one optimiser step (forward + backward) by torch's FlopCounterMode (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward_backward(model_loss(model, p), model, micro, p, gens, autocast)
    return float(counter.get_total_flops())


def plot(results: list[dict], path: Path, cpu: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, PANELS, strict=True):
        for r in results:
            xs = [pt["seconds"] / 60 for pt in r["points"] if key in pt]
            ys = [pt[key] for pt in r["points"] if key in pt]
            ax.plot(xs, ys, marker=".", label=r["label"])
        ax.set_title(key)
        ax.set_xlabel("training minutes")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"validation quality against training time ({cpu['model']}, {cpu.get('cpus', '?')} CPUs; "
                 f"{cpu['simd'] or 'no AVX'})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default,fast",
                    help="comma-separated name[:key=value,...]; a comma before a recipe name starts the next")
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per recipe")
    ap.add_argument("--eval-every", type=float, default=60.0, help="training seconds between evaluations")
    ap.add_argument("--train-images", type=int, default=8000)
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    args = ap.parse_args(argv)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu.get('cpus', '?')} CPUs), SIMD: {cpu['simd']}", flush=True)
    recipes = [recipe_params(s) for s in _split_specs(args.recipes)]
    train_recs, val_recs = synthetic_data(args.train_images, args.val_images)
    results = []
    for label, p in recipes:
        tokenizer = train_tokenizer(tokenizer_texts(train_recs), p.text.vocab_size)
        results.append(run_recipe(label, p, train_recs, val_recs, args.budget, args.eval_every, tokenizer))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "train_images": len(train_recs), "budget_s": args.budget,
                                    "results": results}, indent=1))
    plot(results, args.plot, cpu)
    for r in results:
        print(f"{r['label']}: {r['samples_per_s']:.1f} samples/s, {r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
              f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s achieved")
    return 0


def _split_specs(text: str) -> list[str]:
    """Split ``a,b:x=1,y=2,c`` into recipes: a comma starts a new recipe only before a known recipe name."""
    out: list[str] = []
    for part in text.split(","):
        if out and (part.split(":")[0] not in RECIPES or "=" in part.split(":")[0]):
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    sys.exit(main())
