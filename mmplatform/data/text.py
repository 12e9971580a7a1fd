"""Caption text helpers: normalisation, repair of undecodable bytes, caption cleaning for the clean
stage, and the left/right swap used by horizontal-flip augmentation.

Three levels, from least to most opinionated:

* :func:`normalize_text` / :func:`normalize_text_detailed` — lossless-in-meaning canonicalisation that
  ingest applies to every caption: Unicode NFC, control characters to spaces, invisible format
  characters and lone surrogates dropped, whitespace collapsed.
* :func:`transcode_undecodable` — ingest's repair of text that was not valid UTF-8 (see its docstring).
* :func:`clean_caption_detailed` — the clean stage's caption filter: also HTML, URLs, compatibility
  forms and placeholder captions, returning the repair/drop codes that go to
  ``meta["caption_repairs"]`` and the clean stats.

**NFC, not NFKC.** NFKC would fold ``"m²"`` to ``"m2"``, ``"½"`` to ``"1⁄2"``, ``"①"`` to ``"1"`` and
``"™"`` to ``"TM"``, changing what a caption says; NFC only composes canonically equivalent sequences
(``e`` + U+0301 -> ``é``), which never changes meaning. CLIP's tokenizer cleaning (``ftfy.fix_text``,
whose default normalisation is NFC) makes the same choice. The two families of compatibility
characters that are pure presentation variants — the Latin ligatures U+FB00–FB06 (``"ﬁ"`` -> ``"fi"``)
and the halfwidth/fullwidth forms U+FF01–FFEE (``"ＡＢＣ１"`` -> ``"ABC1"``, halfwidth katakana to
standard katakana) — are folded individually by :func:`clean_caption_detailed`, so that web captions
typed with a CJK input method tokenise like everyone else's.
"""

from __future__ import annotations

import bisect
import html
import re
import unicodedata

# Format characters that are invisible and carry no meaning in a caption, or that can make text
# display differently from what it contains (bidi overrides, "trojan source"). ZWJ/ZWNJ
# (U+200D/U+200C) are kept on purpose: they are meaningful in emoji sequences and Indic/Arabic scripts.
_STRIP_FORMAT = frozenset(
    "\u00ad"  # soft hyphen
    "\u200b\u2060\ufeff"  # zero-width space, word joiner, BOM / zero-width no-break space
    "\u200e\u200f\u061c"  # LRM, RLM, Arabic letter mark
    "\u202a\u202b\u202c\u202d\u202e"  # bidi embeddings / overrides
    "\u2066\u2067\u2068\u2069"  # bidi isolates
)
# Control characters that are ordinary whitespace: turning them into a space is not a repair.
_WHITESPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c")

_SURROGATE = re.compile("[\ud800-\udfff]")
# What ``bytes.decode("utf-8", errors="surrogateescape")`` turns each undecodable byte 0x80-0xFF into.
_ESCAPED_RUN = re.compile("[\udc80-\udcff]+")
# Longest run of consecutive undecodable bytes that is still transcoded as Windows-1252. Western
# European text in cp1252 has isolated accented letters or punctuation ("caf\xe9", "Gr\xf6\xdfe",
# "\x93quoted\x94"); long runs of high bytes are text in another single-byte code page (cp1251
# Cyrillic, ISO-8859-7 Greek, ...) or binary, which cp1252 would turn into mojibake.
MAX_TRANSCODE_RUN = 3
# A UTF-16 byte-order mark inside UTF-8 text means UTF-16 data was pasted in, not cp1252 "ÿþ".
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def normalize_text_detailed(text: str) -> tuple[str, list[str]]:
    """:func:`normalize_text` plus the codes of what it changed, among ``unicode_normalized`` (NFC
    changed the string), ``control_chars`` (control characters other than tab/newline/CR/VT/FF),
    ``format_chars`` (invisible format characters) and ``non_utf8_removed`` (lone surrogates).
    Collapsing whitespace is not reported."""
    codes: list[str] = []
    # normalize() raises on nothing, but lone surrogates survive it unchanged.
    nfc = unicodedata.normalize("NFC", text)
    if nfc != text:
        codes.append("unicode_normalized")
    out = []
    for ch in nfc:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            out.append(" ")  # \t, \n, \x00 ...: a separator, not glued-together words
            if ch not in _WHITESPACE_CONTROLS and "control_chars" not in codes:
                codes.append("control_chars")
        elif cat == "Cs":
            if "non_utf8_removed" not in codes:
                codes.append("non_utf8_removed")
        elif ch in _STRIP_FORMAT:
            if "format_chars" not in codes:
                codes.append("format_chars")
        else:
            out.append(ch)
    # str.split() with no argument splits on all Unicode whitespace (NBSP, ideographic space, ...).
    return " ".join("".join(out).split()), codes


