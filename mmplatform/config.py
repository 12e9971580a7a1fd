"""Typed configuration: one pydantic model per ``params.yaml`` section.

Unknown keys and bad values are rejected with :class:`ConfigError`, whose message is one line naming
the key (``train.no_such_key: unknown key``). ``-S section.key=value`` overrides are parsed as YAML
scalars and validated the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mmplatform.data.quality import QualityThresholds
from mmplatform.rl.grpo_config import GRPOConfig
from mmplatform.rl.ppo_config import PPOConfig
from mmplatform.rl.scst_config import SCSTConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad params file or override; ``str()`` is one line naming the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- ingest
class SyntheticParams(_Section):
    seed: int = Field(0, description="RNG seed of the procedural scenes")
    n_train: int = Field(8000, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(1000, ge=1)
    n_test_compositional: int = Field(1000, ge=0)
    image_size: int = Field(64, ge=32, le=512)
    captions_per_image: int = Field(5, ge=1, le=10)


IngestFormat = Literal["synthetic", "coco", "jsonl", "csv", "webdataset", "imagefolder", "labelstudio"]


class SourceParams(_Section):
    format: IngestFormat = "synthetic"
    path: str | None = Field(None, description="COCO JSON, manifest, tar shard(s), imagefolder or Label Studio export")
    images: str | None = Field(None, description="image root; defaults to the manifest's folder")


class IngestParams(_Section):
    sources: list[SourceParams] = Field(default_factory=lambda: [SourceParams()])
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)


# ----------------------------------------------------------------------------- annotate / clean / augment
class AnnotateParams(_Section):
    annotations_dir: str = Field("data/annotations", description="Label Studio exports picked up here")
    min_agreement: float = Field(0.5, ge=0.0, le=1.0,
                                 description="VQA answers with less agreement (or a tie) go to review")


class NearDupParams(_Section):
    enabled: bool = True
    hamming_radius: int = Field(4, ge=0, le=64,
                                description="pHash pairs within this Hamming distance are near duplicates ...")
    hash_min_cosine: float = Field(0.90, ge=-1.0, le=1.01,
                                   description="... when their descriptors also agree at least this much")
    cosine_threshold: float = Field(0.94, ge=-1.0, le=1.01,
                                    description="descriptor pairs at or above this cosine are near duplicates")
    linkage: Literal["connected", "star", "complete"] = Field(
        "star", description="how matched pairs form groups (star: every member matches the group's centre)")
    exempt_sources: list[str] = Field(
        default_factory=lambda: ["synthetic:"],
        description="records whose source starts with one of these are distinct by construction (the built-in "
                    "generator never repeats a scene) and are not grouped")
    policy: Literal["largest", "most_captions", "first"] = Field(
        "largest", description="which member of a group is kept")
    action: Literal["drop", "keep"] = Field(
        "drop", description="drop: keep one representative; keep: keep all, same split for the whole group")


class AlignmentParams(_Section):
    mode: Literal["off", "threshold", "top_fraction"] = Field(
        "threshold", description="DataComp-style filter with the champion's contrastive score; skipped without one")
    score: Literal["percentile", "cosine"] = Field(
        "percentile", description="percentile among random captions (model-independent) or raw cosine")
    min_score: float = Field(0.9, description="threshold mode: captions scoring below are dropped")
    keep_fraction: float = Field(0.9, gt=0.0, le=1.0, description="top_fraction mode: share of captions kept")
    model_name: str = Field("mmplatform", description="registered model whose champion scores the captions")
    alias: str = "champion"


ImageIssue = Literal["dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale"]


class CleanParams(_Section):
    min_caption_words: int = Field(1, ge=1)
    max_caption_words: int = Field(60, ge=1)
    max_image_bytes: int = Field(20_000_000, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    merge_duplicates: bool = Field(True, description="an exact duplicate's captions are added to the kept copy")
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    drop_issues: list[ImageIssue] = Field(
        default_factory=list, description="image issues that drop a record; the others are only flagged in meta")
    near_duplicates: NearDupParams = Field(default_factory=NearDupParams)
    alignment: AlignmentParams = Field(default_factory=AlignmentParams)
    engine: Literal["ray", "local"] = Field("ray", description="ray: Ray Data map_batches; local: in-process")
    rows_per_task: int = Field(1000, ge=1, description="records per Ray Data task")
    report: bool = Field(True, description="write report.html beside the dataset and log it to MLflow")


class AugmentParams(_Section):
    seed: int = 0
    flip_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of train images given a mirrored copy")
    jitter_fraction: float = Field(0.0, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    saturation: float = Field(0.2, ge=0.0, le=1.0)


# ----------------------------------------------------------------------------- train
Finetune = Literal["full", "partial", "frozen"]
_NAME_HELP = ("a transformers model by hub name or local folder (safetensors only, never remote code); "
              "null = the small config built from the keys below")
_FINETUNE_HELP = "full: train it all; partial: only the last trainable_layers blocks and final norms; frozen: none"


class VisionParams(_Section):
    arch: Literal["vit", "convnext", "dinov2", "clip"] = Field(
        "vit", description="small config built when name_or_path is null (convnext ignores patch_size, heads)")
    name_or_path: str | None = Field(None, description=_NAME_HELP)
    finetune: Finetune = Field("full", description=_FINETUNE_HELP)
    trainable_layers: int = Field(2, ge=1, description="blocks / stages trained with finetune=partial")
    patch_size: int = Field(8, ge=2)
    stem: Literal["patch", "conv"] = Field(
        "patch", description="vit only: patch = one patch_size x patch_size projection; conv = a stack of 3x3 "
        "stride-2 convolutions (Xiao et al. 2021), patch_size a power of two")
    position_init: Literal["random", "sincos"] = Field(
        "random", description="vit only: how the learned position embeddings start; sincos = fixed 2D sine-cosine "
        "(MAE) values, so a position signal is there from the first step")
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _stem_fits(self) -> VisionParams:
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"stem: conv needs a power-of-two patch_size, got {self.patch_size}")
        if self.position_init == "sincos" and self.hidden_size % 4:
            raise ValueError(f"position_init: sincos needs hidden_size divisible by 4, got {self.hidden_size}")
        return self


class TextParams(_Section):
    arch: Literal["bert", "roberta", "distilbert"] = Field("bert", description="small config built when "
                                                            "name_or_path is null")
    name_or_path: str | None = Field(None, description=_NAME_HELP + "; its tokenizer replaces the locally "
                                                                    "trained one (vocab_size is then unused)")
    finetune: Finetune = Field("full", description=_FINETUNE_HELP)
    trainable_layers: int = Field(2, ge=1, description="blocks trained with finetune=partial")
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_length: int = Field(48, ge=8)
    vocab_size: int = Field(512, ge=32, description="WordPiece vocabulary trained on the training captions")


class DecoderParams(_Section):
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)


class LossWeights(_Section):
    contrastive: float = Field(1.0, ge=0.0)
    captioning: float = Field(1.0, ge=0.0)
    itm: float = Field(0.5, ge=0.0, description="image-text matching on the fused pair, hard negatives")
    triplet: float = Field(0.0, ge=0.0, description="VSE++ triplet loss with the hardest in-batch negatives")
    vqa: float = Field(0.5, ge=0.0, description="VQA answer classification over the fused (image, question) pair; "
                                                "one question per image per step")
    mlm: float = Field(0.0, ge=0.0, description="masked language modelling of the captions with image context")
    vqa_generative: float = Field(0.0, ge=0.0, description="VQA answers generated by the captioning decoder with "
                                                           "the question as its prefix")


class TrainParams(_Section):
    seed: int = 0
    epochs: int = Field(60, ge=1, description="the most epochs; early stopping ends sooner on a plateau")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    embed_dim: int = Field(128, ge=8)
    foil_negatives: bool = Field(True, description="NegCLIP: each caption's composition foil (attributes swapped, "
                                                    "relation reversed or words shuffled) as an extra negative")
    triplet_margin: float = Field(0.2, gt=0.0)
    mlm_probability: float = Field(0.15, gt=0.0, le=1.0, description="share of caption tokens MLM hides (BERT)")
    mlm_through_fusion: bool = Field(
        False, description="MLM reads the masked caption through the fusion encoder (ALBEF), so every masked "
        "colour, shape or position word trains the fusion's grounding that ITM and VQA use; false = a separate "
        "cross-attention MLM head. Needs fusion: cross_attention")
    vqa_questions_per_image: int = Field(
        4, ge=1, description="VQA questions drawn per image each step (without replacement; all of an image's "
        "when it has fewer): relation questions need many more updates than the image's captions do")
    early_stopping_patience: int = Field(
        3, ge=0, description="stop when early_stopping_metric has not improved for this many epochs, and keep "
        "the weights of its best epoch (the train stage records both in reports/train/summary.json); 0 = run "
        "every epoch and keep the last")
    early_stopping_metric: Literal["val_total", "val_captioning", "val_contrastive", "val_itm", "val_vqa"] = Field(
        "val_total", description="the validation loss early stopping and best-epoch selection watch")
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="what the contrastive embeddings project: the first token ([CLS]) or the mean of "
        "the tokens (text: over the attention mask; image: over the patch tokens); OpenCLIP's pool_type")
    fusion: Literal["concat", "gated", "cross_attention", "multimodal_transformer"] = Field(
        "cross_attention", description="how image and text meet for ITM (mmplatform/models/fusion.py)")
    fusion_layers: int = Field(
        2, ge=1, description="blocks of the cross_attention / multimodal_transformer fusion (concat and gated "
        "have none); two let the question's [CLS] compare what two of its words found in the image")
    vision: VisionParams = Field(default_factory=VisionParams)
    text: TextParams = Field(default_factory=TextParams)
    decoder: DecoderParams = Field(default_factory=DecoderParams)
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    num_workers: int = Field(1, ge=0, description="Ray Train workers (DDP: gloo on CPU, NCCL on GPU); batch_size "
                                                   "is the global batch, split evenly across workers; 0 = Ray "
                                                   "Train's local mode (one process, this one: debugging, tests)")
    cpus_per_worker: int = Field(2, ge=1)
    threads_per_worker: int = Field(0, ge=0, description="torch threads per worker; 0 = cpus_per_worker")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step (OpenCLIP's two-pass "
                                                  "accumulation: contrastive negatives span the whole batch)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: torch.autocast on CPU or CUDA")
    checkpoint_every_steps: int = Field(25, ge=1, description="optimiser steps between checkpoints (and one at "
                                                              "every epoch end); a resumed run continues there")
    max_failures: int = Field(2, ge=0, description="worker-group failures Ray Train restarts from the last "
                                                   "checkpoint (FailureConfig) before the stage fails")

    @model_validator(mode="after")
    def _monitored_loss_exists(self) -> TrainParams:
        name = self.early_stopping_metric.removeprefix("val_")
        if name != "total" and getattr(self.loss_weights, name) == 0:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric!r} watches a loss whose weight "
                             f"loss_weights.{name} is 0 (no such val loss); use val_total or give it a weight")
        if self.mlm_through_fusion and self.loss_weights.mlm > 0 and self.fusion != "cross_attention":
            raise ValueError(f"mlm_through_fusion reads the fusion's token states: it needs fusion: cross_attention, "
                             f"not {self.fusion}")
        return self


# ----------------------------------------------------------------------------- tune
Distribution = Literal["uniform", "loguniform", "randint", "choice", "grid"]
# Keys a sweep may not vary: the epoch budget is ASHA's max_t, and a trial is one process whatever the
# train stage's worker layout.
_NOT_TUNABLE = ("epochs", "num_workers", "cpus_per_worker", "threads_per_worker")


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        d = d[part]
    d[leaf] = value


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _check_search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
    """Each key must be a leaf of the train section and each bound or choice a valid value for it. Values
    come back as the train section types them: PyYAML reads ``1e-4`` (no dot) as a string."""
    base = TrainParams().model_dump()
    out: dict[str, dict[str, list[Any]]] = {}
    for key, dist in space.items():
        node = TrainParams
        for part in key.split("."):
            is_section = isinstance(node, type) and issubclass(node, BaseModel)
            field = node.model_fields.get(part) if is_section else None
            if field is None:
                raise ValueError(f"{key}: not a train key")
            node = field.annotation
        if isinstance(node, type) and issubclass(node, BaseModel):
            raise ValueError(f"{key}: a section, not a value; name one of its keys")
        if key in _NOT_TUNABLE:
            raise ValueError(f"{key}: not tunable (the epoch budget is tune.epochs, trials are one process)")
        if len(dist) != 1:
            raise ValueError(f"{key}: give exactly one of {', '.join(Distribution.__args__)}")
        [(kind, values)] = dist.items()
        typed = []
        for v in values:
            trial = copy.deepcopy(base)
            _set_dotted(trial, key, v)
            try:
                typed.append(_get_dotted(TrainParams.model_validate(trial).model_dump(), key))
            except ValidationError as err:
                raise ValueError(f"{key}: {v!r}: {err.errors()[0]['msg']}") from None
        if kind in ("uniform", "loguniform", "randint"):
            if len(typed) != 2 or not isinstance(typed[0], int | float) or not typed[0] < typed[1]:
                raise ValueError(f"{key}: {kind} takes [low, high] with low < high")
            if kind == "loguniform" and typed[0] <= 0:
                raise ValueError(f"{key}: loguniform needs low > 0")
            if kind == "randint" and not all(isinstance(t, int) for t in typed):
                raise ValueError(f"{key}: randint is for integer keys")
        elif not typed:
            raise ValueError(f"{key}: {kind} needs at least one value")
        out[key] = {kind: typed}
    return out


class TuneParams(_Section):
    """A Ray Tune sweep over the train section: ``mmp tune`` / ``dvc repro tune`` (not in the retraining flow).
    Trials are compared on ``metric`` after each epoch and stopped early by ASHA (Li et al., MLSys 2020)."""

    search_space: dict[str, dict[Distribution, list[Any]]] = Field(
        default_factory=lambda: {"lr": {"loguniform": [1e-4, 3e-3]},
                                 "loss_weights.itm": {"choice": [0.25, 0.5, 1.0]}},
        description="dotted train key -> one distribution: uniform / loguniform / randint [low, high) or "
                    "choice / grid [values] (a grid is crossed with the other keys)")
    num_samples: int = Field(8, ge=1, description="trials drawn (with a grid: repeats of the whole grid)")
    metric: str = Field("val_t2i_recall@1", description="per-epoch value of the train loop the trials are ranked on")
    mode: Literal["max", "min"] = "max"
    epochs: int = Field(0, ge=0, description="epochs per trial (ASHA's max_t); 0 = train.epochs")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: a trial goes on past a rung if it is in the top "
                                                       "1/reduction_factor of the trials that reached it")
    cpus_per_trial: int = Field(0, ge=0, description="CPUs (torch threads) per trial; 0 = train.cpus_per_worker. "
                                                     "Trials at once = available CPUs // this, at least 1")
    seed: int = Field(0, description="seed of the random search (the trials all train with train.seed)")

    @field_validator("search_space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        return _check_search_space(v)


# ----------------------------------------------------------------------------- evaluate / register
# rl_finetune: each algorithm's config lives beside its trainer (mmplatform/rl/<algo>_config.py), as TRL does;
# the section is the one its ``algorithm`` key names (scst when absent), and only that one's keys are allowed.
RL_ALGORITHMS = {"scst": SCSTConfig, "ppo": PPOConfig, "grpo": GRPOConfig}


def _rl_algorithm(v: Any) -> str:
    return (v.get("algorithm", "scst") if isinstance(v, dict) else getattr(v, "algorithm", None)) or "scst"


RLConfig = Annotated[
    Annotated[SCSTConfig, Tag("scst")] | Annotated[PPOConfig, Tag("ppo")] | Annotated[GRPOConfig, Tag("grpo")],
    Discriminator(_rl_algorithm, custom_error_type="rl_algorithm",
                  custom_error_message=f"unknown algorithm (known: {', '.join(RL_ALGORITHMS)})"),
]


class EvaluateParams(_Section):
    split: str = "test"
    batch_size: int = Field(256, ge=1)
    max_length: int = Field(40, ge=4)
    grid_images: int = Field(16, ge=0)
    # Off by default: with today's ITM head re-ranking lowers t2i R@1 (0.425 -> 0.363 at k=4, 0.333 at k=16
    # on the default model, docs/results.md); it is there for models whose matching head is stronger.
    rerank_top_k: int = Field(0, ge=0, description="re-rank each query's contrastive top-k with the ITM head "
                                                    "(ALBEF/BLIP retrieval); 0 or 1 = contrastive only")


class RegisterParams(_Section):
    model_name: str = "mmplatform"
    alias: str = "champion"
    primary_metric: str = "t2i_recall@5"
    min_improvement: float = Field(0.0, ge=0.0)
    # Metric -> the largest drop against the champion (same test split) that still allows a promotion. Every
    # guarded metric is one where higher is better.
    guardrails: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=lambda: {"i2t_recall@5": 0.02, "cider_d_rl": 0.05, "vqa_accuracy": 0.02})


class Params(_Section):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    ingest: IngestParams = Field(default_factory=IngestParams)
    annotate: AnnotateParams = Field(default_factory=AnnotateParams)
    clean: CleanParams = Field(default_factory=CleanParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    train: TrainParams = Field(default_factory=TrainParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    rl_finetune: RLConfig = Field(default_factory=SCSTConfig)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    # "register" would shadow BaseModel.register; the YAML key stays "register".
    register_: RegisterParams = Field(default_factory=RegisterParams, alias="register")

    @model_validator(mode="after")
    def _vqa_rl_needs_an_answer_decoder(self) -> Params:
        # Checked when the file loads, not after an hour of training: the RL stage would stop there.
        if self.rl_finetune.task == "vqa" and self.train.loss_weights.vqa_generative <= 0:
            raise ValueError("rl_finetune.task=vqa fine-tunes the answer decoder, which only "
                             "train.loss_weights.vqa_generative > 0 trains; set it (e.g. 0.5)")
        return self


def one_line(err: ValidationError, where: str) -> str:
    """A pydantic error as one line: ``where: key: reason``."""
    e = err.errors()[0]
    loc = list(e["loc"])
    algo = ""
    if len(loc) >= 2 and loc[0] == "rl_finetune" and loc[1] in RL_ALGORITHMS:
        # The union's tag is not a key of the file: "rl_finetune.baseline", said for which algorithm.
        algo = f" (algorithm {loc.pop(1)})"
    key = ".".join(str(p) for p in loc)
    reason = ("unknown key" if e["type"] == "extra_forbidden" else e["msg"]) + algo
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if not key:  # a check across sections names its keys itself
        return f"{where}: {reason.removeprefix('Value error, ')}{more}"
    return f"{where}: {key}: {reason}{more}"


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false. YAML 1.1 also reads on/off/yes/no/y/n as
    booleans, so ``alignment.mode: off`` (or ``-S clean.alignment.mode=off``) arrived as False and was refused as
    "Input should be 'off', ..."; a boolean key still takes on/off/yes/no (pydantic reads those strings)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """YAML as params.yaml and ``-S`` values are read (:class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {key!r}: expected section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: bad value {raw!r}: {exc.__class__.__name__}") from None
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; a user means the number
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each override set; unknown keys are caught by validation."""
    out = copy.deepcopy(raw)
    given: set[tuple[str, ...]] = set()
    for ov in overrides:
        parts, value = parse_override(ov)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts)}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
        given.add(tuple(parts))
    _switch_rl_algorithm(raw, out, given)
    return out


def _switch_rl_algorithm(raw: dict[str, Any], out: dict[str, Any], given: set[tuple[str, ...]]) -> None:
    """``-S rl_finetune.algorithm=grpo`` on a file written for SCST: the file's keys that only SCST has
    (``baseline``) would stop the run as unknown keys, so they are dropped, with a log line that names them.
    Keys the overrides set themselves are kept, so a wrong one is still reported."""
    before, after = raw.get("rl_finetune"), out.get("rl_finetune")
    if not isinstance(before, dict) or not isinstance(after, dict) or ("rl_finetune", "algorithm") not in given:
        return
    cls = RL_ALGORITHMS.get(_rl_algorithm(after))
    if cls is None or _rl_algorithm(before) == _rl_algorithm(after):
        return
    dropped = [k for k in list(after) if k not in cls.model_fields and ("rl_finetune", k) not in given]
    for k in dropped:
        del after[k]
    if dropped:
        logger.warning("rl_finetune.algorithm=%s: dropped the file's keys that %s does not take: %s",
                       _rl_algorithm(after), _rl_algorithm(after), ", ".join(dropped))


def validate(raw: dict[str, Any], where: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(one_line(err, where)) from None


def read_raw(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    raw = apply_overrides(read_raw(path), overrides or [])
    return validate(raw, str(path))


# A run's overrides never touch the user's params.yaml: `mmp run -S` writes them to OVERRIDES_FILE (tracked,
# an empty list between runs) and the `params` stage merges both into RUN_PARAMS, the file every other stage
# reads and lists its params from. DVC then records the values a run used in dvc.lock, and an override
# re-runs exactly the stages whose keys it changes.
OVERRIDES_FILE = ".mmp/overrides.yaml"
RUN_PARAMS = ".mmp/run_params.yaml"
_RUN_PARAMS_HEADER = ("# Written by the params stage: params.yaml with this run's -S overrides (.mmp/overrides.yaml).\n"
                      "# Edit params.yaml, not this file.\n")


def read_overrides(path: str | Path = OVERRIDES_FILE) -> list[str]:
    """The ``section.key=value`` list in ``path``; a missing or empty file is no overrides."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ConfigError(f"{path}: expected a list of section.key=value strings")
    return data


def overrides_text(overrides: list[str]) -> str:
    body = yaml.safe_dump(list(overrides), default_flow_style=False) if overrides else "[]\n"
    return "# `mmp run -S` writes the run's overrides here and empties the list when the run ends.\n" + body


def write_run_params(params: str | Path = "params.yaml", overrides: str | Path = OVERRIDES_FILE,
                     out: str | Path = RUN_PARAMS) -> Params:
    """``params`` with the overrides in ``overrides`` applied, validated, written to ``out`` (sections in
    params.yaml's order, comments dropped); the same inputs give the same bytes, so DVC re-runs no stage
    whose keys kept their values."""
    ovs = read_overrides(overrides)
    raw = apply_overrides(read_raw(params), ovs)
    validated = validate(raw, f"{params} with {overrides}" if ovs else str(params))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(_RUN_PARAMS_HEADER + yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, out)
    return validated
