"""Multi-task training on Ray Train: contrastive + ITM + captioning + VQA (+ MLM, triplet, NegCLIP foils).

    dvc repro train        # = python -m pipelines.train: run_training() on params.yaml's train section

``run_training`` (the driver) trains the tokenizer, picks the checkpoint directory and runs
``train_loop_per_worker`` on ``train.num_workers`` Ray Train workers (``compute.run_workers``: a
``TorchTrainer``; gloo on CPU, NCCL on GPU; ``FailureConfig`` restarts a failed worker group;
``train.num_workers: 0`` runs the same loop in Ray Train's local mode, in this process). Each worker reads
top to bottom:

1. ``setup``    — deterministic kernels, threads, data decoded and tokenised once, the model wrapped in DDP
   (:class:`MultitaskLoss`: one ``forward`` is the whole loss), optimiser, scheduler, resume;
2. ``train``    — per optimiser step: the global batch of (seed, epoch, step), this worker's rows, forward
   and backward (:func:`forward_backward`, two passes when ``accum_steps`` > 1), clip, step, clamp;
3. ``save_checkpoint`` — every ``checkpoint_every_steps`` steps and at each epoch end: model, optimiser,
   scheduler, every worker's RNG state, the data position (epoch, next step) and the per-step log, written
   atomically (tmp + rename) by rank 0;
4. ``validate`` — each epoch, data-parallel like training: val losses and val text->image R@1.

Data order. The epoch permutation and each step's caption and question draws depend only on (seed, epoch,
step) and the position in the global batch, never on the rank or the number of workers: worker r trains
on rows [r B/W, (r+1) B/W) of the global batch B, the contrastive loss gathers the features of every
worker (with gradients, OpenCLIP's local loss) and DDP averages the gradients, so W workers take the step
one worker takes, up to float rounding and ITM, whose hard negatives are mined within each worker's rows
(``tests/test_distributed.py`` states the tolerances), and a resumed run sees the batches it would have
seen. Draws inside the loss (ITM hard negatives, MLM masks) come from a generator keyed by (seed, epoch,
step, rank, micro-batch), so they too are a function of the position, not of what ran before.

Precision. ``train.precision: bf16`` autocasts the forward passes (CPU or CUDA); weights, gradients and
AdamW's moments stay fp32, and so do the contrastive logits (``objectives.set_level_losses``).

Determinism. On CPU a fixed seed and thread count give bit-identical runs. What made them differ: the
tokenizer's trainer broke ties in hash order (fixed in ``models/tokenizer.py``), and the backward of
advanced indexing (ITM's negative rows ``img_tok[neg]``, VQA's ``img_tok[pos]``) accumulates with
``index_put_``, whose multi-threaded CPU kernel adds in a varying order: losses drifted in the 7th digit
after a few steps and the drift grows. ``torch.use_deterministic_algorithms`` makes that kernel sort first.

Fault tolerance. A worker that fails makes Ray restart the worker group (``FailureConfig``); every worker
then resumes from the last checkpoint, as a re-run of the stage after the driver died does. The
checkpoint directory is keyed by the params (not the worker layout, which does not change the data order),
the training data's content hash and the library's code (a code change starts afresh); on a multi-node
cluster it must be on shared storage, as Ray's ``storage_path`` must. ``journal.jsonl`` beside it records
every step as it is taken, retaken ones too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle  # for its exception class only: checkpoints load with weights_only=True
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmplatform.config import TrainParams
from mmplatform.models.heads import build_answer_vocab
from mmplatform.models.losses import MAX_LOGIT_SCALE
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer
from mmplatform.train.batches import (
    CaptionTable,
    FoilTable,
    QuestionTable,
    VQABatch,
    decode_images,
    foil_table,
    sample_caption_per_image,
    tokenize_captions,
    tokenize_questions,
    vqa_batch,
)
from mmplatform.train.objectives import (
    SET_LEVEL,
    FeatureCache,
    accumulation_total,
    check_encoders,
    contrastive_features,
    make_tokenizer,
    model_config,
    multitask_loss,
    recall_at_1,
    trim,
)

log = logging.getLogger(__name__)
CKPT = "last.pt"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the mmplatform package, for code_fingerprint
PREVIOUS_CKPT = "previous.pt"  # the checkpoint before last.pt, kept for when last.pt does not load
JOURNAL = "journal.jsonl"  # one line per optimiser step as it is taken, recomputed steps included
VAL_IMAGES = 500  # val images scored each epoch (R@1 among them)
VAL_LOSS_IMAGES = 256  # of which the val losses use the first ones
LOG_EVERY = 20  # steps between MLflow train metrics
# Random streams, each keyed by its position (step_seed)
PERMUTATION, CAPTIONS, QUESTIONS, LOSS = range(4)


# ----------------------------------------------------------------------------- randomness and schedule
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, epoch: int, step: int, stream: int, rank: int = 0, micro: int = 0) -> int:
    """The seed of one random stream at one position. NumPy's ``SeedSequence`` hashes the whole key, so
    neighbouring keys give unrelated streams (``seed + epoch`` would make seed 1 epoch 0 = seed 0 epoch 1)."""
    key = [seed, epoch, step, stream, rank, micro]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(*key))


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 10% (the usual CLIP/ViT schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def rng_state() -> dict[str, Any]:
    """The global generators (nothing in our loop draws from them, but anything a model adds, such as
    dropout, would); our own generators are derived from the position and need no state. Tensors, numbers and
    tuples only, so the checkpoint loads with ``torch.load(weights_only=True)`` (no pickle)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """What batches are cut from, decoded and tokenised once per worker."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    caps: CaptionTable
    cap_rows: list[list[int]]  # caption indices of each image
    foils: FoilTable | None
    qa: QuestionTable | None
    q_rows: list[list[int]] | None


def load_data(tokenizer, records: list[dict], image_size: int, p: TrainParams, answers: dict[str, int],
              foils: bool = False) -> TrainData:
    caps = tokenize_captions(tokenizer, records, p.text.max_length)
    qa = tokenize_questions(tokenizer, records, p.text.max_length, answers) if answers else None
    return TrainData(decode_images(records, image_size), caps, caps.per_image(len(records)),
                     foil_table(tokenizer, caps, p.text.max_length, p.seed) if foils else None,
                     qa, qa.per_image(len(records)) if qa else None)


@dataclass
class Batch:
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    foils: tuple | None = None  # (ids, mask, has): one NegCLIP foil per caption
    vqa: VQABatch | None = None

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        vqa = VQABatch(**{f.name: move(getattr(self.vqa, f.name)) for f in dataclasses.fields(self.vqa)}) \
            if self.vqa is not None else None
        return Batch(move(self.images), move(self.ids), move(self.mask),
                     tuple(move(x) for x in self.foils) if self.foils else None, vqa)


def global_draws(d: TrainData, idx: torch.Tensor, seed: int, epoch: int, step: int, questions_per_image: int = 1
                 ) -> tuple[torch.Tensor, VQABatch | None]:
    """One caption and ``questions_per_image`` questions per image of the *global* batch, drawn from generators
    keyed by the position: every worker draws the same, whatever the number of workers."""
    cap = sample_caption_per_image(d.cap_rows, idx.tolist(), generator(seed, epoch, step, CAPTIONS))
    vqa = (vqa_batch(d.qa, d.q_rows, idx.tolist(), generator(seed, epoch, step, QUESTIONS), questions_per_image)
           if d.qa else None)
    return cap, vqa


def rows_of(d: TrainData, idx: torch.Tensor, cap: torch.Tensor, vqa: VQABatch | None, lo: int, hi: int) -> Batch:
    """Rows ``lo:hi`` of a global batch as tensors, padding trimmed to these rows."""
    cap = cap[lo:hi]
    ids, mask = trim(d.caps.ids[cap], d.caps.mask[cap])
    foils = None
    if d.foils is not None:
        f_ids, f_mask = trim(d.foils.ids[cap], d.foils.mask[cap])
        foils = (f_ids, f_mask, d.foils.has[cap])
    if vqa is not None:  # every VQABatch field is per question: keep this slice's questions
        keep = (vqa.pos >= lo) & (vqa.pos < hi)
        part = {f.name: getattr(vqa, f.name)[keep] for f in dataclasses.fields(vqa)}
        part["pos"] = part["pos"] - lo
        for name in [k for k in part if k.endswith("ids") and k.replace("ids", "mask") in part]:
            if bool(keep.any()):  # token tensors (question, answer): padding trimmed to these rows
                part[name], part[name.replace("ids", "mask")] = trim(part[name], part[name.replace("ids", "mask")])
        vqa = VQABatch(**part)
    return Batch(d.images[idx[lo:hi]], ids, mask, foils, vqa)


# ----------------------------------------------------------------------------- one step
class MultitaskLoss(nn.Module):
    """The model with its loss as ``forward``. DDP (Li et al., VLDB 2020) prepares its gradient hooks when
    its module's ``forward`` runs; our loss calls several sub-modules (encoders, fusion, heads, decoder),
    so the module DDP wraps is the loss. ``model`` is what is saved."""

    def __init__(self, model: MultimodalModel, p: TrainParams):
        super().__init__()
        self.model = model
        self.p = p

    def forward(self, b: Batch, gen: torch.Generator, cache: FeatureCache | None = None) -> dict[str, torch.Tensor]:
        p = self.p
        return multitask_loss(self.model, b.images, b.ids, b.mask, p.loss_weights, gen, foils=b.foils,
                              triplet_margin=p.triplet_margin, vqa=b.vqa, mlm_probability=p.mlm_probability,
                              cache=cache)


def wrap_ddp(module: MultitaskLoss, probe: Batch, device: torch.device) -> nn.Module:
    """DDP across the Ray Train workers (``prepare_model``: gloo on CPU, NCCL on GPU; with one worker the
    module itself). No buffer sync in forward: the model's buffers are constants (pixel mean/std)."""
    import ray.train
    import ray.train.torch

    module = module.to(device)
    unused = unused_parameters(module, probe.to(device)) if ray.train.get_context().get_world_size() > 1 else []
    if unused:
        log.info("parameters without a gradient at these loss weights (DDP will not wait for them): %s",
                 sorted({n.split(".")[1] for n in unused}))
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={
        "find_unused_parameters": bool(unused), "forward_sync_buffers": False})


