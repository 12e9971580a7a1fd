"""Benchmark: training throughput and MFU of a ViT-B/16 + BERT-base-sized model in bf16 on one GPU.

    python bench/gpu_bench.py [--batch 128] [--steps 30] [--warmup 5] [--peak-tflops 989]
    python bench/gpu_bench.py --device cpu --tiny        # smoke run of the same code path (no GPU)

The model is ``MultimodalModel`` (the one the train stage builds) at base size: ViT-B/16 at 224 px
(hidden 768, 12 layers, 12 heads), a BERT-base text encoder (768, 12, 12), a 12-layer BERT-base caption
decoder with cross-attention, the default fusion; the step is the train stage's
``objectives.multitask_loss`` (contrastive + ITM with hard negatives + captioning) under
``torch.autocast(bfloat16)``, backward, AdamW. Inputs are random images and random token ids at
``--text-length`` (the cost does not depend on their content).

FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention,
forward and backward); MFU = counted FLOPs × steps/s ÷ the GPU's dense bf16 peak (``--peak-tflops``:
989 for an H100/H200 SXM by the data sheet). Writes ``bench/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mmplatform.config import LossWeights
from mmplatform.models.multimodal import ModelConfig, MultimodalModel
from mmplatform.train.objectives import multitask_loss

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"


def base_config(tiny: bool, text_length: int) -> ModelConfig:
    if tiny:  # same code path at a size a CPU runs in seconds
        return ModelConfig(vocab_size=512, pad_id=0, bos_id=2, eos_id=3, image_size=32, patch_size=8,
                           max_length=text_length)
    return ModelConfig(vocab_size=30522, pad_id=0, bos_id=101, eos_id=102, image_size=224, patch_size=16,
                       vision_hidden=768, vision_layers=12, vision_heads=12, text_hidden=768, text_layers=12,
                       text_heads=12, max_length=text_length, decoder_hidden=768, decoder_layers=12,
                       decoder_heads=12, embed_dim=512)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--text-length", type=int, default=32)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device here; use --device cpu --tiny for a smoke run")
    torch.manual_seed(0)
    cfg = base_config(args.tiny, args.text_length)
    model = MultimodalModel(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    weights = LossWeights()
    b = args.batch
    images = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    ids = torch.randint(5, cfg.vocab_size, (b, args.text_length), device=dev)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.eos_id
    mask = torch.ones_like(ids)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = multitask_loss(model, images, ids, mask, weights, gen)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    secs = time.perf_counter() - t0
    steps_s = args.steps / secs
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "batch": b, "steps": args.steps,
        "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
        "tflop_per_step": flops / 1e12, "samples_per_s": steps_s * b,
        "achieved_tflops": flops * steps_s / 1e12,
        "mfu": flops * steps_s / (args.peak_tflops * 1e12),
        "peak_tflops": args.peak_tflops,
        "max_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201 - a bench script reports on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
