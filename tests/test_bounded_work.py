"""Hostile input costs bounded work: no caption, caption list or run of bad rows makes a stage quadratic or
floods the log. Each test runs under an alarm, so a regression fails instead of hanging the suite."""

from __future__ import annotations

import json
import logging
import signal

import pytest
from PIL import Image

from mmplatform.config import CleanParams
from mmplatform.data.clean import clean_dataset
from mmplatform.data.dataset import read_dataset, write_dataset
from mmplatform.data.ingest import QUARANTINE_LOG_LINES, ingest_source
from mmplatform.data.text import MAX_CAPTION_CHARS, clean_caption_detailed

pytestmark = pytest.mark.reliability


@pytest.fixture
def deadline():
    """Fail (not hang) when the test's work takes more than 20 s; a linear pass takes well under one."""
    def expired(*_):
        raise TimeoutError("bounded-work test ran past its 20 s alarm")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("unit", ["<!--", "<script>", "<style x>", "<!--<script>-->", "www.", "&#1", "<p "])
def test_hostile_captions_clean_in_linear_time(deadline, unit):
    caption = unit * ((MAX_CAPTION_CHARS - 1) // len(unit))
    for _ in range(20):  # 20 near-limit captions: a quadratic pattern took seconds for each
        clean_caption_detailed(caption)


def test_a_caption_over_the_limit_is_dropped_before_any_pattern_runs(deadline):
    assert clean_caption_detailed("<!--" * 150_000) == (None, ["too_long"])  # 600 KB hung clean before
    assert clean_caption_detailed("a <!-- note --> red <script>x()</script>circle")[0] == "a red circle"


def test_blocks_are_removed_up_to_the_first_closing_of_their_kind():
    text = "<script>a</style> b </script> c <!-- <script> --> e <!-- never closed"
    assert clean_caption_detailed(text)[0] == "c e <!-- never closed"


def _image(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")


def test_forty_thousand_captions_of_one_image_are_deduplicated_in_linear_time(tmp_path, deadline):
    _image(tmp_path)
    caps = [f"caption number {i % 20_000}" for i in range(40_000)]  # each twice
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "captions": caps}) + "\n")
    kept, bad = ingest_source("jsonl", tmp_path / "m.jsonl")
    assert not bad and len(kept[0]["captions"]) == 40_000  # ingest keeps what the file says; clean dedups
    write_dataset(tmp_path / "in", kept, stage="ingest")
    stats = clean_dataset(tmp_path / "in", tmp_path / "out", CleanParams(engine="local", report=False))
    (rec,) = read_dataset(tmp_path / "out")
    assert len(rec["captions"]) == 20_000 and stats["captions_dropped"].get("duplicate") == 20_000
    rows = "".join(f"a.png,caption number {i % 20_000}\n" for i in range(40_000))
    (tmp_path / "m.csv").write_text("image,caption\n" + rows)
    kept, bad = ingest_source("csv", tmp_path / "m.csv")
    assert not bad and len(kept) == 1 and len(kept[0]["captions"]) == 20_000


def test_quarantine_warnings_are_aggregated_per_reason(tmp_path, caplog):
    _image(tmp_path)
    lines = [json.dumps({"image": "a.png", "captions": ["a red square"]})]
    lines += [json.dumps({"image": f"missing{i}.png", "captions": ["x y"]}) for i in range(500)]
    lines += ["{not json"] * 300
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="mmplatform.data.ingest"):
        kept, bad = ingest_source("jsonl", tmp_path / "m.jsonl")
    assert len(kept) + len(bad) == 801 and len(kept) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) <= 2 * (QUARANTINE_LOG_LINES + 1)
    summaries = [m for m in messages if "rows quarantined for" in m]
    assert any("500 rows" in m for m in summaries) and any("300 rows" in m for m in summaries)


def test_an_imagefolder_metadata_link_out_of_the_root_is_not_followed(tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(outside / "b.png")
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "a private picture"}) + "\n")
    root = tmp_path / "folder"
    (root / "train").mkdir(parents=True)
    (root / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    with pytest.raises(FileNotFoundError, match="no metadata"):  # the link is all there is: nothing is read
        ingest_source("imagefolder", root)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "train" / "a.png")
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n")
    kept, bad = ingest_source("imagefolder", root)
    assert [r["captions"] for r in kept] == [["a red square"]] and not bad


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_bytes_appended_after_the_image_are_not_kept(tmp_path, fmt):
    import io

    buf = io.BytesIO()
    Image.effect_noise((24, 16), 50).convert("RGB").save(buf, format=fmt)
    image = buf.getvalue()
    payload = b"PK\x03\x04" + b"#!/bin/sh\nrm -rf ~\n" * 10  # a zip or a script riding on a valid image
    (tmp_path / "a.img").write_bytes(image + payload)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.img", "captions": ["noise"]}) + "\n")
    (rec,), bad = ingest_source("jsonl", tmp_path / "m.jsonl")
    assert not bad and rec["image"] == image
    assert json.loads(rec["meta"])["trailing_bytes_removed"] == len(payload)


