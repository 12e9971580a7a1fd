"""Ingest a JSONL or CSV manifest of (image path, captions[, questions, answers, split]) into records.

Nothing in the manifest is trusted: image paths must stay inside the images root (no ``..``, no
absolute paths, no symlinks leading out), only regular files are opened (a FIFO would block), files
are size-checked before they are read, and image bytes go through the safe decoder. Every line that
cannot become a good record comes back in the quarantine list with a specific ``reason``, so that
``len(kept) + len(quarantined)`` equals the number of records read.

Image bytes are stored as read for JPEG and PNG (so the sample_id is the hash of the file itself);
other allowed formats (WebP, GIF, BMP, TIFF) are re-encoded to PNG, because the dataset contract
holds PNG/JPEG only. ``width``/``height`` are those of the decoded image, i.e. after EXIF orientation.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from mmplatform.data.dataset import SPLITS, make_record
from mmplatform.data.images import BadImage, decode_image, encode_png, sniff_format

log = logging.getLogger(__name__)

_KEEP_BYTES_FORMATS = ("JPEG", "PNG")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "training": "train"}
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Reject(Exception):
    """Internal: this line becomes a quarantine row with ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def ingest_manifest(
    path: str | Path,
    images: str | Path | None = None,
    fmt: str = "jsonl",
    *,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a manifest and return ``(records, quarantined)``.

    ``fmt`` is ``"jsonl"`` or ``"csv"``. ``images`` is the root that image paths are relative to
    (default: the manifest's folder). See :func:`_ingest_jsonl` / :func:`_ingest_csv` for the
    accepted fields.
    """
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    fmt = fmt.lower()
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown manifest format {fmt!r} (expected 'jsonl' or 'csv')")
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"images root is not a directory: {root}")
    loader = _Loader(root, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    if fmt == "jsonl":
        kept, quarantined = _ingest_jsonl(path, loader)
    else:
        kept, quarantined = _ingest_csv(path, loader)
    log.info("ingested %s: %d kept, %d quarantined", path, len(kept), len(quarantined))
    return kept, quarantined


# --------------------------------------------------------------------------------------------- JSONL

def _ingest_jsonl(path: Path, loader: _Loader) -> tuple[list[dict], list[dict]]:
    """One JSON object per line: ``image`` (or ``file_name``), ``captions`` (list) and/or ``caption``
    (string), optional ``questions``/``answers`` (aligned lists), ``split`` and ``meta`` (an object,
    merged into the record's meta; ``file`` is always the image path). Blank lines are skipped."""
    kept: list[dict] = []
    quarantined: list[dict] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            source = f"jsonl:{path}:{lineno}"
            partial: dict[str, Any] = {}
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deeply nested JSON recurses
                    raise _Reject(f"bad_json: line {lineno}") from e
                if not isinstance(obj, dict):
                    raise _Reject(f"bad_json: line {lineno}: not an object")
                kept.append(loader.record(_fields_from_obj(obj, partial, f"{path}:{lineno}"), source))
            except _Reject as r:
                quarantined.append(_quarantine(partial, source, r.reason, path, lineno))
    return kept, quarantined


def _fields_from_obj(obj: dict[str, Any], partial: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one manifest entry; fills ``partial`` with what could be read as it goes, so a
    rejected entry still shows its captions/path in quarantine."""
    image = obj.get("image", obj.get("file_name"))
    if isinstance(image, str) and image:
        partial["file"] = image
    captions = _captions(obj.get("captions"), obj.get("caption"))
    partial["captions"] = captions
    questions = _str_list(obj.get("questions", []), "bad_qa: questions")
    answers = _str_list(obj.get("answers", []), "bad_qa: answers")
    partial["questions"], partial["answers"] = questions, answers
    split = _split(obj.get("split"), partial, where)
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise _Reject("bad_field: meta")
    partial["meta"] = dict(meta or {})
    if image is None:
        raise _Reject("missing_field: image")
    if not isinstance(image, str) or not image or "\x00" in image or not _utf8_ok(image):
        raise _Reject("bad_field: image")
    if len(questions) != len(answers):
        raise _Reject(f"qa_length_mismatch: {len(questions)} questions, {len(answers)} answers")
    partial["split"] = split
    return partial


def _captions(captions: Any, caption: Any) -> list[str]:
    out: list[str] = []
    if captions is not None:
        out = _str_list(captions, "bad_captions")
    if caption is not None:
        if not isinstance(caption, str) or not _utf8_ok(caption):
            raise _Reject("bad_captions")
        if caption not in out:
            out.append(caption)
    return out


def _str_list(value: Any, reason: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and _utf8_ok(v) for v in value):
        raise _Reject(reason)
    return list(value)


def _utf8_ok(s: str) -> bool:
    # JSON allows "\ud800"; a lone surrogate would make the Parquet writer fail much later.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split(value: Any, partial: dict[str, Any], where: str) -> str:
    """A known split (or alias) is kept; anything else becomes "" (assigned later by clean) and the
    given value is remembered in meta as ``split_given`` rather than silently lost."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        v = value.strip().lower()
        v = _SPLIT_ALIASES.get(v, v)
        if v in SPLITS:
            partial["split"] = v
            return v
    log.warning("%s: unknown split %r: left unassigned", where, value)
    partial.setdefault("split_given", str(value))
    return ""


# ----------------------------------------------------------------------------------------------- CSV

def _ingest_csv(path: Path, loader: _Loader) -> tuple[list[dict], list[dict]]:
    """Header row, then one row per caption: ``image`` (or ``file_name``), ``caption`` (one per row)
    or ``captions`` (a JSON list, or a single caption), optional ``question``/``answer`` (one pair
    per row) or ``questions``/``answers`` (JSON lists), and ``split``. Rows naming the same image are
    grouped into one record (first-appearance order, captions in row order); its source names the
    file line of the group's first row."""
    kept: list[dict] = []
    quarantined: list[dict] = []
    groups: dict[str, dict[str, Any]] = {}
    with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
        reader = csv.DictReader(f)
        lineno = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                bad_line = reader.line_num or lineno + 1
                quarantined.append(_quarantine({}, f"csv:{path}:{bad_line}", f"bad_csv: line {bad_line}",
                                               path, bad_line))
                if isinstance(e, UnicodeDecodeError):
                    break  # the decoder cannot resynchronise; the rest of the file is unreadable
                lineno = reader.line_num
                continue
            lineno = reader.line_num
            source = f"csv:{path}:{lineno}"
            partial: dict[str, Any] = {}
            try:
                image = row.get("image") or row.get("file_name")
                if image:
                    partial["file"] = image
                caps = _csv_list(row, "captions", "caption", "bad_captions")
                partial["captions"] = caps
                qs = _csv_list(row, "questions", "question", "bad_qa: questions")
                ans = _csv_list(row, "answers", "answer", "bad_qa: answers")
                partial["questions"], partial["answers"] = qs, ans
                split = _split(row.get("split"), partial, f"{path}:{lineno}")
                if not image:
                    raise _Reject("missing_field: image")
                if "\x00" in image:
                    raise _Reject("bad_field: image")
                if len(qs) != len(ans):
                    raise _Reject(f"qa_length_mismatch: {len(qs)} questions, {len(ans)} answers")
            except _Reject as r:
                quarantined.append(_quarantine(partial, source, r.reason, path, lineno))
                continue
            g = groups.get(image)
            if g is None:
                groups[image] = {"file": image, "captions": [], "questions": [], "answers": [],
                                 "split": split, "meta": {}, "source": source, "lineno": lineno}
                g = groups[image]
            elif split and g["split"] and split != g["split"]:
                log.warning("%s:%d: split %r conflicts with %r from line %d; keeping the first",
                            path, lineno, split, g["split"], g["lineno"])
            g["split"] = g["split"] or split
            if partial.get("split_given"):
                g.setdefault("split_given", partial["split_given"])
            g["captions"].extend(c for c in caps if c not in g["captions"])
            g["questions"].extend(qs)
            g["answers"].extend(ans)
    for g in groups.values():
        try:
            kept.append(loader.record(g, g["source"]))
        except _Reject as r:
            quarantined.append(_quarantine(g, g["source"], r.reason, path, g["lineno"]))
    return kept, quarantined


def _csv_list(row: dict[str, Any], plural: str, singular: str, reason: str) -> list[str]:
    out: list[str] = []
    many = row.get(plural)
    if many:
        if many.lstrip().startswith("["):
            try:
                parsed = json.loads(many)
            except ValueError as e:
                raise _Reject(reason) from e
            out = _str_list(parsed, reason)
        else:
            out = [many]
    one = row.get(singular)
    if one:
        out.append(one)
    return out


# ------------------------------------------------------------------------------------- image loading

class _Loader:
    def __init__(self, root: Path, *, max_image_bytes: int, max_pixels: int):
        self.root = root
        self.root_resolved = root.resolve(strict=True)
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels

    def record(self, fields: dict[str, Any], source: str) -> dict[str, Any]:
        """Read and validate the image; return a good record or raise _Reject. On a bad image the
        bytes read so far are left in ``fields["image"]`` for the quarantine row."""
        rel = fields["file"]
        data = self._read(rel)
        fields["image"] = data
        try:
            im = decode_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)
        except BadImage as e:
            raise _Reject(e.reason) from e
        meta = dict(fields.get("meta") or {})
        meta["file"] = rel
        fmt = sniff_format(data)
        if fmt not in _KEEP_BYTES_FORMATS:
            meta["reencoded_from"] = fmt
            data = encode_png(im)
        if fields.get("split_given"):
            meta["split_given"] = fields["split_given"]
        return make_record(data, im.width, im.height, fields["captions"], fields["questions"],
                           fields["answers"], source=source, split=fields.get("split", ""), meta=meta)

    def _safe_path(self, rel: str) -> Path:
        pure = PurePosixPath(rel.replace("\\", "/"))
        if rel.startswith(("/", "\\")) or _DRIVE.match(rel) or pure.is_absolute() or ".." in pure.parts:
            raise _Reject("path_outside_root")
        try:
            candidate = (self.root / pure).resolve(strict=False)
        except (RuntimeError, OSError) as e:  # symlink loop (RuntimeError on 3.11, OSError on 3.13)
            raise _Reject("unreadable_file: symlink loop") from e
        # resolve() follows every symlink, so a link anywhere in the path that leads out is caught here.
        if not candidate.is_relative_to(self.root_resolved):
            raise _Reject("path_outside_root")
        return candidate

    def _read(self, rel: str) -> bytes:
        p = self._safe_path(rel)
        try:
            # O_NOFOLLOW: p is fully resolved, so a symlink here means it was swapped in after the check.
            # O_NONBLOCK: opening a FIFO must not hang the ingest; regular files ignore the flag.
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError as e:
            raise _Reject("missing_file") from e
        except OSError as e:
            raise _Reject(f"unreadable_file: {e.strerror or type(e).__name__}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Reject("not_a_file")
            if st.st_size == 0:
                raise _Reject("empty_file")
            if st.st_size > self.max_image_bytes:
                raise _Reject(f"too_large: {st.st_size} bytes > {self.max_image_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(self.max_image_bytes + 1)
        except OSError as e:
            raise _Reject(f"unreadable_file: {e.strerror or type(e).__name__}") from e
        finally:
            os.close(fd)


def _quarantine(partial: dict[str, Any], source: str, reason: str, path: Path, lineno: int) -> dict[str, Any]:
    """A full record-shaped row keeping whatever could be read, plus ``reason``."""
    log.warning("%s:%d: quarantined: %s", path, lineno, reason)
    image = bytes(partial.get("image") or b"")
    meta = dict(partial.get("meta") or {})
    if partial.get("file"):
        meta["file"] = partial["file"]
    if partial.get("split_given"):
        meta["split_given"] = partial["split_given"]
    if image:
        rec = make_record(image, 0, 0, partial.get("captions") or [], partial.get("questions") or [],
                          partial.get("answers") or [], source=source, split=partial.get("split", ""),
                          meta=meta)
    else:
        # No bytes: an empty sample_id rather than the hash of b"" shared by every such row.
        rec = {"sample_id": "", "image": b"", "image_sha256": "", "width": 0, "height": 0,
               "captions": list(partial.get("captions") or []),
               "questions": list(partial.get("questions") or []),
               "answers": list(partial.get("answers") or []),
               "source": source, "split": partial.get("split", ""), "meta": json.dumps(meta, sort_keys=True)}
    rec["reason"] = reason
    return rec
