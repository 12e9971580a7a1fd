"""The RL stability study: each algorithm x several seeds from the same cross-entropy model.

The seed documents judge RL fine-tuning by reward, episode length, policy stability and compute; one run says
little about stability, so this runs ``algorithms x seeds`` (each seed changes the sampling and the batch order,
not the starting model) and reports per algorithm the mean ± std of the final held-out reward and of the test
CIDEr-D of the final policy, the fraction of collapsed runs (a run whose held-out reward ends below its start),
the mean KL to the reference and the wall time. Everything goes to one MLflow parent run with a child run per
(algorithm, seed), and to ``stability.json`` / ``stability.md`` in ``out_dir``.

Command: ``mmp study stability`` (flows/cli.py).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def run_once(cfg, *, base_dir: Path, data_dir: Path, out_dir: Path, cache_dir: Path, mlflow_run_id: str | None,
             runner: Callable[..., list[dict]]) -> dict[str, Any]:
    """One RL run; returns its start / final / selected held-out reward, final KL and wall time."""
    t0 = time.perf_counter()
    history = runner(cfg, base_dir=base_dir, data_dir=data_dir, out_dir=out_dir, cache_dir=cache_dir,
                     mlflow_run_id=mlflow_run_id)
    wall = time.perf_counter() - t0
    start, final = history[0], history[-1]
    selected = next(h for h in history if h.get("selected"))
    return {"heldout_start": start["heldout_reward"], "heldout_final": final["heldout_reward"],
            "heldout_selected": selected["heldout_reward"], "selected_step": selected["step"],
            "kl_final": final.get("kl"), "collapsed": final["heldout_reward"] < start["heldout_reward"],
            "wall_s": wall}


def greedy_cider_d(model_dir: Path, data_dir: Path, split: str = "test", max_length: int = 40) -> float:
    """Test-split CIDEr-D (df from the split's references, as the evaluate stage) of a model's greedy captions."""
    from mmplatform.data.dataset import read_dataset
    from mmplatform.evaluate.captions import CiderD
    from mmplatform.models.captioning import greedy_captions
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.models.tokenizer import load_tokenizer
    from mmplatform.train.batches import decode_images

    model = MultimodalModel.load(model_dir).eval()
    tok = load_tokenizer(Path(model_dir) / "tokenizer")
    recs = read_dataset(data_dir, split=split)
    caps = greedy_captions(model, tok, decode_images(recs, model.cfg.image_size), max_length, 256)
    return float(CiderD().score(caps, [r["captions"] for r in recs]).mean())


def mean_std(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of ``key`` over the rows that have it; NaN, NaN for none."""
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per algorithm: mean and std (sample std; 0 for one run) of the final held-out reward, its relative gain
    over the start, the test CIDEr-D and the KL; the collapsed fraction; the mean wall time."""
    out: dict[str, dict[str, float]] = {}
    for algo in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == algo]
        ms = partial(mean_std, mine)
        gains = [r["heldout_final"] / r["heldout_start"] - 1 for r in mine]
        row: dict[str, float] = {"runs": len(mine)}
        for key in ("heldout_final", "test_cider_d", "kl_final"):
            row[f"{key}_mean"], row[f"{key}_std"] = ms(key)
        row["heldout_gain_mean"] = statistics.fmean(gains)
        row["heldout_gain_std"] = statistics.stdev(gains) if len(gains) > 1 else 0.0
        row["collapsed_fraction"] = sum(bool(r["collapsed"]) for r in mine) / len(mine)
        row["wall_s_mean"] = statistics.fmean(r["wall_s"] for r in mine)
        out[algo] = row
    return out


def markdown_table(summary: dict[str, dict[str, float]], test_cider_xe: float | None) -> str:
    head = ("| algorithm | runs | final held-out reward | gain over start | test CIDEr-D | collapsed | KL to ref "
            "| wall s/run |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {a} | {int(s['runs'])} | {s['heldout_final_mean']:.3f} ± {s['heldout_final_std']:.3f} "
             f"| {100 * s['heldout_gain_mean']:+.1f}% ± {100 * s['heldout_gain_std']:.1f} "
             f"| {s['test_cider_d_mean']:.3f} ± {s['test_cider_d_std']:.3f} | {s['collapsed_fraction']:.2f} "
             f"| {s['kl_final_mean']:.3f} | {s['wall_s_mean']:.0f} |" for a, s in summary.items()]
    foot = f"\nCross-entropy model's test CIDEr-D: {test_cider_xe:.3f}\n" if test_cider_xe is not None else ""
    return head + "\n".join(lines) + "\n" + foot


def stability_study(configs: dict[str, Any], seeds: Sequence[int], *, base_dir: str | Path, data_dir: str | Path,
                    out_dir: str | Path, cache_dir: str | Path,
                    runner_for: Callable[[str], Callable[..., list[dict]]]) -> dict[str, Any]:
    """Run every ``configs[algorithm]`` (an RL config) with each seed from ``base_dir``; ``runner_for(algo)``
    gives the algorithm's ``run_<algo>``. Returns (and writes) the per-run rows and the per-algorithm summary."""
    import mlflow

    from mmplatform import tracking

    base_dir, data_dir, out_dir, cache_dir = (Path(p).resolve() for p in (base_dir, data_dir, out_dir, cache_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup()
    rows: list[dict[str, Any]] = []
    with mlflow.start_run(run_name="rl-stability-study", tags={"mmp.study": "rl_stability"}) as parent:
        mlflow.log_params({"algorithms": ",".join(configs), "seeds": ",".join(map(str, seeds)),
                           "base_dir": str(base_dir)})
        xe = greedy_cider_d(base_dir, data_dir)
        mlflow.log_metric("test_cider_d_xe", xe)
        for algo, cfg in configs.items():
            for seed in seeds:
                run_cfg = cfg.model_copy(update={"seed": int(seed)})
                run_dir = out_dir / "runs" / f"{algo}-seed{seed}"
                with mlflow.start_run(run_name=f"{algo}-seed{seed}", nested=True,
                                      tags={"mmp.study": "rl_stability", "algorithm": algo}) as child:
                    mlflow.log_params({k: str(v) for k, v in tracking.flatten(run_cfg.model_dump()).items()})
                    row = run_once(run_cfg, base_dir=base_dir, data_dir=data_dir, out_dir=run_dir,
                                   cache_dir=cache_dir, mlflow_run_id=child.info.run_id, runner=runner_for(algo))
                    row["test_cider_d"] = greedy_cider_d(run_dir, data_dir)
                    mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)})
                row |= {"algorithm": algo, "seed": int(seed)}
                rows.append(row)
                # Written after every run, so a study cut short still leaves the runs it finished.
                partial = {"test_cider_d_xe": xe, "runs": rows}
                (out_dir / "stability_runs.json").write_text(json.dumps(partial, indent=2))
                log.info("%s seed %d: held-out %.4f -> %.4f, test CIDEr-D %.4f (%.0f s)", algo, seed,
                         row["heldout_start"], row["heldout_final"], row["test_cider_d"], row["wall_s"])
        summary = summarise(rows)
        for algo, s in summary.items():
            mlflow.log_metrics({f"{algo}/{k}": v for k, v in s.items()})
        result = {"test_cider_d_xe": xe, "runs": rows, "summary": summary, "mlflow_parent_run_id": parent.info.run_id}
        (out_dir / "stability.json").write_text(json.dumps(result, indent=2))
        (out_dir / "stability.md").write_text(markdown_table(summary, xe))
        mlflow.log_artifact(str(out_dir / "stability.json"))
        mlflow.log_artifact(str(out_dir / "stability.md"))
    return result
