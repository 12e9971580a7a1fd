"""What the RL trainers (SCST, PPO, GRPO) share: episodes, per-token log-probs, telemetry, the Ray driver.

- :func:`sample_episodes`: k sampled captions per image (an episode is one caption), decoded and scored by the
  reward function of :mod:`mmplatform.rl.rewards` (always given ``images=``, one per candidate). With
  :class:`Prompts` the task is generative VQA: an episode is an answer decoded after its ``[CLS] question [SEP]``
  (BLIP's answer decoder, here the captioner), the references are the gold answers, and the rewards also get
  ``answers=`` (what ``vqa_exact_match`` reads).
- :func:`policy_pass`: one teacher-forced pass over the episodes' tokens → per-token log-probs at the sampling
  temperature (the behaviour policy that drew them, so PPO/GRPO importance ratios are exact, as TRL does),
  the full log-softmax, the episode mask and, for PPO's value head, the decoder's last hidden states.
- :func:`episode_telemetry`: the columns every algorithm logs (reward mean/std per reward and total, episode
  length mean/min/max, truncation rate, KL to the reference, entropy).
- :func:`worker_loop` / :func:`run_rl`: the Ray Train worker loop (rollouts + updates, gradients averaged
  across workers with :func:`mmplatform.compute.average_gradients`) with the held-out reward beside the training
  reward and best-policy selection, and the driver that runs it and reads back history and summary.

The vision encoder and the contrastive parts stay frozen in every algorithm (:func:`trainable_parameters`): RL
moves only the captioner (decoder + memory projection), so retrieval is untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmplatform.models.captioning import decode_text
from mmplatform.models.multimodal import MultimodalModel, token_mask

log = logging.getLogger(__name__)

# update(images (B,3,H,W) uint8, refs: list[list[str]][, prompts=Prompts]) -> telemetry row of the step
Updater = Callable[[torch.Tensor, list[list[str]]], dict[str, float]]


def trainable_parameters(model: MultimodalModel) -> list[torch.nn.Parameter]:
    """Freeze everything but the captioner (decoder + memory projections); return the trainable parameters."""
    for q in model.parameters():
        q.requires_grad_(False)
    params = list(model.decoder.parameters()) + list(model.memory_proj.parameters())
    if model.answer_proj is not None:  # the answer decoder's input from the (frozen) fusion
        params += list(model.answer_proj.parameters())
    for q in params:
        q.requires_grad_(True)
    return params


# ------------------------------------------------------------------------------------------------ episodes
@dataclass
class Prompts:
    """Generative VQA's decoder prefix per row: ``[CLS] question [SEP]`` ids, right-padded, and their lengths."""

    ids: torch.Tensor  # (N, L)
    lengths: torch.Tensor  # (N,)

    def rows(self, idx: torch.Tensor) -> Prompts:
        return Prompts(self.ids[idx], self.lengths[idx])

    def mask(self) -> torch.Tensor:
        """(N, L) attention mask of ``ids``: 1 on each prompt's tokens."""
        return (torch.arange(self.ids.shape[1], device=self.ids.device)[None] < self.lengths[:, None]).long()

    def repeat(self, k: int) -> Prompts:
        return Prompts(self.ids.repeat_interleave(k, 0), self.lengths.repeat_interleave(k, 0))


def decode(model: MultimodalModel, memory: torch.Tensor, max_length: int, *, greedy: bool, temperature: float = 1.0,
           gen: torch.Generator | None = None, prompts: Prompts | None = None) -> torch.Tensor:
    """Episode tokens (N, T), as :meth:`MultimodalModel.generate` returns them: after [CLS] (captioning) or after
    each row's prompt (generative VQA; rows with prompts of one length are decoded together, in length order)."""
    if prompts is None:
        return model.generate(memory, max_length, greedy=greedy, temperature=temperature, generator=gen)[0]
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n in prompts.lengths.unique().tolist():  # sorted: the draw order, hence the samples, is seeded
        rows = (prompts.lengths == n).nonzero().squeeze(1)
        steps = max(1, min(max_length, model.decoder.config.max_position_embeddings - n))
        toks, _ = model.generate(memory[rows], steps, greedy=greedy, temperature=temperature, generator=gen,
                                 prefix=prompts.ids[rows, :n])
        parts.append((rows, toks))
    out = torch.full((len(prompts.lengths), max(t.shape[1] for _, t in parts)), model.cfg.pad_id, dtype=torch.long,
                     device=memory.device)
    for rows, toks in parts:
        out[rows, :toks.shape[1]] = toks
    return out


