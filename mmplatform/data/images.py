"""Safe image decoding: the one place where untrusted image bytes meet PIL.

Every stage that needs pixels goes through :func:`decode_image`, so the rules live here once:

* refuse empty and oversized files before parsing anything;
* sniff the container format from its magic bytes and refuse anything outside a small allow-list
  *before* any PIL plugin sees the data (PIL would otherwise happily hand EPS to Ghostscript, or
  try dozens of obscure parsers on hostile input);
* open with only the sniffed format enabled;
* refuse decompression bombs by checking the header's pixel count before the pixels are decoded,
  and by turning PIL's own ``DecompressionBombWarning`` into an error;
* apply EXIF orientation, so width/height and pixels are what a person viewing the file sees;
* convert every mode to 8-bit RGB deterministically. Transparent pixels are composited on **white**:
  most transparent images in captioned web data (logos, icons, product shots, diagrams) are authored
  to be seen on a light page, and compositing on black would make dark line art vanish and make
  captions such as "a black logo" false. (PIL's plain ``convert("RGB")`` just drops alpha and exposes
  whatever colour the transparent pixels happen to store, which is arbitrary.)
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

# PIL format name -> magic-byte prefixes (offset 0). WebP is RIFF....WEBP and is checked separately.
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    # Classic TIFF, little and big endian, and BigTIFF (PIL reads both).
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Background for transparent pixels (see module docstring for why white).
ALPHA_BACKGROUND = (255, 255, 255)

# ``info`` key of a draft-decoded image holding the file's full (width, height) after EXIF orientation.
FULL_SIZE_KEY = "mmp_full_size"


class BadImage(ValueError):
    """An image that must not enter the dataset; ``reason`` is a short snake_case code
    (optionally ``"code: detail"``) suitable for a quarantine row."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """Return the PIL format name for ``data`` from its magic bytes, or None if not allowed."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for fmt, prefixes in _MAGIC.items():
        if any(data.startswith(p) for p in prefixes):
            return fmt
    return None


def decode_image(data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 50_000_000,
                 draft: int | None = None) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded RGB image, or raise :class:`BadImage`.

    ``draft``: for JPEG only, let libjpeg decode with DCT-domain scaling (1/2, 1/4 or 1/8, the largest
    that keeps the longest side >= ``draft``; PIL's ``Image.draft``), several times faster than a full
    decode followed by a resize.
    The whole entropy-coded stream is still parsed, so truncated and corrupt files are still refused.
    The returned image is then smaller than the file; the file's full size (after EXIF orientation)
    is in ``im.info[FULL_SIZE_KEY]``. Other formats ignore ``draft``.

    Reasons: ``empty_file``, ``too_large``, ``unsupported_format``, ``decompression_bomb``,
    ``corrupt_image``, ``unsupported_mode``. Multi-frame files (animated GIF/WebP, multi-page TIFF)
    yield their first frame.

    The effective pixel limit is ``min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS)``: the global is
    deliberately not mutated (it is process-wide and other threads may be decoding).
    """
    if not data:
        raise BadImage("empty_file")
    if len(data) > max_bytes:
        raise BadImage(f"too_large: {len(data)} bytes > {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImage("unsupported_format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            # Check the header's claim before allocating/decoding any pixel data.
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImage(f"corrupt_image: size {w}x{h}")
            if w * h > max_pixels:
                raise BadImage(f"decompression_bomb: {w}x{h} > {max_pixels} pixels")
            full_size = None
            if draft is not None and fmt == "JPEG":
                long_side = max(w, h)  # ask for the image's own aspect, so the longest side decides
                im.draft("RGB", (max(1, w * draft // long_side), max(1, h * draft // long_side)))
                full_size = (w, h)
            im.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb") from e
    except MemoryError as e:
        raise BadImage("decompression_bomb: out of memory") from e
    except Exception as e:  # noqa: BLE001 - malformed files make PIL raise almost anything
        # UnidentifiedImageError (magic matched, body did not), truncated data (OSError),
        # bad chunks (SyntaxError/ValueError), and assorted parser errors on fuzzed input.
        raise BadImage(f"corrupt_image: {type(e).__name__}") from e

    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1) if full_size else 1
        im = ImageOps.exif_transpose(im)
        if full_size and orientation in (5, 6, 7, 8):  # the transposing orientations swap the sides
            full_size = (full_size[1], full_size[0])
    except Exception as e:  # noqa: BLE001
        # A broken EXIF block should not cost us an otherwise good image: keep the stored orientation.
        log.warning("ignoring unreadable EXIF orientation (%s: %s)", type(e).__name__, e)
    out = to_rgb(im)
    if full_size:
        out.info[FULL_SIZE_KEY] = full_size
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, deterministically (always returns a new image).

    * alpha modes (RGBA, LA, PA, RGBa, La, and P/L/RGB with a ``transparency`` key): composited
      on :data:`ALPHA_BACKGROUND`;
    * 16/32-bit integer greyscale (``I;16*``, ``I``): the 16-bit range is mapped onto 8 bits
      (``v >> 8``, values clipped to 0..65535) — PIL's own conversion clips at 255 instead, which
      turns almost every 16-bit image white;
    * float (``F``): treated as 0..1 if all values lie in that range, else as 0..255, then clipped;
    * everything else (1, L, P, CMYK, YCbCr, RGBX, ...): PIL's ``convert("RGB")``.
    """
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode == "I":
        # At most 4 bytes a pixel beside PIL's own buffer: a 7000 x 7000 16-bit PNG (93 KB on disk, within the
        # pixel limit) took 1 GB through int64 arrays.
        a = np.asarray(im)  # uint16 (I;16, any byte order) or int32 (I): a view of PIL's buffer
        if a.dtype.itemsize > 2:
            a = np.clip(a, 0, 65535)
        a8 = (a >> 8).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"unsupported_mode: {mode}") from e


def image_info(data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 50_000_000) -> tuple[int, int]:
    """(width, height) after EXIF orientation, via a full safe decode (raises :class:`BadImage`)."""
    im = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return im.size


def encode_png(im: Image.Image) -> bytes:
    """Encode deterministically as PNG: no metadata, fixed compression settings. The same pixels give
    the same bytes (and so the same sample_id) for a given Pillow/zlib build."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encoded_length(data: bytes, fmt: str | None) -> int | None:
    """Where the PNG (after its ``IEND`` chunk) or JPEG (at its ``EOI`` marker) stream ``data`` ends, or None when
    its structure cannot be followed. Bytes after that end are not part of the image: a file with a payload
    appended (a zip, a script) decodes the same, so they are cut before the bytes are kept."""
    if fmt == "PNG":
        return _png_end(data)
    if fmt == "JPEG":
        return _jpeg_end(data)
    return None


def _png_end(data: bytes) -> int | None:
    i, n = 8, len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        i += 12 + length
        if kind == b"IEND":
            return i if i <= n else None
    return None


def _jpeg_end(data: bytes) -> int | None:
    i, n = 2, len(data)
    while i + 2 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return i + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker (FF not followed by 00/RSTn)
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return None
                nxt = data[i + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    i += 2
                    continue
                break
    return None
