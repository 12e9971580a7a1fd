"""Model registry: log the model, create a version, move the champion alias only when it is beaten.

The gate (:func:`gate`): the new version becomes ``champion`` when there is none yet, or when it beats the
champion, both scored on this run's test split, on the primary metric by more than ``min_improvement`` and
drops no guarded metric further than allowed. The decision and its reason are written to
``reports/registry.json``, set as tags on the version, appended to the registered model's history and told in
the version's model card, so an auditor sees why from every side.
"""

from __future__ import annotations

import json
import logging
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from mmplatform.champion import champion_source, model_digest
from mmplatform.config import RegisterParams
from mmplatform.tracking import metric_name

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "serving.py"
# What serving the model imports, pinned to the versions this code was trained and tested with (the lock file's,
# in our environment); the package itself is shipped with the model (code_paths), never fetched from an index.
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "pandas", "pyarrow")


class MMPlatformModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper. A DataFrame with an ``image`` column (encoded bytes) → generated captions, or image
    embeddings with ``params={"task": "embed"}``; with a ``text`` column instead → text embeddings."""

    def load_context(self, context):  # noqa: D401
        from mmplatform.models.multimodal import MultimodalModel
        from mmplatform.models.tokenizer import load_tokenizer

        self.model = MultimodalModel.load(context.artifacts["model"])
        self.tokenizer = load_tokenizer(Path(context.artifacts["model"]) / "tokenizer")

    def predict(self, context, model_input, params=None):
        import torch

        from mmplatform.models.captioning import greedy_captions
        from mmplatform.train.batches import decode_images

        task = (params or {}).get("task", "caption")
        if task not in ("caption", "embed"):
            raise ValueError(f"params.task {task!r}: expected 'caption' or 'embed'")
        if "image" in model_input.columns and model_input["image"].notna().all():
            recs = [{"image": b} for b in model_input["image"]]
            images = decode_images(recs, self.model.cfg.image_size)
            if task == "embed":
                with torch.no_grad():
                    return self.model.embed_images(images).numpy()
            return greedy_captions(self.model, self.tokenizer, images, 40)
        enc = self.tokenizer(list(model_input["text"]), padding=True, truncation=True,
                             max_length=self.model.cfg.max_length, return_tensors="pt")
        with torch.no_grad():
            return self.model.embed_texts(enc["input_ids"], enc["attention_mask"]).numpy()


def signature():
    """Inputs: ``image`` (encoded bytes) or ``text`` (string), either column optional; ``params.task``:
    ``caption`` (default) or ``embed`` for images. Outputs vary by task (captions or an (N, D) array), so
    they are left out of the signature."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image", required=False),
                                         ColSpec("string", "text", required=False)]),
                          params=ParamSchema([ParamSpec("task", "string", "caption")]))


def pinned_requirements(packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """``name==version`` of each package as installed here; a local build label (``2.13.0+cpu``) is dropped, so
    the pin resolves from a plain index."""
    return [f"{name}=={re.sub(r'[+].*$', '', metadata.version(name))}" for name in packages]


def _champion(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


HISTORY_PREFIX = "decision."  # registered-model tags decision.0001, decision.0002, ...: the gate's history


def history(client, name: str) -> list[dict[str, Any]]:
    """Every gate decision on ``name``, oldest first, from its registered-model tags. MLflow keeps no history
    of alias moves itself, so each decision (alias moved or not) is appended there, where the registered
    model's page in the UI shows it."""
    tags = client.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_PREFIX))]


