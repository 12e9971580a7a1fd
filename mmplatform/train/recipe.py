"""Multi-task training recipe: contrastive alignment + image-text matching + captioning.

Runs on Ray Train workers (``TorchTrainer``; data-parallel when ``train.num_workers`` > 1, gradients
all-reduced after each backward, see ``compute.average_gradients``). Stage command:
``dvc repro train`` (= ``python -m pipelines.train``). Read top to bottom:

1. ``setup``   — seed, threads, decode images once, tokenize captions, build the model, resume;
2. ``train``   — per epoch: shuffled batches, one random caption per image, three losses;
3. ``validate``— val losses and val text→image R@1, so the plateau is visible;
4. ``save_checkpoint`` — every epoch, atomically (tmp + rename), model + optimiser + scheduler + RNG +
   epoch; a re-run of the stage after an interruption resumes from it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmplatform.compute import average_gradients
from mmplatform.config import TrainParams
from mmplatform.models.losses import MAX_LOGIT_SCALE
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer
from mmplatform.train.batches import decode_images, foil_table, sample_caption_per_image, tokenize_captions
from mmplatform.train.objectives import model_config, multitask_loss, recall_at_1, trim

log = logging.getLogger(__name__)
CKPT = "last.pt"
VAL_IMAGES = 500  # val images scored each epoch (R@1 among them)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 10% (the usual CLIP/ViT schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    import ray.train

    from mmplatform import tracking
    from mmplatform.data.dataset import read_dataset

    p = TrainParams.model_validate(config["params"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
    seed_everything(p.seed)

    # ---------------------------------------------------------------- setup: data
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    train_recs = read_dataset(config["train_dir"], split="train")
    val_recs = read_dataset(config["val_dir"], split="val")[:VAL_IMAGES]
    image_size = config["image_size"]
    images = decode_images(train_recs, image_size)
    caps = tokenize_captions(tokenizer, train_recs, p.text.max_length)
    rows = caps.per_image(len(train_recs))
    foil_tab = foil_table(tokenizer, caps, p.text.max_length, p.seed) if p.foil_negatives else None
    val_images = decode_images(val_recs, image_size)
    val_caps = tokenize_captions(tokenizer, val_recs, p.text.max_length)
    val_first = torch.tensor([r[0] for r in val_caps.per_image(len(val_recs))])

    # ---------------------------------------------------------------- setup: model, optimiser, resume
    model = MultimodalModel(model_config(p, tokenizer, image_size))
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)
    global_batch = p.batch_size
    local_batch = max(1, global_batch // world)
    steps_per_epoch = len(train_recs) // global_batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p.warmup_steps, steps_per_epoch * p.epochs))
    ckpt_dir = Path(config["ckpt_dir"])
    start_epoch, history = 0, []
    if (ckpt_dir / CKPT).exists():
        state = torch.load(ckpt_dir / CKPT, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("resumed from %s at epoch %d", ckpt_dir / CKPT, start_epoch)
    gen = torch.Generator().manual_seed(p.seed * 1000 + rank)
    run_id = config.get("mlflow_run_id") if rank == 0 else None

    # ---------------------------------------------------------------- train
    for epoch in range(start_epoch, p.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train_recs), generator=torch.Generator().manual_seed(p.seed + epoch))
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            idx = perm[step * global_batch:(step + 1) * global_batch][rank * local_batch:(rank + 1) * local_batch]
            cap_idx = sample_caption_per_image(rows, idx.tolist(), gen)
            ids, mask = trim(caps.ids[cap_idx], caps.mask[cap_idx])
            batch_foils = None
            if foil_tab is not None:
                f_ids, f_mask = trim(foil_tab.ids[cap_idx], foil_tab.mask[cap_idx])
                batch_foils = (f_ids, f_mask, foil_tab.has[cap_idx])
            losses = multitask_loss(model, images[idx], ids, mask, p.loss_weights, gen, foils=batch_foils,
                                    triplet_margin=p.triplet_margin)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            average_gradients(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # OpenCLIP clamps the parameter itself, not only its use
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            gstep = epoch * steps_per_epoch + step
            if step % 20 == 0:
                tracking.log_metrics(run_id, {f"train/{k}": float(v) for k, v in losses.items()}
                                     | {"train/lr": sched.get_last_lr()[0],
                                        "train/logit_scale": float(model.logit_scale.exp())}, gstep)
        # ------------------------------------------------------------ validate
        model.eval()
        with torch.no_grad():
            vl = multitask_loss(model, val_images[:256], val_caps.ids[val_first[:256]],
                                val_caps.mask[val_first[:256]], p.loss_weights, torch.Generator().manual_seed(0))
            r1 = recall_at_1(model, val_images, val_caps.ids[val_first], val_caps.mask[val_first])
        row = {"epoch": epoch, "seconds": time.time() - t0,
               **{f"train_{k}": v / max(1, steps_per_epoch) for k, v in sums.items()},
               **{f"val_{k}": float(v) for k, v in vl.items()}, "val_t2i_recall@1": r1}
        history.append(row)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        tracking.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, epoch)
        # ------------------------------------------------------------ save_checkpoint
        if rank == 0:
            save_checkpoint(ckpt_dir, model, opt, sched, epoch, history)
        _maybe_inject_fault(config, epoch, ckpt_dir)
        # Our own checkpoint (above) is what a restarted worker group or a re-run stage resumes from,
        # so Ray only gets the metrics.
        ray.train.report(dict(row))  # also a barrier across workers

    if rank == 0:
        model.save(config["out_dir"])
        tokenizer.save_pretrained(str(Path(config["out_dir"]) / "tokenizer"))


def _maybe_inject_fault(config: dict[str, Any], epoch: int, ckpt_dir: Path) -> None:
    """Test hook: kill this worker once, after the checkpoint of epoch ``fault_inject_epoch``, so tests
    can check that Ray restarts the worker group and training resumes without losing or repeating a step."""
    marker = ckpt_dir / "fault_injected"
    if config.get("fault_inject_epoch") == epoch and not marker.exists():
        marker.write_text(str(epoch))
        raise RuntimeError(f"injected fault after epoch {epoch}")


def save_checkpoint(ckpt_dir: Path, model, opt, sched, epoch: int, history: list) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (CKPT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch, "history": history}, tmp)
    os.replace(tmp, ckpt_dir / CKPT)  # atomic: a crash leaves the previous checkpoint whole


def read_history(ckpt_dir: str | Path) -> list[dict]:
    path = Path(ckpt_dir) / CKPT
    return torch.load(path, weights_only=False)["history"] if path.exists() else []


def run_training(p: TrainParams, *, train_dir: str | Path, val_dir: str | Path, out_dir: str | Path,
                 cache_dir: str | Path, mlflow_run_id: str | None = None,
                 fault_inject_epoch: int | None = None) -> list[dict]:
    """Driver side: train the tokenizer, pick the resume directory, run the workers, return history.

    The checkpoint directory is keyed by the params and the training data's content hash, so a re-run
    after an interruption resumes, while a change of either starts afresh.
    """
    import hashlib
    import json

    from mmplatform.compute import run_workers
    from mmplatform.data.dataset import read_dataset, read_manifest
    from mmplatform.models.tokenizer import save_tokenizer, train_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_recs = read_dataset(train_dir, columns=["captions", "split", "width"], split="train")
    if len(train_recs) < p.batch_size:
        raise ValueError(f"{train_dir}: {len(train_recs)} training images, fewer than train.batch_size "
                         f"={p.batch_size}")
    tokenizer = train_tokenizer((c for r in train_recs for c in r["captions"]), p.text.vocab_size)
    tok_dir = out_dir / "tokenizer"
    save_tokenizer(tokenizer, tok_dir)
    image_size = int(train_recs[0]["width"])
    key = hashlib.sha256(json.dumps([p.model_dump(), read_manifest(train_dir)["content_hash"]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    ckpt_dir = Path(cache_dir) / f"train-{key}"
    config = {"params": p.model_dump(), "tokenizer_dir": str(tok_dir.resolve()),
              "train_dir": str(Path(train_dir).resolve()), "val_dir": str(Path(val_dir).resolve()),
              "out_dir": str(out_dir.resolve()), "ckpt_dir": str(ckpt_dir.resolve()),
              "image_size": image_size, "mlflow_run_id": mlflow_run_id,
              "fault_inject_epoch": fault_inject_epoch}
    run_workers(train_loop_per_worker, config, num_workers=p.num_workers, cpus_per_worker=p.cpus_per_worker,
                storage_path=Path(cache_dir) / "ray", name=f"train-{key}")
    return read_history(ckpt_dir)

