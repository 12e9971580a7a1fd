"""dvc.yaml lists, for every stage, every project module its command can import (the static import closure of
``pipelines/<stage>.py``, function-level imports included). A module missing from a stage's deps means an edit
to it re-runs nothing, and dvc.lock then describes outputs the code no longer makes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmplatform", "pipelines", "flows")


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any level, with the packages on the way (their __init__ runs)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                parts = name.split(".")
                out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {n for n in out if _module_file(n)}


def import_closure(entry: str) -> set[Path]:
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(_imports(_module_file(name)) - seen)
    return {_module_file(n).relative_to(ROOT) for n in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_module_a_stage_imports_is_a_dependency(stage):
    spec = _stages()[stage]
    entry = spec["cmd"].split("python -m ", 1)[1].split()[0]
    # Empty package markers hold no code that a stage runs.
    needed = {p for p in import_closure(entry) if not (p.name == "__init__.py" and not (ROOT / p).read_text().strip())}
    missing = sorted(str(p) for p in needed if not _covered(p, spec.get("deps", [])))
    assert not missing, f"dvc.yaml: stage {stage} imports these but does not list them as deps: {missing}"


def test_the_closure_follows_function_level_imports():
    closure = import_closure("pipelines.train")
    assert Path("mmplatform/train/recipe.py") in closure
    assert Path("mmplatform/compute.py") in closure  # imported inside run_training
