"""Ingest of JSONL/CSV manifests and the safe image decoder behind it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmplatform.data import images as images_mod
from mmplatform.data.images import BadImage, decode_image, image_info
from mmplatform.data.ingest import ingest_manifest


def png_bytes(color=(255, 0, 0), size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(32, 24), **save_kw) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **save_kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- images

def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(BadImage) as ei:
        decode_image(data, **kw)
    return ei.value.reason


def test_decode_plain_png():
    im = decode_image(png_bytes(size=(8, 6)))
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (255, 0, 0)
    assert image_info(png_bytes(size=(5, 7))) == (5, 7)


def test_empty_and_too_large():
    assert reason_of(b"") == "empty_file"
    assert reason_of(png_bytes(), max_bytes=10).startswith("too_large")


def test_decompression_bomb_refused():
    assert reason_of(png_bytes(size=(100, 100)), max_pixels=1000).startswith("decompression_bomb")


def test_eps_named_png_refused_without_opening(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("PIL must not be asked to open an unsupported format")

    monkeypatch.setattr(images_mod.Image, "open", boom)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert reason_of(eps) == "unsupported_format"
    assert reason_of(b"just some text, not an image") == "unsupported_format"


def test_truncated_jpeg_is_corrupt():
    data = jpeg_bytes()
    assert reason_of(data[: len(data) // 2]).startswith("corrupt_image")


def test_magic_ok_but_body_garbage_is_corrupt():
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).startswith("corrupt_image")


def test_cmyk_jpeg_to_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB"
    r, g, b = im.getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # cyan=0, magenta=yellow=full -> red


def test_16bit_png_scaled_not_clipped():
    im16 = Image.new("I;16", (4, 4), 0)
    im16.putpixel((0, 0), 65535)
    im16.putpixel((1, 0), 32896)  # 128 * 257
    buf = io.BytesIO()
    im16.save(buf, format="PNG")
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((1, 0)) == (128, 128, 128)  # PIL's own convert would clip this to 255
    assert im.getpixel((2, 0)) == (0, 0, 0)


def test_palette_and_alpha_to_rgb_on_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    buf = io.BytesIO()
    p.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (0, 0, 255)

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert im.getpixel((1, 1)) == (255, 255, 255)  # composited on white, not black


def test_exif_orientation_applied():
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high
    arr[:4, :4] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    im = decode_image(buf.getvalue())
    assert im.size == (10, 20)
    r, g, b = im.getpixel((8, 1))  # stored top-left is now at the top-right
    assert r > 200 and g < 60 and b < 60


def test_other_allowed_formats_decode():
    for fmt in ("WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (6, 5), (0, 255, 0)).save(buf, format=fmt)
        assert decode_image(buf.getvalue()).size == (6, 5), fmt


# ------------------------------------------------------------------------------------------- ingest

@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "red.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "imgs" / "blue.png").write_bytes(png_bytes((0, 0, 255), size=(10, 4)))
    (root / "imgs" / "green.png").write_bytes(png_bytes((0, 255, 0)))
    (root / "imgs" / "fake.jpg").write_text("I am not a JPEG")
    (root / "imgs" / "empty.png").write_bytes(b"")
    (root / "imgs" / "pic.webp").write_bytes(_webp())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes((1, 2, 3)))
    os.symlink(outside, root / "imgs" / "escape.png")
    os.symlink(root / "imgs" / "red.png", root / "imgs" / "inside_link.png")
    return root


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (9, 9, 9)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def write_jsonl(path: Path, lines: list) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_ingest_jsonl_good_and_bad(tree: Path, tmp_path: Path, caplog):
    lines = [
        {"image": "imgs/red.png", "captions": ["a red square", "red"], "split": "train"},          # 1
        {"file_name": "imgs/blue.png", "caption": "a blue rectangle"},                             # 2
        {"image": "imgs/nope.png", "captions": ["missing"]},                                      # 3
        {"image": "../secret.png", "captions": ["dotdot"]},                                       # 4
        {"image": str(tmp_path / "secret.png"), "captions": ["absolute"]},                        # 5
        {"image": "imgs/escape.png", "captions": ["symlink out"]},                                # 6
        '{"image": "imgs/red.png", "captions": [',                                                # 7
        {"image": "imgs/fake.jpg", "captions": ["text file"]},                                    # 8
        {"image": "imgs/empty.png", "captions": ["zero bytes"]},                                  # 9
        {"captions": ["no image"]},                                                               # 10
        {"image": "imgs/green.png", "captions": "not a list"},                                    # 11
        {"image": "imgs/green.png", "captions": ["q"], "questions": ["a?", "b?"], "answers": ["x"]},  # 12
        {"image": "imgs/inside_link.png", "captions": ["symlink inside"],
         "questions": ["what colour?"], "answers": ["red"], "split": "validation"},              # 13
        {"image": "imgs/pic.webp", "captions": ["webp"]},                                         # 14
        {"image": "imgs", "captions": ["a directory"]},                                           # 15
    ]
    manifest = tree / "m.jsonl"
    write_jsonl(manifest, lines)
    with caplog.at_level("WARNING", logger="mmplatform.data.ingest"):
        kept, quarantined = ingest_manifest(manifest)

    assert len(kept) + len(quarantined) == len(lines)
    by_line = {int(q["source"].rsplit(":", 1)[1]): q["reason"] for q in quarantined}
    assert by_line[3] == "missing_file"
    assert by_line[4] == "path_outside_root"
    assert by_line[5] == "path_outside_root"
    assert by_line[6] == "path_outside_root"
    assert by_line[7] == "bad_json: line 7"
    assert by_line[8] == "unsupported_format"
    assert by_line[9] == "empty_file"
    assert by_line[10] == "missing_field: image"
    assert by_line[11] == "bad_captions"
    assert by_line[12].startswith("qa_length_mismatch")
    assert by_line[15] == "not_a_file"
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15]

    k = {int(r["source"].rsplit(":", 1)[1]): r for r in kept}
    assert k[1]["captions"] == ["a red square", "red"] and k[1]["split"] == "train"
    assert k[1]["source"] == f"jsonl:{manifest}:1"
    assert json.loads(k[1]["meta"]) == {"file": "imgs/red.png"}
    assert k[1]["image"] == (tree / "imgs" / "red.png").read_bytes()
    assert (k[2]["width"], k[2]["height"]) == (10, 4) and k[2]["captions"] == ["a blue rectangle"]
    assert k[13]["sample_id"] == k[1]["sample_id"]  # the in-root symlink reads the same file
    assert k[13]["questions"] == ["what colour?"] and k[13]["split"] == "val"
    webp = k[14]
    assert webp["image"].startswith(b"\x89PNG") and json.loads(webp["meta"])["reencoded_from"] == "WEBP"

    # Quarantined rows keep what could be read.
    q8 = next(q for q in quarantined if q["source"].endswith(":8"))
    assert q8["captions"] == ["text file"] and q8["image"] == b"I am not a JPEG"
    assert json.loads(q8["meta"])["file"] == "imgs/fake.jpg"
    q3 = next(q for q in quarantined if q["source"].endswith(":3"))
    assert q3["image"] == b"" and q3["sample_id"] == ""
    # One warning per quarantined record, naming the line and the reason.
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "quarantined" in r.getMessage()]
    assert len(warnings) == len(quarantined)
    assert any(f"{manifest}:6" in w and "path_outside_root" in w for w in warnings)


def test_images_root_separate_from_manifest(tree: Path, tmp_path: Path):
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    manifest.parent.mkdir()
    write_jsonl(manifest, [{"image": "red.png", "captions": ["a"]},
                           {"image": "../m.jsonl", "captions": ["b"]}])
    kept, quarantined = ingest_manifest(manifest, images=tree / "imgs")
    assert len(kept) == 1 and [q["reason"] for q in quarantined] == ["path_outside_root"]


def test_csv_groups_rows_and_matches_jsonl_ids(tree: Path):
    csv_path = tree / "m.csv"
    csv_path.write_text(
        "image,caption,split\n"
        "imgs/red.png,a red square,train\n"
        "imgs/blue.png,a blue thing,\n"
        "imgs/red.png,\"red, bright\",train\n"
        ",no image,\n"
        "imgs/../../secret.png,escape,\n"
    )
    kept, quarantined = ingest_manifest(csv_path, fmt="csv")
    assert len(kept) == 2
    red = kept[0]
    assert red["captions"] == ["a red square", "red, bright"]
    assert red["source"] == f"csv:{csv_path}:2" and red["split"] == "train"
    assert sorted(q["reason"] for q in quarantined) == ["missing_field: image", "path_outside_root"]

    jsonl = tree / "m.jsonl"
    write_jsonl(jsonl, [{"image": "imgs/red.png", "captions": ["x"]}])
    (jk,), _ = ingest_manifest(jsonl)
    assert jk["sample_id"] == red["sample_id"]


def test_csv_file_name_and_captions_json(tree: Path):
    csv_path = tree / "meta.csv"
    csv_path.write_text('file_name,captions\nimgs/green.png,"[""one"", ""two""]"\n')
    (rec,), q = ingest_manifest(csv_path, fmt="csv")
    assert rec["captions"] == ["one", "two"] and q == []


def test_unknown_format_raises(tree: Path):
    with pytest.raises(ValueError):
        ingest_manifest(tree / "m.jsonl", fmt="xml")


# ------------------------------------------------------------------------------ caption text at ingest

def test_jsonl_non_utf8_lines_are_repaired_or_quarantined_per_record(tree: Path):
    manifest = tree / "m.jsonl"
    manifest.write_bytes(b"\n".join([
        b'{"image": "imgs/red.png", "captions": ["un caf\xe9", "fine"]}',               # 1 cp1252: repaired
        b'{"image": "imgs/blue.png", "captions": ["bad \x81 byte"]}',                   # 2 not cp1252
        b'{"image": "imgs/green.png", "caption": "lone \\ud800 escape"}',              # 3 JSON surrogate
        b'{"image": "imgs/red.png", "captions": ["ok"], "questions": ["q\xe9?"], "answers": ["\x9d"]}',  # 4
        b'{"image": "imgs/\xff.png", "captions": ["path is not UTF-8"]}',              # 5
        b'{"image": "imgs/green.png", "captions": ["after the bad lines"]}',           # 6
    ]) + b"\n")
    kept, quarantined = ingest_manifest(manifest)
    assert len(kept) + len(quarantined) == 6
    k = {int(r["source"].rsplit(":", 1)[1]): r for r in kept}
    q = {int(r["source"].rsplit(":", 1)[1]): r for r in quarantined}
    assert k[1]["captions"] == ["un café", "fine"]
    assert json.loads(k[1]["meta"])["caption_repairs"] == ["non_utf8_transcoded"]
    assert q[2]["reason"] == "non_utf8_caption" and q[2]["captions"] == ["bad \\udc81 byte"]
    assert q[3]["reason"] == "non_utf8_caption"
    assert q[4]["reason"] == "non_utf8_caption: answers"
    assert q[5]["reason"] == "bad_field: image"
    assert k[6]["captions"] == ["after the bad lines"]


def test_csv_bad_bytes_do_not_lose_the_rest_of_the_file(tree: Path):
    csv_path = tree / "m.csv"
    csv_path.write_bytes(b"image,caption\n"
                         b"imgs/red.png,caf\xe9 au lait\n"
                         b"imgs/blue.png,\x81\x8d\n"
                         b"imgs/green.png,a green square\n"
                         b"imgs/red.png,a red square\n")
    kept, quarantined = ingest_manifest(csv_path, fmt="csv")
    assert [r["captions"] for r in kept] == [["café au lait", "a red square"], ["a green square"]]
    assert json.loads(kept[0]["meta"])["caption_repairs"] == ["non_utf8_transcoded"]
    assert [(r["reason"], r["source"]) for r in quarantined] == [("non_utf8_caption", f"csv:{csv_path}:3")]


def test_control_chars_and_empty_captions(tree: Path):
    manifest = tree / "m.jsonl"
    write_jsonl(manifest, [
        {"image": "imgs/red.png", "captions": ["a\x00red\u202e square ", "", "  \t "]},
        {"image": "imgs/blue.png", "caption": "   "},
        {"image": "imgs/green.png", "captions": ["cafe\u0301"], "questions": [""], "answers": ["x"]},
    ])
    (red, blue, green), quarantined = ingest_manifest(manifest)
    assert quarantined == []
    assert red["captions"] == ["a red square"]
    assert json.loads(red["meta"])["caption_repairs"] == ["control_chars", "format_chars", "empty_caption_dropped"]
    # A record whose only caption was empty is kept with none: clean quarantines it (no_valid_caption).
    assert blue["captions"] == [] and json.loads(blue["meta"])["caption_repairs"] == ["empty_caption_dropped"]
    assert green["captions"] == ["café"] and green["questions"] == [""]  # QA pairs stay aligned
    assert json.loads(green["meta"])["caption_repairs"] == ["unicode_normalized"]


def test_overlong_jsonl_line_is_skipped(tree: Path, monkeypatch):
    from mmplatform.data import ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "MAX_LINE_BYTES", 100)
    manifest = tree / "m.jsonl"
    write_jsonl(manifest, [{"image": "imgs/red.png", "captions": ["x" * 500]},
                           {"image": "imgs/blue.png", "captions": ["short"]}])
    (rec,), (bad,) = ingest_manifest(manifest)
    assert rec["captions"] == ["short"] and rec["source"].endswith(":2")
    assert bad["reason"] == "bad_json: line 1: longer than 100 bytes"


def test_bom_and_blank_lines(tree: Path):
    manifest = tree / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "imgs/red.png", "caption": "a"}).encode()
                         + b"\n\n   \n" + json.dumps({"image": "imgs/blue.png", "caption": "b"}).encode())
    kept, quarantined = ingest_manifest(manifest)
    assert [r["captions"] for r in kept] == [["a"], ["b"]] and quarantined == []