def normalize_text(text: str) -> str:
    """NFC-normalise, turn control characters into spaces, drop invisible format characters and
    lone surrogates (which cannot be stored as UTF-8), and collapse runs of whitespace to one space."""
    return normalize_text_detailed(text)[0]


def has_surrogates(text: str) -> bool:
    """True when ``text`` holds a lone surrogate, i.e. cannot be encoded as UTF-8 (Parquet would refuse
    it): from ``errors="surrogateescape"`` decoding or from a JSON ``"\\udXXX"`` escape."""
    return _SURROGATE.search(text) is not None


def transcode_undecodable(text: str) -> str | None:
    """Repair a string decoded with ``errors="surrogateescape"`` from bytes that were not valid UTF-8.

    Each run of undecodable bytes (U+DC80–U+DCFF after surrogateescape) is decoded as Windows-1252,
    the commonest real cause of non-UTF-8 captions (text exported on Windows, and what the WHATWG
    Encoding Standard decodes every "latin1"/"iso-8859-1" label as). The valid UTF-8 around a run is
    already decoded and stays as it is, so a string mixing both is repaired correctly. Returns None —
    not repairable, the caller quarantines — when a run is not valid cp1252 (bytes 0x81, 0x8D, 0x8F,
    0x90, 0x9D are unassigned), is longer than :data:`MAX_TRANSCODE_RUN` bytes or is a UTF-16
    byte-order mark (``FF FE``/``FE FF``: UTF-16 data, not text), or when the string
    holds a surrogate outside the surrogateescape range (a JSON ``"\\ud800"`` escape: not bytes at all).
    A string without surrogates is returned unchanged.
    """
    if not has_surrogates(text):
        return text
    if has_surrogates(_ESCAPED_RUN.sub("", text)):
        return None
    failed = False

    def repl(m: re.Match[str]) -> str:
        nonlocal failed
        raw = m.group(0).encode("utf-8", "surrogateescape")
        if len(raw) > MAX_TRANSCODE_RUN or raw in _UTF16_BOMS:
            failed = True
            return ""
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            failed = True
            return ""

    out = _ESCAPED_RUN.sub(repl, text)
    return None if failed else out


