"""Evaluation on the test split: retrieval both ways, captioning quality before and after RL, plots.

Retrieval follows the COCO/OpenCLIP protocol: every caption of every test image queries the images
(text→image: hit if its own image is in the top K), every image queries all captions (image→text: hit
if any of its captions is in the top K); plus mean and median rank. Caption metrics are CIDEr-D (df
from the test references, as pycocoevalcap computes it) and BLEU-4, for the cross-entropy model (xe)
and the RL model (rl). The held-out colour–shape split reports the same with a ``_compositional`` suffix.
"""

from __future__ import annotations

import io
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch

from mmplatform.champion import model_digest
from mmplatform.data.dataset import read_dataset
from mmplatform.evaluate.captions import CiderD, bleu4
from mmplatform.evaluate.vqa import vqa_metrics
from mmplatform.models.captioning import greedy_captions
from mmplatform.models.multimodal import MultimodalModel
from mmplatform.models.tokenizer import load_tokenizer
from mmplatform.train.batches import decode_images, tokenize_captions

log = logging.getLogger(__name__)
KS = (1, 5, 10)


def ranks_from_similarity(sim: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim``: (captions, images); ``owner[j]``: image of caption j. Returns 0-based ranks:
    text→image (rank of each caption's own image) and image→text (best rank among its captions)."""
    own = sim.gather(1, owner[:, None])
    t2i = (sim > own).sum(1)
    simT = sim.T  # (images, captions)
    is_own = torch.zeros_like(simT, dtype=torch.bool)
    is_own[owner, torch.arange(len(owner))] = True
    best_own = simT.masked_fill(~is_own, float("-inf")).max(1).values
    i2t = (simT > best_own[:, None]).sum(1)
    return t2i, i2t


def retrieval_metrics(t2i: torch.Tensor, i2t: torch.Tensor, suffix: str = "") -> dict[str, float]:
    m: dict[str, float] = {}
    for k in KS:
        m[f"t2i_recall@{k}{suffix}"] = float((t2i < k).float().mean())
        m[f"i2t_recall@{k}{suffix}"] = float((i2t < k).float().mean())
    m[f"t2i_mean_rank{suffix}"] = float(t2i.float().mean() + 1)
    m[f"t2i_median_rank{suffix}"] = float(t2i.float().median() + 1)
    m[f"i2t_mean_rank{suffix}"] = float(i2t.float().mean() + 1)
    m[f"i2t_median_rank{suffix}"] = float(i2t.float().median() + 1)
    return m


@torch.no_grad()
def similarity(model: MultimodalModel, tokenizer, records: list[dict], batch: int = 256):
    images = decode_images(records, model.cfg.image_size)
    caps = tokenize_captions(tokenizer, records, model.cfg.max_length)
    img = torch.cat([model.embed_images(images[i:i + batch]) for i in range(0, len(images), batch)])
    txt = torch.cat([model.embed_texts(caps.ids[i:i + batch], caps.mask[i:i + batch])
                     for i in range(0, len(caps.ids), batch)])
    return txt @ img.T, caps.owner, images


@torch.no_grad()
def itm_rerank(model: MultimodalModel, tokenizer, records: list[dict], images: torch.Tensor, sim: torch.Tensor,
               k: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval as ALBEF/BLIP evaluate it: the contrastive top-``k`` of each query re-ranked by the fused
    image-text-matching head (Li et al. 2021, 2022), which sees word order and binding that a dot product of
    pooled features cannot. Returns two (captions, images) score matrices, one for text->image (each row's
    top-k re-scored) and one for image->text (each column's top-k re-scored); a re-scored entry is
    ``1000 + log p(match)``, above every cosine, so it ranks first and among its peers by ITM."""
    caps = tokenize_captions(tokenizer, records, model.cfg.max_length)
    k = min(k, sim.shape[1], sim.shape[0])
    img_tok = torch.cat([model.image_tokens(images[i:i + batch]) for i in range(0, len(images), batch)])

    def score(cap_idx: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(cap_idx), batch):
            c, m = caps.ids[cap_idx[s:s + batch]], caps.mask[cap_idx[s:s + batch]]
            n = int(m.sum(1).max())  # trim the padding tail: attention cost follows real length
            c, m = c[:, :n], m[:, :n]
            out.append(model.itm_logits(img_tok[img_idx[s:s + batch]], model.text_tokens(c, m), m)
                       .float().log_softmax(-1)[:, 1])
        return torch.cat(out)

    t2i = sim.clone()
    top = sim.topk(k, dim=1).indices  # (captions, k)
    rows = torch.arange(sim.shape[0])[:, None].expand_as(top).reshape(-1)
    t2i[rows, top.reshape(-1)] = 1000.0 + score(rows, top.reshape(-1))
    i2t = sim.clone()
    top = sim.topk(k, dim=0).indices  # (k, images)
    cols = torch.arange(sim.shape[1])[None, :].expand_as(top).reshape(-1)
    i2t[top.reshape(-1), cols] = 1000.0 + score(top.reshape(-1), cols)
    return t2i, i2t


ARO_KEYS = {"attribute": "aro_attribution", "relation": "aro_relation", "order": "aro_order"}


@torch.no_grad()
def aro_metrics(model: MultimodalModel, tokenizer, records: list[dict], images: torch.Tensor, *, seed: int = 0,
                batch: int = 256, suffix: str = "") -> dict[str, float]:
    """Binding, not bag-of-words (ARO, Yuksekgonul et al. ICLR 2023): for each image and its first caption,
    does the model score the caption above a foil with attributes swapped between objects, with a relation
    reversed, with the words shuffled? Accuracy per kind (chance 0.5), by contrastive similarity
    (``aro_*``) and by the fused image-text-matching head (``aro_*_itm``), over the images where that kind
    of foil exists (``aro_*_n``)."""
    import numpy as np

    from mmplatform.data.foils import foils

    rng = np.random.default_rng(seed)
    rows: list[tuple[int, str, str, str]] = []  # (image index, kind, caption, foil)
    for i, r in enumerate(records):
        cap = r["captions"][0]
        for kind, foil in foils(cap, rng).items():
            rows.append((i, kind, cap, foil))
    if not rows:
        return {}
    img_idx = torch.tensor([r[0] for r in rows])
    texts = [r[2] for r in rows] + [r[3] for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=model.cfg.max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = len(rows)
    contrastive, itm = [], []
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        idx = img_idx[sl]
        img_tok = model.image_tokens(images[idx])
        img = model.embed_image_tokens(img_tok)
        scores_c, scores_m = [], []
        for off in (0, n):  # true captions, then foils
            t_ids, t_mask = ids[off + sl.start:off + sl.stop], mask[off + sl.start:off + sl.stop]
            txt_tok = model.text_tokens(t_ids, t_mask)
            scores_c.append((img * model.embed_text_tokens(txt_tok, t_mask)).sum(-1))
            scores_m.append(model.itm_logits(img_tok, txt_tok, t_mask).log_softmax(-1)[:, 1])
        contrastive.append(scores_c[0] > scores_c[1])
        itm.append(scores_m[0] > scores_m[1])
    win_c, win_m = torch.cat(contrastive), torch.cat(itm)
    kinds = [r[1] for r in rows]
    out: dict[str, float] = {}
    for kind, key in ARO_KEYS.items():
        sel = torch.tensor([k == kind for k in kinds])
        if sel.any():
            out[f"{key}{suffix}"] = float(win_c[sel].float().mean())
            out[f"{key}_itm{suffix}"] = float(win_m[sel].float().mean())
            out[f"{key}_n{suffix}"] = int(sel.sum())
    return out


def caption_scores(candidates: list[str], refs: list[list[str]], tag: str, suffix: str = "") -> dict[str, float]:
    return {f"cider_d_{tag}{suffix}": float(CiderD().score(candidates, refs).mean()),
            f"bleu4_{tag}{suffix}": float(bleu4(candidates, refs))}


def evaluate(xe_dir: str | Path, rl_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *,
             split: str = "test", max_length: int = 40, grid_images: int = 16,
             batch_size: int = 256, rerank_top_k: int = 0) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xe = MultimodalModel.load(xe_dir)
    rl = MultimodalModel.load(rl_dir)
    tok = load_tokenizer(Path(rl_dir) / "tokenizer")
    metrics, samples, curve = score_model(rl, tok, data_dir, xe=xe, split=split, max_length=max_length,
                                          batch_size=batch_size, rerank_top_k=rerank_top_k, keep_samples=grid_images)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    write_recall_curve(*curve, out_dir / "recall_curve.csv")
    if samples:
        caption_grid(samples, out_dir / "caption_grid.png")
    (out_dir / "samples.json").write_text(json.dumps([{k: v for k, v in s.items() if k != "image"}
                                                     for s in samples], indent=2))
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


def evaluate_champion(champion: tuple[Path, str] | None, data_dir: str | Path, out: str | Path, *,
                      challenger: tuple[str | Path, dict[str, Any]] | None = None, split: str = "test",
                      max_length: int = 40, batch_size: int = 256, rerank_top_k: int = 0) -> dict[str, Any]:
    """The current champion scored on the same split with the same code as the challenger, so that the gate
    compares two models on one exam (the champion's stored figures came from an earlier test split). The
    registered model is the RL model, so its ``*_xe`` caption figures are absent. ``champion``: (model dir,
    source) as :func:`mmplatform.champion.champion_model_dir` gives it, None when there is none;
    ``challenger``: (its model dir, its metrics), so that a champion with the same files is not scored twice.
    Writes and returns ``{"champion": source or None, "metrics": {...}}``, with ``"error"`` when this code
    cannot load the champion."""
    result: dict[str, Any] = {"champion": None, "metrics": {}}
    if champion is not None:
        model_dir, source = champion
        result["champion"] = source
        if challenger is not None and model_digest(model_dir) == model_digest(challenger[0]):
            result["metrics"] = {k: v for k, v in challenger[1].items() if "_xe" not in k}
            result["same_as_challenger"] = True
            log.info("champion %s has the challenger's files: its figures are the challenger's", source)
        else:
            result |= _score_champion(model_dir, source, data_dir, split=split, max_length=max_length,
                                      batch_size=batch_size, rerank_top_k=rerank_top_k)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def _score_champion(model_dir: Path, source: str, data_dir: str | Path, **kw: Any) -> dict[str, Any]:
    try:
        model = MultimodalModel.load(model_dir)
        tok = load_tokenizer(Path(model_dir) / "tokenizer")
    except (TypeError, ValueError, KeyError, RuntimeError, OSError) as exc:
        error = f"cannot be loaded by this code: {exc.__class__.__name__}: {str(exc)[:300]}"
        log.warning("champion %s %s", source, error)
        return {"error": error}
    metrics = score_model(model, tok, data_dir, **kw)[0]
    log.info("champion %s on this split: %s", source, {k: round(v, 4) for k, v in metrics.items()
                                                       if isinstance(v, float)})
    return {"metrics": metrics}


def score_model(rl: MultimodalModel, tok, data_dir: str | Path, *, xe: MultimodalModel | None = None,
                split: str = "test", max_length: int = 40, batch_size: int = 256, rerank_top_k: int = 0,
                keep_samples: int = 0) -> tuple[dict[str, Any], list[dict], tuple[torch.Tensor, torch.Tensor]]:
    """Every metric of ``rl`` (and the ``*_xe`` caption figures of ``xe``) on ``split`` and on the
    compositional split. Returns (metrics, up to ``keep_samples`` captioned test images, (t2i, i2t) ranks)."""
    metrics: dict[str, Any] = {}
    samples: list[dict] = []
    curve = (torch.zeros(0), torch.zeros(0))
    for name, suffix in ((split, ""), ("test_compositional", "_compositional")):
        recs = read_dataset(data_dir, split=name)
        if not recs:
            if not suffix:
                raise ValueError(f"{data_dir}: no records in split {name!r}")
            continue
        sim, owner, images = similarity(rl, tok, recs, batch_size)
        t2i, i2t = ranks_from_similarity(sim, owner)
        if rerank_top_k > 1:
            # The headline keys are the model's full retrieval (contrastive, then ITM re-ranking, as BLIP
            # reports); ``*_contrastive`` keeps the dual encoder alone (what an embedding index gives).
            metrics |= retrieval_metrics(t2i, i2t, "_contrastive" + suffix)
            s_t2i, s_i2t = itm_rerank(rl, tok, recs, images, sim, rerank_top_k, batch_size)
            t2i, i2t = ranks_from_similarity(s_t2i, owner)[0], ranks_from_similarity(s_i2t, owner)[1]
        metrics |= retrieval_metrics(t2i, i2t, suffix)
        metrics[f"n_images{suffix}"] = len(recs)
        metrics[f"n_captions{suffix}"] = len(owner)
        metrics[f"chance_t2i_recall@5{suffix}"] = min(1.0, 5 / len(recs))
        metrics |= aro_metrics(rl, tok, recs, images, batch=batch_size, suffix=suffix)
        metrics |= vqa_metrics(rl, tok, recs, images=images, batch=batch_size, suffix=suffix)
        refs = [r["captions"] for r in recs]
        caps_rl = caps_xe = greedy_captions(rl, tok, images, max_length, batch_size)
        metrics |= caption_scores(caps_rl, refs, "rl", suffix)
        if xe is not None:
            caps_xe = greedy_captions(xe, tok, images, max_length, batch_size)
            metrics |= caption_scores(caps_xe, refs, "xe", suffix)
        if not suffix:
            curve = (t2i, i2t)
            samples = [{"image": recs[i]["image"], "xe": caps_xe[i], "rl": caps_rl[i], "ref": refs[i][0]}
                       for i in range(min(keep_samples, len(recs)))]
    return metrics, samples, curve


def write_recall_curve(t2i: torch.Tensor, i2t: torch.Tensor, path: Path) -> None:
    lines = ["k,t2i_recall,i2t_recall"]
    for k in (1, 2, 3, 5, 10, 20, 50, 100):
        lines.append(f"{k},{float((t2i < k).float().mean()):.4f},{float((i2t < k).float().mean()):.4f}")
    path.write_text("\n".join(lines) + "\n")


def caption_grid(samples: list[dict], path: Path, cols: int = 4) -> None:
    """Test images with their generated captions (xe and rl) and one reference, for auditors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = -(-len(samples) // cols)
    # Captions go under each image, in a band as tall as the image, so long captions never overlap.
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.6, rows * 5.6), squeeze=False,
                             gridspec_kw={"hspace": 1.1, "wspace": 0.15})
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples, strict=False):
        ax.imshow(Image.open(io.BytesIO(s["image"])).convert("RGB"), interpolation="nearest")
        text = "\n".join(textwrap.fill(f"{k}: {s[k]}", 48) for k in ("xe", "rl", "ref"))
        ax.text(0.0, -0.04, text, transform=ax.transAxes, va="top", ha="left", fontsize=6.5, family="monospace")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.08)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
