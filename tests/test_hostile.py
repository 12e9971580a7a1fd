"""Acceptance test for ingest on hostile input.

One corpus of bad and good entries under an images root, written as a JSONL manifest and as a COCO
captions file. For both: no exception, every bad entry quarantined with its specific reason, every good
one kept, kept + quarantined = read, and no file outside the root is ever opened (every ``open``/
``os.open`` during ingest is recorded and checked). The JSONL corpus also goes through the CLI.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from mmplatform.data.dataset import read_dataset, read_quarantine, write_dataset
from mmplatform.data.ingest import ingest_source


def jpeg_bytes(seed: int, size=(48, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def png_bytes(color, size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# Raw caption bytes, spliced into the files as bytes (they are not valid UTF-8).
CP1252 = b"un caf\xe9 \x93cr\xe8me\x94"     # Windows-1252: repaired
UNDECODABLE = b"bad \x81\x8d bytes"             # unassigned in cp1252: quarantined
UTF16 = b"\xff\xfecat"                          # a UTF-16 BOM pasted into UTF-8: quarantined

# (case, image path, captions, expected reason code or None when kept)
# The captions "@CP1252@", "@UNDECODABLE@", "@UTF16@" are replaced by the raw bytes above.
CASES = [
    ("good_jpeg", "good1.jpg", ["a noisy photo", "colour noise"], None),
    ("good_png", "sub/good2.png", ["a red rectangle"], None),
    ("good_webp", "good3.webp", ["a green webp"], None),
    ("cp1252_caption", "good4.jpg", ["@CP1252@"], None),
    ("control_chars", "good5.png", ["a\x00 blue\x1b box"], None),
    ("empty_caption", "good6.png", ["   "], None),
    ("bomb", "bomb.png", ["a bomb"], "decompression_bomb"),
    ("truncated_jpeg", "truncated.jpg", ["half a jpeg"], "corrupt_image"),
    ("zero_bytes", "zero.jpg", ["nothing"], "empty_file"),
    ("text_as_jpeg", "text.jpg", ["text file"], "unsupported_format"),
    ("eps_as_png", "eps.png", ["postscript"], "unsupported_format"),
    ("dotdot", "../outside.jpg", ["escape up"], "path_outside_root"),
    ("absolute", "@ABSOLUTE@", ["absolute path"], "path_outside_root"),
    ("symlink_out", "link_out.jpg", ["symlink leading out"], "path_outside_root"),
    ("symlink_dir_out", "linkdir/inside.jpg", ["through a linked folder"], "path_outside_root"),
    ("missing", "missing.jpg", ["gone"], "missing_file"),
    ("fifo", "fifo.jpg", ["a named pipe"], "not_a_file"),
    ("directory", "adir.jpg", ["a folder"], "not_a_file"),
    ("undecodable_caption", "good7.png", ["@UNDECODABLE@"], "non_utf8_caption"),
    ("utf16_caption", "good7.png", ["@UTF16@"], "non_utf8_caption"),
]


@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    elsewhere = tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "good1.jpg").write_bytes(jpeg_bytes(1))
    (root / "sub" / "good2.png").write_bytes(png_bytes((255, 0, 0)))
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (0, 255, 0)).save(buf, format="WEBP", lossless=True)
    (root / "good3.webp").write_bytes(buf.getvalue())
    (root / "good4.jpg").write_bytes(jpeg_bytes(4))
    (root / "good5.png").write_bytes(png_bytes((0, 0, 255)))
    (root / "good6.png").write_bytes(png_bytes((9, 9, 9)))
    (root / "good7.png").write_bytes(png_bytes((7, 7, 7)))
    (root / "bomb.png").write_bytes(png_bomb())
    full = jpeg_bytes(8, (64, 64))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is plain text, not a JPEG\n")
    (root / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n")
    # Real, readable files outside the root: a read would succeed, so only the checks stop it.
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(10))
    (elsewhere / "abs.jpg").write_bytes(jpeg_bytes(11))
    (elsewhere / "linked.jpg").write_bytes(jpeg_bytes(12))
    (elsewhere / "inside.jpg").write_bytes(jpeg_bytes(13))
    os.symlink(elsewhere / "linked.jpg", root / "link_out.jpg")
    os.symlink(elsewhere, root / "linkdir")
    os.mkfifo(root / "fifo.jpg")  # opening it for reading without O_NONBLOCK would hang
    (root / "adir.jpg").mkdir()
    return {"root": root, "absolute": elsewhere / "abs.jpg", "tmp": tmp_path}


def _caption_bytes(c: str) -> bytes:
    body = json.dumps(c)[1:-1].encode()
    return body.replace(b"@CP1252@", CP1252).replace(b"@UNDECODABLE@", UNDECODABLE).replace(b"@UTF16@", UTF16)


def _image(case_path: str, corpus: dict[str, Path]) -> str:
    return str(corpus["absolute"]) if case_path == "@ABSOLUTE@" else case_path


def write_jsonl(corpus: dict[str, Path]) -> Path:
    lines = []
    for _, image, captions, _ in CASES:
        caps = b", ".join(b'"' + _caption_bytes(c) + b'"' for c in captions)
        lines.append(b'{"image": ' + json.dumps(_image(image, corpus)).encode() + b', "captions": [' + caps + b"]}")
    path = corpus["root"] / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_coco(corpus: dict[str, Path]) -> Path:
    images = b", ".join(b'{"id": %d, "file_name": %s}' % (i, json.dumps(_image(image, corpus)).encode())
                        for i, (_, image, _, _) in enumerate(CASES))
    anns = b", ".join(b'{"id": %d, "image_id": %d, "caption": "%s"}' % (100 * i + j, i, _caption_bytes(c))
                      for i, (_, _, captions, _) in enumerate(CASES) for j, c in enumerate(captions))
    path = corpus["root"] / "captions.json"
    path.write_bytes(b'{"images": [' + images + b'], "annotations": [' + anns + b"]}")
    return path


class OpenRecorder:
    """Records every path given to ``open``/``io.open``/``os.open`` while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.paths: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def rec_open(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.fsdecode(file))
            return real_open(file, *a, **k)

        def rec_os_open(path, *a, **k):
            self.paths.append(os.fsdecode(path))
            return real_os_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", rec_open)
        monkeypatch.setattr(io, "open", rec_open)  # pathlib opens through io.open
        monkeypatch.setattr(os, "open", rec_os_open)

    def outside(self, root: Path) -> list[str]:
        r = root.resolve()
        return [p for p in self.paths if not Path(p).resolve().is_relative_to(r)]


