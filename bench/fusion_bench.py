"""Benchmark: pairing text rows with images by index (``img_index``) vs repeating the images, in one run.

    python bench/fusion_bench.py [--steps 12] [--repeats 3] [--images 1024]

Training pairs each image with ``vqa_questions_per_image`` (4) questions and each ITM anchor with two captions.
Repeating the image tokens once per pair makes the fusion project the same image again for every pair; with
``img_index`` the image-only work (the cross-attention's key/value projections, the multimodal transformer's
input projection) runs once per image.

- *fusion*: forward + backward of each fusion kind at the VQA term's shapes (128 images x 4 questions,
  65 image tokens, 14 question tokens, width 128), median of ``--repeats`` x 5 calls, per-row vs indexed.
- *step*: the recipe's training step (``train_bench``'s plain loop: batch, multi-task loss, backward,
  optimiser step) at default params on seeded synthetic data; A runs the fusion on repeated images
  (what the recipe did before), B as the recipe does now. A and B alternate ``--repeats`` times in this process.

Same weights and inputs on both sides; the bench checks the fused vectors agree. Writes
``bench/results/fusion.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import build_config, env_info, run_steps, setup  # noqa: E402

from mmplatform.models.fusion import FUSION_KINDS, build_fusion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fusion.json"


def fusion_case(kind: str, repeats: int, images: int = 128, per_image: int = 4, ni: int = 65, nt: int = 14,
                dim: int = 128) -> dict[str, float]:
    torch.manual_seed(0)
    f = build_fusion(kind, dim, dim, dim).train()
    img = torch.randn(images, ni, dim, requires_grad=True)
    txt = torch.randn(images * per_image, nt, dim, requires_grad=True)
    mask = torch.ones(images * per_image, nt)
    index = torch.arange(images).repeat_interleave(per_image)
    runs = {"per_row": lambda: f(img[index], txt, mask), "indexed": lambda: f(img, txt, mask, img_index=index)}
    with torch.no_grad():
        diff = float((runs["per_row"]() - runs["indexed"]()).abs().max())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            for _ in range(5):
                t = time.perf_counter()
                fn().square().mean().backward()
                times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["per_row"]), statistics.median(times["indexed"])
    return {"per_row_ms": a * 1e3, "indexed_ms": b * 1e3, "speedup": a / b, "max_abs_diff": diff}


class PerRowFusion(torch.nn.Module):
    """The fusion as the recipe called it before ``img_index``: the images repeated, one per pair. The same
    parameter tensors (the optimiser already holds them), so gradient clipping sees the same set."""

    def __init__(self, fusion: torch.nn.Module):
        super().__init__()
        self.inner = fusion
        self.out_dim = fusion.out_dim

    def forward(self, img_tokens, txt_tokens, txt_mask, img_index=None):
        return self.inner(img_tokens if img_index is None else img_tokens[img_index], txt_tokens, txt_mask)


def step_case(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config(SimpleNamespace(batch=128, vision_layers=0, seed=0, images=args.images), Path(tmp))
        results: dict[str, list[dict]] = {"A_per_row": [], "B_indexed": []}
        for _ in range(args.repeats):
            for name in results:
                s = setup(config)
                if name == "A_per_row":
                    s["model"].fusion = PerRowFusion(s["model"].fusion)
                results[name].append(run_steps(s, args.steps, args.warmup, None))
    a = statistics.median(r["samples_per_s"] for r in results["A_per_row"])
    b = statistics.median(r["samples_per_s"] for r in results["B_indexed"])
    same = [(ra["first_loss"], rb["first_loss"], ra["last_loss"], rb["last_loss"])
            for ra, rb in zip(results["A_per_row"], results["B_indexed"], strict=True)]
    return {"A_samples_per_s": a, "B_samples_per_s": b, "speedup": b / a, "losses_first_last": same,
            "runs": {k: [{m: r[m] for m in ("samples_per_s", "median_step_s", "cpu_ms_per_sample")} for r in v]
                     for k, v in results.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out: dict[str, object] = {"env": env_info(), "fusion": {}}
    print("fusion kind             per-row ms  indexed ms  speed-up  max |diff|")
    for kind in FUSION_KINDS:
        r = fusion_case(kind, args.repeats)
        out["fusion"][kind] = r
        print(f"{kind:<22} {r['per_row_ms']:>10.1f}  {r['indexed_ms']:>10.1f}  {r['speedup']:>7.2f}x  "
              f"{r['max_abs_diff']:.1e}")
    step = step_case(args)
    out["step"] = step
    print(f"training step, samples/s: per-row {step['A_samples_per_s']:.1f}, indexed {step['B_samples_per_s']:.1f}, "
          f"speed-up {step['speedup']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
