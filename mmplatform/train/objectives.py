"""What one training step optimises: the model built from params, and the weighted multi-task loss.

Kept apart from the loop (``recipe``) so the objectives, the heads and the loop can change independently;
``recipe.train_loop_per_worker`` and ``bench/train_bench.py`` both call :func:`multitask_loss`.
"""

from __future__ import annotations

import torch

from mmplatform.config import TrainParams
from mmplatform.models.losses import (
    caption_loss,
    clip_loss,
    clip_loss_with_hard_negatives,
    sample_hard_negatives,
    triplet_loss,
)
from mmplatform.models.multimodal import ModelConfig, MultimodalModel


def model_config(p: TrainParams, tokenizer, image_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.cls_token_id,
        eos_id=tokenizer.sep_token_id, image_size=image_size, patch_size=p.vision.patch_size,
        vision_hidden=p.vision.hidden_size, vision_layers=p.vision.layers, vision_heads=p.vision.heads,
        text_hidden=p.text.hidden_size, text_layers=p.text.layers, text_heads=p.text.heads,
        max_length=p.text.max_length, decoder_hidden=p.decoder.hidden_size,
        decoder_layers=p.decoder.layers, decoder_heads=p.decoder.heads, embed_dim=p.embed_dim,
        fusion=p.fusion,
        banned_ids=sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id,
                           tokenizer.unk_token_id}),
    )


def multitask_loss(model: MultimodalModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   weights, gen: torch.Generator, itm_pairs: int = 32, *, foils: tuple | None = None,
                   triplet_margin: float = 0.2) -> dict[str, torch.Tensor]:
    """The weighted objectives on one batch. ``foils``: ``(ids, mask, has)`` of one composition foil per
    caption; they become extra image->text negatives (NegCLIP, Yuksekgonul et al. ICLR 2023), which is
    what teaches the text side to bind attributes to objects instead of bagging words."""
    img_tok = model.image_tokens(images)
    txt_tok = model.text_tokens(ids, mask)
    img = model.embed_image_tokens(img_tok)
    txt = model.embed_text_tokens(txt_tok)
    if foils is not None:
        f_ids, f_mask, has = foils
        neg = model.embed_text_tokens(model.text_tokens(f_ids, f_mask))
        losses = {"contrastive": clip_loss_with_hard_negatives(img, txt, neg[:, None], model.logit_scale,
                                                               has[:, None])}
    else:
        losses = {"contrastive": clip_loss(img, txt, model.logit_scale)}
    if weights.triplet > 0:
        losses["triplet"] = triplet_loss(img, txt, triplet_margin)
    if weights.itm > 0:
        # Negatives are mined over the whole batch, but only the first ``itm_pairs`` anchors are fused:
        # the fusion pass over 3x the anchors is the costly part, and the ITM loss saturates early.
        b = min(itm_pairs, images.shape[0])
        sim = img @ txt.T
        neg_txt = sample_hard_negatives(sim, gen)[:b]      # a hard caption for each image
        neg_img = sample_hard_negatives(sim.T, gen)[:b]    # a hard image for each caption
        fused_img = torch.cat([img_tok[:b], img_tok[:b], img_tok[neg_img]])
        fused_txt = torch.cat([txt_tok[:b], txt_tok[neg_txt], txt_tok[:b]])
        fused_mask = torch.cat([mask[:b], mask[neg_txt], mask[:b]])
        logits = model.itm_logits(fused_img, fused_txt, fused_mask)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
        losses["itm"] = torch.nn.functional.cross_entropy(logits, labels)
    if weights.captioning > 0:
        logits = model.caption_logits(model.memory(img_tok), ids[:, :-1], mask[:, :-1])
        losses["captioning"] = caption_loss(logits, ids[:, 1:], model.cfg.pad_id)
    losses["total"] = sum(getattr(weights, k) * v for k, v in losses.items())
    return losses


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