def check(kept: list[dict], quarantined: list[dict], key_of) -> None:
    assert len(kept) + len(quarantined) == len(CASES)  # read = one entry per case
    got_q = {key_of(q): q["reason"] for q in quarantined}
    got_k = {key_of(r): r for r in kept}
    for i, (case, _, _, reason) in enumerate(CASES):
        if reason is None:
            assert i in got_k, f"{case} should be kept, got {got_q.get(i)}"
        else:
            assert i in got_q, f"{case} should be quarantined as {reason}"
            assert got_q[i].split(":")[0] == reason, f"{case}: {got_q[i]} != {reason}"
    by_case = {CASES[i][0]: r for i, r in got_k.items()}
    assert by_case["good_jpeg"]["captions"] == ["a noisy photo", "colour noise"]
    assert json.loads(by_case["good_webp"]["meta"])["reencoded_from"] == "WEBP"
    cp = by_case["cp1252_caption"]
    assert cp["captions"] == ["un café \u201ccrème\u201d"]
    assert json.loads(cp["meta"])["caption_repairs"] == ["non_utf8_transcoded"]
    ctl = by_case["control_chars"]
    assert ctl["captions"] == ["a blue box"] and json.loads(ctl["meta"])["caption_repairs"] == ["control_chars"]
    # Empty caption policy: dropped and recorded; the record is kept with no caption (clean quarantines it
    # as no_valid_caption, as it does for any record without a caption).
    empty = by_case["empty_caption"]
    assert empty["captions"] == [] and json.loads(empty["meta"])["caption_repairs"] == ["empty_caption_dropped"]
    q_by_case = {CASES[key_of(q)][0]: q for q in quarantined}
    assert q_by_case["bomb"]["reason"].startswith("decompression_bomb")
    assert q_by_case["undecodable_caption"]["captions"] == ["bad \\udc81\\udc8d bytes"]
    assert q_by_case["text_as_jpeg"]["image"].startswith(b"this is plain text")


def test_hostile_jsonl(corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    manifest = write_jsonl(corpus)
    rec = OpenRecorder(monkeypatch)
    kept, quarantined = ingest_source("jsonl", manifest)
    monkeypatch.undo()
    check(kept, quarantined, lambda r: int(r["source"].rsplit(":", 1)[1]) - 1)
    root = corpus["root"]
    assert rec.outside(root) == []
    # The recorder did see the reads: the manifest and the good images were opened through it.
    assert str(manifest) in rec.paths and str((root / "good1.jpg").resolve()) in rec.paths
    assert not any("outside" in p or "elsewhere" in p for p in rec.paths)
    # Every row, quarantine included, can be written and read back.
    write_dataset(corpus["tmp"] / "out", kept, stage="ingest", quarantine=quarantined)
    assert len(read_quarantine(corpus["tmp"] / "out")) == sum(1 for c in CASES if c[3])


def test_hostile_coco(corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    path = write_coco(corpus)
    rec = OpenRecorder(monkeypatch)
    kept, quarantined = ingest_source("coco", path)
    monkeypatch.undo()
    check(kept, quarantined, lambda r: int(r["source"].rsplit(":", 1)[1]))
    assert rec.outside(corpus["root"]) == []
    assert str(path) in rec.paths and str((corpus["root"] / "good1.jpg").resolve()) in rec.paths


def _run_cli(fmt: str, path: Path, corpus: dict[str, Path], out: Path) -> None:
    rc = main(["data", "ingest", "--format", fmt, "--path", str(path), "--images", str(corpus["root"]),
               "--out", str(out)])
    assert rc == 0
    kept, quarantined = read_dataset(out), read_quarantine(out)
    assert len(kept) + len(quarantined) == len(CASES)
    expected = sorted(c[3] for c in CASES if c[3])
    assert sorted(q["reason"].split(":")[0] for q in quarantined) == expected
    assert all(q["stage"] == "ingest" for q in quarantined)


def test_hostile_jsonl_through_cli(corpus: dict[str, Path]):
    _run_cli("jsonl", write_jsonl(corpus), corpus, corpus["tmp"] / "ds_jsonl")


def test_hostile_coco_through_cli(corpus: dict[str, Path]):
    # Needs config.SourceParams.format to accept "coco" and stages.ingest to call ingest_source.
    _run_cli("coco", write_coco(corpus), corpus, corpus["tmp"] / "ds_coco")
