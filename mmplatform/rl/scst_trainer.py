"""Self-critical sequence training (SCST; Rennie et al. 2017) of the captioning decoder.

An episode is one sampled caption. Its advantage is its reward minus the reward of the greedy caption
of the same image (the "self-critical" baseline: no value network, and only samples that beat the
test-time policy are reinforced). The vision encoder and the contrastive parts stay frozen, so
retrieval is untouched; the decoder and its memory projection learn.

Logged per step: reward mean/std (total and per reward), episode length in tokens, KL to the starting
policy (sample estimate of E[log π − log π_ref]), token entropy, and a held-out reward (greedy
captions of val images) beside the training reward, so reward hacking shows as the two diverging.

Stage command: ``dvc repro rl_finetune`` (= ``python -m pipelines.rl_finetune``).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmplatform.compute import average_gradients
from mmplatform.models.captioning import decode_text, greedy_captions
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer
from mmplatform.rl.rewards import build_rewards
from mmplatform.rl.scst_config import SCSTConfig
from mmplatform.train.batches import decode_images

log = logging.getLogger(__name__)


def trainable_parameters(model: MultimodalModel) -> list[torch.nn.Parameter]:
    for q in model.parameters():
        q.requires_grad_(False)
    params = list(model.decoder.parameters()) + list(model.memory_proj.parameters())
    for q in params:
        q.requires_grad_(True)
    return params


def scst_update(model: MultimodalModel, reference: MultimodalModel, opt: torch.optim.Optimizer,
                params: list[torch.nn.Parameter], images: torch.Tensor, batch_refs: list[list[str]],
                reward_fn, tokenizer, cfg: SCSTConfig, gen: torch.Generator) -> dict[str, float]:
    """One SCST policy update on a batch of images; returns the step's telemetry."""
    k = cfg.samples_per_image
    with torch.no_grad():
        img_tok = model.image_tokens(images)  # frozen encoder: no graph needed
        greedy_tok, _ = model.generate(model.memory(img_tok), cfg.max_length, greedy=True)
        mem_k = model.memory(img_tok).repeat_interleave(k, 0)
        sample_tok, _ = model.generate(mem_k, cfg.max_length, greedy=False, temperature=cfg.temperature,
                                       generator=gen)
    greedy_r = reward_fn(decode_text(tokenizer, greedy_tok), batch_refs)
    sample_r = reward_fn(decode_text(tokenizer, sample_tok), [r for r in batch_refs for _ in range(k)])
    rewards = sample_r["total"].reshape(-1, k)
    if cfg.baseline == "loo":
        # Leave-one-out: each sample is judged against the mean of the image's other k-1 samples
        # (Luo 2020, "A Better Variant of Self-Critical Sequence Training"); advantages sum to zero per image.
        baseline = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
    else:
        baseline = np.repeat(greedy_r["total"][:, None], k, 1)  # Rennie et al. 2017: the greedy caption
    adv = torch.tensor((rewards - baseline).reshape(-1), dtype=torch.float32)

    memory = model.memory(img_tok).repeat_interleave(k, 0)
    tok_logp, full_logp, valid = model.sequence_logprobs(memory, sample_tok)
    # REINFORCE with the greedy caption's reward as baseline, averaged over the tokens of the batch.
    loss = -(adv[:, None] * tok_logp).sum() / valid.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

    with torch.no_grad():
        ref_logp, _, _ = reference.sequence_logprobs(reference.memory(img_tok).repeat_interleave(k, 0), sample_tok)
        n_tok = valid.sum().clamp(min=1)
        lengths = valid.sum(1)
        row = {
            "rl/reward_mean": float(sample_r["total"].mean()), "rl/reward_std": float(sample_r["total"].std()),
            "rl/greedy_reward_mean": float(greedy_r["total"].mean()), "rl/advantage_mean": float(adv.mean()),
            "rl/loss": float(loss),
            "rl/episode_length_mean": float(lengths.mean()), "rl/episode_length_min": float(lengths.min()),
            "rl/episode_length_max": float(lengths.max()),
            "rl/truncation_rate": float((~(sample_tok == model.cfg.eos_id).any(1)).float().mean()),
            # Sample estimate of KL(π || π_ref) per token: E_π[log π − log π_ref].
            "rl/kl_to_reference": float(((tok_logp.detach() - ref_logp) * valid).sum() / n_tok),
            "rl/entropy": float((torch.special.entr(full_logp.exp()).sum(-1) * valid).sum() / n_tok),
        }
    for name, vals in sample_r.items():
        if name != "total":
            row[f"rl/reward_{name}_mean"] = float(vals.mean())
    return row


