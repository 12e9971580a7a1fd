"""Caption text helpers: normalisation and the left/right swap used by horizontal-flip augmentation."""

from __future__ import annotations

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


def normalize_text(text: str) -> str:
    """NFC-normalise, turn control characters into spaces, drop invisible format characters and
    lone surrogates (which cannot be stored as UTF-8), and collapse runs of whitespace to one space."""
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            out.append(" ")  # \t, \n, \x00 ...: a separator, not glued-together words
        elif cat == "Cs" or ch in _STRIP_FORMAT:
            continue
        else:
            out.append(ch)
    # str.split() with no argument splits on all Unicode whitespace (NBSP, ideographic space, ...).
    return " ".join("".join(out).split())


def clean_caption(text: object) -> str | None:
    """Normalised caption, or None when ``text`` is not a string or is empty after cleaning."""
    if not isinstance(text, str):
        return None
    cleaned = normalize_text(text)
    return cleaned or None


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
