"""Image-text alignment filter: score each caption against its image with our own contrastive model.

This is DataComp's CLIP-score filtering (Gadre et al. 2023, "DataComp: In search of the next generation
of multimodal datasets"): captions that do not describe their image are removed, either below a score
threshold or outside the top fraction. The scorer is the registered champion, so the data that trains
the next model is filtered by the best model we have; with no champion yet, the filter is skipped (the
caller logs that).

Raw cosine similarity is not comparable across models (a small model trained on synthetic scenes puts
matched pairs at 0.9+ and the 99th percentile of random pairs near 0.9 as well), so the default score is
the caption's *percentile* among random captions: the share of other captions in the dataset that the
model ranks below this caption for this image. A caption that describes its image scores near 1 with any
useful model; a caption that belongs to another image scores like a random draw, uniform on [0, 1]. A
threshold on it (default 0.9) means the same thing for every model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class AlignmentScorer:
    """Cosine similarities from a :class:`~mmplatform.models.multimodal.MultimodalModel`."""

    model: Any
    tokenizer: Any
    source: str = ""
    batch_size: int = 256

    @classmethod
    def from_dir(cls, model_dir: str | Path, source: str = "") -> AlignmentScorer:
        from mmplatform.champion import load_model

        model, tokenizer = load_model(model_dir)
        return cls(model, tokenizer, source or str(model_dir))

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        import torch

        from mmplatform.train.batches import decode_images

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                recs = [{"image": b} for b in images[i:i + self.batch_size]]
                x = decode_images(recs, self.model.cfg.image_size)
                out.append(torch.nn.functional.normalize(self.model.embed_images(x), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.embed_dim), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.model.cfg.max_length, return_tensors="pt")
                e = self.model.embed_texts(enc["input_ids"], enc["attention_mask"])
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.embed_dim), np.float32)


def caption_scores(scorer: AlignmentScorer, images: list[bytes], captions: list[list[str]], *,
                   score: str = "percentile", n_random: int = 512, seed: int = 0) -> list[list[float]]:
    """Per image, per caption: ``cosine`` (raw) or ``percentile`` (share of ``n_random`` captions drawn
    from the other images that score lower for this image; see the module docstring)."""
    if score not in ("cosine", "percentile"):
        raise ValueError(f"alignment score {score!r}: expected 'cosine' or 'percentile'")
    flat = [c for caps in captions for c in caps]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps], dtype=np.int64)
    if not flat:
        return [[] for _ in captions]
    img = scorer.embed_images(images)
    txt = scorer.embed_texts(flat)
    cos = np.einsum("ij,ij->i", img[owner], txt)
    if score == "cosine":
        values = cos
    else:
        rng = np.random.default_rng(seed)
        pool = rng.choice(len(flat), size=min(n_random, len(flat)), replace=False)
        sims = img @ txt[pool].T  # (images, pool)
        other = owner[pool][None, :] != np.arange(len(images))[:, None]  # never compare with own captions
        below = ((sims[owner] < cos[:, None]) & other[owner]).sum(1)
        values = below / np.maximum(other[owner].sum(1), 1)
    out: list[list[float]] = [[] for _ in captions]
    for v, o in zip(values.tolist(), owner.tolist(), strict=True):
        out[o].append(float(v))
    return out


def keep_mask(scores: list[list[float]], *, mode: str, min_score: float, keep_fraction: float) -> list[list[bool]]:
    """Which captions survive: ``threshold`` keeps scores >= ``min_score``; ``top_fraction`` keeps the
    best ``keep_fraction`` of all captions (DataComp's "top 30%" style)."""
    if mode == "threshold":
        return [[s >= min_score for s in row] for row in scores]
    if mode == "top_fraction":
        flat = np.array([s for row in scores for s in row])
        if flat.size == 0:
            return [[] for _ in scores]
        cut = np.quantile(flat, 1.0 - keep_fraction) if keep_fraction < 1 else -np.inf
        return [[s >= cut for s in row] for row in scores]
    raise ValueError(f"alignment mode {mode!r}: expected 'off', 'threshold' or 'top_fraction'")


def load_champion_scorer(model_name: str, alias: str, domains: set[str] | None = None) -> AlignmentScorer | None:
    """The registered champion as a scorer, or None when the registry has none (first run). With ``domains``
    (the :func:`~mmplatform.data.dataset.source_domain` set of the data to clean), only a champion trained on
    all of them: a model that never saw a domain cannot judge its captions (it would drop correct ones)."""
    from mmplatform.champion import champion_model_dir, champion_tags

    found = champion_model_dir(model_name, alias)
    if found is None:
        return None
    if domains is not None:
        trained_on = set(json.loads(champion_tags(model_name, alias).get("data_domains", "[]")))
        unseen = sorted(domains - trained_on)
        if unseen:
            log.info("alignment: filter off: champion %s was not trained on %s (trained on %s)", found[1],
                     ", ".join(unseen[:3]) + (" ..." if len(unseen) > 3 else ""), sorted(trained_on) or "unknown data")
            return None
    try:
        return AlignmentScorer.from_dir(found[0], source=found[1])
    except (ValueError, OSError) as exc:
        log.warning("alignment: champion %s cannot be loaded (%s); skipped", found[1], exc)
        return None
