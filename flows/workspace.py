"""A self-contained DVC workspace: a copy of the pipeline (dvc.yaml, the stage scripts, the library) with its
own params.yaml, DVC repo, MLflow store and Prefect database. ``mmp demo`` runs the demo profile in one, so the
user's own workspace, registry and data are never touched; the end-to-end tests build theirs the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mmplatform.config import OVERRIDES_FILE, load_yaml, validate

ROOT = Path(__file__).resolve().parents[1]  # the checkout this package runs from
DEMO_PROFILE = ROOT / "params/demo.yaml"
MARKER = ".mmp/workspace"  # says the directory is a workspace this function made (and may refresh)


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``new``'s keys set, section by section (a nested mapping updates, anything else replaces)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def make_workspace(path: str | Path, overlay: dict[str, Any] | None = None) -> Path:
    """Create (or refresh) the workspace at ``path`` with params.yaml = this checkout's params.yaml updated by
    ``overlay``. Refreshing rewrites only files with the same content, so DVC skips every stage that ran. A
    non-empty directory that is not such a workspace is refused (ValueError): it may be someone's files."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise ValueError(f"{path}: not empty and not an mmp workspace; choose another directory")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("mmplatform", "pipelines"):
        shutil.copytree(ROOT / d, path / d, ignore=ignore, dirs_exist_ok=True)
    for f in ("dvc.yaml", ".dvcignore", OVERRIDES_FILE):
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        if not (path / f).is_file() or (path / f).read_bytes() != (ROOT / f).read_bytes():
            shutil.copy(ROOT / f, path / f)
    (path / "data/annotations").mkdir(parents=True, exist_ok=True)
    readme = path / "data/annotations/README.md"
    if not readme.is_file():
        readme.write_text("Label Studio exports for this workspace go here.\n")
    raw = deep_update(load_yaml((ROOT / "params.yaml").read_text()), overlay or {})
    validate(raw, f"{path / 'params.yaml'}")
    text = yaml.safe_dump(raw, sort_keys=False)
    if not (path / "params.yaml").is_file() or (path / "params.yaml").read_text() != text:
        (path / "params.yaml").write_text(text)
    if not (path / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=path, check=True)
    (path / MARKER).write_text("made by mmp: a copy of the pipeline with its own params, data and stores\n")
    return path


def demo_profile() -> dict[str, Any]:
    return load_yaml(DEMO_PROFILE.read_text())
