"""The multimodal model: two ``transformers`` encoders, a fusion module, and its heads.

Composition, not inheritance (torchtune): ``MultimodalModel`` holds
- ``vision``: a :class:`~mmplatform.models.encoders.VisionEncoder`: by default a ``ViTModel`` built from the
  small config in ``ModelConfig``; ``vision_arch`` picks another small builder (ConvNeXt, DINOv2, CLIP), and
  ``vision_name_or_path`` any ``transformers`` vision model by hub name or local folder, with its processor;
- ``text``: a :class:`~mmplatform.models.encoders.TextEncoder`: by default a ``BertModel`` from the small
  config, fed by a locally trained word-level tokenizer; ``text_name_or_path`` loads a pretrained text model,
  whose own tokenizer is then used (``train.objectives.make_tokenizer``);
- ``fusion`` (:mod:`mmplatform.models.fusion`) + ``itm_head``: image-text matching on the fused pair;
- projections + a learned temperature for contrastive alignment (CLIP; temperature init 0.07, clamped);
- ``decoder``: a ``BertLMHeadModel`` with cross-attention over the projected image tokens, the captioner
  (and, with a question as its prefix, the generative VQA answerer: BLIP's answer decoder);
- ``vqa_head`` (only when ``cfg.vqa_answers`` is set): answer classification over the fused (image,
  question) vector, the same ``fusion`` the ITM head reads (:class:`~mmplatform.models.heads.VQAClassifier`);
- ``mlm_head`` (only when ``cfg.mlm``): masked words predicted from the fusion encoder's token states
  (``cfg.mlm_through_fusion``, ALBEF), or from the text states with its own cross-attention to
  the image (:class:`~mmplatform.models.heads.MLMHead`, ALBEF/BLIP).

Saved as ``model.safetensors`` + ``model_config.json`` + ``tokenizer/`` in one directory, plus
``vision_encoder/`` / ``text_encoder/`` (``config.json`` and processor / tokenizer, no weights) for a
pretrained encoder, so the saved model rebuilds its architecture offline without the hub. The optional
heads and the encoder fields default to off / today's small encoders, so a ``model_config.json`` written before
they existed still loads; so do its weights, saved when the encoders were bare ``ViTModel`` / ``BertModel``
attributes (``vision.*`` keys are read as ``vision.model.*``, see ``_upgrade_old_keys``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import BertConfig, BertLMHeadModel, BertModel, ViTConfig, ViTModel

from mmplatform.models.encoders import (
    ConvStem,
    TextEncoder,
    VisionEncoder,
    load_text_encoder,
    load_vision_encoder,
    sincos_positions,
    small_text_encoder,
    small_vision_encoder,
    text_encoder_from_config,
    vision_encoder_from_config,
)
from mmplatform.models.fusion import build_fusion
from mmplatform.models.heads import MLMHead, MLMPrediction, VQAClassifier, normalize_answer


@dataclass
class ModelConfig:
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 48
    decoder_hidden: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    embed_dim: int = 128
    fusion: str = "cross_attention"
    # Depth of the attention fusions; None (configs saved before the option): cross_attention one block without
    # text self-attention, multimodal_transformer MT_LAYERS. fusion_self_attention: cross_attention's text
    # self-attention in each block (False in those older configs).
    fusion_layers: int | None = None
    fusion_self_attention: bool = False
    # What the contrastive embeddings project: "cls" (token 0, as models saved before this option did) or
    # "mean" (text: mean over the attention mask; image: mean over the tokens after token 0).
    pooling: str = "cls"
    # Special tokens the captioner may never emit ([PAD], [CLS], [MASK], [UNK]); [SEP] ends a caption.
    banned_ids: list[int] = field(default_factory=list)
    # Optional heads (defaults = absent, so configs saved before they existed load unchanged).
    # VQA answer vocabulary in class order (built from the training answers by build_answer_vocab); [] = no head.
    vqa_answers: list[str] = field(default_factory=list)
    mlm: bool = False  # build the masked-language-modelling head (image context)
    # MLM over the fusion encoder's token states (ALBEF) instead of its own cross-attention head (MLMHead).
    mlm_through_fusion: bool = False
    vqa_generative: bool = False  # the decoder was also trained to answer questions (question as prefix)
    # The answer decoder also reads the fusion's (image, question) vector, as BLIP's reads its fusion encoder's
    # output: one more memory token before the image's. False for models saved before it (they answer without).
    vqa_fused_memory: bool = False
    mask_id: int | None = None  # the tokenizer's [MASK], needed by MLM
    # Encoders (defaults = the small ViT / BERT above, so older configs load unchanged). *_name_or_path: a
    # transformers model by hub name or local folder; its hidden size then replaces *_hidden.
    vision_arch: str = "vit"
    # The small ViT's patch projection: "patch" (one p x p projection, as configs saved before the option) or
    # "conv" (encoders.ConvStem); and how its position embeddings start: "random" (transformers' default) or
    # "sincos" (encoders.sincos_positions, then learned). Pretrained encoders keep their own.
    vision_stem: str = "patch"
    vision_position_init: str = "random"
    vision_name_or_path: str | None = None
    vision_finetune: str = "full"
    vision_trainable_layers: int = 2
    text_arch: str = "bert"
    text_name_or_path: str | None = None
    text_finetune: str = "full"
    text_trainable_layers: int = 2

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """From ``model_config.json``; keys this version does not know are an error that names them."""
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k not in _RETIRED_KEYS}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"model_config.json: unknown keys {unknown} (written by a newer version?)")
        return cls(**raw)


# Keys that model_config.json files of earlier versions carry and this version ignores: ``extra`` (an
# always-empty dict of the first version).
_RETIRED_KEYS = frozenset({"extra"})


def _no_dropout() -> dict:
    # Small models on small synthetic data do not need dropout, and RL's sampled log-probs must match the
    # policy that is being updated (dropout in train mode would make them differ).
    return {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


VISION_DIR, TEXT_DIR = "vision_encoder", "text_encoder"  # a pretrained encoder's config beside the weights


def build_vision_encoder(cfg: ModelConfig, saved: Path | None = None) -> VisionEncoder:
    """The vision encoder ``cfg`` names. ``saved``: a saved model's folder; a pretrained encoder's architecture is
    then rebuilt from ``saved/vision_encoder`` (no hub, no weights: they come from the model's safetensors)."""
    ft = {"finetune": cfg.vision_finetune, "trainable_layers": cfg.vision_trainable_layers}
    if cfg.vision_name_or_path:
        if saved is not None:
            return vision_encoder_from_config(saved / VISION_DIR, **ft)
        return load_vision_encoder(cfg.vision_name_or_path, **ft)
    if cfg.vision_arch == "vit":
        # Built as before the encoders module existed (no pooler constructed), so a seed gives the same weights.
        vit = ViTModel(ViTConfig(
            image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
            hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, intermediate_size=4 * cfg.vision_hidden, **_no_dropout(),
        ), add_pooling_layer=False)
        if cfg.vision_stem == "conv":
            vit.embeddings.patch_embeddings.projection = ConvStem(3, cfg.vision_hidden, cfg.patch_size)
        if cfg.vision_position_init == "sincos":
            with torch.no_grad():
                grid = cfg.image_size // cfg.patch_size
                vit.embeddings.position_embeddings[0, 1:] = sincos_positions(grid, cfg.vision_hidden)
        return VisionEncoder(vit, **ft)
    return small_vision_encoder(cfg.vision_arch, image_size=cfg.image_size, hidden=cfg.vision_hidden,
                                layers=cfg.vision_layers, patch_size=cfg.patch_size, heads=cfg.vision_heads, **ft)


def build_text_encoder(cfg: ModelConfig, saved: Path | None = None) -> TextEncoder:
    """The text encoder ``cfg`` names; ``saved`` as in :func:`build_vision_encoder`."""
    ft = {"finetune": cfg.text_finetune, "trainable_layers": cfg.text_trainable_layers}
    if cfg.text_name_or_path:
        if saved is not None:
            return text_encoder_from_config(saved / TEXT_DIR, **ft)
        return load_text_encoder(cfg.text_name_or_path, **ft)
    if cfg.text_arch == "bert":
        return TextEncoder(BertModel(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, intermediate_size=4 * cfg.text_hidden,
            max_position_embeddings=cfg.max_length, pad_token_id=cfg.pad_id, **_no_dropout(),
        ), add_pooling_layer=False), **ft)
    return small_text_encoder(cfg.text_arch, vocab_size=cfg.vocab_size, hidden=cfg.text_hidden,
                              layers=cfg.text_layers, max_length=cfg.max_length, heads=cfg.text_heads,
                              pad_id=cfg.pad_id, **ft)