def gate(metrics: dict[str, Any], p: RegisterParams, champion_version: int | None,
         champion_scored: dict[str, Any] | None, champion_stored: float | None) -> tuple[bool, str, dict[str, Any]]:
    """Promote or not, and why. The challenger must beat the champion on ``p.primary_metric`` by more than
    ``p.min_improvement`` and lose no more than ``p.guardrails[m]`` on each guarded metric ``m``. Both sides
    are the figures of this run's test split (``champion_scored``); only when the champion could not be scored
    with this code does the gate fall back to its stored primary figure (from an earlier split), and says so.
    Returns (promote, reason, the champion's figures compared)."""
    if champion_version is None:
        return True, "no champion yet: the first version becomes champion", {}
    name = p.primary_metric
    value = float(metrics[name])
    if champion_scored and name in champion_scored:
        basis, theirs = "on this run's test split", {k: v for k, v in champion_scored.items()
                                                      if isinstance(v, int | float)}
    else:
        basis, theirs = "against its stored figure (it could not be scored on this split)", \
            {name: champion_stored if champion_stored is not None else float("nan")}
    beats = value > theirs[name] + p.min_improvement
    reason = (f"{name} {value:.4f} {'beats' if beats else 'does not beat'} champion v{champion_version} "
              f"({theirs[name]:.4f}) by more than {p.min_improvement} {basis}")
    broken = [f"{m} {float(metrics[m]):.4f} < {theirs[m]:.4f} - {drop}" for m, drop in sorted(p.guardrails.items())
              if m in theirs and m in metrics and float(metrics[m]) < theirs[m] - drop]
    if broken:
        reason += "; guardrail broken: " + ", ".join(broken)
    # A guarded metric this data does not measure (no VQA questions in a captions-only dataset) guards nothing;
    # the reason says so rather than the run failing on it.
    unmeasured = sorted(m for m in p.guardrails if m not in metrics or m not in theirs)
    if unmeasured:
        reason += "; not measured on both, so not guarded: " + ", ".join(unmeasured)
    return beats and not broken, reason, theirs


def model_card(name: str, version: int, decision: dict[str, Any], metrics: dict[str, Any],
               tags: dict[str, str]) -> str:
    """A model card (Mitchell et al. 2019, "Model Cards for Model Reporting"), markdown: what the model is, the
    data and code it came from, its figures beside the champion's, intended use and limits."""
    shown = [decision["primary_metric"], *sorted(decision["guardrails"]),
             "t2i_recall@1", "i2t_recall@1", "bleu4_rl", "vqa_accuracy", "aro_relation", "aro_attribution"]
    champ = decision.get("champion_metrics") or {}
    rows = "\n".join(f"| {m} | {float(metrics[m]):.4f} | " + (f"{champ[m]:.4f}" if m in champ else "–") + " |"
                      for m in dict.fromkeys(shown) if m in metrics)
    data = "\n".join(f"- `{k.removeprefix('dvc.')}`: `{v}`" for k, v in sorted(tags.items()) if k.startswith("dvc."))
    return f"""# {name} v{version}

Image-text model: a ViT image encoder, a BERT-style text encoder, a fusion encoder (image-text matching, VQA)
and a caption decoder, trained with contrastive, matching, masked-language and captioning objectives, then
fine-tuned for captioning by reinforcement learning.

## Decision
{"Promoted to" if decision["promoted"] else "Registered, not promoted to"} `@{decision["alias"]}`: {decision["reason"]}.

## Lineage
- code: git commit `{tags.get("git_commit", "unknown")}`
- Prefect flow run: `{tags.get("prefect_flow_run_id", "none")}`
{data or "- data: no dvc.lock hashes recorded"}

## Evaluation (test split of this run; the champion scored on the same split)
| metric | this version | champion before |
|---|---:|---:|
{rows}

## Intended use
Retrieval of images by text and of text by image, and short descriptive captions, for the data distribution it
was trained on (the DVC data versions above). It is a small model trained on CPU: a baseline for the
platform's retraining loop, not a general-purpose vision-language model.

## Limits
- Figures hold for the test split above only; images unlike the training data (other domains, text in images,
  medical or surveillance imagery) are out of scope.
- Captions come from a small vocabulary and may state colours, counts or relations wrongly; do not use them
  where a wrong caption harms someone.
- No fairness or bias audit beyond the platform's evaluation report has been done.
"""


