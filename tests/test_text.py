"""Caption text helpers: normalisation with repair codes, non-UTF-8 repair, caption cleaning."""

from __future__ import annotations

import pytest

from mmplatform.data.text import (
    clean_caption,
    clean_caption_detailed,
    has_surrogates,
    is_placeholder,
    normalize_text,
    normalize_text_detailed,
    safe_str,
    transcode_undecodable,
)


def escaped(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------- normalize

@pytest.mark.parametrize("text, expected, codes", [
    ("  a  red\tcar\n", "a red car", []),                       # plain whitespace is not a repair
    ("a\x00red\x1bcar", "a red car", ["control_chars"]),
    ("cafe\u0301", "caf\u00e9", ["unicode_normalized"]),          # NFC composes
    ("a\u200bred\u202ecar", "aredcar", ["format_chars"]),         # ZWSP and RLO vanish
    ("x\ud800y", "xy", ["non_utf8_removed"]),
    ("emoji \U0001F468\u200d\U0001F469", "emoji \U0001F468\u200d\U0001F469", []),  # ZWJ kept
    ("non\u00a0breaking\u3000space", "non breaking space", []),
])
def test_normalize_text_detailed(text, expected, codes):
    assert normalize_text_detailed(text) == (expected, codes)
    assert normalize_text(text) == expected


def test_clean_caption_unchanged_for_existing_callers():
    assert clean_caption("  A dog\n") == "A dog"
    assert clean_caption("   ") is None and clean_caption(None) is None and clean_caption(3) is None
    # clean_caption stays a pure normaliser: no HTML or URL handling.
    assert clean_caption("<b>x</b>") == "<b>x</b>"


# ---------------------------------------------------------------------------------------- transcode

@pytest.mark.parametrize("raw, expected", [
    (b"caf\xe9", "café"),                                   # cp1252 / latin-1 letter
    (b"\x93quoted\x94 \x96 dash", "\u201cquoted\u201d \u2013 dash"),  # cp1252-only punctuation
    (b"Gr\xf6\xdfe", "Größe"),                              # a run of two
    (b"na\xefve caf\xc3\xa9", "naïve café"),                # mixed: the valid UTF-8 stays as it is
    (b"plain", "plain"),
])
def test_transcode_repairs_cp1252(raw, expected):
    assert transcode_undecodable(escaped(raw)) == expected


@pytest.mark.parametrize("raw", [
    b"\x81bad",                              # unassigned in cp1252
    b"\xcf\xf0\xe8\xe2\xe5\xf2",              # cp1251 "Привет": a long run would be mojibake
    b"\xff\xfea\x00",                          # a UTF-16 BOM: UTF-16 data, not "ÿþ"
])
def test_transcode_refuses_what_it_cannot_repair(raw):
    assert transcode_undecodable(escaped(raw)) is None


def test_transcode_refuses_json_surrogate_escapes():
    assert transcode_undecodable("a \ud800 b") is None


def test_safe_str_and_has_surrogates():
    s = escaped(b"x\xffy")
    assert has_surrogates(s) and not has_surrogates("plain é")
    assert safe_str(s) == "x\\udcffy" and safe_str(s).encode("utf-8")
    assert safe_str("plain é") == "plain é"


# ----------------------------------------------------------------------------------- clean caption

@pytest.mark.parametrize("text, expected, codes", [
    ("A dog on grass", "A dog on grass", []),
    ("A <b>red</b> car&nbsp;on a road", "A red car on a road", ["html_unescaped", "html_stripped"]),
    ("Tom &amp;amp; Jerry", "Tom & Jerry", ["html_unescaped"]),  # double-escaped
    ("<p>one</p><p>two</p>", "one two", ["html_stripped"]),      # block tags separate words
    ("<script>alert(1)</script>a dog", "a dog", ["html_stripped"]),
    ("a cat <!-- tracking --> asleep", "a cat asleep", ["html_stripped"]),
    ("&lt;i&gt;cat&lt;/i&gt; sleeping", "cat sleeping", ["html_unescaped", "html_stripped"]),
    ("<person> holds <object>", "<person> holds <object>", []),  # not HTML tags: kept
    ("3 < 5 and 7 > 2 apples", "3 < 5 and 7 > 2 apples", []),
    ("this &not that", "this &not that", []),                    # no ";": not an entity
    ("a dog at www.example.com.", "a dog at.", ["url_removed"]),
    ("a bridge (source: http://x.org/p)", "a bridge (source: )", ["url_removed"]),  # ")" is not the URL's
    ("see https://x.org/a?b=c now", "see now", ["url_removed"]),
    ("\uff21\uff22\uff23 \ufb01sh m\u00b2 \u00bd", "ABC fish m\u00b2 \u00bd", ["unicode_normalized"]),
    ("a\x07b", "a b", ["control_chars"]),
    ("\U0001F436\U0001F333", "\U0001F436\U0001F333", []),         # emoji-only is not a placeholder
])
def test_clean_caption_detailed_repairs(text, expected, codes):
    assert clean_caption_detailed(text) == (expected, codes)


@pytest.mark.parametrize("text, codes", [
    (None, ["not_a_string"]),
    (42, ["not_a_string"]),
    ("   ", ["empty"]),
    ("<br/>", ["html_stripped", "empty"]),
    ("image", ["placeholder"]),
    ("Photo", ["placeholder"]),
    ("picture.", ["placeholder"]),
    ("Untitled", ["placeholder"]),
    ("no caption", ["placeholder"]),
    ("NULL", ["placeholder"]),
    ("None", ["placeholder"]),
    ("N/A", ["placeholder"]),
    ("IMG_1234.jpg", ["placeholder"]),
    ("DSC0001", ["placeholder"]),
    ("image (3).png", ["placeholder"]),
    ("P1010001", ["placeholder"]),
    ("untitled-1", ["placeholder"]),
    ("12345", ["placeholder"]),
    ("2021-03-04", ["placeholder"]),
    ("d41d8cd98f00b204e9800998ecf8427e", ["placeholder"]),
    ("https://example.com/img/123.jpg", ["url_removed", "placeholder"]),
    ("www.example.com", ["url_removed", "placeholder"]),
])
def test_clean_caption_detailed_drops(text, codes):
    assert clean_caption_detailed(text) == (None, codes)


@pytest.mark.parametrize("text", [
    "an image of a dog", "a photo of two cats", "untitled painting of a lake", "IMG tag on a sign",
    "3 dogs", "a dog.jpg shaped cloud on a sunny day", "Größe 42 Schuhe",
])
def test_not_placeholders(text):
    assert not is_placeholder(text)
    assert clean_caption_detailed(text)[0] == text