def score(reward_fn, texts: list[str], refs: list[list[str]], images: torch.Tensor, vqa: bool) -> dict[str, np.ndarray]:
    """The rewards of ``texts``; generative VQA's references are the gold answers, also given as ``answers=``."""
    return reward_fn(texts, refs, images=images, **({"answers": refs} if vqa else {}))


@dataclass
class Episodes:
    """``B`` images × ``k`` sampled captions, image-major (rows ``i*k .. i*k+k-1`` belong to image ``i``)."""

    img_tok: torch.Tensor  # (B, P, H) frozen vision tokens, no graph
    k: int
    tokens: torch.Tensor  # (B*k, T) after [CLS], ending in [SEP] then [PAD]s
    valid: torch.Tensor  # (B*k, T) 1.0 on the episode's tokens (up to and including [SEP])
    texts: list[str]
    refs: list[list[str]]  # reference set of each episode
    rewards: dict[str, np.ndarray]  # {name: (B*k,), "total": (B*k,)}
    prompts: Prompts | None = None  # generative VQA: each episode's question prefix (B*k rows)
    fused: torch.Tensor | None = None  # generative VQA: the frozen fusion's vector per question (B rows) or None

    def memory(self, model: MultimodalModel) -> torch.Tensor:
        """The decoder's cross-attention memory per episode; built here so gradients reach the projections."""
        return model.answer_memory(self.img_tok, self.fused).repeat_interleave(self.k, 0)

    def policy(self, model: MultimodalModel, temperature: float = 1.0, *, hidden: bool = False,
               rows: torch.Tensor | None = None) -> TokenPass:
        """:func:`policy_pass` of ``model`` over these episodes (or ``rows`` of them), prompts included."""
        memory, tokens, prompts = self.memory(model), self.tokens, self.prompts
        if rows is not None:
            memory, tokens = memory[rows], tokens[rows]
            prompts = prompts.rows(rows) if prompts is not None else None
        return policy_pass(model, memory, tokens, temperature, hidden=hidden, prompts=prompts)

    def greedy_texts(self, model: MultimodalModel, tokenizer, max_length: int) -> list[str]:
        """The greedy caption (answer) of each image (question): SCST's self-critical baseline."""
        prompts = self.prompts.rows(torch.arange(0, len(self.tokens), self.k)) if self.prompts is not None else None
        with torch.no_grad():
            toks = decode(model, model.answer_memory(self.img_tok, self.fused), max_length, greedy=True,
                          prompts=prompts)
        return decode_text(tokenizer, toks)


def sample_episodes(model: MultimodalModel, images: torch.Tensor, refs: Sequence[Sequence[str]], reward_fn,
                    tokenizer, *, k: int, max_length: int, temperature: float, gen: torch.Generator,
                    img_tok: torch.Tensor | None = None, prompts: Prompts | None = None) -> Episodes:
    """Sample ``k`` captions per image (answers per question, with ``prompts``) at ``temperature`` and score
    them (``images=`` one per candidate)."""
    ep_prompts = prompts.repeat(k) if prompts is not None else None
    with torch.no_grad():
        img_tok = model.image_tokens(images) if img_tok is None else img_tok  # frozen encoder: no graph
        fused = fused_questions(model, img_tok, prompts)  # frozen fusion: computed once per question
        mem = model.answer_memory(img_tok, fused).repeat_interleave(k, 0)
        tokens = decode(model, mem, max_length, greedy=False, temperature=temperature, gen=gen, prompts=ep_prompts)
    texts = decode_text(tokenizer, tokens)
    ep_refs = [list(r) for r in refs for _ in range(k)]
    rewards = score(reward_fn, texts, ep_refs, images.repeat_interleave(k, 0), prompts is not None)
    valid = token_mask(tokens, model.cfg.eos_id, model.cfg.pad_id)
    return Episodes(img_tok, k, tokens, valid, texts, ep_refs, rewards, ep_prompts, fused)


def fused_questions(model: MultimodalModel, img_tok: torch.Tensor, prompts: Prompts | None) -> torch.Tensor | None:
    """The fusion's vector per (image, question) for an answer decoder that reads it; None otherwise."""
    if prompts is None:
        return None
    return model.fused_question(img_tok, prompts.ids, prompts.mask())


@dataclass
class TokenPass:
    logp: torch.Tensor  # (N, T) log-prob of each episode token, 0 outside the episode
    full: torch.Tensor  # (N, T, V) log-softmax
    valid: torch.Tensor  # (N, T)
    hidden: torch.Tensor | None  # (N, T, H) decoder's last hidden state at the position that emits token t


