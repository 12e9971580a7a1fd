"""Composition foils: captions made false by changing *how* their words are bound, not *which* words.

Yuksekgonul et al. (ICLR 2023, "When and why vision-language models behave like bags-of-words, and what
to do about it") showed that CLIP scores a caption and its foil almost alike (ARO benchmark: near chance on
VG-Attribution, VG-Relation, COCO/Flickr-Order), and that training with such foils as extra hard negatives
(NegCLIP, :func:`mmplatform.models.losses.clip_loss_with_hard_negatives`) lifts it. The same foils serve
as the binding evaluation (``score(image, caption) > score(image, foil)``).

Three kinds, each a pure caption -> caption function that returns ``None`` when it does not apply:

- :func:`swap_attributes` (VG-Attribution): exchange one attribute (colour, or size) between two objects,
  ``"a red circle and a blue square" -> "a blue circle and a red square"``.
- :func:`reverse_relation` (VG-Relation): swap the two arguments of an asymmetric spatial relation
  (``"a red circle above a blue square" -> "a blue square above a red circle"``), or else flip one
  spatial word (left/right, top/bottom, above/below, ...) in one object's position phrase.
- :func:`shuffle_order` (COCO/Flickr-Order): shuffle the word order.

They understand the built-in synthetic captions exactly (``a <size> <colour> <shape> <position>`` phrases
joined by commas and "and", plus the two-object relation template, see :mod:`mmplatform.data.synthetic`),
and degrade gracefully on arbitrary English: an "object phrase" is a run of colour/size words followed by a
noun (the next word that is not a function word). A foil is only returned when it changes what the caption
claims: swapping the colours of two objects that are otherwise alike ("a red circle and a blue circle"),
or flipping a position onto another identical object, would give a caption that is still true, so those
are skipped. Every returned foil differs from its caption.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOR_WORDS: frozenset[str] = frozenset({
    "red", "green", "blue", "yellow", "purple", "cyan", "orange", "pink", "black", "white", "gray", "grey",
    "brown", "magenta", "violet", "gold", "golden", "silver", "beige", "turquoise", "maroon", "navy",
})
SIZE_WORDS: frozenset[str] = frozenset({"small", "large", "big", "tiny", "little", "huge", "giant"})
ATTRIBUTE_WORDS: dict[str, frozenset[str]] = {"color": COLOR_WORDS, "size": SIZE_WORDS}
# Words whose swap changes a spatial claim; "center"/"middle" have no opposite.
SPATIAL_FLIPS: dict[str, str] = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above",
    "upper": "lower", "lower": "upper", "over": "under", "under": "over", "inside": "outside",
    "outside": "inside",
}
SPATIAL_WORDS: frozenset[str] = frozenset(SPATIAL_FLIPS) | {"center", "centre", "middle"}
# Asymmetric binary relations, longest first (their argument swap changes the meaning; "next to" would not).
RELATIONS: tuple[tuple[str, ...], ...] = (
    ("to", "the", "left", "of"), ("to", "the", "right", "of"), ("on", "the", "left", "of"),
    ("on", "the", "right", "of"), ("on", "top", "of"), ("in", "front", "of"), ("left", "of"), ("right", "of"),
    ("above",), ("below",), ("under",), ("underneath",), ("beneath",), ("over",), ("behind",), ("inside",),
)
DETERMINERS: frozenset[str] = frozenset({"a", "an", "the", "one", "two", "three", "four", "some", "another"})
PREPOSITIONS: frozenset[str] = frozenset({"in", "on", "at", "of", "to", "from", "by", "into", "onto", "near",
                                          "under", "over", "above", "below", "behind", "beneath", "inside"})
COPULAS: frozenset[str] = frozenset({"is", "are", "was", "were"})
FUNCTION_WORDS: frozenset[str] = (DETERMINERS | PREPOSITIONS | COPULAS | SPATIAL_WORDS | frozenset({
    "and", "or", "but", "with", "without", "its", "their", "his", "her", "this", "that", "these", "those",
    "there", "here", "very", "each", "both", "be", "has", "have", "it", "they", "he", "she", "as",
}))
_CLAUSE_BREAKS: frozenset[str] = frozenset({",", ";", ":", ".", "!", "?"})
_TOKEN = re.compile(r"\w+|[^\w\s]")

Rng = np.random.Generator | random.Random


@dataclass(frozen=True)
class _Tok:
    start: int
    end: int
    text: str

    @property
    def low(self) -> str:
        return self.text.lower()


@dataclass(frozen=True)
class _Phrase:
    """An object phrase: attribute words at ``attrs`` (token indices), head noun at ``noun``; ``segment``
    is the token range it owns (up to the next object phrase), where its position words are read."""

    attrs: tuple[int, ...]
    noun: int
    segment: tuple[int, int]


def _tokens(caption: str) -> list[_Tok]:
    return [_Tok(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(caption)]


def _replace(caption: str, toks: list[_Tok], new: dict[int, str]) -> str:
    """``caption`` with token ``i`` replaced by ``new[i]``; everything else (spacing, case) kept."""
    out, pos = [], 0
    for i in sorted(new):
        out += [caption[pos:toks[i].start], new[i]]
        pos = toks[i].end
    return "".join(out) + caption[pos:]


def _is_attr(tok: _Tok) -> bool:
    return tok.low in COLOR_WORDS or tok.low in SIZE_WORDS


def _phrases(toks: list[_Tok]) -> list[_Phrase]:
    found: list[tuple[tuple[int, ...], int]] = []
    i = 0
    while i < len(toks):
        if not _is_attr(toks[i]):
            i += 1
            continue
        j = i
        while j < len(toks) and _is_attr(toks[j]):
            j += 1
        # The run must end in a noun: a plain word that is not a function word ("a red and blue ball":
        # "red" is followed by "and", so only "blue ball" is an object phrase).
        if j < len(toks) and toks[j].text.isalpha() and toks[j].low not in FUNCTION_WORDS:
            found.append((tuple(range(i, j)), j))
        i = j + 1
    return [_Phrase(attrs, noun, (attrs[0], found[k + 1][0][0] if k + 1 < len(found) else len(toks)))
            for k, (attrs, noun) in enumerate(found)]


def _describe(toks: list[_Tok], p: _Phrase, override: dict[int, str] | None = None) -> tuple:
    """What a phrase claims: its noun, its attributes and the position words of its segment."""
    word = {i: t.low for i, t in enumerate(toks)} | (override or {})
    attrs = tuple(sorted(word[i] for i in p.attrs))
    where = tuple(word[i] for i in range(p.noun + 1, p.segment[1]) if word[i] in SPATIAL_WORDS)
    return word[p.noun], attrs, where


def _attr_of(toks: list[_Tok], p: _Phrase, kind: str) -> int | None:
    idx = [i for i in p.attrs if toks[i].low in ATTRIBUTE_WORDS[kind]]
    return idx[0] if len(idx) == 1 else None


def swap_attributes(caption: str, attribute: str = "color") -> str | None:
    """Exchange one ``attribute`` (``"color"`` or ``"size"``) between the first two object phrases that
    differ in it and would still differ after the swap; ``None`` if no such pair.

    >>> swap_attributes("a red circle and a blue square")
    'a blue circle and a red square'
    >>> swap_attributes("a red circle and a red square") is None
    True
    """
    if attribute not in ATTRIBUTE_WORDS:
        raise ValueError(f"attribute must be one of {sorted(ATTRIBUTE_WORDS)}, got {attribute!r}")
    toks = _tokens(caption)
    phrases = _phrases(toks)
    for a_i, a in enumerate(phrases):
        ia = _attr_of(toks, a, attribute)
        if ia is None:
            continue
        for b in phrases[a_i + 1:]:
            ib = _attr_of(toks, b, attribute)
            if ib is None or toks[ia].low == toks[ib].low:
                continue
            swap = {ia: toks[ib].low, ib: toks[ia].low}
            # Swapping between otherwise identical objects describes the same scene: not a foil.
            if {_describe(toks, a, swap), _describe(toks, b, swap)} == {_describe(toks, a), _describe(toks, b)}:
                continue
            foil = _replace(caption, toks, {ia: _match_case(toks[ib].text, toks[ia].text),
                                            ib: _match_case(toks[ia].text, toks[ib].text)})
            if foil != caption:
                return foil
    return None


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word.lower()


def _match_relation(low: list[str], i: int) -> int:
    """Length of the relation starting at token ``i`` (0 if none)."""
    for rel in RELATIONS:
        if tuple(low[i:i + len(rel)]) == rel:
            return len(rel)
    return 0


def _swap_arguments(caption: str, toks: list[_Tok]) -> str | None:
    low = [t.low for t in toks]
    r0 = 1
    while r0 < len(toks):
        n = _match_relation(low, r0)
        if not n:
            r0 += 1
            continue
        r1 = r0 + n
        while r1 + 1 < len(toks) and low[r1] == "and" and _match_relation(low, r1 + 1):  # "above and to the left of"
            r1 += 1 + _match_relation(low, r1 + 1)
        # Left argument: ends before the relation (and a comma or copula before it), starts at the last
        # determiner that is not inside a prepositional phrase ("in *the* top left") or the clause start.
        end1 = r0
        while end1 > 0 and (low[end1 - 1] == "," or low[end1 - 1] in COPULAS):
            end1 -= 1
        clause = max((k + 1 for k in range(end1) if low[k] in _CLAUSE_BREAKS), default=0)
        starts = [k for k in range(clause, end1)
                  if low[k] in DETERMINERS and (k == 0 or low[k - 1] not in PREPOSITIONS)]
        # Right argument: a determiner right after the relation, up to the clause end or "and <determiner>".
        if not starts or r1 >= len(toks) or low[r1] not in DETERMINERS:
            r0 = r1  # not this relation; never re-match inside it ("left of" within "to the left of")
            continue
        s1 = starts[-1]
        end2 = r1 + 1
        while end2 < len(toks) and low[end2] not in _CLAUSE_BREAKS and not (
                low[end2] == "and" and end2 + 1 < len(toks) and low[end2 + 1] in DETERMINERS):
            end2 += 1
        left = caption[toks[s1].start:toks[end1 - 1].end]
        right = caption[toks[r1].start:toks[end2 - 1].end]
        if s1 == 0 and left[:1].isupper():  # "A man ... of a car." -> "A car ... of a man."
            left, right = left[:1].lower() + left[1:], right[:1].upper() + right[1:]
        foil = (caption[:toks[s1].start] + right + caption[toks[end1 - 1].end:toks[r1].start] + left
                + caption[toks[end2 - 1].end:])
        if left.lower() != right.lower() and foil != caption:
            return foil
        r0 = r1
    return None


def _relation_tokens(toks: list[_Tok]) -> set[int]:
    low = [t.low for t in toks]
    out: set[int] = set()
    i = 0
    while i < len(low):
        n = _match_relation(low, i)
        out.update(range(i, i + n))
        i += max(n, 1)
    return out


def _flip_one(caption: str, toks: list[_Tok]) -> str | None:
    # Words of a binary relation are not flipped: that is an argument swap, and it was either done
    # already or refused because both arguments read the same ("a dog above a dog" = "a dog below a dog").
    in_relation = _relation_tokens(toks)
    phrases = _phrases(toks)
    if not phrases:  # no object phrases: flip the first spatial word there is
        for i, t in enumerate(toks):
            if t.low in SPATIAL_FLIPS and i not in in_relation:
                return _replace(caption, toks, {i: _match_case(SPATIAL_FLIPS[t.low], t.text)})
        return None
    for p in phrases:
        others = {_describe(toks, q) for q in phrases if q is not p}
        for i in range(p.noun + 1, p.segment[1]):
            word = toks[i].low
            if word not in SPATIAL_FLIPS or i in in_relation:
                continue
            flipped = {i: SPATIAL_FLIPS[word]}
            # Moving an object onto the place of an identical one it would still describe the scene.
            if _describe(toks, p, flipped) in others:
                continue
            return _replace(caption, toks, {i: _match_case(SPATIAL_FLIPS[word], toks[i].text)})
    return None


def reverse_relation(caption: str) -> str | None:
    """Make the caption's spatial claim false: swap the two arguments of an asymmetric spatial relation
    (VG-Relation style), else flip one spatial word in one object's position; ``None`` if neither applies.

    >>> reverse_relation("a red circle above a blue square")
    'a blue square above a red circle'
    >>> reverse_relation("a small red circle on the left")
    'a small red circle on the right'
    """
    toks = _tokens(caption)
    for make in (_swap_arguments, _flip_one):
        foil = make(caption, toks)
        if foil is not None and foil != caption:
            return foil
    return None


def _permutation(n: int, rng: Rng) -> list[int]:
    if isinstance(rng, random.Random):
        order = list(range(n))
        rng.shuffle(order)
        return order
    return [int(i) for i in rng.permutation(n)]


def shuffle_order(caption: str, rng: Rng, *, tries: int = 10) -> str | None:
    """The caption's words in a random order that differs from the original (ARO's COCO/Flickr-Order
    foils); ``None`` when the caption has fewer than two distinct words. Punctuation is dropped."""
    words = [t.text for t in _tokens(caption) if t.text[0].isalnum() or t.text[0] == "_"]
    if len(set(words)) < 2:
        return None
    original = " ".join(words)
    for _ in range(tries):
        foil = " ".join(words[i] for i in _permutation(len(words), rng))
        if foil != original and foil != caption:
            return foil
    # A rotation by one differs whenever two words differ (it would equal the original only if periodic
    # with period 1), so the contract holds even for an unlucky generator.
    return " ".join(words[1:] + words[:1])


def foils(caption: str, rng: Rng) -> dict[str, str]:
    """Every foil kind that applies: ``{"attribute": ..., "relation": ..., "order": ...}`` (keys whose
    foil is ``None`` are left out). The attribute foil swaps colours, or sizes when no colour swap exists."""
    out = {
        "attribute": swap_attributes(caption, "color") or swap_attributes(caption, "size"),
        "relation": reverse_relation(caption),
        "order": shuffle_order(caption, rng),
    }
    return {k: v for k, v in out.items() if v is not None and v != caption}


FOIL_KINDS: Sequence[str] = ("attribute", "relation", "order")