def scst_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker."""
    import ray.train

    from mmplatform import tracking
    from mmplatform.data.dataset import read_dataset

    cfg = SCSTConfig.model_validate(config["params"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)

    # ---------------------------------------------------------------- setup
    model = MultimodalModel.load(config["base_dir"])
    tokenizer = load_tokenizer(Path(config["base_dir"]) / "tokenizer")
    reference = copy.deepcopy(model).eval()  # π_ref for the KL telemetry
    for q in reference.parameters():
        q.requires_grad_(False)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    train_recs = read_dataset(config["data_dir"], split="train")
    val_recs = read_dataset(config["data_dir"], split="val")[: cfg.heldout_images]
    size = model.cfg.image_size
    images = decode_images(train_recs, size)
    refs = [r["captions"] for r in train_recs]
    val_images = decode_images(val_recs, size)
    val_refs = [r["captions"] for r in val_recs]
    reward_fn = build_rewards(cfg.reward, refs)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    run_id = config.get("mlflow_run_id") if rank == 0 else None
    k = cfg.samples_per_image

    def heldout_reward() -> float:
        model.eval()
        caps = greedy_captions(model, tokenizer, val_images, cfg.max_length)
        return float(reward_fn(caps, val_refs)["total"].mean())

    start = heldout_reward()
    history = [{"step": 0, "heldout_reward": start}]
    # Model selection on the held-out (val) reward: keep the best policy seen, as one keeps the best
    # validation checkpoint in supervised training; RL rewards are noisy from one evaluation to the next.
    best = {"step": 0, "reward": start, "state": copy.deepcopy(model.state_dict())}
    tracking.log_metrics(run_id, {"rl/heldout_reward": start}, 0)
    # ---------------------------------------------------------------- train
    for step in range(1, cfg.steps + 1):
        t0 = time.time()
        idx = torch.randint(0, len(train_recs), (cfg.batch_size,), generator=gen)
        row = scst_update(model, reference, opt, params, images[idx], [refs[i] for i in idx.tolist()],
                          reward_fn, tokenizer, cfg, gen)
        row["rl/episodes_per_s"] = cfg.batch_size * k / (time.time() - t0)
        kl, entropy = row["rl/kl_to_reference"], row["rl/entropy"]
        if step % cfg.log_every == 0 or step == cfg.steps:
            row["rl/heldout_reward"] = heldout_reward()
            history.append({"step": step, "heldout_reward": row["rl/heldout_reward"],
                            "reward_mean": row["rl/reward_mean"], "kl": kl, "entropy": entropy})
            if row["rl/heldout_reward"] > best["reward"]:
                best = {"step": step, "reward": row["rl/heldout_reward"], "state": copy.deepcopy(model.state_dict())}
            log.info("step %d: %s", step, {k2: round(v, 4) for k2, v in row.items()})
        tracking.log_metrics(run_id, row, step)
    model.load_state_dict(best["state"])
    for row in history:
        row["selected"] = int(row["step"] == best["step"])
    log.info("selected the policy of step %d (held-out reward %.4f, start %.4f)", best["step"], best["reward"], start)
    ray.train.report({"heldout_reward_start": start, "heldout_reward_best": best["reward"], "best_step": best["step"]})
    if rank == 0:
        model.save(config["out_dir"])
        tokenizer.save_pretrained(str(Path(config["out_dir"]) / "tokenizer"))
        import json

        (Path(config["out_dir"]) / "rl_history.json").write_text(json.dumps(history, indent=2))


def run_scst(cfg: SCSTConfig, *, base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             cache_dir: str | Path, mlflow_run_id: str | None = None) -> list[dict]:
    """Driver side: run SCST on Ray Train workers; returns the held-out history."""
    import json

    from mmplatform.compute import run_workers

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config = {"params": cfg.model_dump(), "base_dir": str(Path(base_dir).resolve()),
              "data_dir": str(Path(data_dir).resolve()), "out_dir": str(Path(out_dir).resolve()),
              "mlflow_run_id": mlflow_run_id}
    run_workers(scst_loop_per_worker, config, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                storage_path=Path(cache_dir) / "ray", name="rl_finetune")
    return json.loads((Path(out_dir) / "rl_history.json").read_text())
