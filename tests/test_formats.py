"""COCO, WebDataset and imagefolder ingest: happy paths on real image bytes, grouping, splits, the
hostile cases of each format, and the same sample_id for the same dataset in every format."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmplatform.data.dataset import read_dataset, read_quarantine, write_dataset
from mmplatform.data.formats import expand_braces, ingest_coco, ingest_imagefolder, ingest_webdataset, shard_paths
from mmplatform.data.ingest import FORMATS, ingest_source


def jpeg_bytes(seed: int = 0, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def png_bytes(color=(255, 0, 0), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def sid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def reasons(quarantined: list[dict]) -> dict[str, str]:
    return {q["source"]: q["reason"] for q in quarantined}


# ------------------------------------------------------------------------------ same data, five formats

# name, bytes, captions, split
DATASET = [
    ("a.jpg", jpeg_bytes(1, (40, 30)), ["a noisy picture", "random colours everywhere"], "train"),
    ("b.png", png_bytes((0, 0, 255), (16, 9)), ["a blue rectangle"], "train"),
    ("c.jpg", jpeg_bytes(2, (24, 48)), ["a tall noisy image", "static", "snow on a screen"], "val"),
    ("d.png", png_bytes((0, 200, 0), (10, 10)), ["a green square"], "test"),
]


def write_all_formats(base: Path) -> dict[str, tuple[str, Path, Path | None]]:
    imgs = base / "imgs"
    imgs.mkdir(parents=True)
    for name, data, _, _ in DATASET:
        (imgs / name).write_bytes(data)
    out: dict[str, tuple[str, Path, Path | None]] = {}

    coco = {"images": [{"id": i + 1, "file_name": name, "coco_url": "http://images.cocodataset.org/x.jpg"}
                       for i, (name, *_rest) in enumerate(DATASET)],
            "annotations": [{"id": 100 * (i + 1) + j, "image_id": i + 1, "caption": c}
                            for i, (_, _, caps, _) in enumerate(DATASET) for j, c in enumerate(caps)]}
    (base / "captions.json").write_text(json.dumps(coco))
    out["coco"] = ("coco", base / "captions.json", imgs)

    (base / "m.jsonl").write_text("".join(json.dumps({"image": n, "captions": caps}) + "\n"
                                          for n, _, caps, _ in DATASET))
    out["jsonl"] = ("jsonl", base / "m.jsonl", imgs)

    with open(base / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for n, _, caps, _ in DATASET:
            for c in caps:
                w.writerow([n, c])
    out["csv"] = ("csv", base / "m.csv", imgs)

    wds = base / "wds"
    wds.mkdir()
    for shard in range(2):
        with tarfile.open(wds / f"shard-{shard:06d}.tar", "w") as tf:
            for i, (n, data, caps, _) in enumerate(DATASET):
                if i % 2 != shard:
                    continue
                key = f"sample{i:04d}"
                add_member(tf, f"{key}.{n.split('.')[1]}", data)
                add_member(tf, f"{key}.txt", ("\n".join(caps) + "\n").encode())
    out["webdataset"] = ("webdataset", Path(str(wds / "shard-{000000..000001}.tar")), None)

    hf = base / "hf"
    for n, data, caps, split in DATASET:
        d = hf / {"train": "train", "val": "validation", "test": "test"}[split]
        d.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(data)
        row = {"file_name": n, "text": caps[0]} if len(caps) == 1 else {"file_name": n, "captions": caps}
        with open(d / "metadata.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    out["imagefolder"] = ("imagefolder", hf, None)
    return out


def test_same_dataset_gives_same_sample_ids_in_every_format(tmp_path: Path):
    expected = {(sid(data), tuple(sorted(caps))) for _, data, caps, _ in DATASET}
    for fmt, path, images in write_all_formats(tmp_path).values():
        kept, quarantined = ingest_source(fmt, path, images)
        assert quarantined == [], fmt
        assert {(r["sample_id"], tuple(sorted(r["captions"]))) for r in kept} == expected, fmt
        # Stored as read: the bytes are the file's, so the id is the file's hash.
        assert all(r["image_sha256"][:20] == r["sample_id"] for r in kept)
        sizes = {r["sample_id"]: (r["width"], r["height"]) for r in kept}
        assert sizes[sid(DATASET[2][1])] == (24, 48), fmt


@pytest.mark.parametrize("fmt", ["coco", "csv", "webdataset", "imagefolder"])
def test_every_format_through_the_cli(tmp_path: Path, fmt: str):
    from flows.cli import main

    f, path, images = write_all_formats(tmp_path)[fmt]
    args = ["data", "ingest", "--format", f, "--path", str(path), "--out", str(tmp_path / "out")]
    assert main(args + (["--images", str(images)] if images else [])) == 0
    assert {r["sample_id"] for r in read_dataset(tmp_path / "out")} == {sid(d) for _, d, _, _ in DATASET}
    assert read_quarantine(tmp_path / "out") == []


def test_imagefolder_splits_from_folders(tmp_path: Path):
    fmt, path, _ = write_all_formats(tmp_path)["imagefolder"]
    kept, _ = ingest_source(fmt, path)
    assert {r["sample_id"]: r["split"] for r in kept} == {sid(d): s for _, d, _, s in DATASET}
    assert all(r["source"].startswith(f"imagefolder:{path}/") for r in kept)


def test_unknown_format_names_the_accepted_ones(tmp_path: Path):
    with pytest.raises(ValueError) as ei:
        ingest_source("parquet", tmp_path)
    for f in FORMATS:
        assert f in str(ei.value)


def test_dispatcher_is_case_insensitive(tmp_path: Path):
    fmt, path, images = write_all_formats(tmp_path)["jsonl"]
    kept, _ = ingest_source("JSONL", path, images)
    assert len(kept) == len(DATASET)


# ---------------------------------------------------------------------------------------------- COCO

@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "val2017" / "1.jpg").write_bytes(jpeg_bytes(1, (40, 30)))
    (root / "val2017" / "2.png").write_bytes(png_bytes((1, 2, 3), (7, 5)))
    (root / "val2017" / "3.png").write_bytes(png_bytes((9, 9, 9), (6, 6)))
    (root / "val2017" / "4.png").write_bytes(png_bytes((4, 4, 4), (5, 5)))
    (tmp_path / "outside.png").write_bytes(png_bytes((7, 7, 7)))
    return root


def test_coco_grouping_and_hostile_entries(coco_root: Path, caplog):
    doc = {
        "info": {"year": 2017},
        "images": [
            {"id": 1, "file_name": "val2017/1.jpg", "width": 40, "height": 30, "split": "val"},
            {"id": 2, "file_name": "val2017/2.png", "width": 99, "height": 5},   # wrong declared width
            {"id": 3, "file_name": "val2017/3.png"},                             # no annotations
            {"id": 1, "file_name": "val2017/4.png"},                             # duplicate id
            {"id": 5, "file_name": "../outside.png"},                            # escapes the root
            {"id": 6, "file_name": "val2017/4.png"},                             # non-string caption
            {"id": 7, "file_name": "val2017/4.png"},                             # lone surrogate caption
            {"id": 8},                                                           # no file_name
            "not an object",
            {"id": 9.0, "file_name": "val2017/4.png"},                           # float id
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "first caption of one"},
            {"id": 21, "image_id": 2, "caption": "  a dark\x07 square  "},
            {"id": 12, "image_id": 1, "caption": "second caption of one"},
            {"id": 13, "image_id": 1, "caption": "   "},
            {"id": 61, "image_id": 6, "caption": 42},
            {"id": 62, "image_id": 6, "caption": "a fine caption"},
            {"id": 71, "image_id": 7, "caption": "bad \ud800 text"},
            {"id": 91, "image_id": 404, "caption": "orphan one"},
            {"id": 92, "image_id": 404, "caption": "orphan two"},
            {"id": 93, "caption": "no image id"},
        ],
    }
    path = coco_root / "captions_val2017.json"
    path.write_text(json.dumps(doc))  # ensure_ascii: the surrogate is a "\ud800" escape
    with caplog.at_level(logging.WARNING):
        kept, quarantined = ingest_coco(path)

    assert len(kept) + len(quarantined) == len(doc["images"]) + 2  # two orphan groups
    by_id = {json.loads(r["meta"])["coco_id"]: r for r in kept}
    assert sorted(by_id) == [1, 2, 3]
    one = by_id[1]
    assert one["captions"] == ["first caption of one", "second caption of one"]  # annotation order
    assert (one["width"], one["height"]) == (40, 30) and one["split"] == "val"
    meta1 = json.loads(one["meta"])
    assert meta1["annotation_ids"] == [11, 12, 13] and meta1["file"] == "val2017/1.jpg"
    assert meta1["caption_repairs"] == ["empty_caption_dropped"]
    assert one["source"] == f"coco:{path}:1"
    assert one["image"] == (coco_root / "val2017" / "1.jpg").read_bytes()
    two = by_id[2]
    assert two["captions"] == ["a dark square"] and (two["width"], two["height"]) == (7, 5)
    assert json.loads(two["meta"])["declared_size"] == [99, 5]
    assert json.loads(two["meta"])["caption_repairs"] == ["control_chars"]
    assert by_id[3]["captions"] == []

    got = sorted(q["reason"] for q in quarantined)
    assert got == sorted([
        "duplicate_image_id: 1 (first at images[0])",
        "path_outside_root",
        "bad_captions: annotation 61",
        "non_utf8_caption",
        "missing_field: file_name",
        "bad_field: images entry is not an object",
        "bad_field: id",
        "orphan_annotation: image_id 404 (2 annotations)",
        "orphan_annotation: missing or invalid image_id (1 annotations)",
    ])
    orphan = next(q for q in quarantined if "404" in q["reason"])
    assert orphan["captions"] == ["orphan one", "orphan two"]  # nothing lost
    assert json.loads(orphan["meta"]) == {"annotation_ids": [91, 92], "coco_image_id": 404}
    bad_cap = next(q for q in quarantined if q["reason"].startswith("bad_captions"))
    assert bad_cap["captions"] == ["a fine caption"]
    sur = next(q for q in quarantined if q["reason"] == "non_utf8_caption")
    assert sur["captions"] == ["bad \\ud800 text"]  # kept, made storable
    assert any("declared size 99x5" in r.getMessage() for r in caplog.records)

    # Everything, quarantine included, can be written and read back.
    write_dataset(coco_root / "out", kept, stage="ingest", quarantine=quarantined)
    assert len(read_dataset(coco_root / "out")) == 3 and len(read_quarantine(coco_root / "out")) == 9


def test_coco_file_in_cp1252_is_repaired(coco_root: Path):
    text = json.dumps({"images": [{"id": 1, "file_name": "val2017/2.png"}],
                       "annotations": [{"image_id": 1, "caption": "un caf\u00e9 cr\u00e8me"}]}, ensure_ascii=False)
    path = coco_root / "cp1252.json"
    path.write_bytes(text.encode("cp1252"))
    (rec,), q = ingest_coco(path)
    assert q == [] and rec["captions"] == ["un café crème"]
    assert json.loads(rec["meta"])["caption_repairs"] == ["non_utf8_transcoded"]


def test_coco_whole_file_errors_are_one_line(coco_root: Path):
    bad = coco_root / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError) as ei:
        ingest_coco(bad)
    msg = str(ei.value)
    assert str(bad) in msg and "\n" not in msg and "not valid COCO captions JSON" in msg
    notcoco = coco_root / "list.json"
    notcoco.write_text("[1, 2]")
    with pytest.raises(ValueError, match="no 'images' list"):
        ingest_coco(notcoco)
    with pytest.raises(FileNotFoundError):
        ingest_coco(coco_root / "missing.json")


def test_coco_images_root_option(coco_root: Path, tmp_path: Path):
    path = tmp_path / "ann" / "c.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": [{"id": "x", "file_name": "3.png"}],
                                "annotations": [{"image_id": "x", "caption": "grey"}]}))
    (rec,), _ = ingest_source("coco", path, coco_root / "val2017")
    assert rec["captions"] == ["grey"] and rec["source"] == f"coco:{path}:x"


def test_coco_real_photos(tmp_path: Path):
    """The two photographs sklearn ships (china.jpg, flower.jpg) plus re-encoded and resized copies:
    six real JPEGs with five captions each, grouped and sized right."""
    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images"
    imgs = tmp_path / "photos"
    imgs.mkdir()
    files: dict[str, tuple[int, int]] = {}
    for name in ("china.jpg", "flower.jpg"):
        shutil.copyfile(src / name, imgs / name)
        with Image.open(src / name) as im:
            files[name] = im.size
            stem = name.split(".")[0]
            small = im.resize((im.width // 2, im.height // 3))
            small.save(imgs / f"{stem}_small.jpg", quality=80)
            files[f"{stem}_small.jpg"] = small.size
            im.transpose(Image.Transpose.ROTATE_90).save(imgs / f"{stem}_rot.jpg", quality=70)
            files[f"{stem}_rot.jpg"] = (im.height, im.width)
    names = sorted(files)
    doc = {"images": [{"id": i, "file_name": n, "width": files[n][0], "height": files[n][1]}
                      for i, n in enumerate(names)],
           "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"photo {n} caption number {j}"}
                           for j in range(5) for i, n in enumerate(names)]}  # interleaved, as COCO is
    path = imgs / "captions.json"
    path.write_text(json.dumps(doc))
    kept, quarantined = ingest_source("coco", path)
    assert quarantined == [] and len(kept) == 6
    for r in kept:
        name = json.loads(r["meta"])["file"]
        assert r["captions"] == [f"photo {name} caption number {j}" for j in range(5)]
        assert (r["width"], r["height"]) == files[name]
        assert "declared_size" not in json.loads(r["meta"])
        assert r["image"] == (imgs / name).read_bytes() and r["image"][:3] == b"\xff\xd8\xff"
    assert files["china.jpg"] == (640, 427) and files["flower.jpg"] == (640, 427)


# ---------------------------------------------------------------------------------------- WebDataset

def test_expand_braces():
    assert expand_braces("s-{000000..000002}.tar") == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{01..02}") == ["a/01", "a/02", "b/01", "b/02"]
    assert expand_braces("s-{3..1}") == ["s-3", "s-2", "s-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("odd{x}.tar") == ["odd{x}.tar"]
    with pytest.raises(ValueError):
        expand_braces("s-{0..99999999}.tar")


def test_shard_paths(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in shard_paths(tmp_path)] == ["s-0.tar", "s-1.tar", "s-2.tar"]
    assert len(shard_paths(str(tmp_path / "s-{0..2}.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="1 of 4 shards"):
        shard_paths(str(tmp_path / "s-{0..3}.tar"))
    with pytest.raises(FileNotFoundError):
        shard_paths(tmp_path / "nope.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        shard_paths(tmp_path / "empty")


def test_webdataset_samples_and_hostile_members(tmp_path: Path):
    shard = tmp_path / "data-000000.tar"
    red, blue, green = png_bytes((255, 0, 0)), png_bytes((0, 0, 255)), png_bytes((0, 255, 0))
    photo = jpeg_bytes(3)
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "dir/000.jpg", photo)                     # directory is part of the key
        add_member(tf, "dir/000.txt", b"first line\n\n  second line \r\nthird\n")
        add_member(tf, "dir/000.cls", b"3")                      # not read, listed
        add_member(tf, "001.png", red)
        add_member(tf, "001.json", json.dumps({"caption": "red", "captions": ["a red square"],
                                               "questions": ["colour?"], "answers": ["red"],
                                               "split": "validation", "meta": {"url": "u"}}).encode())
        add_member(tf, "002.PNG", blue)                          # extension case does not matter
        add_member(tf, "003.txt", b"text without an image")
        info = tarfile.TarInfo("004.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        add_member(tf, "004.txt", b"caption of a symlink")
        add_member(tf, "005.png", green)
        info = tarfile.TarInfo("005.txt")
        info.type, info.linkname = tarfile.LNKTYPE, "001.png"
        tf.addfile(info)
        info = tarfile.TarInfo("006.png")
        info.type = tarfile.FIFOTYPE
        tf.addfile(info)
        add_member(tf, "007.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)   # corrupt image
        add_member(tf, "007.txt", b"broken")
        add_member(tf, "008.jpg", jpeg_bytes(8))
        add_member(tf, "008.txt", b"un caf\xe9\n")                         # cp1252
        add_member(tf, "009.png", red)
        add_member(tf, "009.txt", b"\x81\x8d\n")                           # not repairable
        add_member(tf, "../../escape.png", green)                          # never extracted
        add_member(tf, "../../escape.txt", b"dotdot name")
        add_member(tf, "010.png", blue)
        add_member(tf, "010.json", b"{not json")
        add_member(tf, "big.png", b"\x89PNG" + b"\x00" * 5000)
        add_member(tf, "README", b"no extension: not a sample")
        add_member(tf, "011.png", png_bytes((5, 5, 5)))
        add_member(tf, "011.png", png_bytes((6, 6, 6)))                    # duplicate: the later wins
    kept, quarantined = ingest_webdataset(shard, max_image_bytes=4000)
    k = {r["source"].rsplit(":", 1)[1]: r for r in kept}
    q = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in quarantined}
    assert len(kept) + len(quarantined) == 14
    assert sorted(k) == ["../../escape", "001", "002", "008", "011", "dir/000"]

    assert k["dir/000"]["captions"] == ["first line", "second line", "third"]
    assert k["dir/000"]["image"] == photo and k["dir/000"]["sample_id"] == sid(photo)
    assert json.loads(k["dir/000"]["meta"]) == {"file": "dir/000.jpg", "other_members": ["dir/000.cls"]}
    one = k["001"]
    assert one["captions"] == ["a red square", "red"] and one["questions"] == ["colour?"]
    assert one["answers"] == ["red"] and one["split"] == "val"
    assert json.loads(one["meta"]) == {"file": "001.png", "url": "u"}
    assert k["002"]["captions"] == [] and k["002"]["sample_id"] == sid(blue)  # image without text: kept
    assert k["008"]["captions"] == ["un café"]
    assert json.loads(k["008"]["meta"])["caption_repairs"] == ["non_utf8_transcoded"]
    assert json.loads(k["../../escape"]["meta"])["unsafe_member_name"] is True
    assert k["011"]["sample_id"] == sid(png_bytes((6, 6, 6)))
    assert not (tmp_path.parent / "escape.png").exists() and not Path("escape.png").exists()

    assert q == {
        "003": "missing_image",
        "004": "tar_member_not_a_file: symlink 004.jpg",
        "005": "tar_member_not_a_file: hardlink 005.txt",
        "006": "tar_member_not_a_file: fifo 006.png",
        "007": q["007"],
        "009": "non_utf8_caption",
        "010": "bad_json: 010.json",
        "big": "too_large: big.png: 5004 bytes > 4000",
    }
    assert q["007"].startswith("corrupt_image")
    by_key = {r["source"].rsplit(":", 1)[1]: r for r in quarantined}
    assert by_key["004"]["captions"] == ["caption of a symlink"]  # the text read is kept
    assert by_key["009"]["captions"] == ["\\udc81\\udc8d"]  # the undecodable bytes, visibly escaped
    assert by_key["007"]["captions"] == ["broken"] and by_key["007"]["image"].startswith(b"\x89PNG")
    write_dataset(tmp_path / "out", kept, stage="ingest", quarantine=quarantined)
    assert len(read_quarantine(tmp_path / "out")) == 8


def _one_shard(path: Path, n: int = 4) -> bytes:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            add_member(tf, f"{i:03d}.jpg", jpeg_bytes(i, (32, 32)))
            add_member(tf, f"{i:03d}.txt", f"noise number {i}".encode())
    return path.read_bytes()


@pytest.mark.parametrize("cut", ["mid_image", "header_boundary", "mid_header"])
def test_truncated_tar_keeps_what_was_read(tmp_path: Path, cut: str):
    data = _one_shard(tmp_path / "full.tar")
    with tarfile.open(tmp_path / "full.tar") as tf:
        members = tf.getmembers()
    img2, txt2 = members[4], members[5]  # 002.jpg, 002.txt
    at = {"mid_image": img2.offset_data + img2.size // 2,  # 002 loses its image
          "header_boundary": txt2.offset,                  # 002 loses its caption, no error raised
          "mid_header": txt2.offset + 200}[cut]
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:at])
    kept, quarantined = ingest_source("webdataset", shard)
    assert [r["captions"] for r in kept] == [["noise number 0"], ["noise number 1"]]
    assert [r["reason"] for r in quarantined] == [f"incomplete_sample: {shard} is damaged after it",
                                                  f"corrupt_tar: {shard}"]
    assert quarantined[0]["source"] == f"webdataset:{shard}:002"


def test_not_a_tar_and_gzip_shards(tmp_path: Path):
    garbage = tmp_path / "a-0.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 40)
    full = _one_shard(tmp_path / "plain.tar", 2)
    gz = tmp_path / "a-1.tar.gz"
    gz.write_bytes(gzip.compress(full))
    truncated_gz = tmp_path / "a-2.tgz"
    truncated_gz.write_bytes(gzip.compress(full)[: 200])
    kept, quarantined = ingest_webdataset(gz)
    assert len(kept) == 2 and quarantined == []
    kept_g, q_g = ingest_webdataset(garbage)
    assert kept_g == [] and [r["reason"] for r in q_g] == [f"corrupt_tar: {garbage}"]
    _, q_t = ingest_webdataset(truncated_gz)
    assert [r["reason"] for r in q_t][-1] == f"corrupt_tar: {truncated_gz}"


def test_non_utf8_member_names_are_stored_safely(tmp_path: Path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        add_member(tf, "caf\udce9.png", png_bytes())
        add_member(tf, "caf\udce9.txt", b"a red thing")
    (rec,), q = ingest_webdataset(shard)
    assert q == [] and rec["source"].endswith(":caf\\udce9") and json.loads(rec["meta"])["file"] == "caf\\udce9.png"
    write_dataset(tmp_path / "out", [rec], stage="ingest")
    assert read_dataset(tmp_path / "out")[0]["source"] == rec["source"]


# --------------------------------------------------------------------------------------- imagefolder

def test_imagefolder_root_metadata_csv_and_hostile_rows(tmp_path: Path, caplog):
    root = tmp_path / "hf"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes((1, 1, 1)))
    (root / "sub" / "b.jpg").write_bytes(jpeg_bytes(5))
    (root / "unnamed1.png").write_bytes(png_bytes((2, 2, 2)))
    (root / "sub" / "unnamed2.JPG").write_bytes(jpeg_bytes(6))
    (tmp_path / "secret.png").write_bytes(png_bytes((3, 3, 3)))
    rows = [
        {"file_name": "a.png", "text": "a black square", "split": "train"},
        {"file_name": "sub/b.jpg", "text": "noise", "questions": ["what?"], "answers": ["noise"]},
        {"file_name": "../secret.png", "text": "escape"},
        {"file_name": "missing.png", "text": "gone"},
        {"text": "no file name"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="mmplatform.data.formats"):
        kept, quarantined = ingest_imagefolder(root)
    assert len(kept) + len(quarantined) == 5
    k = {json.loads(r["meta"])["file"]: r for r in kept}
    assert k["a.png"]["captions"] == ["a black square"] and k["a.png"]["split"] == "train"
    assert k["sub/b.jpg"]["questions"] == ["what?"] and k["sub/b.jpg"]["split"] == ""
    assert sorted(r["reason"] for r in quarantined) == ["missing_field: image", "missing_file", "path_outside_root"]
    assert any("2 image files are named by no metadata row" in r.getMessage() for r in caplog.records)

    # metadata.csv in a split folder; a row may not leave its folder.
    (root / "metadata.jsonl").unlink()
    (root / "valid").mkdir()
    (root / "valid" / "c.png").write_bytes(png_bytes((4, 4, 4)))
    (root / "valid" / "metadata.csv").write_text('file_name,text\nc.png,"a dark, grey square"\n../a.png,up\n')
    kept, quarantined = ingest_imagefolder(root)
    assert [(r["captions"], r["split"]) for r in kept] == [(["a dark, grey square"], "val")]
    assert [r["reason"] for r in quarantined] == ["path_outside_root"]
    assert kept[0]["source"] == f"imagefolder:{root / 'valid' / 'metadata.csv'}:2"


def test_imagefolder_without_metadata_is_an_error(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(png_bytes())
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        ingest_imagefolder(tmp_path)
    with pytest.raises(FileNotFoundError):
        ingest_imagefolder(tmp_path / "x.png")
