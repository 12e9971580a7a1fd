"""Ingest of COCO captions JSON, WebDataset tar shards and Hugging Face imagefolder directories.

All three produce the same records as a JSONL manifest of the same images would (same image bytes,
hence the same ``sample_id``), with the same guarantees (see :mod:`mmplatform.data.ingest`): paths
stay inside the images root, images go through the safe decoder, caption text follows the ingest
caption policy, and every entry read is either kept or quarantined with a reason. A problem with the
whole file (not JSON, no ``images`` list, no shard, no metadata) raises ``ValueError`` or
``FileNotFoundError`` with one line naming the file and the reason.

What counts as "read" (kept + quarantined = read) per format:

* COCO: each entry of ``images[]``, plus one quarantine row per unknown ``image_id`` that annotations
  point to (``orphan_annotation``: its captions are kept in the row, so no caption is lost);
* WebDataset: each sample (members sharing a key), plus one ``corrupt_tar`` row per damaged shard;
* imagefolder: each line (row) of each ``metadata.jsonl`` (``metadata.csv``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

from mmplatform.data.ingest import (
    Loader,
    Reject,
    TextStats,
    build_record,
    decode_bytes,
    extend_unique,
    ingest_csv,
    ingest_jsonl,
    parse_fields,
    quarantine_row,
    repair_texts,
    split_value,
)
from mmplatform.data.text import has_surrogates, safe_str

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- COCO

def ingest_coco(
    path: str | Path,
    images: str | Path | None = None,
    *,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a COCO captions file (``captions_train2017.json`` layout) and return ``(records, quarantined)``.

    ``images[]`` entries need ``id`` (int or string) and ``file_name`` (relative to ``images``, default
    the JSON file's folder); ``width``/``height`` are checked against the decoded image (a mismatch is
    logged and kept in ``meta["declared_size"]``; the decoded size wins); a ``split`` field (as in the
    Karpathy split files) is honoured like a JSONL ``split``; other fields (``coco_url``, ``license``...)
    are ignored. ``annotations[]`` entries (``image_id``, ``caption``) are grouped into their image's
    record in annotation order. Hostile cases:

    * an image with no annotation: kept with no caption (clean decides, as for every format);
    * annotations whose ``image_id`` is not an image: one row per unknown id, ``orphan_annotation``;
    * a repeated image ``id``: the first entry gets the annotations, later ones are quarantined as
      ``duplicate_image_id``;
    * a caption that is not a string: the image's record is quarantined as ``bad_captions`` (as a JSONL
      ``captions`` list with a non-string would be), with its string captions;
    * lone surrogates (``"\\ud800"`` escapes): ``non_utf8_caption``; a file that is not valid UTF-8 is
      repaired per string as the ingest caption policy says.
    """
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"COCO file not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"images root is not a directory: {root}")
    doc, escaped = _load_json(path, "COCO captions")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: not a COCO captions file: no 'images' list")
    annotations = doc.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: not a COCO captions file: 'annotations' is not a list")
    loader = Loader(root, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    stats = TextStats()

    first_index: dict[int | str, int] = {}  # image id -> index of its first entry
    for i, entry in enumerate(doc["images"]):
        if isinstance(entry, dict) and _valid_id(entry.get("id")) and entry["id"] not in first_index:
            first_index[entry["id"]] = i
    by_image: dict[int, list[dict[str, Any]]] = {}
    orphans: dict[str, list[dict[str, Any]]] = {}
    for ann in annotations:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if _valid_id(image_id) and image_id in first_index:
            by_image.setdefault(first_index[image_id], []).append(ann)
        else:
            orphans.setdefault(json.dumps(image_id) if _valid_id(image_id) else "invalid", []).append(ann)

    kept: list[dict] = []
    quarantined: list[dict] = []
    for i, entry in enumerate(doc["images"]):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        source = f"coco:{path}:{image_id}" if _valid_id(image_id) else f"coco:{path}:images[{i}]"
        where = f"{path}: images[{i}]"
        partial: dict[str, Any] = {"meta": {}}
        try:
            if not isinstance(entry, dict):
                raise Reject("bad_field: images entry is not an object")
            file_name = entry.get("file_name")
            if isinstance(file_name, str) and file_name:
                partial["file"] = file_name
            if not _valid_id(image_id):
                raise Reject("bad_field: id")
            partial["meta"]["coco_id"] = image_id
            if first_index[image_id] != i:
                raise Reject(f"duplicate_image_id: {image_id} (first at images[{first_index[image_id]}])")
            anns = by_image.get(i, [])
            ann_ids = [a.get("id") for a in anns if _valid_id(a.get("id"))]
            if ann_ids:
                partial["meta"]["annotation_ids"] = ann_ids
            raw = [a.get("caption") for a in anns]
            partial["captions"] = [c for c in raw if isinstance(c, str)]
            bad = [a.get("id", j) for j, a in enumerate(anns) if not isinstance(a.get("caption"), str)]
            if bad:
                more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                raise Reject(f"bad_captions: annotation {bad[0]}{more}")
            partial["captions"] = repair_texts(partial["captions"], "captions", partial["meta"], transcode=escaped,
                                               stats=stats)
            partial["split"] = split_value(entry.get("split"), partial, where)
            if file_name is None:
                raise Reject("missing_field: file_name")
            if not isinstance(file_name, str) or not file_name or "\x00" in file_name or has_surrogates(file_name):
                raise Reject("bad_field: file_name")
            rec = loader.record(partial, source)
        except Reject as r:
            quarantined.append(quarantine_row(partial, source, r.reason, where))
            continue
        declared = (entry.get("width"), entry.get("height"))
        if all(isinstance(v, int) for v in declared) and declared != (rec["width"], rec["height"]):
            log.warning("%s: declared size %sx%s, decoded %sx%s: keeping the decoded size", where, *declared,
                        rec["width"], rec["height"])
            meta = json.loads(rec["meta"])
            meta["declared_size"] = list(declared)
            rec["meta"] = json.dumps(meta, sort_keys=True)
        kept.append(rec)

    for key, anns in orphans.items():
        captions = [a.get("caption") for a in anns if isinstance(a, dict) and isinstance(a.get("caption"), str)]
        meta: dict[str, Any] = {"coco_image_id": json.loads(key) if key != "invalid" else None}
        ann_ids = [a.get("id") for a in anns if isinstance(a, dict) and _valid_id(a.get("id"))]
        if ann_ids:
            meta["annotation_ids"] = ann_ids
        what = f"image_id {key}" if key != "invalid" else "missing or invalid image_id"
        quarantined.append(quarantine_row({"captions": captions, "meta": meta}, f"coco:{path}:annotations",
                                          f"orphan_annotation: {what} ({len(anns)} annotations)",
                                          f"{path}: annotations"))
    if orphans:
        log.warning("%s: %d annotations point to %d unknown images", path, sum(map(len, orphans.values())),
                    len(orphans))
    stats.log(path)
    log.info("ingested %s: %d kept, %d quarantined", path, len(kept), len(quarantined))
    return kept, quarantined


def _valid_id(v: Any) -> bool:
    # bool is an int, and 1.0 == 1 would match an int id in a dict: only int and str are ids.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v))


def _load_json(path: Path, what: str) -> tuple[Any, bool]:
    """Parse a whole JSON file; a broken one is a ``ValueError`` with one line naming the file."""
    text, escaped = decode_bytes(path.read_bytes())
    try:
        return json.loads(text), escaped
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid {what} JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid {what} JSON: {type(e).__name__}") from None


# ---------------------------------------------------------------------------------------- WebDataset

# WebDataset's own key/extension split (webdataset.tariterators.base_plus_ext): the key is the member
# name up to the first dot of its basename, directories included; names without one are not samples.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_TEXT_EXTS = ("txt", "json")
_BRACE = re.compile(r"\{([^{}]*)\}")
_MAX_SHARDS = 100_000


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` numeric ranges (zero-padded like the bounds, descending allowed) and
    ``{a,b,c}`` lists, as WebDataset's ``braceexpand`` does for shard URLs."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= _MAX_SHARDS:
            raise ValueError(f"{pattern}: brace range expands to more than {_MAX_SHARDS} shards")
        padded = (len(a) > 1 and a.lstrip("-").startswith("0")) or (len(b) > 1 and b.lstrip("-").startswith("0"))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        items = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression: literal
        return [head + items[0] + t for t in expand_braces(tail)]
    out = [head + item + t for item in items for t in expand_braces(tail)]
    if len(out) > _MAX_SHARDS:
        raise ValueError(f"{pattern}: expands to more than {_MAX_SHARDS} shards")
    return out


def shard_paths(path: str | Path) -> list[Path]:
    """The shards named by ``path``: a file, a folder (its ``*.tar``/``*.tar.gz``/``*.tgz`` files,
    sorted), or a brace pattern (every expanded shard must exist)."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(q for q in p.iterdir() if q.name.endswith((".tar", ".tar.gz", ".tgz")) and q.is_file())
        if not shards:
            raise FileNotFoundError(f"webdataset: no .tar shards in {p}")
        return shards
    if p.is_file():
        return [p]
    names = expand_braces(str(path))
    if names == [str(path)]:
        raise FileNotFoundError(f"webdataset: shard not found: {path}")
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset: {len(missing)} of {len(names)} shards of {path} not found, "
                                f"first {missing[0]}")
    return [Path(n) for n in names]


def ingest_webdataset(
    path: str | Path,
    images: str | Path | None = None,
    *,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read WebDataset tar shards (see :func:`shard_paths`) and return ``(records, quarantined)``.

    Members are grouped into samples by key (:data:`_KEY_EXT`). A sample's image is its ``jpg``,
    ``jpeg``, ``png``, ``webp``, ``gif``, ``bmp``, ``tif`` or ``tiff`` member (the first in that order
    if there are several); its captions are the non-empty lines of ``txt`` and/or the fields of
    ``json`` (``caption``/``captions``/``questions``/``answers``/``split``/``meta`` as in a JSONL
    line); other members (``cls``, ``npy``, ...) are listed in ``meta["other_members"]``, not read.
    ``images`` is not used (the images are in the shards).

    Safety: shards are read as streams and nothing is extracted to disk; only regular-file members
    are read, and only when their declared size is within ``max_image_bytes``. A sample with a member
    that is a symlink, hard link, device or FIFO is quarantined (``tar_member_not_a_file: <type>``),
    as is one with an oversized member (``too_large``) or no image (``missing_image``); a sample with
    an image but no text is kept with no caption. Member names with ``..`` or a leading ``/`` are
    harmless here (nothing is written) but flagged in ``meta["unsafe_member_name"]``. A truncated or
    corrupt shard keeps the samples read before the damage and adds one ``corrupt_tar: <shard>`` row;
    the sample being read when the damage came may have lost members, so it is quarantined as
    ``incomplete_sample`` (a truncation exactly at a header boundary is caught too: the end-of-archive
    marker is missing).
    """
    if images is not None:
        log.warning("webdataset: images root %s is not used: images are read from the shards", images)
    kept: list[dict] = []
    quarantined: list[dict] = []
    for shard in shard_paths(path):
        k, q = _ingest_shard(shard, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
        kept.extend(k)
        quarantined.extend(q)
    log.info("ingested %s: %d kept, %d quarantined", path, len(kept), len(quarantined))
    return kept, quarantined


# A compressed shard may hold at most this many times its size uncompressed (JPEG/PNG members barely compress,
# so real shards stay far below it; a gzip of zeros is ~1000x) and at least MIN_DECOMPRESSED_LIMIT bytes.
MAX_DECOMPRESSION_RATIO = 50
MIN_DECOMPRESSED_LIMIT = 256 * 1024 * 1024


def _member_type(m: tarfile.TarInfo) -> str:
    for name, test in (("symlink", m.issym), ("hardlink", m.islnk), ("character_device", m.ischr),
                       ("block_device", m.isblk), ("fifo", m.isfifo), ("directory", m.isdir)):
        if test():
            return name
    return f"type_{m.type!r}"


def _ingest_shard(shard: Path, *, max_image_bytes: int, max_pixels: int) -> tuple[list[dict], list[dict]]:
    samples: dict[str, dict[str, Any]] = {}
    last_key: str | None = None
    ignored = 0
    damage: str | None = None
    end = 0  # offset just after the last member's data: where the end-of-archive marker must be
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        compressed = f.read(6)[:3] in (b"\x1f\x8b\x08", b"BZh", b"\xfd7z")
        f.seek(0)
        # The stream reader skips a member by reading it: a header may not send it past what the file holds
        # (a 10 KiB shard declaring a 1 TiB member read for ~18 min) or, compressed, past a bomb's ratio.
        limit = max(MAX_DECOMPRESSION_RATIO * size, MIN_DECOMPRESSED_LIMIT) if compressed else size
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for m in tf:
                    if m.offset_data + m.size > limit:
                        cut = _KEY_EXT.match(m.name)
                        if cut is not None:  # the sample this member belonged to is incomplete
                            last_key = cut.group(1)
                            samples.setdefault(last_key, {"members": {}, "other": [], "bad": None})
                        damage = (f"decompression_bomb: member {safe_str(m.name)} would take the shard past "
                                  f"{limit} uncompressed bytes" if compressed else
                                  f"member {safe_str(m.name)} declares {m.size} bytes, past the end of the file")
                        break
                    end = m.offset_data + (-(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if m.isreg() else 0)
                    if m.isdir():
                        continue
                    match = _KEY_EXT.match(m.name)
                    if match is None:
                        ignored += 1
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    last_key = key
                    s = samples.setdefault(key, {"members": {}, "other": [], "bad": None})
                    if not m.isreg():
                        s["bad"] = s["bad"] or f"tar_member_not_a_file: {_member_type(m)} {safe_str(m.name)}"
                        continue
                    if ext not in _IMAGE_EXTS + _TEXT_EXTS:
                        s["other"].append(safe_str(m.name))
                        continue
                    if m.size > max_image_bytes:
                        s["bad"] = s["bad"] or f"too_large: {safe_str(m.name)}: {m.size} bytes > {max_image_bytes}"
                        continue
                    member = tf.extractfile(m)
                    data = member.read(max_image_bytes + 1) if member is not None else b""
                    if ext in s["members"]:
                        log.warning("%s: member %s appears twice: the later one is used", shard, safe_str(m.name))
                    s["members"][ext] = (m.name, data)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            damage = f"{type(e).__name__}: {e}"
        if damage is None and not compressed:
            # tarfile ends quietly when the file stops at a header boundary; a complete archive has a
            # zero block there (compressed streams carry their own end-of-stream check).
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE) != b"\0" * tarfile.BLOCKSIZE:
                damage = "no end-of-archive marker (truncated)"
    if ignored:
        log.info("%s: %d members without a key.extension name ignored", shard, ignored)
    if damage is not None and last_key is not None:
        # Samples are contiguous in a shard, so only the one being read when the damage came can have
        # lost members (its caption, say): it is not kept as if it were whole.
        last = samples[last_key]
        last["bad"] = last["bad"] or f"incomplete_sample: {safe_str(str(shard))} is damaged after it"

    kept: list[dict] = []
    quarantined: list[dict] = []
    stats = TextStats()
    for key, s in samples.items():
        source = f"webdataset:{shard}:{key}"
        where = f"{shard}:{key}"
        partial: dict[str, Any] = {"meta": {}}
        img_ext = next((e for e in _IMAGE_EXTS if e in s["members"]), None)
        other = s["other"] + [safe_str(n) for e, (n, _) in s["members"].items() if e in _IMAGE_EXTS and e != img_ext]
        if other:
            partial["meta"]["other_members"] = other
        if ".." in key.split("/") or key.startswith("/"):
            partial["meta"]["unsafe_member_name"] = True
            log.warning("%s: member name %r has '..' or a leading '/' (not extracted, so harmless)", shard, key)
        if img_ext:
            partial["file"] = s["members"][img_ext][0]
        try:
            try:
                _sample_text(s["members"], partial, where, stats)
            except Reject:
                if not s["bad"]:
                    raise
            if s["bad"]:  # a bad member decides the reason; the text read is kept in the row
                raise Reject(s["bad"])
            if img_ext is None:
                raise Reject("missing_image")
            data = s["members"][img_ext][1]
            kept.append(build_record(data, partial, source, max_image_bytes=max_image_bytes, max_pixels=max_pixels))
        except Reject as r:
            quarantined.append(quarantine_row(partial, source, r.reason, where))
    if damage is not None:
        log.warning("%s: damaged shard (%s): %d samples read before it are kept", shard, damage, len(samples))
        quarantined.append(quarantine_row({"meta": {"error": safe_str(damage)}}, f"webdataset:{shard}",
                                          f"corrupt_tar: {shard}", str(shard)))
    stats.log(shard)
    return kept, quarantined


def _sample_text(members: dict[str, tuple[str, bytes]], partial: dict[str, Any], where: str,
                 stats: TextStats) -> None:
    """Captions (``txt`` lines, then ``json`` fields) and QA/split/meta of one sample, into ``partial``."""
    captions: list[str] = []
    if "txt" in members:
        text, escaped = decode_bytes(members["txt"][1])
        lines = [ln for ln in re.split(r"\r\n|\r|\n", text) if ln.strip()]
        partial["captions"] = lines
        captions = repair_texts(lines, "captions", partial["meta"], transcode=escaped, stats=stats)
        partial["captions"] = captions
    if "json" in members:
        name = safe_str(members["json"][0])
        text, escaped = decode_bytes(members["json"][1])
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise Reject(f"bad_json: {name}") from e
        if not isinstance(obj, dict):
            raise Reject(f"bad_json: {name}: not an object")
        obj = {k: v for k, v in obj.items() if k not in ("image", "file_name")}
        fields = parse_fields(obj, {}, where, transcode=escaped, require_image=False, stats=stats)
        repairs = partial["meta"].get("caption_repairs", [])
        repairs += [c for c in fields["meta"].pop("caption_repairs", []) if c not in repairs]
        partial["meta"] = {**fields["meta"], **partial["meta"]}
        if repairs:
            partial["meta"]["caption_repairs"] = repairs
        extend_unique(captions, fields["captions"], set(captions))
        partial.update(questions=fields["questions"], answers=fields["answers"], split=fields["split"])
        if fields.get("split_given"):
            partial["split_given"] = fields["split_given"]
    partial["captions"] = captions


# --------------------------------------------------------------------------------------- imagefolder

# Hugging Face datasets' split keywords for data directories (datasets.data_files), mapped onto ours.
_HF_SPLIT_DIRS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
                  "dev": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_FOLDER_IMAGE_EXTS = tuple(f".{e}" for e in _IMAGE_EXTS)


def _inside(path: Path, root: Path) -> bool:
    """A regular file whose real path is inside ``root``: a metadata file that is a link out of the folder
    (``metadata.jsonl -> /etc/...``) is not read, as image names are confined to their folder."""
    if not path.is_file():
        return False
    if path.resolve().is_relative_to(root.resolve()):
        return True
    log.warning("imagefolder: %s links outside %s: not read", path, root)
    return False


def ingest_imagefolder(
    path: str | Path,
    images: str | Path | None = None,
    *,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a Hugging Face ``imagefolder`` directory and return ``(records, quarantined)``.

    Metadata files (``metadata.jsonl``, or ``metadata.csv``) sit in the folder itself and/or in split
    subfolders (``train/``, ``validation/``, ``test/`` and the other names Hugging Face recognises);
    records from a split folder get that split. A row names its image with ``file_name``, relative to
    its metadata file's folder (and confined to it), and its text with ``text`` (the column name the
    Hugging Face docs use), ``caption`` or ``captions``, plus optional ``questions``/``answers`` — the
    JSONL manifest fields otherwise. Images that no row names are not records: they are counted and
    logged once. ``images`` is not used.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: not a directory: {root}")
    if images is not None:
        log.warning("imagefolder: images root %s is not used: file names are relative to each metadata file",
                    images)
    metas: list[tuple[Path, str | None]] = [(root / n, None) for n in _METADATA_FILES if _inside(root / n, root)]
    for d in sorted(root.iterdir()):
        split = _HF_SPLIT_DIRS.get(d.name.lower())
        if split and d.is_dir() and not d.is_symlink():
            metas += [(d / n, split) for n in _METADATA_FILES if _inside(d / n, root)]
    if not metas:
        raise FileNotFoundError(f"imagefolder: no metadata.jsonl or metadata.csv in {root} or its split folders")
    kept: list[dict] = []
    quarantined: list[dict] = []
    named: set[str] = set()
    for meta_path, split in metas:
        loader = Loader(meta_path.parent, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
        parse = ingest_jsonl if meta_path.suffix == ".jsonl" else ingest_csv
        k, q = parse(meta_path, loader, text_alias=True, force_split=split, kind="imagefolder")
        kept.extend(k)
        quarantined.extend(q)
        for r in k + q:
            file = json.loads(r["meta"]).get("file")
            if isinstance(file, str):
                named.add(os.path.normpath(meta_path.parent / file))
    unnamed = 0
    for dirpath, _dirs, files in os.walk(root):  # followlinks=False: a linked folder is not walked
        unnamed += sum(1 for n in files if n.lower().endswith(_FOLDER_IMAGE_EXTS)
                       and os.path.normpath(os.path.join(dirpath, n)) not in named)
    if unnamed:
        log.info("imagefolder %s: %d image files are named by no metadata row and were not ingested", root, unnamed)
    log.info("ingested %s: %d kept, %d quarantined", root, len(kept), len(quarantined))
    return kept, quarantined