def safe_str(text: str) -> str:
    """``text`` with every lone surrogate written as a ``\\udcXX`` escape: always encodable as UTF-8, for
    file names, sources and log lines that must be stored or printed whatever bytes they came from."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogates(text) else text


def clean_caption(text: object) -> str | None:
    """Normalised caption, or None when ``text`` is not a string or is empty after cleaning."""
    if not isinstance(text, str):
        return None
    cleaned = normalize_text(text)
    return cleaned or None


# ------------------------------------------------------------------------------ caption cleaning

# Entities only with their terminating ";" (html.unescape alone would also turn the legacy
# semicolon-less names into characters: "this &not that" -> "this ¬ that", "&copy2020" -> "©2020").
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# Openings of the blocks removed with their content; each is closed by the first closing after it, found by a
# linear scan (:func:`_strip_blocks`): a lazy ``<!--.*?-->`` re-scans to the end of the text from every unclosed
# opening, quadratic in hostile input (an 80 KB caption of repeated "<!--" took 11.5 s).
_BLOCK_OPEN = re.compile(r"<!--|<(script|style)\b[^<>]*>", re.IGNORECASE)
_BLOCK_CLOSE = re.compile(r"-->|</(script|style)\s*>", re.IGNORECASE)
# Longer captions are dropped before any pattern runs: no caption of a real dataset comes near it, and it bounds
# the work one record can cost.
MAX_CAPTION_CHARS = 20_000
# Only real HTML tag names are stripped, so "<person> holds <object>" templates and "a < b > c" stay.
_BLOCK_TAGS = ("address|article|aside|blockquote|br|caption|center|dd|div|dl|dt|figcaption|figure|footer|"
               "h[1-6]|header|hr|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|title|tr|ul")
_INLINE_TAGS = ("a|abbr|acronym|b|bdi|big|cite|code|del|dfn|em|font|i|img|ins|kbd|label|mark|q|s|samp|"
                "small|span|strike|strong|sub|sup|time|tt|u|var|wbr")
_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS})\b(?:\s[^<>]*)?/?>", re.IGNORECASE)
_INLINE_TAG = re.compile(rf"</?(?:{_INLINE_TAGS})\b(?:\s[^<>]*)?/?>", re.IGNORECASE)
# Trailing sentence punctuation is not part of the URL: "see www.x.com." keeps its full stop.
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"]*[^\s<>\".,;:!?)\]}'\u2019\u201d]", re.IGNORECASE)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])(?=\s|$)")
_COMPAT_FOLD = re.compile("[\ufb00-\ufb06\uff01-\uffee]+")

_PLACEHOLDER_WORDS = frozenset({
    "image", "images", "img", "photo", "photos", "photograph", "picture", "pic", "pics", "thumbnail",
    "untitled", "no caption", "no description", "no title", "caption", "description", "title",
    "alt", "alt text", "null", "none", "nil", "nan", "n/a", "na", "undefined", "placeholder",
    "default", "unknown", "tbd", "todo", "blank", "empty", "missing", "not available",
    "no image", "image not found", "no photo", "no picture", "image description", "photo description",
})
_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|bmp|webp|tiff?|heic|heif|avif)"
_PLACEHOLDER_PATTERNS = (
    # A file name: "IMG_1234.jpg", "image (3).png", "photo-final.JPEG".
    re.compile(rf"^\S+(?: \(\d+\))?\.{_IMAGE_EXT}$", re.IGNORECASE),
    # Camera and phone default names: "DSC0001", "IMG_1234", "DSCN0042", "P1010001", "PXL_20210101_123456".
    re.compile(r"^(?:img|dsc[nf]?|dcim|pict?|pxl|mvimg|gopr|dji|sam|wp|p)[ _-]?\d{3,}(?:[ _-]\d+)*$",
               re.IGNORECASE),
    # A generic word with a number: "image 3", "untitled-1", "photo #12", "Picture (4)".
    re.compile(r"^(?:untitled|image|img|photo|picture|pic|screenshot|scan)[ _#-]*\(?\d+\)?$", re.IGNORECASE),
    # A content hash or UUID used as a caption.
    re.compile(r"^[0-9a-f]{16,}$|^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE),
)
_EDGE_PUNCT = " \t\"'`.,;:!?()[]{}<>-_*#|~"


def _strip_blocks(s: str) -> str:
    """``s`` with every comment and ``<script>``/``<style>`` block (opening to the first closing of its kind)
    replaced by a space; an opening that is never closed is left as text. The closings are found once, in one
    pass, and each opening looks its closing up by bisection: O(n log n) whatever the input."""
    closings: dict[str, list[tuple[int, int]]] = {}
    for c in _BLOCK_CLOSE.finditer(s):
        closings.setdefault("--" if c.group(0) == "-->" else c.group(1).lower(), []).append((c.start(), c.end()))
    out, pos = [], 0
    for m in _BLOCK_OPEN.finditer(s):
        if m.start() < pos:
            continue  # inside a block already removed
        ends = closings.get("--" if m.group(0) == "<!--" else m.group(1).lower(), [])
        i = bisect.bisect_left(ends, (m.end(), -1))
        if i == len(ends):
            continue  # never closed: stays as text
        out.append(s[pos:m.start()] + " ")
        pos = ends[i][1]
    out.append(s[pos:])
    return "".join(out)


def _fold_compat(m: re.Match[str]) -> str:
    return unicodedata.normalize("NFKC", m.group(0))


def _add(codes: list[str], new: list[str] | str) -> None:
    for c in [new] if isinstance(new, str) else new:
        if c not in codes:
            codes.append(c)


def is_placeholder(text: str) -> bool:
    """True for captions that say nothing about the image: generic words ("image", "untitled",
    "n/a", ...), file names and camera default names ("IMG_1234.jpg", "DSC0001", "image (3).png"),
    hashes, and text with no letter or symbol at all (numbers, punctuation)."""
    core = text.strip(_EDGE_PUNCT).lower()
    if not core or core in _PLACEHOLDER_WORDS:
        return True
    if not any(unicodedata.category(ch)[0] == "L" or unicodedata.category(ch) == "So" for ch in core):
        return True  # "12345", "...", "2021-03-04": no letters and no emoji/symbols
    stripped = text.strip()
    return any(p.match(stripped) or p.match(core) for p in _PLACEHOLDER_PATTERNS)


def clean_caption_detailed(text: object) -> tuple[str | None, list[str]]:
    """Clean one caption for training; return ``(caption or None, codes)``.

    Steps, each adding its code when it changed something: :func:`normalize_text_detailed`
    (``unicode_normalized``, ``control_chars``, ``format_chars``, ``non_utf8_removed``) plus folding of
    ligatures and fullwidth/halfwidth forms (``unicode_normalized``, see the module docstring); HTML
    entities unescaped, twice for double-escaped text such as ``"&amp;amp;"`` (``html_unescaped``);
    ``<script>``/``<style>`` blocks, comments and known HTML tags removed (``html_stripped``: block
    tags become a space, inline ones vanish); ``http(s)://``, ``ftp://`` and ``www.`` URLs removed
    (``url_removed``); whitespace collapsed.

    A dropped caption returns None and its codes end with the drop reason: ``not_a_string``, ``too_long``
    (over :data:`MAX_CAPTION_CHARS` characters, before any other work), ``empty`` (nothing left), or
    ``placeholder`` (:func:`is_placeholder`, or a caption that was only URLs).
    """
    if not isinstance(text, str):
        return None, ["not_a_string"]
    if len(text) > MAX_CAPTION_CHARS:
        return None, ["too_long"]
    s, codes = normalize_text_detailed(text)
    folded = _COMPAT_FOLD.sub(_fold_compat, s)
    if folded != s:
        _add(codes, "unicode_normalized")
        s = folded
    for _ in range(2):
        unescaped = _ENTITY.sub(lambda m: html.unescape(m.group(0)), s)
        if unescaped == s:
            break
        _add(codes, "html_unescaped")
        s = unescaped
    stripped = _INLINE_TAG.sub("", _BLOCK_TAG.sub(" ", _strip_blocks(s)))
    if stripped != s:
        _add(codes, "html_stripped")
        s = stripped
    without_urls = _URL.sub(" ", s)
    if without_urls != s:
        _add(codes, "url_removed")
        if not without_urls.strip(_EDGE_PUNCT):
            return None, codes + ["placeholder"]
        s = _SPACE_BEFORE_PUNCT.sub(r"\1", without_urls)  # "found at <url>." -> "found at."
    # Entities can produce control characters or NBSPs ("&#7;", "&nbsp;"): normalise once more.
    s, more = normalize_text_detailed(s)
    _add(codes, more)
    if not s:
        return None, codes + ["empty"]
    if is_placeholder(s):
        return None, codes + ["placeholder"]
    return s, codes


def word_count(text: str) -> int:
    return len(text.split())


# Whole words only: \b keeps "bright", "copyright", "leftover", "righteous", "left_arm" untouched.
# Suffixes cover the directional derivatives ("leftmost", "rightward(s)").
_LR = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def flip_left_right(text: str) -> str:
    """Swap left<->right (and leftmost<->rightmost, leftward(s)<->rightward(s)) as whole words,
    preserving case: "Left" -> "Right", "LEFT" -> "RIGHT", "to the left of" -> "to the right of".

    Purely lexical: non-directional senses are swapped too ("he left the room", "a right angle",
    "all right"), so it is only safe on captions that describe spatial layout.
    """

    def repl(m: re.Match[str]) -> str:
        whole = m.group(0)
        swapped = _SWAP[m.group(1).lower()] + (m.group(2) or "").lower()
        return _match_case(whole, swapped)

    return _LR.sub(repl, text)