def policy_pass(model: MultimodalModel, memory: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                *, hidden: bool = False, prompts: Prompts | None = None) -> TokenPass:
    """One teacher-forced pass over ``tokens`` (as :meth:`MultimodalModel.generate` returns them).

    The same computation as :meth:`MultimodalModel.sequence_logprobs` with the logits divided by
    ``temperature`` — the distribution the episodes were sampled from — and optionally the decoder's hidden
    states (PPO's value head reads them). With ``prompts`` each row is ``prompt + tokens`` (right-padded, as
    generative VQA is trained) and the outputs are those at the tokens' positions. Gradients flow when enabled.
    """
    b, t = tokens.shape
    valid = token_mask(tokens, model.cfg.eos_id, model.cfg.pad_id)
    if prompts is None:
        bos = torch.full((b, 1), model.cfg.bos_id, dtype=torch.long, device=tokens.device)
        inp = torch.cat([bos, tokens[:, :-1]], 1)
        attn = torch.cat([torch.ones_like(bos), valid[:, :-1].long()], 1)
        at = None
    else:
        lengths = prompts.lengths[:, None]
        pos = torch.arange(int(prompts.lengths.max()) + t, device=tokens.device)[None]
        ans = (pos - lengths).clamp(0, t - 1)  # index into tokens at and after the prompt
        pids = torch.nn.functional.pad(prompts.ids, (0, pos.shape[1] - prompts.ids.shape[1]),
                                       value=model.cfg.pad_id)
        seq = torch.where(pos < lengths, pids, tokens.gather(1, ans))
        mask = torch.where(pos < lengths, torch.ones_like(seq), (valid.gather(1, ans) > 0).long())
        inp, attn = seq[:, :-1], mask[:, :-1]
        at = lengths - 1 + torch.arange(t, device=tokens.device)[None]  # the position that emits token j
    out = model.decoder(input_ids=inp, attention_mask=attn, encoder_hidden_states=memory,
                        output_hidden_states=hidden)
    logits, states = out.logits, out.hidden_states[-1] if hidden else None
    if at is not None:
        logits = logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1]))
        states = states.gather(1, at[:, :, None].expand(-1, -1, states.shape[-1])) if hidden else None
    full = torch.log_softmax(model._allowed(logits.float()) / temperature, -1)
    chosen = full.gather(2, tokens[:, :, None]).squeeze(2)
    # where, not multiply: padding after the episode is a banned token (log-prob -inf) and -inf * 0 = nan
    logp = torch.where(valid > 0, chosen, torch.zeros_like(chosen))
    return TokenPass(logp, full, valid, states)


def at_temperature(tp: TokenPass, tokens: torch.Tensor, temperature: float) -> TokenPass:
    """``tp`` (at temperature 1) re-expressed at ``temperature``, without another forward pass:
    log_softmax(logits / T) = log_softmax(log_softmax(logits) / T). No gradient."""
    with torch.no_grad():
        full = torch.log_softmax(tp.full.detach() / temperature, -1) if temperature != 1.0 else tp.full.detach()
        chosen = full.gather(2, tokens[:, :, None]).squeeze(2)
        logp = torch.where(tp.valid > 0, chosen, torch.zeros_like(chosen))
    return TokenPass(logp, full, tp.valid, None)