def unused_parameters(module: MultitaskLoss, b: Batch) -> list[str]:
    """Parameters one step's loss does not reach, e.g. a head weighted 0. DDP waits for a gradient from
    every parameter unless told (``find_unused_parameters``), and telling it costs a traversal of the
    graph every step, so look once (one forward and backward, gradients then cleared)."""
    module(b, torch.Generator(device=b.images.device).manual_seed(0))["total"].backward()
    names = [n for n, q in module.named_parameters() if q.requires_grad and q.grad is None]
    module.zero_grad(set_to_none=True)
    return names


def forward_backward(net: nn.Module, model: MultimodalModel, micro: list[Batch], p: TrainParams,
                     gens: list[torch.Generator], autocast) -> dict[str, float]:
    """Forward and backward of one optimiser step over its micro-batches; returns the step's losses.

    One micro-batch: the plain step. Several: OpenCLIP's two passes (``objectives.FeatureCache``): embed
    every micro-batch without a graph, then per micro-batch recompute with gradients and score against the
    whole accumulated batch; gradients accumulate locally (``no_sync``) and DDP all-reduces once, in the
    last pass, which is also the one that gives the logit scale its gradient."""
    k = len(micro)
    cache = None
    if k > 1:
        with autocast:
            cache = FeatureCache.from_parts([contrastive_features(model, b.images, b.ids, b.mask, b.foils)
                                             for b in micro])
    logged: dict[str, float] = {}
    start = 0
    for j, b in enumerate(micro):
        last = j == k - 1
        with nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with autocast:
                losses = net(b, gens[j], cache.at(start, scale_grad=last) if cache is not None else None)
            accumulation_total(losses, p.loss_weights, k).backward()
        start += len(b.images)
        for name, v in losses.items():
            if name != "total":  # set-level terms already span the whole batch; per-sample ones: mean
                v = float(v.detach())
                logged[name] = v if name in SET_LEVEL else logged.get(name, 0.0) + v / k
    logged["total"] = sum(getattr(p.loss_weights, name) * v for name, v in logged.items())
    return logged