def _upgrade_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # Weights saved before the encoders were wrapped: "vision.embeddings..." is now "vision.model.embeddings...".
    for part in ("vision.", "text."):
        old = prefix + part
        if any(k.startswith(old + "model.") for k in state_dict):
            continue
        for k in [k for k in state_dict if k.startswith(old)]:
            state_dict[old + "model." + k[len(old):]] = state_dict.pop(k)


def fusion_kwargs(cfg: ModelConfig) -> dict:
    """The fusion constructor's depth options from a model config (see ``ModelConfig.fusion_layers``)."""
    if cfg.fusion == "cross_attention":
        return {"layers": cfg.fusion_layers or 1, "self_attention": cfg.fusion_self_attention}
    if cfg.fusion == "multimodal_transformer" and cfg.fusion_layers:
        return {"layers": cfg.fusion_layers}
    return {}


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, saved: str | Path | None = None):
        """``saved``: the folder a model is being loaded from (see :meth:`load`), so that pretrained encoders are
        rebuilt from their saved configs instead of being fetched."""
        super().__init__()
        self.cfg = cfg
        saved = Path(saved) if saved is not None else None
        self.vision = build_vision_encoder(cfg, saved)
        self.text = build_text_encoder(cfg, saved)
        vision_hidden, text_hidden = self.vision.hidden_size, self.text.hidden_size
        self.img_proj = nn.Linear(vision_hidden, cfg.embed_dim, bias=False)
        self.txt_proj = nn.Linear(text_hidden, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.fusion = build_fusion(cfg.fusion, vision_hidden, text_hidden, cfg.embed_dim, **fusion_kwargs(cfg))
        self.itm_head = nn.Linear(self.fusion.out_dim, 2)
        self.memory_proj = nn.Linear(vision_hidden, cfg.decoder_hidden)
        self.decoder = BertLMHeadModel(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.decoder_hidden, num_hidden_layers=cfg.decoder_layers,
            num_attention_heads=cfg.decoder_heads, intermediate_size=4 * cfg.decoder_hidden,
            max_position_embeddings=cfg.max_length + 2, pad_token_id=cfg.pad_id, is_decoder=True,
            add_cross_attention=True, **_no_dropout(),
        ))
        self.vqa_head = VQAClassifier(self.fusion.out_dim, len(cfg.vqa_answers)) if cfg.vqa_answers else None
        self.answer_proj = (nn.Linear(self.fusion.out_dim, cfg.decoder_hidden)
                            if cfg.vqa_generative and cfg.vqa_fused_memory else None)
        if cfg.mlm and cfg.mask_id is None:
            raise ValueError("ModelConfig.mlm needs mask_id (the tokenizer's [MASK] id)")
        mlm_heads = getattr(self.text.config, "num_attention_heads", None) or cfg.text_heads
        if cfg.mlm and cfg.mlm_through_fusion and not hasattr(self.fusion, "token_states"):
            raise ValueError(f"mlm_through_fusion needs a fusion with token states (cross_attention), not {cfg.fusion}")
        self.mlm_head = (None if not cfg.mlm else MLMPrediction(self.fusion.out_dim, cfg.vocab_size)
                         if cfg.mlm_through_fusion else MLMHead(text_hidden, vision_hidden, cfg.vocab_size,
                                                                heads=mlm_heads))
        # Images come in as uint8; normalise inside the model so every caller gets the same transform. A
        # pretrained encoder gets its own processor's resize and mean/std (VisionEncoder.preprocess); the small
        # ones keep this fixed 0.5/0.5 transform, bit for bit what models trained before it saw.
        self._processor_pixels = bool(cfg.vision_name_or_path)
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_load_state_dict_pre_hook(_upgrade_old_keys)

    # ------------------------------------------------------------------ encoders
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → what the vision encoder takes."""
        if self._processor_pixels:
            return self.vision.preprocess(images)
        return (images.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision.tokens(self.pixel_values(images))

    def text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text.tokens(ids, mask)

    # Mean pooling: a freshly initialised encoder's [CLS] output is nearly the same for every input (its
    # attention starts uniform), so the contrastive loss sits at ln(B) until [CLS] learns to gather; the mean
    # of the tokens differs from the first step (measured on the default model and data: the loss leaves the
    # plateau ~50 steps earlier). OpenCLIP offers both (pool_type "tok" / "avg").
    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, 1:].mean(1) if self.cfg.pooling == "mean" and tokens.shape[1] > 1 else tokens[:, 0]
        return F.normalize(self.img_proj(pooled), dim=-1)

    def embed_text_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "mean":
            m = mask[..., None].to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            pooled = tokens[:, 0]
        return F.normalize(self.txt_proj(pooled), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_image_tokens(self.image_tokens(images))

    @torch.no_grad()
    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed_text_tokens(self.text_tokens(ids, mask), mask)

    def itm_logits(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, mask: torch.Tensor,
                   img_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2) match scores of pair ``j`` = (image ``img_index[j]``, text ``j``); without ``img_index`` the
        image tokens are one row per pair (see :mod:`mmplatform.models.fusion`)."""
        return self.itm_head(self.fusion(img_tokens, txt_tokens, mask, img_index))

    # ------------------------------------------------------------------ VQA and MLM heads
    def vqa_logits(self, img_tokens: torch.Tensor, q_tokens: torch.Tensor, q_mask: torch.Tensor,
                   img_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_answers) answer scores from the fused (image, question) pair; ``img_index`` as in
        :meth:`itm_logits`."""
        if self.vqa_head is None:
            raise ValueError("this model has no VQA head (it was trained without VQA answers)")
        return self.vqa_head(self.fusion(img_tokens, q_tokens, q_mask, img_index))

    @torch.no_grad()
    def answer_questions(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The most likely answer (normalised text) to question ``ids[i]`` about ``images[i]``."""
        logits = self.vqa_logits(self.image_tokens(images), self.text_tokens(ids, mask), mask)
        return [self.cfg.vqa_answers[int(i)] for i in logits.argmax(-1)]

    def answer_index(self, answers: list[str]) -> torch.Tensor:
        """Class index of each answer after VQA normalisation; -1 where it is outside the vocabulary."""
        vocab = {a: i for i, a in enumerate(self.cfg.vqa_answers)}
        return torch.tensor([vocab.get(normalize_answer(a), -1) for a in answers], dtype=torch.long)

    def mlm_logits(self, img_tokens: torch.Tensor, masked_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) scores of every position of a masked caption, read with the image as context."""
        if self.mlm_head is None:
            raise ValueError("this model has no MLM head (ModelConfig.mlm is off)")
        if self.cfg.mlm_through_fusion:
            return self.mlm_head(self.fusion.token_states(img_tokens, self.text_tokens(masked_ids, mask), mask))
        return self.mlm_head(self.text_tokens(masked_ids, mask), img_tokens, mask)

    def special_ids(self) -> list[int]:
        """Token ids MLM never masks nor samples: [PAD], [CLS], [SEP], [MASK], [UNK]."""
        ids = {self.cfg.pad_id, self.cfg.bos_id, self.cfg.eos_id, *self.cfg.banned_ids}
        if self.cfg.mask_id is not None:
            ids.add(self.cfg.mask_id)
        return sorted(ids)

    # ------------------------------------------------------------------ generative VQA (the decoder)
    def answer_sequences(self, q_ids: torch.Tensor, q_mask: torch.Tensor, a_ids: torch.Tensor,
                         a_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[CLS] question [SEP] answer [SEP]`` per row, right-padded: (ids, attention mask, labels); labels
        are the answer tokens and the final [SEP], -100 on the question (a prefix, not predicted) and padding.
        ``q_ids``/``a_ids`` are tokenized as usual (``[CLS] ... [SEP]``); the answer's [CLS] is dropped."""
        q_len, a_len = q_mask.sum(1).tolist(), a_mask.sum(1).tolist()
        limit = self.decoder.config.max_position_embeddings + 1  # the input is ids[:, :-1]
        rows = [torch.cat([q_ids[i, :q], a_ids[i, 1:a]])[:limit]
                for i, (q, a) in enumerate(zip(q_len, a_len, strict=True))]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.cfg.pad_id, dtype=torch.long, device=q_ids.device)
        labels = torch.full_like(ids, -100)
        for i, (r, q) in enumerate(zip(rows, q_len, strict=True)):
            ids[i, :len(r)] = r
            labels[i, q:len(r)] = r[q:]
        return ids, (ids != self.cfg.pad_id).long(), labels

    def fused_question(self, img_tokens: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor
                       ) -> torch.Tensor | None:
        """The fusion's (B, out_dim) vector of each (image, question), which the answer decoder reads; None for a
        model whose answer decoder reads the image only."""
        if self.answer_proj is None:
            return None
        return self.fusion(img_tokens, self.text_tokens(q_ids, q_mask), q_mask)

    def answer_memory(self, img_tokens: torch.Tensor, fused: torch.Tensor | None) -> torch.Tensor:
        """The answer decoder's cross-attention memory: [projected fused vector;] projected image tokens."""
        memory = self.memory(img_tokens)
        if fused is None:
            return memory
        return torch.cat([self.answer_proj(fused)[:, None], memory], 1)

    def generative_vqa_loss(self, img_tokens: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor,
                            a_ids: torch.Tensor, a_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of the answer tokens given the image and the question (BLIP's answer
        decoder, here the captioner itself with the question as its prompt, reading the fusion's output too)."""
        ids, attn, labels = self.answer_sequences(q_ids, q_mask, a_ids, a_mask)
        memory = self.answer_memory(img_tokens, self.fused_question(img_tokens, q_ids, q_mask))
        logits = self.caption_logits(memory, ids[:, :-1], attn[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    @torch.no_grad()
    def generate_answers(self, images: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor,
                         max_length: int = 4) -> list[torch.Tensor]:
        """Greedy answer tokens (up to [SEP], excluded) for each question, decoded after the question
        prefix with the KV cache; questions of equal length are decoded together (no padding inside)."""
        img_tokens = self.image_tokens(images)
        memory = self.answer_memory(img_tokens, self.fused_question(img_tokens, q_ids, q_mask))
        q_len = q_mask.sum(1)
        out: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(q_ids)
        for n in q_len.unique().tolist():
            rows = (q_len == n).nonzero().squeeze(1)
            steps = max(1, min(max_length, self.decoder.config.max_position_embeddings - n))
            seq, _ = self.generate(memory[rows], steps, greedy=True, prefix=q_ids[rows, :n])
            for k, r in enumerate(rows.tolist()):
                end = (seq[k] == self.cfg.eos_id).nonzero()
                out[r] = seq[k, :int(end[0])] if len(end) else seq[k]
        return out

    # ------------------------------------------------------------------ captioner
    def memory(self, img_tokens: torch.Tensor) -> torch.Tensor:
        return self.memory_proj(img_tokens)

    def caption_logits(self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: position t predicts token t+1."""
        return self.decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory).logits

    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.cfg.banned_ids:
            return logits
        return logits.index_fill(-1, torch.tensor(self.cfg.banned_ids, device=logits.device), float("-inf"))

    def generate(self, memory: torch.Tensor, max_length: int, *, greedy: bool = True,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with the KV cache. Returns (tokens (B, T) after [CLS] — or after ``prefix``, (B, L) ids that
        start with [CLS], the same length in every row: generative VQA's ``[CLS] question [SEP]`` — ending in
        [SEP] then [PAD]s; log-probs (B, T) of the chosen tokens, 0 after the end). Gradients flow when enabled."""
        b = memory.shape[0]
        cur = (torch.full((b, 1), self.cfg.bos_id, dtype=torch.long, device=memory.device)
               if prefix is None else prefix)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        past, toks, logps = None, [], []
        for _ in range(max_length):
            out = self.decoder(input_ids=cur, encoder_hidden_states=memory, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = torch.log_softmax(self._allowed(out.logits[:, -1].float()) / temperature, dim=-1)
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            lp = logp.gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.pad_id), nxt)
            toks.append(nxt)
            logps.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | (nxt == self.cfg.eos_id)
            cur = nxt[:, None]
            if bool(done.all()):
                break
        return torch.stack(toks, 1), torch.stack(logps, 1)

    def sequence_logprobs(self, memory: torch.Tensor, tokens: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One teacher-forced pass over ``tokens`` (as returned by :meth:`generate`), used for RL updates
        and the KL to the reference. Returns (per-token log-probs (B, T), 0 after the episode;
        full log-softmax (B, T, V); episode mask (B, T))."""
        b = tokens.shape[0]
        bos = torch.full((b, 1), self.cfg.bos_id, dtype=torch.long, device=tokens.device)
        inp = torch.cat([bos, tokens[:, :-1]], 1)
        valid = token_mask(tokens, self.cfg.eos_id, self.cfg.pad_id)
        attn = torch.cat([torch.ones_like(bos), valid[:, :-1].long()], 1)
        logits = self._allowed(self.caption_logits(memory, inp, attn).float())
        logp = torch.log_softmax(logits, -1)
        chosen = logp.gather(2, tokens[:, :, None]).squeeze(2)
        # where, not multiply: padding after the episode is a banned token (log-prob -inf) and -inf * 0 = nan
        return torch.where(valid > 0, chosen, torch.zeros_like(chosen)), logp, valid

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / "model.safetensors"))  # handles the decoder's tied embeddings
        (path / "model_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        if self.cfg.vision_name_or_path:
            self.vision.save_config(path / VISION_DIR)
        if self.cfg.text_name_or_path:
            self.text.save_config(path / TEXT_DIR)

    @classmethod
    def load(cls, path: str | Path) -> MultimodalModel:
        path = Path(path)
        cfg = ModelConfig.from_dict(json.loads((path / "model_config.json").read_text()))
        model = cls(cfg, saved=path)
        load_model(model, str(path / "model.safetensors"))
        return model.eval()


def token_mask(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1.0 up to and including the first [SEP] (the episode), 0.0 after it."""
    is_eos = tokens == eos_id
    after = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # >0 strictly after the first eos
    return ((after == 0) & (tokens != pad_id)).float()
