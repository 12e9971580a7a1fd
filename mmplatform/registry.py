"""Model registry: log the model, create a version, move the champion alias only when it is beaten.

The gate: the new version becomes ``champion`` when there is none yet, or when its primary test metric
exceeds the champion's by more than ``min_improvement``. The decision and its reason are written to
``reports/registry.json`` and set as tags on the version, so an auditor sees why from either side.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from mmplatform.config import RegisterParams

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


def register(model_dir: str | Path, metrics: dict[str, Any], p: RegisterParams, *,
             out: str | Path = "reports/registry.json", tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log and register the model under the active MLflow run; gate the alias. Returns the decision."""
    from mlflow.tracking import MlflowClient

    if p.primary_metric not in metrics:
        raise ValueError(f"register.primary_metric: {p.primary_metric!r} is not in the evaluation metrics")
    value = float(metrics[p.primary_metric])
    client = MlflowClient()
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"model": str(Path(model_dir).resolve())},
        code_paths=[str(PACKAGE_DIR)], signature=signature(),
        # Explicit requirements: inferring them would import-scan the environment (slow, and offline here).
        pip_requirements=pinned_requirements(),
    )
    version = mlflow.register_model(info.model_uri, p.model_name)
    champ = _champion(client, p.model_name, p.alias)
    champ_value = None
    if champ is None:
        promote, reason = True, "no champion yet: the first version becomes champion"
    else:
        champ_value = float(champ.tags.get("primary_metric_value", "nan"))
        promote = value > champ_value + p.min_improvement
        verb = "beats" if promote else "does not beat"
        reason = (f"{p.primary_metric} {value:.4f} {verb} champion v{champ.version} ({champ_value:.4f})"
                  f" by more than {p.min_improvement}")
    all_tags = {"primary_metric": p.primary_metric, "primary_metric_value": f"{value:.6f}",
                "decision": "champion" if promote else "challenger", "reason": reason, **(tags or {})}
    for k, v in all_tags.items():
        client.set_model_version_tag(p.model_name, version.version, k, v)
    if promote:
        client.set_registered_model_alias(p.model_name, p.alias, version.version)
    decision = {"model_name": p.model_name, "version": int(version.version), "alias": p.alias,
                "promoted": promote, "reason": reason, "primary_metric": p.primary_metric, "value": value,
                "champion_before": int(champ.version) if champ else None, "champion_value_before": champ_value,
                "run_id": mlflow.active_run().info.run_id, "model_uri": info.model_uri}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(decision, indent=2))
    log.info("register: %s", reason)
    return decision
