"""The registered champion, for the data stages that use it: alignment scores when cleaning, and
caption predictions for model-assisted annotation. Both are skipped when there is no champion yet."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def model_digest(model_dir: str | Path) -> str:
    """sha256 over the files that make a model (weights, config, tokenizer): equal digests, the same model."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for f in [d / "model.safetensors", d / "model_config.json", *sorted((d / "tokenizer").rglob("*"))]:
        if f.is_file():
            h.update(f.relative_to(d).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def champion_source(model_name: str, alias: str, version: int | str) -> str:
    """How a champion is named in logs and in ``reports/eval/champion_metrics.json``."""
    return f"models:/{model_name}@{alias} (v{version})"


def champion_model_dir(model_name: str = "mmplatform", alias: str = "champion") -> tuple[Path, str] | None:
    """``(local model dir, "models:/name@alias (vN)")`` of the champion, or None when there is none."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mmplatform import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no store here yet: do not create one just to find it empty
    tracking.setup()
    try:
        version = MlflowClient().get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@{alias}"))
    # The pyfunc keeps the model directory under artifacts/<its original folder name> (e.g. artifacts/rl).
    found = sorted(local.glob("artifacts/*/model_config.json"))
    if not found:
        log.warning("champion %s v%s has no model files under %s", model_name, version.version, local)
        return None
    return found[0].parent, champion_source(model_name, alias, version.version)


def champion_tags(model_name: str = "mmplatform", alias: str = "champion") -> dict[str, str]:
    """The champion version's tags (lineage, decision, the data domains it was trained on); {} without one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient().get_model_version_by_alias(model_name, alias).tags)
    except mlflow.exceptions.MlflowException:
        return {}


def load_model(model_dir: str | Path):
    """(model in eval mode, tokenizer); raises ValueError for a model saved by incompatible code."""
    from mmplatform.models.multimodal import MultimodalModel
    from mmplatform.models.tokenizer import load_tokenizer

    try:
        model = MultimodalModel.load(model_dir).eval()
    except TypeError as exc:  # a config written by an older code version
        raise ValueError(f"{model_dir}: model cannot be loaded by this code version ({exc})") from None
    return model, load_tokenizer(Path(model_dir) / "tokenizer")


def champion_captioner(model_name: str = "mmplatform", alias: str = "champion", max_length: int = 40
                       ) -> tuple[Callable[[list[bytes]], list[str]], str] | None:
    """``(captions(list of image bytes) -> list of str, model version)`` from the champion, or None."""
    found = champion_model_dir(model_name, alias)
    if found is None:
        return None
    model_dir, source = found
    try:
        model, tokenizer = load_model(model_dir)
    except ValueError as exc:
        log.warning("%s", exc)
        return None

    def predict(images: list[bytes]) -> list[str]:
        from mmplatform.models.captioning import greedy_captions
        from mmplatform.train.batches import decode_images

        out: list[str] = []
        for i in range(0, len(images), 256):
            x = decode_images([{"image": b} for b in images[i:i + 256]], model.cfg.image_size)
            out.extend(greedy_captions(model, tokenizer, x, max_length))
        return out

    return predict, source