def paired_sem(after: np.ndarray, before: np.ndarray) -> float:
    """Standard error of ``mean(after - before)`` over the same held-out items (sample std, ddof 1): how far a
    held-out gain could be noise. Paired, so the items' own spread (easy and hard images) cancels. 0 for one item."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref) from samples of π (Schulman 2020, "Approximating KL
    divergence"): exp(r) - r - 1 with r = log π_ref - log π; unbiased and never negative."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


# ------------------------------------------------------------------------------------------------ telemetry
def episode_telemetry(ep: Episodes, tp: TokenPass, ref_logp: torch.Tensor, eos_id: int) -> dict[str, float]:
    """The columns every algorithm logs for a batch of episodes; ``tp`` and ``ref_logp`` at the sampling
    temperature, before the update (the policy that produced the episodes)."""
    with torch.no_grad():
        valid = tp.valid
        lengths = valid.sum(1)
        total = ep.rewards["total"]
        row = {
            "rl/reward_mean": float(total.mean()), "rl/reward_std": float(total.std()),
            "rl/episode_length_mean": float(lengths.mean()), "rl/episode_length_min": float(lengths.min()),
            "rl/episode_length_max": float(lengths.max()),
            # An episode that never emitted [SEP] was cut at max_length.
            "rl/truncation_rate": float((~(ep.tokens == eos_id).any(1)).float().mean()),
            # Sample estimate of KL(π || π_ref) per token: E_π[log π − log π_ref] (k1, unbiased).
            "rl/kl_to_reference": float(masked_mean(tp.logp.detach() - ref_logp, valid)),
            "rl/entropy": float(masked_mean(torch.special.entr(tp.full.detach().exp()).sum(-1), valid)),
        }
        for name, vals in ep.rewards.items():
            if name != "total":
                row[f"rl/reward_{name}_mean"] = float(vals.mean())
                row[f"rl/reward_{name}_std"] = float(vals.std())
    return row


def world() -> tuple[int, int]:
    """(rank, world size) of the torch process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(value: float) -> float:
    """Mean of a scalar over the data-parallel workers (PPO's KL controller must see the same KL on every
    worker, or the workers' β — and with it their rewards — drift apart)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


# ------------------------------------------------------------------------------------------------ Ray worker
def worker_loop(config: dict[str, Any], cfg_cls, make_updater: Callable[..., Updater]) -> None:
    """The Ray Train worker loop of every algorithm: setup, held-out reward, ``cfg.steps`` updates, best policy.

    ``make_updater(model=, reference=, params=, tokenizer=, reward_fn=, cfg=, gen=)`` returns the algorithm's
    ``update(images, refs) -> row``; it owns its optimiser (PPO adds its value head to it).
    """
    import ray.train

    from mmplatform import tracking
    from mmplatform.data.dataset import read_dataset
    from mmplatform.models.tokenizer import load_tokenizer
    from mmplatform.rl.rewards import build_rewards
    from mmplatform.train.batches import decode_images

    cfg = cfg_cls.model_validate(config["params"])
    rank = ray.train.get_context().get_world_rank()
    n_workers = ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)

    # ---------------------------------------------------------------- setup
    model = MultimodalModel.load(config["base_dir"])
    tokenizer = load_tokenizer(Path(config["base_dir"]) / "tokenizer")
    reference = copy.deepcopy(model).eval()  # π_ref: the KL telemetry, PPO/GRPO's KL penalty, clip_score
    for q in reference.parameters():
        q.requires_grad_(False)
    params = trainable_parameters(model)
    train_recs = read_dataset(config["data_dir"], split="train")
    val_recs = read_dataset(config["data_dir"], split="val")[: cfg.heldout_images]
    size = model.cfg.image_size
    images = decode_images(train_recs, size)
    val_images = decode_images(val_recs, size)
    vqa = cfg.task == "vqa"
    if vqa:
        # An RL sample is a question: its image, its prompt, its gold answer as the one reference.
        owner, prompts, refs = question_rows(train_recs, tokenizer, model)
        val_owner, val_prompts, val_refs = question_rows(val_recs, tokenizer, model)
    else:
        owner, prompts, refs = torch.arange(len(train_recs)), None, [r["captions"] for r in train_recs]
        val_owner, val_prompts, val_refs = torch.arange(len(val_recs)), None, [r["captions"] for r in val_recs]
    # The frozen starting model scores clip_score, so the reward cannot drift with the policy it judges.
    reward_fn = build_rewards(cfg.reward, refs, model=reference, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    update = make_updater(model=model, reference=reference, params=params, tokenizer=tokenizer,
                          reward_fn=reward_fn, cfg=cfg, gen=gen)
    run_id = config.get("mlflow_run_id") if rank == 0 else None
    episodes_per_step = cfg.batch_size * cfg.samples_per_image * n_workers

    def heldout() -> tuple[dict[str, float], np.ndarray]:
        """Reward of the greedy captions of val images (answers to their questions), total and per reward; and
        the total of each item, for the standard error of a gain."""
        texts = []
        with torch.no_grad():
            for i in range(0, len(val_owner), 256):
                rows = torch.arange(i, min(i + 256, len(val_owner)))
                batch_prompts = val_prompts.rows(rows) if vqa else None
                img_tok = model.image_tokens(val_images[val_owner[rows]])
                mem = model.answer_memory(img_tok, fused_questions(model, img_tok, batch_prompts))
                texts += decode_text(tokenizer, decode(model, mem, cfg.max_length, greedy=True,
                                                       prompts=batch_prompts))
        rewards = score(reward_fn, texts, val_refs, val_images[val_owner], vqa)
        return {name: float(v.mean()) for name, v in rewards.items()}, np.asarray(rewards["total"], dtype=float)

    h, start_items = heldout()
    start = h["total"]
    # The selected policy is the best of several noisy evaluations of a few hundred items: the paired standard
    # error of each gain says how much of it could be the draw of the held-out set (measured on generative VQA:
    # 200 val images, ~1,000 questions, se 0.012 against gains of 0.014-0.018 that the test split did not show).
    history = [{"step": 0, "heldout_reward": start, **{f"heldout_{n}": v for n, v in h.items() if n != "total"},
                "heldout_gain_sem": 0.0, "kl": 0.0}]
    # Model selection on the held-out (val) reward: keep the best policy seen, as one keeps the best
    # validation checkpoint in supervised training; RL rewards are noisy from one evaluation to the next.
    best = {"step": 0, "reward": start, "state": copy.deepcopy(model.state_dict())}
    tracking.log_metrics(run_id, {"rl/heldout_reward": start}, 0)
    window: list[dict[str, float]] = []
    rates: list[float] = []
    started = time.time()
    # ---------------------------------------------------------------- train
    for step in range(1, cfg.steps + 1):
        t0 = time.time()
        # The model stays in eval mode (MultimodalModel.load returns it so): no dropout, so the log-probs of an
        # update match those the episodes were sampled with.
        idx = torch.randint(0, len(owner), (cfg.batch_size,), generator=gen)
        batch_prompts = {"prompts": prompts.rows(idx)} if vqa else {}  # the captioners' updaters take no prompts
        row = update(images[owner[idx]], [refs[i] for i in idx.tolist()], **batch_prompts)
        # All workers step together, so the global rate is the world size times this worker's.
        row["rl/episodes_per_s"] = episodes_per_step / (time.time() - t0)
        rates.append(row["rl/episodes_per_s"])
        window.append(row)
        if step % cfg.log_every == 0 or step == cfg.steps:
            h, items = heldout()
            row["rl/heldout_reward"] = h["total"]
            row["rl/heldout_gain_sem"] = paired_sem(items, start_items)
            for n, v in h.items():
                if n != "total":
                    row[f"rl/heldout_reward_{n}"] = v
            # KL of the policy being evaluated: mean over the steps since the last evaluation (one batch is noisy).
            kl = float(np.mean([r["rl/kl_to_reference"] for r in window]))
            history.append({"step": step, "heldout_reward": h["total"],
                            **{f"heldout_{n}": v for n, v in h.items() if n != "total"},
                            "heldout_gain_sem": row["rl/heldout_gain_sem"], "reward_mean": row["rl/reward_mean"],
                            "kl": kl, "entropy": row["rl/entropy"],
                            "episode_length_mean": row["rl/episode_length_mean"]})
            window = []
            if h["total"] > best["reward"]:
                best = {"step": step, "reward": h["total"], "state": copy.deepcopy(model.state_dict())}
            left = (cfg.steps - step) * (time.time() - started) / step
            log.info("step %d/%d: reward %.4f, held-out reward %.4f (start %.4f, best %.4f at step %d), KL %.4f, "
                     "%.1f episodes/s, ETA %d min %02d s", step, cfg.steps, row["rl/reward_mean"], h["total"], start,
                     best["reward"], best["step"], kl, row["rl/episodes_per_s"], left // 60, left % 60)
        tracking.log_metrics(run_id, row, step)
    model.load_state_dict(best["state"])
    for row in history:
        row["selected"] = int(row["step"] == best["step"])
    selected = next(r for r in history if r["selected"])
    kl_bound = getattr(cfg, "kl_bound", None)
    summary = {
        "algorithm": cfg.algorithm, "task": cfg.task, "heldout_reward_start": start,
        "heldout_reward_selected": best["reward"],
        "selected_step": best["step"], "heldout_items": len(start_items),
        "heldout_gain_sem": selected["heldout_gain_sem"], "kl_to_reference_selected": selected["kl"],
        "kl_to_reference_max": max(r["kl"] for r in history),
        "episodes_per_s_mean": float(np.mean(rates)) if rates else 0.0, "workers": n_workers,
    }
    if kl_bound is not None:
        summary["kl_bound"] = kl_bound
        summary["within_kl_bound"] = bool(selected["kl"] <= kl_bound)
    log.info("selected the policy of step %d (held-out reward %.4f, start %.4f, KL to reference %.4f)",
             best["step"], best["reward"], start, selected["kl"])
    ray.train.report({"heldout_reward_start": start, "heldout_reward_best": best["reward"], "best_step": best["step"]})
    if rank == 0:
        out = Path(config["out_dir"])
        model.save(out)
        tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / "rl_history.json").write_text(json.dumps(history, indent=2))
        (out / "rl_summary.json").write_text(json.dumps(summary, indent=2))


def question_rows(records: list[dict], tokenizer, model: MultimodalModel
                  ) -> tuple[torch.Tensor, Prompts, list[list[str]]]:
    """Generative VQA's samples: (image index of each question, its ``[CLS] question [SEP]`` prompt, [gold
    answer]). The base model must have learnt to answer after a question (``train.loss_weights.vqa_generative``)."""
    from mmplatform.train.batches import tokenize_questions

    require_generative_vqa(model.cfg.vqa_generative)
    qt = tokenize_questions(tokenizer, records, model.cfg.max_length, {})
    if not len(qt.ids):
        raise ValueError("rl_finetune.task=vqa: the records have no questions")
    return qt.owner, Prompts(qt.ids, qt.mask.sum(1)), [[a] for a in qt.answers]


def require_generative_vqa(vqa_generative: bool) -> None:
    if not vqa_generative:
        raise ValueError("rl_finetune.task=vqa needs a base model trained to answer through its decoder: "
                         "train it with train.loss_weights.vqa_generative > 0 (its model_config.json has "
                         "vqa_generative: false)")


def run_rl(loop_per_worker: Callable[[dict], None], cfg, *, base_dir: str | Path, data_dir: str | Path,
           out_dir: str | Path, cache_dir: str | Path, mlflow_run_id: str | None = None) -> list[dict]:
    """Driver side: run ``loop_per_worker`` on ``cfg.num_workers`` Ray Train workers; returns the held-out
    history (``rl_history.json``); ``rl_summary.json`` beside it has the start/selected reward and, for
    algorithms with a ``kl_bound``, whether the selected policy stayed under it."""
    from mmplatform.compute import run_workers

    if cfg.task == "vqa":  # checked here too, so the stage stops with one line rather than a worker's traceback
        model_cfg = json.loads((Path(base_dir) / "model_config.json").read_text())
        require_generative_vqa(bool(model_cfg.get("vqa_generative")))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config = {"params": cfg.model_dump(), "base_dir": str(Path(base_dir).resolve()),
              "data_dir": str(Path(data_dir).resolve()), "out_dir": str(Path(out_dir).resolve()),
              "mlflow_run_id": mlflow_run_id}
    run_workers(loop_per_worker, config, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                storage_path=Path(cache_dir) / "ray", name="rl_finetune")
    summary = read_summary(out_dir)
    if cfg.task == "captioning" and summary:
        add_headroom(summary, data_dir, cfg)
        (Path(out_dir) / "rl_summary.json").write_text(json.dumps(summary, indent=2))
    if summary.get("within_kl_bound") is False:
        log.warning("%s: the selected policy's KL to the reference (%.4f nats/token) exceeds kl_bound %.4f",
                    cfg.algorithm, summary["kl_to_reference_selected"], summary["kl_bound"])
    return json.loads((Path(out_dir) / "rl_history.json").read_text())


def add_headroom(summary: dict[str, Any], data_dir: str | Path, cfg) -> None:
    """How much of the room above the start the selected policy used: the held-out set's best blind wording
    (synthetic data) or best own reference per image (``mmplatform.evaluate.ceiling``), and the share of the
    way to it. A gain target above the ceiling cannot be met by any policy; one near it asks for perfection."""
    from mmplatform.evaluate.ceiling import heldout_ceiling

    ceiling = heldout_ceiling(data_dir, cfg.heldout_images, cfg.reward)
    if not ceiling:
        return
    summary.update(ceiling)
    top = ceiling.get("heldout_ceiling_blind", ceiling["heldout_ceiling_reference"])
    room = top - summary["heldout_reward_start"]
    if room > 0:
        summary["heldout_headroom_used"] = (summary["heldout_reward_selected"] - summary["heldout_reward_start"]) / room
        log.info("held-out reward %.4f -> %.4f: %.0f%% of the way to %.4f, the %s", summary["heldout_reward_start"],
                 summary["heldout_reward_selected"], 100 * summary["heldout_headroom_used"], top,
                 "best wording a policy can write without the references" if "heldout_ceiling_blind" in ceiling
                 else "best own reference per image")


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "rl_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}
