"""Fusion-strategy study: how the multimodal embedding an RL policy reads changes its reward, episode length,
stability and compute.

The policy is the generative-VQA answer decoder (``rl_finetune.task=vqa``). Like BLIP's answer decoder it reads
the fusion's (image, question) vector as the first token of its memory, then the image tokens; so the fusion
strategy is the part of its input that differs. For each fusion in :data:`FUSION_KINDS`:

1. train a base model from the same data, seed and params with only ``train.fusion`` changed (and the
   generative-VQA objective on, which trains the answer decoder to read that fusion);
2. fine-tune its answer decoder with the RL algorithm on the exact-match reward, once per seed;
3. record reward (held-out exact match at the start, at the end, selected), episode length, stability (std of
   the final reward over seeds, collapsed runs, KL to the reference) and compute (RL wall time, episodes/s,
   FLOPs per episode counted by torch's FLOP counter over a real rollout, the fusion's share of them).

Output: ``fusion.json`` / ``fusion.md`` (per fusion: mean ± std) and ``fusion.png`` (quality against cost), in
one MLflow parent run ``rl-fusion-study`` with a child run per base-model training and per (fusion, seed).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmplatform.rl.study import mean_std, run_once

log = logging.getLogger(__name__)


def study_train_params(p, fusion: str):
    """``p`` (TrainParams) with ``fusion`` and, if it is off, the generative-VQA objective at weight 0.5."""
    q = p.model_copy(deep=True)
    q.fusion = fusion
    if q.loss_weights.vqa_generative <= 0:
        q.loss_weights.vqa_generative = 0.5
    return q


def subset_dataset(src: Path, dst: Path, n: int | None) -> Path:
    """The first ``n`` training records of ``src`` as a dataset of their own (``src`` itself when ``n`` is None)."""
    from mmplatform.data.dataset import read_dataset, read_manifest, write_dataset

    if n is None:
        return src
    dst = dst.with_name(f"{dst.name}-{read_manifest(src)['content_hash'][:12]}")  # a new source, a new subset
    if not (dst / "manifest.json").is_file():
        write_dataset(dst, read_dataset(src, split="train")[:n], stage="fusion_study_subset")
    return dst


@torch.no_grad()
def episode_flops(model_dir: Path, data_dir: Path, max_length: int, questions: int = 64) -> dict[str, float]:
    """FLOPs per episode of the answer decoder's rollout (fusion + greedy decoding of the answer) over the first
    ``questions`` val questions, counted by ``torch.utils.flop_counter``; and the fusion's part."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmplatform.data.dataset import read_dataset
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.models.tokenizer import load_tokenizer
    from mmplatform.rl.rollout import decode, fused_questions, question_rows
    from mmplatform.train.batches import decode_images

    model = MultimodalModel.load(model_dir).eval()
    tok = load_tokenizer(model_dir / "tokenizer")
    recs = read_dataset(data_dir, split="val")[:questions]
    owner, prompts, _ = question_rows(recs, tok, model)
    rows = torch.arange(min(questions, len(owner)))
    prompts = prompts.rows(rows)
    img_tok = model.image_tokens(decode_images(recs, model.cfg.image_size)[owner[rows]])
    with FlopCounterMode(display=False) as fusion_count:
        fused = fused_questions(model, img_tok, prompts)  # includes the question's text encoder pass
    with FlopCounterMode(display=False) as total:
        fused = fused_questions(model, img_tok, prompts)
        decode(model, model.answer_memory(img_tok, fused), max_length, greedy=True, prompts=prompts)
    n = len(rows)
    return {"flops_per_episode": total.get_total_flops() / n, "fusion_flops_per_episode":
            fusion_count.get_total_flops() / n,
            "fusion_parameters": sum(q.numel() for q in model.fusion.parameters())}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per fusion: mean ± std over seeds of the final/selected held-out reward and its gain, episode length,
    KL; collapsed fraction; compute (RL wall time, episodes/s, FLOPs per episode, training wall time)."""
    out: dict[str, dict[str, float]] = {}
    for fusion in dict.fromkeys(r["fusion"] for r in rows):
        mine = [r for r in rows if r["fusion"] == fusion]
        s: dict[str, float] = {"runs": len(mine)}
        for key in ("heldout_start", "heldout_final", "heldout_selected", "gain", "episode_length", "kl_final",
                    "wall_s", "episodes_per_s"):
            s[f"{key}_mean"], s[f"{key}_std"] = mean_std(mine, key)
        s["collapsed_fraction"] = sum(bool(r["collapsed"]) for r in mine) / len(mine)
        for key in ("flops_per_episode", "fusion_flops_per_episode", "fusion_parameters", "train_wall_s"):
            s[key] = float(mine[0][key])
        out[fusion] = s
    return out


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    head = ("| fusion | runs | held-out exact match: start → final | gain | episode length | collapsed | KL to ref "
            "| RL wall s | episodes/s | MFLOPs/episode (fusion) | fusion params | base training s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {f} | {int(s['runs'])} | {s['heldout_start_mean']:.3f} → {s['heldout_final_mean']:.3f} ± "
             f"{s['heldout_final_std']:.3f} | {s['gain_mean']:+.3f} ± {s['gain_std']:.3f} "
             f"| {s['episode_length_mean']:.2f} | {s['collapsed_fraction']:.2f} | {s['kl_final_mean']:.3f} "
             f"| {s['wall_s_mean']:.0f} | {s['episodes_per_s_mean']:.0f} | {s['flops_per_episode'] / 1e6:.2f} "
             f"({s['fusion_flops_per_episode'] / 1e6:.2f}) | {int(s['fusion_parameters']):,} "
             f"| {s['train_wall_s']:.0f} |" for f, s in summary.items()]
    return head + "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    """Quality against cost: final held-out exact match (mean ± std over seeds) against FLOPs per episode and
    against RL wall time, one point per fusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "flops_per_episode", "MFLOPs per episode"),
                           (axes[1], "wall_s_mean", "RL wall time per run (s)")):
        for fusion, s in summary.items():
            x = s[key] / (1e6 if key == "flops_per_episode" else 1.0)
            ax.errorbar(x, s["heldout_final_mean"], yerr=s["heldout_final_std"], fmt="o", capsize=4, label=fusion)
            ax.annotate(fusion, (x, s["heldout_final_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out exact match after RL")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Fusion strategy: answer quality after RL against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fusion_study(train_params, rl_cfg, fusions: Sequence[str], seeds: Sequence[int], *, train_dir: str | Path,
                 val_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cache_dir: str | Path,
                 runner: Callable[..., list[dict]], train_images: int | None = None,
                 train_fn: Callable[..., list[dict]] | None = None) -> dict[str, Any]:
    """Train a base model per fusion (``train_params`` with ``fusion`` changed), then run ``runner`` (the RL
    algorithm's ``run_<algo>``, ``rl_cfg`` with ``task="vqa"``) once per seed from each. Returns (and writes)
    the per-run rows and the per-fusion summary."""
    import mlflow

    from mmplatform import tracking
    from mmplatform.rl.rollout import read_summary

    if rl_cfg.task != "vqa":
        raise ValueError("the fusion study fine-tunes the answer decoder: rl_finetune.task must be vqa")
    if train_fn is None:
        from mmplatform.train.recipe import run_training as train_fn
    train_dir, val_dir, data_dir, out_dir, cache_dir = (Path(p).resolve() for p in
                                                       (train_dir, val_dir, data_dir, out_dir, cache_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup()
    rows: list[dict[str, Any]] = []
    with mlflow.start_run(run_name="rl-fusion-study", tags={"mmp.study": "rl_fusion"}) as parent:
        mlflow.log_params({"fusions": ",".join(fusions), "seeds": ",".join(map(str, seeds)),
                           "algorithm": rl_cfg.algorithm, "train_images": str(train_images),
                           "train_epochs": train_params.epochs, "rl_steps": rl_cfg.steps})
        train_subset = subset_dataset(train_dir, cache_dir / f"fusion-study-train-{train_images}", train_images)
        for fusion in fusions:
            p = study_train_params(train_params, fusion)
            base = out_dir / "models" / fusion
            with mlflow.start_run(run_name=f"{fusion}-train", nested=True,
                                  tags={"mmp.study": "rl_fusion", "fusion": fusion}) as child:
                mlflow.log_params({k: str(v) for k, v in tracking.flatten(p.model_dump()).items()})
                t0 = time.perf_counter()
                train_fn(p, train_dir=train_subset, val_dir=val_dir, out_dir=base, cache_dir=cache_dir,
                         mlflow_run_id=child.info.run_id)
                train_wall = time.perf_counter() - t0
            cost = episode_flops(base, data_dir, rl_cfg.max_length)
            for seed in seeds:
                run_dir = out_dir / "runs" / f"{fusion}-seed{seed}"
                with mlflow.start_run(run_name=f"{fusion}-seed{seed}", nested=True,
                                      tags={"mmp.study": "rl_fusion", "fusion": fusion}) as child:
                    row = run_once(rl_cfg.model_copy(update={"seed": int(seed)}), base_dir=base, data_dir=data_dir,
                                   out_dir=run_dir, cache_dir=cache_dir, mlflow_run_id=child.info.run_id,
                                   runner=runner)
                    history = json.loads((run_dir / "rl_history.json").read_text())
                    lengths = [h["episode_length_mean"] for h in history if "episode_length_mean" in h]
                    row |= {"gain": row["heldout_final"] - row["heldout_start"],
                            "episode_length": statistics.fmean(lengths) if lengths else None,
                            "episodes_per_s": read_summary(run_dir).get("episodes_per_s_mean"),
                            "train_wall_s": train_wall, **cost}
                    mlflow.log_metrics({k: float(v) for k, v in row.items()
                                        if isinstance(v, int | float) and not isinstance(v, bool)})
                row |= {"fusion": fusion, "seed": int(seed)}
                rows.append(row)
                (out_dir / "fusion_runs.json").write_text(json.dumps({"runs": rows}, indent=2))
                log.info("%s seed %d: held-out exact match %.3f -> %.3f (%.0f s)", fusion, seed,
                         row["heldout_start"], row["heldout_final"], row["wall_s"])
        summary = summarise(rows)
        for fusion, s in summary.items():
            mlflow.log_metrics({f"{fusion}/{k}": v for k, v in s.items()})
        result = {"runs": rows, "summary": summary, "mlflow_parent_run_id": parent.info.run_id}
        (out_dir / "fusion.json").write_text(json.dumps(result, indent=2))
        (out_dir / "fusion.md").write_text(markdown_table(summary))
        plot(summary, out_dir / "fusion.png")
        for name in ("fusion.json", "fusion.md", "fusion.png"):
            mlflow.log_artifact(str(out_dir / name))
    return result
