"""The canonical dataset: a directory with ``manifest.json`` and ``shards/*.parquet``.

It is the contract between stages (see docs/dataset.md). One row per image; records that a stage drops
are written, unchanged plus ``reason`` and ``stage`` columns, under ``<out>/quarantine/`` so that
kept + quarantined = read holds for every stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.binary()),
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("questions", pa.list_(pa.string())),
        ("answers", pa.list_(pa.string())),
        ("source", pa.string()),
        ("split", pa.string()),
        ("meta", pa.string()),
    ]
)
QUARANTINE_SCHEMA = SCHEMA.append(pa.field("reason", pa.string())).append(pa.field("stage", pa.string()))
COLUMNS = [f.name for f in SCHEMA]
SPLITS = ("train", "val", "test", "test_compositional")


def sample_id_for(image_bytes: bytes) -> str:
    """Stable id from content: the same image bytes give the same id, whatever the source format."""
    return hashlib.sha256(image_bytes).hexdigest()[:20]


def make_record(
    image_bytes: bytes,
    width: int,
    height: int,
    captions: Iterable[str],
    questions: Iterable[str] = (),
    answers: Iterable[str] = (),
    source: str = "",
    split: str = "",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    digest = hashlib.sha256(image_bytes).hexdigest()
    return {
        "sample_id": digest[:20],
        "image": image_bytes,
        "image_sha256": digest,
        "width": int(width),
        "height": int(height),
        "captions": list(captions),
        "questions": list(questions),
        "answers": list(answers),
        "source": source,
        "split": split,
        "meta": json.dumps(meta or {}, sort_keys=True),
    }


def _normalise(rec: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    out = {}
    for c in columns:
        v = rec.get(c)
        if c in ("captions", "questions", "answers"):
            v = list(v or [])
        elif c in ("width", "height"):
            v = int(v or 0)
        elif c == "image":
            v = bytes(v or b"")
        elif c == "meta" and isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        else:
            v = "" if v is None else str(v)
        out[c] = v
    return out


def _content_hash(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r["image_sha256"].encode())
        h.update(json.dumps([r["captions"], r["questions"], r["answers"], r["split"], r["meta"]]).encode())
    return h.hexdigest()


def _write(out_dir: Path, records: list[dict[str, Any]], schema: pa.Schema, stage: str,
           params: dict | None, shard_size: int, extra: dict | None = None) -> dict[str, Any]:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shards = out_dir / "shards"
    shards.mkdir(parents=True)
    cols = [f.name for f in schema]
    rows = [_normalise(r, cols) for r in records]
    n_shards = max(1, -(-len(rows) // shard_size))
    for i in range(n_shards):
        chunk = rows[i * shard_size:(i + 1) * shard_size]
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, shards / f"part-{i:05d}.parquet", compression="zstd")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "record_count": len(rows),
        "content_hash": _content_hash(rows),
        "stage": stage,
        "params": params or {},
        "splits": {s: sum(1 for r in rows if r["split"] == s) for s in sorted({r["split"] for r in rows})},
        **(extra or {}),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def write_dataset(out_dir: str | Path, records: Iterable[dict[str, Any]], *, stage: str,
                  params: dict | None = None, shard_size: int = 2000,
                  quarantine: Iterable[dict[str, Any]] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``records`` as a canonical dataset (replacing ``out_dir``); ``quarantine`` rows carry a
    ``reason`` and go to ``out_dir/quarantine``; ``extra`` keys (e.g. the stage's stats) are added to
    the manifest. Returns the manifest."""
    out_dir = Path(out_dir)
    records = list(records)
    q = [dict(r, stage=r.get("stage") or stage) for r in (quarantine or [])]
    manifest = _write(out_dir, records, SCHEMA, stage, params, shard_size,
                      extra={**(extra or {}), "quarantined": len(q),
                             "quarantine_reasons": _count(r["reason"].split(":")[0] for r in q)})
    _write(out_dir / "quarantine", q, QUARANTINE_SCHEMA, stage, params, shard_size)
    return manifest


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a dataset (no manifest.json)")
    return json.loads(p.read_text())


def iter_dataset(path: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    path = Path(path)
    read_manifest(path)
    for shard in sorted((path / "shards").glob("*.parquet")):
        yield from pq.read_table(shard, columns=columns).to_pylist()


def read_dataset(path: str | Path, columns: list[str] | None = None,
                 split: str | None = None) -> list[dict[str, Any]]:
    rows = list(iter_dataset(path, columns))
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
    return rows


def read_quarantine(path: str | Path) -> list[dict[str, Any]]:
    q = Path(path) / "quarantine"
    return list(iter_dataset(q)) if (q / "manifest.json").exists() else []
