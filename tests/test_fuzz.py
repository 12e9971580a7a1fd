"""Bounded-time fuzzing of every ingest reader and of the image decoder (hypothesis, derandomized so CI sees the
same cases every run). Whatever the bytes: no uncaught exception, one outcome per entry (kept + quarantined =
read, where entries can be counted), and no decode past the pixel limit."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmplatform.data.images import BadImage, decode_image
from mmplatform.data.ingest import ingest_source

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seed_images() -> list[bytes]:
    out = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})):
        buf = io.BytesIO()
        Image.effect_noise((12, 9), 60).convert("RGB").save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> bytes:
    """A valid image of some format with bytes flipped, cut, repeated or spliced from another."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "dup", "splice", "big"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[i:] = other[draw(st.integers(0, len(other) - 1)):]
        elif op == "big" and len(data) > 24:  # claim a huge size in a header field
            data[16:24] = b"\x7f\xff\xff\xff\x7f\xff\xff\xff"
    return bytes(data)


@FUZZ
@given(mutated_image())
def test_decoder_never_raises_anything_but_bad_image(data):
    try:
        im = decode_image(data, max_pixels=1_000_000)
    except BadImage:
        return
    assert im.mode == "RGB" and im.width * im.height <= 1_000_000


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["image", "file_name", "caption", "captions", "text", "questions", "answers", "split",
                          "meta", "question", "answer"])


@st.composite
def manifest_row(draw) -> dict:
    row = draw(st.dictionaries(FIELDS, JSONISH, max_size=6))
    if draw(st.booleans()):
        row["image"] = draw(st.sampled_from(["a.png", "../etc/passwd", "/abs.png", "missing.png", "b.jpg", ""]))
    return row


def _images(root) -> None:
    (root / "a.png").write_bytes(SEEDS[0])
    (root / "b.jpg").write_bytes(SEEDS[1][: len(SEEDS[1]) // 2])  # truncated


@FUZZ
@given(rows=st.lists(manifest_row() | st.text(max_size=40), max_size=8))
def test_jsonl_reader(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("jsonl")
    _images(root)
    lines = [json.dumps(r) if isinstance(r, dict) else r.replace("\n", " ") for r in rows]
    (root / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    kept, bad = ingest_source("jsonl", root / "m.jsonl")
    assert len(kept) + len(bad) == sum(1 for line in lines if line.strip())


@FUZZ
@given(text=st.lists(st.sampled_from(list('ab,"\n\r;\\x ') + ["a.png", "image", "caption", "\x00", "\udcff"]),
                     max_size=80).map("".join))
def test_csv_reader(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("csv")
    _images(root)
    (root / "m.csv").write_text("image,caption\n" + text, encoding="utf-8", errors="surrogateescape")
    ingest_source("csv", root / "m.csv")


@FUZZ
@given(doc=JSONISH | st.fixed_dictionaries({"images": JSONISH, "annotations": JSONISH}))
def test_coco_reader(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("coco")
    _images(root)
    (root / "c.json").write_text(json.dumps(doc))
    try:
        ingest_source("coco", root / "c.json")
    except ValueError as exc:  # a document that is not COCO at all is refused in one line, not a traceback
        assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(doc=JSONISH | st.lists(st.fixed_dictionaries({"data": JSONISH, "annotations": JSONISH}), max_size=3))
def test_labelstudio_reader(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("ls")
    _images(root)
    (root / "export.json").write_text(json.dumps(doc))
    try:
        ingest_source("labelstudio", root / "export.json")
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)


def _shard() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (name, data) in enumerate([("000.png", SEEDS[0]), ("000.txt", b"a caption"),
                                          ("001.jpg", SEEDS[1]), ("001.json", b'{"captions": ["x y"]}')]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = i
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SHARD = _shard()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(SHARD) - 1), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, len(SHARD)), gz=st.booleans())
def test_webdataset_reader(tmp_path_factory, edits, cut, gz):
    root = tmp_path_factory.mktemp("wds")
    data = bytearray(SHARD)
    for i, v in edits:
        data[i] = v
    data = bytes(data[:cut])
    (root / "s.tar").write_bytes(gzip.compress(data) if gz else data)
    kept, bad = ingest_source("webdataset", root / "s.tar")
    assert len(kept) <= 2
