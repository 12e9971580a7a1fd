"""Unimodal encoders: any Hugging Face ``transformers`` vision or text model behind one small interface.

What: :func:`load_vision_encoder` / :func:`load_text_encoder` load a model by hub name or local folder (with its
image processor / tokenizer when the folder or repo has one) and wrap it as :class:`VisionEncoder` /
:class:`TextEncoder`; :func:`small_vision_encoder` / :func:`small_text_encoder` build tiny ones from configs for
the tests and the offline demo. Every wrapper answers ``tokens(...) -> (B, N, D)``, a token sequence whose first
token is the summary of the input, so fusion modules and heads need not know which backbone they sit on:

- ViT / DeiT / BEiT / DINOv2 (Oquab et al. 2023): ``last_hidden_state``, token 0 is [CLS];
- CLIP vision (Radford et al. 2021): ``post_layernorm(last_hidden_state)``, so token 0 equals CLIP's
  ``pooler_output`` (the vector CLIP projects) and every parameter lies on the path the loss sees;
- ConvNeXt-like CNNs (Liu et al. 2022), whose ``last_hidden_state`` is a (B, C, H, W) feature map: the map
  flattened into H*W tokens (passed through the model's final norm) with ``pooler_output`` prepended;
- BERT / RoBERTa / DistilBERT (text): ``last_hidden_state``, token 0 is [CLS] / <s>.

Why the safety rules: weights are loaded with ``use_safetensors=True`` and ``trust_remote_code=False``, always. A
pickled ``pytorch_model.bin`` can run arbitrary code when loaded, and remote code is code from the hub
(transformers' SECURITY.md recommends both). Offline (``HF_HUB_OFFLINE=1`` or no network) a hub name that is not
in the local cache fails with one line (:class:`EncoderNotFoundError`) that says to give a local path.

Fine-tuning modes (transfer from pretrained encoders when data are sparse; the "partial" mode follows the
common practice of tuning only the top blocks, e.g. Yosinski et al. 2014, "How transferable are features"):
``full`` trains everything; ``partial`` trains only the last ``trainable_layers`` blocks / stages and the final
norms; ``frozen`` trains nothing and keeps the encoder in eval mode even when the parent calls ``.train()``.

Try it: ``python -c "from mmplatform.models.encoders import small_vision_encoder as s; print(s('convnext'))"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

Finetune = Literal["full", "partial", "frozen"]
FINETUNE_MODES = ("full", "partial", "frozen")
VISION_KINDS = ("vit", "convnext", "dinov2", "clip")
TEXT_KINDS = ("bert", "roberta", "distilbert")

# Names a model's list of transformer blocks / CNN stages goes by across transformers' architectures
# (ViT: layers; BERT, DINOv2: encoder.layer; CLIP: encoder.layers; DistilBERT: transformer.layer; ConvNeXt:
# encoder.stages; GPT-2-like: h; timm-like: blocks).
_LAYER_LIST_NAMES = ("layer", "layers", "stages", "blocks", "block", "h")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class EncoderNotFoundError(ValueError):
    """An encoder could not be loaded; the message is one line that says what to do."""


# --------------------------------------------------------------------------------------------- loading helpers
def _offline() -> bool:
    # Read the environment at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else (absolute, relative, home, deeper) is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_local_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise EncoderNotFoundError(f"{what} '{path}': no such folder; give a folder with config.json and "
                                   "model.safetensors, or a hub name")
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError(f"{what} '{path}': no config.json in the folder; save the model with "
                                   "save_pretrained() or give a hub name")
    if any((path / f).is_file() for f in _SAFE_WEIGHTS):
        return
    if any((path / f).is_file() for f in _PICKLE_WEIGHTS) or list(path.glob("*.bin")):
        raise EncoderNotFoundError(f"{what} '{path}': only pickle weights (pytorch_model.bin), which can run "
                                   "arbitrary code when loaded; convert them to model.safetensors first")
    raise EncoderNotFoundError(f"{what} '{path}': no model.safetensors in the folder")


def _resolve(name_or_path: str | os.PathLike, what: str) -> tuple[str, bool]:
    """Return (what to pass to from_pretrained, local_files_only); raise a one-line error when it cannot load."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() or _looks_like_path(name):
        _check_local_folder(path, what)
        return str(path), True
    offline = _offline()
    try:  # the config alone tells us whether the repo is reachable (cached, or online)
        AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=offline)
    except OSError as err:
        text = str(err)
        if offline or "couldn't connect" in text.lower() or "connection" in text.lower():
            raise EncoderNotFoundError(
                f"{what} '{name}': not found locally and the hub is unreachable; give a local path "
                "(a folder with config.json and model.safetensors)") from None
        raise EncoderNotFoundError(f"{what} '{name}': not found on the hub nor locally "
                                   f"({text.splitlines()[0] if text else type(err).__name__})") from None
    return name, offline