def test_a_16_bit_png_decodes_in_a_few_bytes_a_pixel():
    """A 7000 x 7000 16-bit PNG is 93 KB and within the pixel limit; its decode took 1 GB (int64 arrays)."""
    import io
    import tracemalloc

    import numpy as np

    from mmplatform.data.images import decode_image

    side = 2000
    grey = (np.arange(side * side, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(side, side)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")  # mode I;16
    tracemalloc.start()
    try:
        out = decode_image(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 0], (grey >> 8).astype(np.uint8))
    assert peak < 8 * side * side  # bytes of arrays beside PIL's own buffers (5 now; the int64 path: 17)


def _tar_with(tmp_path, name: str, declared: int, body: bytes, gz: bool = False):
    """A shard: sample 000 (image + caption), then a member whose header declares ``declared`` bytes and
    carries ``body``."""
    import gzip
    import io
    import tarfile

    def member(tf, n, data, size=None):
        info = tarfile.TarInfo(n)
        info.size = len(data) if size is None else size
        tf.addfile(info, io.BytesIO(data))

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(png, format="PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        member(tf, "000.png", png.getvalue())
        member(tf, "000.txt", b"a green square")
        if declared == len(body):
            member(tf, name, body)
        else:  # a header that lies: written by hand, the body is what follows it
            info = tarfile.TarInfo(name)
            info.size = declared
            buf.write(info.tobuf(tarfile.GNU_FORMAT))
            buf.write(body)
    data = buf.getvalue()
    path = tmp_path / ("shard.tar.gz" if gz else "shard.tar")
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


def test_a_member_declaring_a_terabyte_is_not_read_through(tmp_path, deadline):
    shard = _tar_with(tmp_path, "001.png", 1 << 40, b"\0" * 8192)  # 10 KiB file, 1 TiB claimed
    kept, bad = ingest_source("webdataset", shard)
    assert [r["captions"] for r in kept] == [["a green square"]]
    assert any("past the end of the file" in json.loads(r["meta"]).get("error", "") for r in bad)
    assert len(kept) + len(bad) == 3  # sample 000 kept; sample 001 incomplete; the shard's damage row


def test_a_gzip_bomb_shard_stops_at_the_ratio_limit(tmp_path, deadline, monkeypatch):
    from mmplatform.data import formats

    monkeypatch.setattr(formats, "MIN_DECOMPRESSED_LIMIT", 1 << 20)  # a small floor, so a small bomb shows it
    shard = _tar_with(tmp_path, "001.bin", 64 << 20, b"\0" * (64 << 20), gz=True)  # 64 MiB of zeros: ~300 KB
    kept, bad = ingest_source("webdataset", shard)
    assert [r["captions"] for r in kept] == [["a green square"]]
    assert any("decompression_bomb" in json.loads(r["meta"]).get("error", "") for r in bad)


def test_an_unterminated_quote_in_a_csv_costs_only_its_line(tmp_path, deadline):
    """It used to fold every following line into one field: 51 lines read as 1 row."""
    _image(tmp_path)
    lines = ["image,caption", 'a.png,"a red square that never closes its quote']
    lines += [f"a.png,red square number {i}" for i in range(49)]
    lines += ['a.png,"a caption with a line break\ninside its quotes"']
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    kept, bad = ingest_source("csv", tmp_path / "m.csv")
    assert [r["reason"] for r in bad] == ["bad_csv: line 2: unterminated quote"]
    (rec,) = kept  # every row names a.png: one record
    assert len(rec["captions"]) == 50 and "a caption with a line break inside its quotes" in rec["captions"]


def test_a_csv_of_unclosed_quotes_is_read_in_linear_time(tmp_path, deadline):
    _image(tmp_path)
    (tmp_path / "m.csv").write_text("image,caption\n" + 'a.png,"open\n' * 20_000)
    kept, bad = ingest_source("csv", tmp_path / "m.csv")
    assert not kept and len(bad) == 20_000