def register(model_dir: str | Path, metrics: dict[str, Any], p: RegisterParams, *,
             champion: dict[str, Any] | None = None, out: str | Path = "reports/registry.json",
             tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log and register the model under the active MLflow run; gate the alias (:func:`gate`) against the
    champion as the evaluate stage scored it on the same split (``champion``: its champion_metrics.json).
    Every decision goes to the version's tags, the registered model's history, a model card and ``out``."""
    from mlflow.tracking import MlflowClient

    if p.primary_metric not in metrics:
        raise ValueError(f"register.primary_metric: {p.primary_metric!r} is not in the evaluation metrics")
    value = float(metrics[p.primary_metric])
    tags = dict(tags or {})
    client = MlflowClient()
    digest = model_digest(model_dir)
    champ = _champion(client, p.model_name, p.alias)
    if champ is not None and champ.tags.get("model_digest") == digest:
        # A re-run that changed no weight (e.g. only an evaluation setting): nothing new to register or judge.
        decision = {"model_name": p.model_name, "version": int(champ.version), "alias": p.alias,
                    "promoted": False, "reason": f"the model's files are champion v{champ.version}'s: nothing "
                    "registered", "primary_metric": p.primary_metric, "value": value, "unchanged": True}
        _write(out, decision)
        log.info("register: %s", decision["reason"])
        return decision
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"model": str(Path(model_dir).resolve())},
        code_paths=[str(PACKAGE_DIR)], signature=signature(),
        # Explicit requirements: inferring them would import-scan the environment (slow, and offline here).
        pip_requirements=pinned_requirements(),
    )
    version = mlflow.register_model(info.model_uri, p.model_name)
    champ_version = int(champ.version) if champ else None
    scored = None
    if champ is not None and champion and champion.get("champion") == champion_source(p.model_name, p.alias,
                                                                                        champ.version):
        scored = champion.get("metrics") or None
    stored = float(champ.tags.get("primary_metric_value", "nan")) if champ else None
    promote, reason, theirs = gate(metrics, p, champ_version, scored, stored)
    run_id = mlflow.active_run().info.run_id
    all_tags = {"primary_metric": p.primary_metric, "primary_metric_value": f"{value:.6f}",
                "decision": "champion" if promote else "challenger", "reason": reason, "model_digest": digest,
                "model_card": f"runs:/{run_id}/model_card.md", **tags}
    for k, v in all_tags.items():
        client.set_model_version_tag(p.model_name, version.version, k, v)
    for m in (p.primary_metric, *p.guardrails):
        if m in theirs:
            client.set_model_version_tag(p.model_name, version.version, f"champion_before.{metric_name(m)}",
                                         f"{theirs[m]:.6f}")
    if promote:
        client.set_registered_model_alias(p.model_name, p.alias, version.version)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "alias": p.alias, "version": int(version.version),
             "from": champ_version, "to": int(version.version) if promote else champ_version,
             "promoted": promote, "reason": reason, "flow_run": tags.get("prefect_flow_run_id", "none"),
             "run_id": run_id}
    past = history(client, p.model_name)
    client.set_registered_model_tag(p.model_name, f"{HISTORY_PREFIX}{len(past) + 1:04d}", json.dumps(entry))
    decision = {"model_name": p.model_name, "version": int(version.version), "alias": p.alias,
                "promoted": promote, "reason": reason, "primary_metric": p.primary_metric, "value": value,
                "guardrails": dict(p.guardrails), "metrics": {m: float(metrics[m]) for m in (p.primary_metric,
                                                                                            *p.guardrails)
                                                                              if m in metrics},
                "champion_before": champ_version, "champion_value_before": theirs.get(p.primary_metric),
                "champion_metrics": theirs, "compared_on": "this run's test split" if scored else
                ("stored figure" if champ else "no champion"),
                "run_id": run_id, "model_uri": info.model_uri, "history": [*past, entry]}
    mlflow.log_text(model_card(p.model_name, int(version.version), decision, metrics, tags), "model_card.md")
    _write(out, decision)
    log.info("register: %s", reason)
    return decision


def _write(out: str | Path, decision: dict[str, Any]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(decision, indent=2))
