"""Small report writers shared by stages (training and RL curves declared as DVC plots)."""

from __future__ import annotations

from pathlib import Path


def write_history(history: list[dict], path: str | Path) -> None:
    """A CSV with one row per epoch (or RL evaluation), declared as a DVC plot."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in history for k in row))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
