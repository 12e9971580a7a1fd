"""The canonical dataset: a directory with ``manifest.json`` and ``shards/*.parquet``.

It is the contract between stages (see docs/dataset.md). One row per image; records that a stage drops
are written, unchanged plus ``reason`` and ``stage`` columns, under ``<out>/quarantine/`` so that
kept + quarantined = read holds for every stage.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
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


class OutputNotOursError(ValueError):
    """The output directory exists, is not empty and is not a dataset this platform wrote."""


def is_dataset_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a dataset this platform wrote (a manifest with our keys)."""
    try:
        m = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "schema_version" in m and "record_count" in m


def check_output_dir(out_dir: str | Path, *, force: bool = False) -> None:
    """Refuse to replace anything but one of our datasets or an empty directory (``force`` allows it).

    Stages call this before their work, so a wrong OUT fails in a second instead of after the work, and
    :func:`write_dataset` calls it again before it swaps the new dataset in."""
    out = Path(out_dir)
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputNotOursError(f"{out}: exists and is not a directory; pass --force to replace it")
    if any(out.iterdir()) and not is_dataset_dir(out):
        raise OutputNotOursError(f"{out}: not empty and not a dataset written by mmp; refusing to replace it "
                                 "(choose another output or pass --force)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(out_dir: Path, records: list[dict[str, Any]], schema: pa.Schema, stage: str,
           params: dict | None, shard_size: int, extra: dict | None = None,
           before_manifest: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write shards, then (after ``before_manifest``) the manifest: a directory with a manifest is complete."""
    shards = out_dir / "shards"
    shards.mkdir(parents=True)
    cols = [f.name for f in schema]
    rows = [_normalise(r, cols) for r in records]
    n_shards = max(1, -(-len(rows) // shard_size))
    for i in range(n_shards):
        chunk = rows[i * shard_size:(i + 1) * shard_size]
        table = pa.Table.from_pylist(chunk, schema=schema)
        path = shards / f"part-{i:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        _fsync(path)
    _fsync(shards)
    if before_manifest is not None:
        before_manifest()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "record_count": len(rows),
        "content_hash": _content_hash(rows),
        "stage": stage,
        "params": params or {},
        "splits": {s: sum(1 for r in rows if r["split"] == s) for s in sorted({r["split"] for r in rows})},
        **(extra or {}),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(path)
    _fsync(out_dir)
    return manifest


def write_dataset(out_dir: str | Path, records: Iterable[dict[str, Any]], *, stage: str,
                  params: dict | None = None, shard_size: int = 2000,
                  quarantine: Iterable[dict[str, Any]] | None = None,
                  extra: dict[str, Any] | None = None, files: dict[str, str] | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Write ``records`` as a canonical dataset at ``out_dir``; ``quarantine`` rows carry a ``reason`` and go
    to ``out_dir/quarantine``; ``extra`` keys (e.g. the stage's stats) are added to the manifest; ``files``
    (name -> text) are written beside it. Returns the manifest.

    The dataset is written whole into a temporary sibling (shards, quarantine, files, the manifest last, each
    fsynced) and then renamed to ``out_dir``: a kill at any point leaves either the previous dataset or the new
    one, never a part. ``out_dir`` is replaced only when it is one of our datasets or empty
    (:func:`check_output_dir`; ``force`` replaces anything)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force=force)
    records = list(records)
    q = [dict(r, stage=r.get("stage") or stage) for r in (quarantine or [])]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def rest() -> None:  # quarantine and extra files before the top manifest, which marks the dataset complete
        _write(tmp / "quarantine", q, QUARANTINE_SCHEMA, stage, params, shard_size)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
            _fsync(tmp / name)

    try:
        manifest = _write(tmp, records, SCHEMA, stage, params, shard_size,
                          extra={**(extra or {}), "quarantined": len(q),
                                 "quarantine_reasons": _count(r["reason"].split(":")[0] for r in q)},
                          before_manifest=rest)
        _swap_in(tmp, out_dir, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _swap_in(tmp: Path, out_dir: Path, *, force: bool) -> None:
    check_output_dir(out_dir, force=force)  # again: something may have appeared there while we wrote
    old = None
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    elif out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_siblings(out_dir: Path) -> None:
    """Temporary siblings that a killed write of ``out_dir`` left behind (their writer is gone)."""
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*-*"):
        kind, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def source_domain(source: str) -> str:
    """Where a record came from, without the item: ``coco:/data/captions.json:123`` → ``coco:/data/captions.json``;
    the synthetic generator is one domain whatever its seed (``synthetic:seed=0`` → ``synthetic``)."""
    kind, _, rest = source.partition(":")
    if kind == "synthetic" or ":" not in rest:
        return kind
    return f"{kind}:{rest.rsplit(':', 1)[0]}"


def source_domains(path: str | Path) -> set[str]:
    """The :func:`source_domain` of every record of the dataset at ``path``."""
    return {source_domain(r["source"] or "") for r in iter_dataset(path, columns=["source"])}