def optimizer_step(model: MultimodalModel, opt: torch.optim.Optimizer, sched) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # OpenCLIP clamps the parameter itself, not only its use
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def build_optimizer(model: MultimodalModel, p: TrainParams, total_steps: int):
    # Only what trains: a frozen or partially tuned encoder's fixed weights get no optimiser state (and AdamW's
    # decoupled weight decay would otherwise still shrink them).
    trainable = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in trainable if q.ndim >= 2]  # no weight decay on biases, norms, the scale
    no_decay = [q for q in trainable if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p.warmup_steps, total_steps))


def configure_process(p: TrainParams, device: torch.device) -> None:
    """Threads, deterministic kernels on CPU (see the module docstring; on GPU speed wins, and cuBLAS
    would need a fixed workspace), global seeds."""
    torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN (to expose reads of uninitialised memory); no
        # kernel we run reads them, and the fill took 15 % of a training step on CPU (torch profiler, fill_).
        torch.utils.deterministic.fill_uninitialized_memory = False
    seed_everything(p.seed)


def autocast_for(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    import ray.train
    import ray.train.torch

    from mmplatform import tracking
    from mmplatform.data.dataset import read_dataset

    # ---------------------------------------------------------------- setup: process
    p = TrainParams.model_validate(config["params"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_process(p, device)
    autocast = autocast_for(device, p.precision)

    # ---------------------------------------------------------------- setup: data
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    train_recs = read_dataset(config["train_dir"], split="train")
    val_recs = read_dataset(config["val_dir"], split="val")[:VAL_IMAGES]
    image_size = config["image_size"]
    # VQA: the answer vocabulary is built from the training answers and saved in the model config
    use_vqa = p.loss_weights.vqa > 0 or p.loss_weights.vqa_generative > 0
    answers = build_answer_vocab(a for r in train_recs for a in r["answers"]) if use_vqa else {}
    data = load_data(tokenizer, train_recs, image_size, p, answers, foils=p.foil_negatives)
    val = load_data(tokenizer, val_recs, image_size, p, answers)
    n_train = len(train_recs)
    del train_recs, val_recs

    # ---------------------------------------------------------------- setup: model, optimiser, resume
    global_batch = p.batch_size
    local_batch = global_batch // world
    micro_batch = local_batch // p.accum_steps
    steps_per_epoch = n_train // global_batch
    model = MultimodalModel(model_config(p, tokenizer, image_size, list(answers)))
    ckpt_dir = Path(config["ckpt_dir"])
    state = read_checkpoint(ckpt_dir)  # None on a fresh start
    if state is not None:
        model.load_state_dict(state["model"])
    first = torch.arange(global_batch)
    probe = rows_of(data, first, *global_draws(data, first, p.seed, 0, 0, p.vqa_questions_per_image), 0, micro_batch)
    net = wrap_ddp(MultitaskLoss(model, p), probe, device)  # DDP also broadcasts rank 0's weights
    opt, sched = build_optimizer(model, p, steps_per_epoch * p.epochs)
    start_epoch, start_step, history, step_log = 0, 0, [], []
    best: dict[str, Any] = {"epoch": -1, "value": math.inf, "model": None}  # early stopping's best epoch
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start_epoch, start_step = state["epoch"], state["step"]
        history, step_log = state["history"], state["steps"]
        best = state.get("best", best)
        log.info("resumed from %s at epoch %d step %d", ckpt_dir / CKPT, start_epoch, start_step)
    run_id = config.get("mlflow_run_id") if rank == 0 else None

    def checkpoint(epoch: int, step: int) -> None:
        """Position = the next step to run. Every rank takes part (RNG states, barrier); rank 0 writes."""
        rngs = gather_objects(rng_state(), world)
        if rank == 0:
            save_checkpoint(ckpt_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "rng": rngs, "epoch": epoch,
                                       "step": step, "history": history, "steps": step_log,
                                       "best": best, "world_size": world})
        barrier(world)  # nobody runs ahead of a checkpoint that is still being written

    # ---------------------------------------------------------------- train
    for epoch in range(start_epoch, p.epochs):
        if plateau_reached(history, best, p):  # a resumed run that had already stopped
            break
        net.train()
        t0 = time.time()
        perm = torch.randperm(n_train, generator=generator(p.seed, epoch, 0, PERMUTATION))
        for step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
            gstep = epoch * steps_per_epoch + step
            _maybe_inject_fault(config, gstep, rank, world, ckpt_dir)
            idx = perm[step * global_batch:(step + 1) * global_batch]
            cap, vqa = global_draws(data, idx, p.seed, epoch, step, p.vqa_questions_per_image)
            lo = rank * local_batch
            micro = [rows_of(data, idx, cap, vqa, lo + j * micro_batch, lo + (j + 1) * micro_batch).to(device)
                     for j in range(p.accum_steps)]
            gens = [generator(p.seed, epoch, step, LOSS, rank, j, device=device) for j in range(p.accum_steps)]
            losses = forward_backward(net, model, micro, p, gens, autocast)
            optimizer_step(model, opt, sched)
            # Each worker's contrastive term is its rows' share of the global loss; the mean over workers
            # is the global batch's loss, what one worker would log.
            losses = all_reduce_mean(losses, world, device)
            step_log.append({"epoch": epoch, "step": step, **losses})
            if rank == 0:
                append_journal(ckpt_dir, step_log[-1])
            if step % LOG_EVERY == 0:
                tracking.log_metrics(run_id, {f"train/{k}": v for k, v in losses.items()}
                                     | {"train/lr": sched.get_last_lr()[0],
                                        "train/logit_scale": float(model.logit_scale.detach().exp())}, gstep)
            if (gstep + 1) % p.checkpoint_every_steps == 0 and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1)
        # ------------------------------------------------------------ validate
        net.eval()
        row = {"epoch": epoch, "seconds": time.time() - t0, **epoch_means(step_log, epoch),
               **validate(model, val, p, rank, world, device, autocast)}
        history.append(row)
        log.info("%s", progress_line(history, p, steps_per_epoch * global_batch, best))
        if row[p.early_stopping_metric] < best["value"]:
            # every rank sees the same all-reduced val losses, so all agree on the best epoch and on stopping
            best = {"epoch": epoch, "value": row[p.early_stopping_metric],
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        tracking.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, epoch)
        # ------------------------------------------------------------ save_checkpoint
        checkpoint(epoch + 1, 0)
        # Our own checkpoint (above) is what a restarted worker group or a re-run stage resumes from,
        # so Ray only gets the metrics.
        ray.train.report(dict(row))  # also a barrier across workers

        if plateau_reached(history, best, p):
            log.info("early stopping after epoch %d: %s has not improved for %d epochs since epoch %d (%.4f)",
                     epoch, p.early_stopping_metric, p.early_stopping_patience, best["epoch"], best["value"])
            break

    if p.early_stopping_patience and best["model"] is not None:
        model.load_state_dict(best["model"])  # the best epoch's weights, as Keras' restore_best_weights
    if rank == 0:
        model.save(config["out_dir"])
        tokenizer.save_pretrained(str(Path(config["out_dir"]) / "tokenizer"))


def progress_line(history: list[dict], p: TrainParams, samples_per_epoch: int, best: dict[str, Any]) -> str:
    """One line per epoch for the person watching: where the run is, how fast, when it ends, how it is doing
    (every figure of the epoch goes to MLflow and history.csv)."""
    row, metric = history[-1], p.early_stopping_metric
    seconds = [h["seconds"] for h in history]
    left = (p.epochs - row["epoch"] - 1) * sum(seconds) / len(seconds)
    h, m, sec = int(left // 3600), int(left % 3600 // 60), int(left % 60)
    eta = f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"
    best_note = "" if best["value"] == float("inf") or row[metric] < best["value"] else \
        f", best {best['value']:.4f} at epoch {best['epoch'] + 1}"
    return (f"epoch {row['epoch'] + 1}/{p.epochs}: {row['seconds']:.0f} s, {samples_per_epoch / row['seconds']:.0f} "
            f"samples/s, ETA {eta}; train_total {row.get('train_total', float('nan')):.4f}, {metric} "
            f"{row[metric]:.4f}{best_note}")


def plateau_reached(history: list[dict], best: dict[str, Any], p: TrainParams) -> bool:
    """Early stopping: the monitored val loss has not improved for ``early_stopping_patience`` epochs."""
    return bool(p.early_stopping_patience and history
                and history[-1]["epoch"] - best["epoch"] >= p.early_stopping_patience)


def training_summary(history: list[dict], p: TrainParams) -> dict[str, Any]:
    """What the train stage records about when training stopped: the best epoch of the monitored val loss,
    the epochs run, and whether it stopped on a plateau (patience ran out) or at ``epochs``."""
    if not history:
        return {"epochs_run": 0}
    monitored = loss_plateau(history, p.early_stopping_metric, p.early_stopping_patience)
    return {"epochs_run": len(history), "max_epochs": p.epochs, "metric": p.early_stopping_metric,
            "patience": p.early_stopping_patience, **monitored,
            "last_value": float(history[-1][p.early_stopping_metric]),
            "weights": "best" if p.early_stopping_patience else "last",
            "val_losses": val_loss_plateaus(history, p.early_stopping_patience or DEFAULT_PATIENCE)}


DEFAULT_PATIENCE = 3  # what "stopped improving" means for the per-loss records when early stopping is off


def loss_plateau(history: list[dict], key: str, patience: int) -> dict[str, Any]:
    """``key``'s best (first lowest) epoch and value, and whether ``patience`` epochs have passed since without
    a new minimum (never with patience 0: nothing is watched)."""
    rows = [h for h in history if h.get(key) is not None]
    best = min(rows, key=lambda h: h[key])
    return {"best_epoch": best["epoch"], "best_value": float(best[key]),
            "plateau": bool(patience) and history[-1]["epoch"] - best["epoch"] >= patience}


def val_loss_plateaus(history: list[dict], patience: int) -> dict[str, dict[str, Any]]:
    """Per val loss (each objective on its own): its best epoch, and whether it then went ``patience`` epochs
    without a new minimum. The run stops on one metric (``val_total``), but each head plateaus at its own time:
    the captioner's loss (what RL starts from) can stop improving while VQA is still learning, and that
    is worth recording rather than stopping for."""
    return {key: loss_plateau(history, key, patience)
            for key in history[-1] if key.startswith("val_") and key != "val_total" and "recall" not in key}


def epoch_means(step_log: list[dict], epoch: int) -> dict[str, float]:
    """Mean train losses of an epoch, from the per-step log (so a resumed epoch counts every step once)."""
    rows = [r for r in step_log if r["epoch"] == epoch]
    keys = [k for k in rows[0] if k not in ("epoch", "step")] if rows else []
    return {f"train_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}


@torch.no_grad()
def validate(model: MultimodalModel, val: TrainData, p: TrainParams, rank: int, world: int,
             device: torch.device, autocast) -> dict[str, float]:
    """Val losses on the first ``VAL_LOSS_IMAGES`` images (first caption each), split across workers as a
    training batch is (the contrastive term then sees them all), averaged over workers; R@1 on rank 0."""
    n = min(VAL_LOSS_IMAGES, len(val.images)) // world * world
    idx = torch.arange(n)
    first = torch.tensor([r[0] for r in val.cap_rows])
    vqa = (vqa_batch(val.qa, val.q_rows, range(n), torch.Generator().manual_seed(0), p.vqa_questions_per_image)
           if val.qa else None)
    b = rows_of(val, idx, first[:n], vqa, rank * n // world, (rank + 1) * n // world).to(device)
    with autocast:
        vl = multitask_loss(model, b.images, b.ids, b.mask, p.loss_weights,
                            torch.Generator(device=device).manual_seed(rank), vqa=b.vqa,
                            mlm_probability=p.mlm_probability)
    vl = all_reduce_mean({k: float(v) for k, v in vl.items()}, world, device)
    out = {f"val_{k}": v for k, v in vl.items()}
    if rank == 0:
        with autocast:
            out["val_t2i_recall@1"] = recall_at_1(model, val.images.to(device), val.caps.ids[first].to(device),
                                                  val.caps.mask[first].to(device))
    return out


# ----------------------------------------------------------------------------- collectives (no-ops alone)
def gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist(), strict=True))


# ----------------------------------------------------------------------------- checkpoints
def _maybe_inject_fault(config: dict[str, Any], gstep: int, rank: int, world: int, ckpt_dir: Path) -> None:
    """Test hook: the last worker raises once, before optimiser step ``fault_inject_step`` (counted over
    epochs), so tests can check that Ray restarts the worker group and training resumes from the last
    checkpoint without losing or repeating a step."""
    marker = ckpt_dir / "fault_injected"
    if config.get("fault_inject_step") == gstep and rank == world - 1 and not marker.exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(gstep))
        raise RuntimeError(f"injected fault on rank {rank} before step {gstep}")


def append_journal(ckpt_dir: Path, row: dict[str, Any]) -> None:
    """Append-only, unlike the checkpoint's step log: after a failure it shows the steps that were lost
    and taken again."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(ckpt_dir / JOURNAL, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_journal(ckpt_dir: str | Path) -> list[dict]:
    path = Path(ckpt_dir) / JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file, fsync it, keep the current checkpoint as the previous one and
    rename the new one in: a kill at any point leaves a whole checkpoint (the new, the current or the
    previous one) that :func:`read_checkpoint` finds."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (CKPT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if (ckpt_dir / CKPT).exists():
        os.replace(ckpt_dir / CKPT, ckpt_dir / PREVIOUS_CKPT)
    os.replace(tmp, ckpt_dir / CKPT)
    fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint in ``ckpt_dir`` that loads, or None. Loaded with ``weights_only=True``: a planted
    or foreign file cannot run code; one that is torn, foreign or from an older format is skipped (with a
    warning) for the previous one, and with neither the run starts from the beginning."""
    for name in (CKPT, PREVIOUS_CKPT):
        path = Path(ckpt_dir) / name
        if not path.exists():
            continue
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torn, truncated, pickled objects: all mean "not usable"
            why = ("it holds pickled objects, which are never loaded" if isinstance(exc, pickle.UnpicklingError)
                   else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__)
            log.warning("%s: not a loadable checkpoint (%s); %s", path, why,
                        "trying the previous one" if name == CKPT else "starting from the beginning")
    return None


def read_history(ckpt_dir: str | Path) -> list[dict]:
    """Per-epoch rows (train means, val losses, val R@1) of the run in ``ckpt_dir``."""
    state = read_checkpoint(ckpt_dir)
    return state["history"] if state else []


def read_steps(ckpt_dir: str | Path) -> list[dict]:
    """Per-step rows (epoch, step, losses) of every optimiser step the checkpointed model has taken."""
    state = read_checkpoint(ckpt_dir)
    return state["steps"] if state else []


# ----------------------------------------------------------------------------- driver
# Params that change how a run executes, not what it computes (up to float rounding: see the module
# docstring on data order), so a re-run with another worker layout resumes the same checkpoint.
_EXECUTION_ONLY = ("num_workers", "cpus_per_worker", "threads_per_worker", "checkpoint_every_steps", "max_failures")


def code_fingerprint(root: str | Path = PACKAGE_ROOT) -> str:
    """Hash of every Python source under ``root`` (the library) and of the torch version: what training computes
    besides its params and data. A resumed checkpoint must come from the same code, or a code change would
    re-publish the weights the old code trained."""
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(root)
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def checkpoint_key(p: TrainParams, content_hash: str, code: str | None = None) -> str:
    """The resume directory's name: params (less the worker layout), training data and code
    (:func:`code_fingerprint`). Any change of the three starts afresh; an interrupted run of the same resumes."""
    params = {k: v for k, v in p.model_dump().items() if k not in _EXECUTION_ONLY}
    code = code_fingerprint() if code is None else code
    return hashlib.sha256(json.dumps([params, content_hash, code], sort_keys=True).encode()).hexdigest()[:16]


def run_training(p: TrainParams, *, train_dir: str | Path, val_dir: str | Path, out_dir: str | Path,
                 cache_dir: str | Path, mlflow_run_id: str | None = None,
                 fault_inject_step: int | None = None) -> list[dict]:
    """Driver side: train the tokenizer, pick the resume directory, run the workers, return history.

    The checkpoint directory is keyed by the params (but not the worker layout: ``_EXECUTION_ONLY``), the
    training data's content hash and the library's code (:func:`checkpoint_key`), so a re-run after an
    interruption resumes, while a change of any of them starts afresh. ``fault_inject_step``: test hook, the
    last worker fails once before that step.
    """
    from mmplatform.compute import run_workers
    from mmplatform.data.dataset import read_dataset, read_manifest
    from mmplatform.models.tokenizer import save_tokenizer
    from mmplatform.train.batches import tokenizer_texts

    check_encoders(p)  # an unreachable encoder fails here, in one line, before data are read or workers start
    splits = max(1, p.num_workers) * p.accum_steps
    if p.batch_size % splits:
        raise ValueError(f"train.batch_size={p.batch_size} must be a multiple of train.num_workers x "
                         f"train.accum_steps = {splits} (every micro-batch the same size)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_recs = read_dataset(train_dir, columns=["captions", "questions", "answers", "split", "width"],
                              split="train")
    if len(train_recs) < p.batch_size:
        raise ValueError(f"{train_dir}: {len(train_recs)} training images, fewer than train.batch_size "
                         f"={p.batch_size}")
    tokenizer = make_tokenizer(p, tokenizer_texts(train_recs))  # trained on captions and questions, or pretrained
    tok_dir = out_dir / "tokenizer"
    save_tokenizer(tokenizer, tok_dir)
    image_size = int(train_recs[0]["width"])
    key = checkpoint_key(p, read_manifest(train_dir)["content_hash"])
    ckpt_dir = Path(cache_dir) / f"train-{key}"
    config = {"params": p.model_dump(), "tokenizer_dir": str(tok_dir.resolve()),
              "train_dir": str(Path(train_dir).resolve()), "val_dir": str(Path(val_dir).resolve()),
              "out_dir": str(out_dir.resolve()), "ckpt_dir": str(ckpt_dir.resolve()),
              "image_size": image_size, "mlflow_run_id": mlflow_run_id,
              "fault_inject_step": fault_inject_step}
    run_workers(train_loop_per_worker, config, num_workers=p.num_workers, cpus_per_worker=p.cpus_per_worker,
                storage_path=Path(cache_dir) / "ray", name=f"train-{key}", max_failures=p.max_failures)
    return read_history(ckpt_dir)