def _load_model(name: str, local_only: bool, what: str) -> PreTrainedModel:
    try:
        return AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False,
                                         local_files_only=local_only)
    except OSError as err:  # a hub repo with only pickle weights, or a download cut short
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "safetensors" in first:
            raise EncoderNotFoundError(f"{what} '{name}': no model.safetensors (only pickle weights, which can run "
                                       "arbitrary code when loaded); convert it or choose another checkpoint"
                                       ) from None
        raise EncoderNotFoundError(f"{what} '{name}': could not load the weights ({first})") from None


def _load_optional(loader: Any, name: str, local_only: bool, what: str) -> Any:
    try:
        return loader.from_pretrained(name, trust_remote_code=False, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("%s '%s': no %s (%s)", what, name, loader.__name__, str(err).splitlines()[0] if str(err) else err)
        return None


def _sub_model(model: PreTrainedModel, attr: str) -> PreTrainedModel:
    # Dual-encoder checkpoints (CLIP, SigLIP, ...) load as the whole pair; keep the tower we were asked for.
    sub = getattr(model, attr, None)
    return sub if isinstance(sub, PreTrainedModel) else model


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


# --------------------------------------------------------------------------------------------- freezing
def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's sequence of blocks / stages: the shallowest ``nn.ModuleList`` named one of
    ``layer, layers, stages, blocks, block, h`` (so ``encoder.stages`` wins over ``encoder.stages.0.layers``)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of layers found (looked for "
                         f"{', '.join(_LAYER_LIST_NAMES)}); use finetune='full' or 'frozen'")
    return best[1], best[2]


def _final_norms(model: nn.Module) -> list[nn.Module]:
    # Norms that sit after the blocks: top-level children with "norm" in the name, except pre-norms (CLIP's
    # pre_layrnorm sits before the blocks).
    return [m for n, m in model.named_children() if "norm" in n.lower() and not n.lower().startswith("pre")]


def apply_finetune(model: nn.Module, finetune: str, trainable_layers: int = 2) -> None:
    """Set ``requires_grad`` on ``model``'s parameters for one of :data:`FINETUNE_MODES`."""
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    if finetune == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if finetune == "frozen":
        return
    if trainable_layers < 1:
        raise ValueError(f"trainable_layers must be >= 1 for finetune='partial', got {trainable_layers}")
    _, layers = find_layer_list(model)
    for block in list(layers)[-trainable_layers:]:
        block.requires_grad_(True)
    for norm in _final_norms(model):
        norm.requires_grad_(True)


class _Encoder(nn.Module):
    """Shared parts: the wrapped model, the fine-tuning mode, and saving."""

    def __init__(self, model: PreTrainedModel, finetune: str, trainable_layers: int):
        super().__init__()
        self.model = model
        self.finetune = finetune
        self.trainable_layers = trainable_layers
        apply_finetune(model, finetune, trainable_layers)
        if finetune == "frozen":
            self.model.eval()

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def train(self, mode: bool = True) -> _Encoder:
        super().train(mode)
        if self.finetune == "frozen":
            self.model.eval()  # a frozen encoder keeps eval behaviour (dropout off) inside a training parent
        return self

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _save_extra(self, path: str) -> None:  # processor / tokenizer
        raise NotImplementedError

    def save_config(self, path: str | os.PathLike) -> None:
        """Save only ``config.json`` and the processor / tokenizer: what :func:`vision_encoder_from_config` /
        :func:`text_encoder_from_config` need to rebuild the architecture when the weights live elsewhere (e.g. in
        a parent model's ``model.safetensors``)."""
        self.config.save_pretrained(str(path))
        self._save_extra(str(path))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the model (``config.json`` + ``model.safetensors``; transformers 5 writes safetensors only) and
        its processor / tokenizer, so that :func:`load_vision_encoder` / :func:`load_text_encoder` reads it back."""
        self.model.save_pretrained(str(path))
        self._save_extra(str(path))


# --------------------------------------------------------------------------------------------- vision
class VisionEncoder(_Encoder):
    """A vision backbone as ``tokens(pixel_values) -> (B, N, D)``, summary token first.

    ``preprocess(images)`` turns uint8 images (B, 3, H, W) into the ``pixel_values`` the backbone was trained on:
    resize / centre crop to the processor's size, rescale, normalise with the processor's mean and std (0.5 / 0.5
    and the config's ``image_size`` when there is no processor)."""

    def __init__(self, model: PreTrainedModel, processor: Any = None, *, finetune: str = "full",
                 trainable_layers: int = 2):
        model = _sub_model(model, "vision_model")
        pooler = getattr(model, "pooler", None)
        if getattr(model.config, "hidden_size", None) and isinstance(pooler, nn.Module) and any(
                True for _ in pooler.parameters()):
            model.pooler = None  # ViT's tanh pooler is not on the token path: unused weights break DDP
        super().__init__(model, finetune, trainable_layers)
        self._clip = model.config.model_type in {"clip_vision_model", "clip"}
        self.processor = processor
        mean = _tuple3(getattr(processor, "image_mean", None), 0.5)
        std = _tuple3(getattr(processor, "image_std", None), 0.5)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.do_normalize = bool(getattr(processor, "do_normalize", True))
        self.rescale_factor = float(getattr(processor, "rescale_factor", None) or 1 / 255)
        self.resize_shortest, self.image_size = self._target_size(processor)

    def _target_size(self, processor: Any) -> tuple[int | None, tuple[int, int]]:
        cfg_size = getattr(self.config, "image_size", 224)
        cfg_size = tuple(cfg_size) if isinstance(cfg_size, (list, tuple)) else (int(cfg_size), int(cfg_size))
        if processor is None:
            return None, cfg_size
        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        shortest = _size_get(size, "shortest_edge")
        if getattr(processor, "do_center_crop", False) and _size_get(crop, "height"):
            return shortest, (_size_get(crop, "height"), _size_get(crop, "width"))
        if _size_get(size, "height"):
            return None, (_size_get(size, "height"), _size_get(size, "width"))
        if shortest:
            return shortest, (shortest, shortest)
        return None, cfg_size

    @property
    def hidden_size(self) -> int:
        cfg = self.config  # CNNs (ConvNeXt, ResNet) have hidden_sizes per stage and no hidden_size
        return int(getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → normalised float pixel values of the backbone's input size."""
        x = images.float() * self.rescale_factor
        h, w = x.shape[-2:]
        th, tw = self.image_size
        if self.resize_shortest and min(h, w) != self.resize_shortest:
            scale = self.resize_shortest / min(h, w)
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True,
                              align_corners=False)
            h, w = x.shape[-2:]
        if self.resize_shortest and (h, w) != (th, tw) and h >= th and w >= tw:
            top, left = (h - th) // 2, (w - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        elif (h, w) != (th, tw):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        if self.do_normalize:
            x = (x - self.pixel_mean) / self.pixel_std
        return x

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # a CNN's (B, C, H, W) feature map → [pooled, H*W spatial tokens]
            spatial = hidden.flatten(2).transpose(1, 2)
            norm = getattr(self.model, "layernorm", None)  # ConvNeXt's final norm, which its pooler applies too
            if isinstance(norm, nn.LayerNorm):
                spatial = norm(spatial)
            pooled = getattr(out, "pooler_output", None)
            pooled = spatial.mean(1) if pooled is None else pooled.flatten(1)
            return torch.cat([pooled[:, None], spatial], 1)
        if self._clip:
            return self.model.post_layernorm(hidden)
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tokens(pixel_values)

    def _save_extra(self, path: str) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(path)


def _tuple3(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- text
class TextEncoder(_Encoder):
    """A text backbone as ``tokens(ids, mask) -> (B, N, D)``; token 0 ([CLS] / <s>) is the summary."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, *, finetune: str = "full",
                 trainable_layers: int = 2):
        model = _sub_model(model, "text_model")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # BERT's tanh pooler is not on the token path: unused weights break DDP
        super().__init__(model, finetune, trainable_layers)
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)  # DistilBERT maps hidden_size → dim

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens(ids, mask)

    def _save_extra(self, path: str) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------------- public loaders
def load_vision_encoder(name_or_path: str | os.PathLike, *, finetune: Finetune = "full",
                        trainable_layers: int = 2) -> VisionEncoder:
    """Any ``transformers`` vision model (ViT, CLIP, ConvNeXt, DINOv2, ...) by hub name or local folder, with its
    image processor when there is one. Raises :class:`EncoderNotFoundError` (one line) when it cannot."""
    what = "vision encoder"
    name, local_only = _resolve(name_or_path, what)
    model = _load_model(name, local_only, what)
    processor = _load_optional(AutoImageProcessor, name, local_only, what)
    return VisionEncoder(model, processor, finetune=finetune, trainable_layers=trainable_layers)


def load_text_encoder(name_or_path: str | os.PathLike, *, finetune: Finetune = "full",
                      trainable_layers: int = 2) -> TextEncoder:
    """Any ``transformers`` text encoder (BERT, RoBERTa, DistilBERT, ...) by hub name or local folder, with its
    tokenizer when there is one. Raises :class:`EncoderNotFoundError` (one line) when it cannot."""
    what = "text encoder"
    name, local_only = _resolve(name_or_path, what)
    model = _load_model(name, local_only, what)
    tokenizer = None
    if not local_only or any((Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "vocab.txt", "vocab.json")):
        tokenizer = _load_optional(AutoTokenizer, name, local_only, what)
    return TextEncoder(model, tokenizer, finetune=finetune, trainable_layers=trainable_layers)


def check_source(name_or_path: str | os.PathLike, what: str = "encoder") -> None:
    """Raise :class:`EncoderNotFoundError` (one line) when ``name_or_path`` cannot be loaded; reads only the config
    (for a driver to fail before its workers start)."""
    _resolve(name_or_path, what)


def load_pretrained_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a text model by hub name or local folder (never remote code); one-line
    :class:`EncoderNotFoundError` when it cannot be loaded."""
    what = "text encoder"
    name, local_only = _resolve(name_or_path, what)
    tokenizer = _load_optional(AutoTokenizer, name, local_only, what)
    if tokenizer is None:
        raise EncoderNotFoundError(f"{what} '{name}': no tokenizer found (save it beside the model with "
                                   "tokenizer.save_pretrained)")
    return tokenizer


def _from_config(path: str | os.PathLike) -> tuple[PreTrainedModel, str]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EncoderNotFoundError(f"encoder config '{path}': no config.json in the folder")
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    return AutoModel.from_config(cfg, trust_remote_code=False), str(path)


def vision_encoder_from_config(path: str | os.PathLike, *, finetune: Finetune = "full",
                               trainable_layers: int = 2) -> VisionEncoder:
    """The architecture saved by :meth:`VisionEncoder.save_config`, randomly initialised (no weights read)."""
    model, name = _from_config(path)
    processor = _load_optional(AutoImageProcessor, name, True, "vision encoder")
    return VisionEncoder(model, processor, finetune=finetune, trainable_layers=trainable_layers)


def text_encoder_from_config(path: str | os.PathLike, *, finetune: Finetune = "full",
                             trainable_layers: int = 2) -> TextEncoder:
    """The architecture saved by :meth:`TextEncoder.save_config`, randomly initialised (no weights read)."""
    model, name = _from_config(path)
    tokenizer = None
    if any((Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = _load_optional(AutoTokenizer, name, True, "text encoder")
    return TextEncoder(model, tokenizer, finetune=finetune, trainable_layers=trainable_layers)


# --------------------------------------------------------------------------------------------- small builders
class ConvStem(nn.Sequential):
    """A ViT's patch projection made of convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See
    Better", arXiv:2106.14881): log2(patch_size) 3x3 stride-2 convolutions, widths doubling up to ``dim``, each but
    the last followed by a normalisation and a ReLU; the output is the same (B, dim, H/p, W/p) grid the single
    p x p projection gives. The paper measured faster, more stable optimisation and better accuracy at equal FLOPs;
    trained from scratch on the built-in data, val R@1 after one epoch was 0.36 against 0.02 with the patchify
    projection (bench/time_to_quality.py). GroupNorm(1): per-sample, so data-parallel workers need no batch
    statistics. ``weight`` is the last convolution's: transformers' ViT reads ``projection.weight.dtype``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        steps = patch_size.bit_length() - 1
        if patch_size < 2 or 1 << steps != patch_size:
            raise ValueError(f"a convolutional stem needs a power-of-two patch_size >= 2, got {patch_size}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(steps):
            c_out = dim if i == steps - 1 else max(8, dim >> (steps - 1 - i))
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
            if i < steps - 1:
                layers += [nn.GroupNorm(1, c_out), nn.ReLU()]
            c_in = c_out
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:
        return self[-1].weight


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2D sine-cosine position embeddings (MAE, He et al. 2022; MoCo v3, Chen et al.
    2021): a quarter of the channels each for sin/cos of the column and of the row, at geometric frequencies.
    Used to initialise the small ViT's learned position embeddings: a relation question needs where an object
    is, and the default initialisation (trunc-normal, std 0.02) starts the position signal far below the patch
    content's."""
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a dim divisible by 4, got {dim}")
    q = dim // 4
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


def small_vision_encoder(kind: str = "vit", image_size: int = 64, hidden: int = 64, layers: int = 2, *,
                         patch_size: int = 8, heads: int = 2, finetune: Finetune = "full",
                         trainable_layers: int = 2) -> VisionEncoder:
    """A tiny vision encoder built from a config (no download), without dropout, with a matching image processor
    (mean/std 0.5, resize to ``image_size``). ConvNeXt: ``layers`` stages of one block, widths doubling up to
    ``hidden``."""
    from transformers import (
        CLIPVisionConfig,
        ConvNextConfig,
        Dinov2Config,
        ViTConfig,
        ViTImageProcessorPil,
    )

    common = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads}
    if kind == "vit":
        cfg: PretrainedConfig = ViTConfig(**common, intermediate_size=4 * hidden, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0)
    elif kind == "dinov2":
        cfg = Dinov2Config(**common, mlp_ratio=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    elif kind == "clip":
        cfg = CLIPVisionConfig(**common, intermediate_size=4 * hidden, attention_dropout=0.0)
    elif kind == "convnext":
        widths = [max(8, hidden // 2 ** (layers - 1 - i)) for i in range(layers)]
        cfg = ConvNextConfig(num_stages=layers, hidden_sizes=widths, depths=[1] * layers, image_size=image_size,
                             patch_size=4)
    else:
        raise ValueError(f"kind must be one of {', '.join(VISION_KINDS)}, got {kind!r}")
    processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return VisionEncoder(AutoModel.from_config(cfg), processor, finetune=finetune,
                         trainable_layers=trainable_layers)


def small_text_encoder(kind: str = "bert", vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                       max_length: int = 48, *, heads: int = 2, pad_id: int = 0, tokenizer: Any = None,
                       finetune: Finetune = "full", trainable_layers: int = 2) -> TextEncoder:
    """A tiny text encoder built from a config (no download), without dropout; ``tokenizer`` (e.g. from
    :func:`mmplatform.models.tokenizer.train_tokenizer`) is kept and saved with it."""
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if kind in {"bert", "roberta"}:
        config_cls = BertConfig if kind == "bert" else RobertaConfig
        # RoBERTa numbers positions from pad_id + 1, so it needs pad_id + 1 more position embeddings.
        positions = max_length if kind == "bert" else max_length + pad_id + 1
        cfg: PretrainedConfig = config_cls(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=positions, pad_token_id=pad_id,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    elif kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads,
                               hidden_dim=4 * hidden, max_position_embeddings=max_length, pad_token_id=pad_id,
                               dropout=0.0, attention_dropout=0.0)
    else:
        raise ValueError(f"kind must be one of {', '.join(TEXT_KINDS)}, got {kind!r}")
    return TextEncoder(AutoModel.from_config(cfg), tokenizer, finetune=finetune, trainable_layers=trainable_layers)
