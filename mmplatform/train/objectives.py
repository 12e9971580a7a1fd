"""What one training step optimises: the model built from params, and the weighted multi-task loss.

Kept apart from the loop (``recipe``) so the objectives, the heads and the loop can change independently;
``recipe.train_loop_per_worker`` and ``bench/train_bench.py`` both call :func:`multitask_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmplatform.config import TrainParams
from mmplatform.models.encoders import EncoderNotFoundError, check_source, load_pretrained_tokenizer
from mmplatform.models.heads import vqa_loss
from mmplatform.models.losses import (
    caption_loss,
    clip_loss,
    clip_loss_with_hard_negatives,
    mlm_loss,
    mlm_mask,
    sample_hard_negatives,
    triplet_loss,
)
from mmplatform.models.multimodal import ModelConfig, MultimodalModel
from mmplatform.train.batches import VQABatch


def make_tokenizer(p: TrainParams, texts: Iterable[str]):
    """The tokenizer the text encoder reads: a pretrained text model's own when ``text.name_or_path`` is set (its
    ids are what its embeddings were trained on), else a word-level one trained on ``texts``. Raises
    :class:`EncoderNotFoundError` (one line) for an unreachable model or one whose tokenizer lacks a token the
    decoder and MLM need."""
    from mmplatform.models.tokenizer import train_tokenizer

    if not p.text.name_or_path:
        return train_tokenizer(texts, p.text.vocab_size)
    tok = load_pretrained_tokenizer(p.text.name_or_path)
    missing = [t for t in ("pad", "cls", "sep", "mask", "unk") if getattr(tok, f"{t}_token_id", None) is None]
    if missing:
        raise EncoderNotFoundError(f"text encoder '{p.text.name_or_path}': its tokenizer has no "
                                   f"{', '.join(t + '_token' for t in missing)} (the captioner and MLM need them)")
    return tok


def check_encoders(p: TrainParams) -> None:
    """Fail in the driver, in one line, before any worker starts, when an encoder cannot be loaded."""
    if p.vision.name_or_path:
        check_source(p.vision.name_or_path, "vision encoder")
    if p.text.name_or_path:
        check_source(p.text.name_or_path, "text encoder")


def model_config(p: TrainParams, tokenizer, image_size: int, vqa_answers: Sequence[str] = ()) -> ModelConfig:
    """``vqa_answers``: the answer vocabulary in class order (``build_answer_vocab`` over the training
    answers); the VQA head is built when it is given and ``loss_weights.vqa`` > 0, the MLM head when
    ``loss_weights.mlm`` > 0."""
    return ModelConfig(
        vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.cls_token_id,
        eos_id=tokenizer.sep_token_id, image_size=image_size, patch_size=p.vision.patch_size,
        vision_hidden=p.vision.hidden_size, vision_layers=p.vision.layers, vision_heads=p.vision.heads,
        text_hidden=p.text.hidden_size, text_layers=p.text.layers, text_heads=p.text.heads,
        max_length=p.text.max_length, decoder_hidden=p.decoder.hidden_size,
        decoder_layers=p.decoder.layers, decoder_heads=p.decoder.heads, embed_dim=p.embed_dim,
        fusion=p.fusion, fusion_layers=p.fusion_layers, fusion_self_attention=True, pooling=p.pooling,
        banned_ids=sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id,
                           tokenizer.unk_token_id}),
        vqa_answers=list(vqa_answers) if p.loss_weights.vqa > 0 else [],
        mlm=p.loss_weights.mlm > 0, mlm_through_fusion=p.mlm_through_fusion, mask_id=tokenizer.mask_token_id,
        vqa_generative=p.loss_weights.vqa_generative > 0, vqa_fused_memory=p.loss_weights.vqa_generative > 0,
        vision_arch=p.vision.arch, vision_stem=p.vision.stem, vision_position_init=p.vision.position_init,
        vision_name_or_path=p.vision.name_or_path, vision_finetune=p.vision.finetune,
        vision_trainable_layers=p.vision.trainable_layers,
        text_arch=p.text.arch, text_name_or_path=p.text.name_or_path, text_finetune=p.text.finetune,
        text_trainable_layers=p.text.trainable_layers,
    )


def multitask_loss(model: MultimodalModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   weights, gen: torch.Generator, itm_pairs: int = 32, *, foils: tuple | None = None,
                   triplet_margin: float = 0.2, vqa: VQABatch | None = None,
                   mlm_probability: float = 0.15, cache: FeatureCache | None = None) -> dict[str, torch.Tensor]:
    """The weighted objectives on one batch. ``foils``: ``(ids, mask, has)`` of one composition foil per
    caption; they become extra image->text negatives (NegCLIP, Yuksekgonul et al. ICLR 2023), which is
    what teaches the text side to bind attributes to objects instead of bagging words. ``vqa``: one
    question per image (:func:`mmplatform.train.batches.vqa_batch`); the ``vqa`` term needs it and the
    model's VQA head, the ``vqa_generative`` term needs it and decodes the answer after the question.
    The ``mlm`` term masks the batch's captions (``mlm_probability``, BERT's 80/10/10).
    ``cache``: this batch is one micro-batch of a gradient-accumulation step (:class:`FeatureCache`)."""
    img_tok = model.image_tokens(images)
    txt_tok = model.text_tokens(ids, mask)
    img = model.embed_image_tokens(img_tok)
    txt = model.embed_text_tokens(txt_tok, mask)
    neg, has = foil_features(model, foils)
    losses = set_level_losses(model, img, txt, neg, has, weights, triplet_margin, cache)
    if weights.itm > 0:
        # Negatives are mined over the whole batch, but only the first ``itm_pairs`` anchors are fused:
        # the fusion pass over 3x the anchors is the costly part, and the ITM loss saturates early.
        b = min(itm_pairs, images.shape[0])
        # Negatives ∝ softmax(cosine), milder than ALBEF's softmax(sim / temperature). ALBEF's encoders start
        # pretrained; ours start from scratch, and with the learned temperature (up to 100) the sampled caption
        # is nearly always a one-word variant of the positive, which a fresh fusion cannot tell apart: the ITM
        # loss then stays at its prior for whole epochs (measured on the default data: 0.56 after 5 epochs with
        # temperature sampling and foil negatives, vs 0.22 after 5 epochs with cosine sampling; the one-head
        # test in tests/test_training.py stays at its prior 0.63 with temperature sampling). Cosine sampling
        # still favours similar captions and lets the head learn the easy cases first.
        sim = img @ txt.T
        neg_txt = sample_hard_negatives(sim, gen)[:b]      # a hard caption for each image
        neg_img = sample_hard_negatives(sim.T, gen)[:b]    # a hard image for each caption
        # Each image's side of the fusion is computed once and shared by its pairs (img_index).
        anchors = torch.arange(b, device=images.device)
        fused_img = torch.cat([anchors, anchors, neg_img])
        fused_txt = torch.cat([txt_tok[:b], txt_tok[neg_txt], txt_tok[:b]])
        fused_mask = torch.cat([mask[:b], mask[neg_txt], mask[:b]])
        logits = model.itm_logits(img_tok, fused_txt, fused_mask, img_index=fused_img)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
        losses["itm"] = torch.nn.functional.cross_entropy(logits, labels)
    if weights.captioning > 0:
        logits = model.caption_logits(model.memory(img_tok), ids[:, :-1], mask[:, :-1])
        losses["captioning"] = caption_loss(logits, ids[:, 1:], model.cfg.pad_id)
    if getattr(weights, "vqa", 0.0) > 0 and vqa is not None and model.vqa_head is not None:
        losses["vqa"] = vqa_term(model, img_tok, vqa)
    if getattr(weights, "vqa_generative", 0.0) > 0 and vqa is not None and len(vqa.pos):
        losses["vqa_generative"] = model.generative_vqa_loss(img_tok[vqa.pos], vqa.ids, vqa.mask, vqa.answer_ids,
                                                             vqa.answer_mask)
    if getattr(weights, "mlm", 0.0) > 0 and model.mlm_head is not None:
        # ALBEF/BLIP: the masked caption is read by the text encoder, then attends to the image; a hidden
        # colour or relation word can only be recovered from the picture.
        inputs, labels = mlm_mask(ids, mask, model.cfg.vocab_size, model.special_ids(), model.cfg.mask_id,
                                  mlm_probability, gen)
        losses["mlm"] = mlm_loss(model.mlm_logits(img_tok, inputs, mask), labels)
    losses["total"] = sum(getattr(weights, k) * v for k, v in losses.items())
    return losses


def vqa_term(model: MultimodalModel, img_tok: torch.Tensor, batch: VQABatch) -> torch.Tensor:
    """VQA as answer classification (ViLT; Anderson et al. 2018): the fused (image, question) vector through
    the VQA head, binary cross-entropy against soft targets; with one reference answer per question the
    target is 1 for that answer and 0 for the others (``vqa_soft_targets``)."""
    head = model.vqa_head
    if len(batch.pos) == 0:
        # No question in this batch: a zero that still reaches the head, so every data-parallel worker
        # all-reduces the same set of gradients.
        return sum(q.sum() for q in head.parameters()) * 0.0
    logits = model.vqa_logits(img_tok, model.text_tokens(batch.ids, batch.mask), batch.mask, img_index=batch.pos)
    targets = F.one_hot(batch.label.clamp(min=0), logits.shape[1]).float() * (batch.label >= 0)[:, None]
    return vqa_loss(logits, targets)


# ----------------------------------------------------------------------------- set-level terms, accumulation
# The contrastive term (and NegCLIP's foils, and the triplet loss) scores every row against every other row
# of the batch: its value depends on the whole set, so splitting the batch into micro-batches would shrink
# the set of negatives. The other terms are means of per-sample losses.
SET_LEVEL = ("contrastive", "triplet")


@dataclass
class FeatureCache:
    """OpenCLIP's gradient accumulation (``open_clip/training/train.py``, ``accum_freq``; Cherti et al. 2023).

    Pass 1 embeds every micro-batch of the accumulated batch without a graph (:func:`contrastive_features`,
    concatenated here). Pass 2 runs each micro-batch again with gradients; its fresh features replace its
    rows (``start`` onwards) in this cache, and the set-level terms are computed on the whole set. The loss
    value is then the big batch's, each pass differentiates only its own rows, and the gradients summed
    over the passes equal the big batch's (the features are recomputed identically: no dropout).
    ``scale_grad``: only one pass lets the logit scale take its gradient; OpenCLIP lets every pass, which
    counts it ``accum_freq`` times."""

    img: torch.Tensor  # (N, D) the whole accumulated local batch, no grad
    txt: torch.Tensor
    neg: torch.Tensor | None  # (N, D) foil features, or None without foils
    has: torch.Tensor | None  # (N,) which rows have a foil
    start: int = 0
    scale_grad: bool = True

    @classmethod
    def from_parts(cls, parts: Sequence[tuple]) -> FeatureCache:
        # fp32 whatever the autocast: the set-level losses are computed in fp32 (see set_level_losses)
        cols = [torch.cat(c) if c[0] is not None else None for c in zip(*parts, strict=True)]
        return cls(*(c.float() if c is not None and c.is_floating_point() else c for c in cols))

    def at(self, start: int, scale_grad: bool) -> FeatureCache:
        return FeatureCache(self.img, self.txt, self.neg, self.has, start, scale_grad)

    def splice(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[:self.start], part.float(), full[self.start + len(part):]])


def foil_features(model: MultimodalModel, foils: tuple | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if foils is None:
        return None, None
    f_ids, f_mask, has = foils
    return model.embed_text_tokens(model.text_tokens(f_ids, f_mask), f_mask), has


@torch.no_grad()
def contrastive_features(model: MultimodalModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                         foils: tuple | None = None) -> tuple:
    """Pass 1 of accumulation: ``(img, txt, foil, has)`` features as :func:`multitask_loss` computes them."""
    img = model.embed_image_tokens(model.image_tokens(images))
    txt = model.embed_text_tokens(model.text_tokens(ids, mask), mask)
    return (img, txt, *foil_features(model, foils))


def set_level_losses(model: MultimodalModel, img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor | None,
                     has: torch.Tensor | None, weights, triplet_margin: float,
                     cache: FeatureCache | None = None) -> dict[str, torch.Tensor]:
    """Contrastive (NegCLIP foils as extra negatives when ``neg`` is given) and triplet terms. Features are
    gathered across workers with gradients inside the losses (OpenCLIP's local loss), so the negatives
    are the global batch's; with ``cache`` they are the whole accumulated global batch's."""
    scale = model.logit_scale
    if cache is not None:
        img, txt = cache.splice(cache.img, img), cache.splice(cache.txt, txt)
        if neg is not None:
            neg, has = cache.splice(cache.neg, neg), cache.has
        if not cache.scale_grad:
            scale = scale.detach()
    # fp32 logits even under bf16 autocast: at a logit scale of 100, bf16's 8-bit mantissa would move
    # scores by up to 0.5, more than the margins the loss is trying to learn.
    with torch.autocast(img.device.type, enabled=False):
        img, txt = img.float(), txt.float()
        if neg is not None:
            losses = {"contrastive": clip_loss_with_hard_negatives(img, txt, neg.float()[:, None], scale,
                                                                   has[:, None])}
        else:
            losses = {"contrastive": clip_loss(img, txt, scale)}
        if weights.triplet > 0:
            losses["triplet"] = triplet_loss(img, txt, triplet_margin)
    return losses


def accumulation_total(losses: dict[str, torch.Tensor], weights, accum_steps: int) -> torch.Tensor:
    """What one of ``accum_steps`` micro-batches backpropagates: set-level terms whole (with a
    :class:`FeatureCache` their value is the accumulated batch's and each pass differentiates only its own
    rows, so the passes add up to the big batch's gradient), per-sample terms divided by ``accum_steps``
    (their mean over the accumulated batch). Not carried over micro-batches: ITM mines its hard negatives
    within the micro-batch (as ALBEF mines within each GPU's batch): fusing against another micro-batch's
    token states would need them all kept with their graphs, the memory that accumulation saves; and the
    captioning/MLM cross-entropies are means over each micro-batch's tokens, so micro-batches with fewer
    tokens weigh a little more than in one big batch."""
    return sum(getattr(weights, k) * v * (1.0 if k in SET_LEVEL else 1.0 / accum_steps)
               for k, v in losses.items() if k != "total")


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the all-padding tail of a batch (dynamic padding: attention cost follows real length)."""
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]


@torch.no_grad()
def recall_at_1(model: MultimodalModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                batch: int = 256) -> float:
    """Text→image R@1 with one caption per image (row i describes image i)."""
    img = torch.cat([model.embed_images(images[i:i + batch]) for i in range(0, len(images), batch)])
    txt = torch.cat([model.embed_texts(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
    return float(((txt @ img.T).argmax(1) == torch.arange(len(img))).float().mean())
