"""Tests for mmplatform.evaluate.captions: CIDEr-D parity with pycocoevalcap, known values, BLEU-4."""

from __future__ import annotations

import math

import numpy as np
import pytest

# Make the repo importable when pytest is run via .venv/bin/pytest without an installed package.
from pycocoevalcap.cider.cider import Cider

from mmplatform.evaluate.captions import CiderD, bleu4, caption_metrics, tokenize

REALISTIC_REFS = [
    [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Man surfing on a big wave at the beach",
        "A surfer in a black wetsuit catching a wave.",
    ],
    [
        "Two dogs playing with a frisbee in the park.",
        "A couple of dogs run after a frisbee on the grass.",
        "Dogs chasing a flying disc in a grassy field.",
        "Two brown dogs are playing in the grass.",
        "A pair of dogs playing fetch in a park.",
    ],
    [
        "A plate of food with broccoli and rice.",
        "A white plate topped with rice, meat and broccoli.",
        "Some broccoli and chicken on a plate with rice.",
        "A dinner plate with vegetables and rice on it.",
        "A meal of rice, chicken and broccoli.",
    ],
    [
        "A red double decker bus driving down a street.",
        "A double-decker bus on a city street.",
        "A big red bus is parked by the sidewalk.",
        "A tour bus travelling down the road in London.",
        "The red bus is driving past some buildings.",
    ],
    [
        "A cat sleeping on a laptop keyboard.",
        "A cat is lying on top of an open laptop.",
        "A grey cat naps on a computer.",
        "The kitten doesn't want anyone to use the laptop.",
        "A cat curled up on a keyboard.",
    ],
    [
        "A woman holding an umbrella in the rain.",
        "A lady walks down the street with a pink umbrella.",
        "A person with an umbrella walking on a wet sidewalk.",
    ],
]
REALISTIC_CANDS = [
    "a man riding a wave on a surfboard",
    "two dogs playing with a frisbee",
    "a plate of food with rice and broccoli",
    "a bus parked on the side of a road",
    "a cat laying on a laptop computer",
    "a woman holding an umbrella",
]


def _joined(text: str) -> str:
    return " ".join(tokenize(text))


def _pycoco(cands: list[str], refs: list[list[str]]) -> tuple[float, np.ndarray]:
    """Reference CIDEr-D: pycocoevalcap on tokenised, space-joined text."""
    gts = {i: [_joined(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [_joined(c)] for i, c in enumerate(cands)}
    mean, scores = Cider().compute_score(gts, res)
    return float(mean), np.asarray(scores, dtype=np.float64)


def _random_set(seed: int, size: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    vocab = [
        "a",
        "the",
        "man",
        "woman",
        "dog",
        "cat",
        "red",
        "big",
        "on",
        "in",
        "with",
        "riding",
        "sitting",
        "table",
        "street",
        "ball",
        "grass",
        "two",
        "small",
        "near",
        "of",
        "is",
    ]

    def sentence(lo: int) -> str:
        return " ".join(rng.choice(vocab, size=int(rng.integers(lo, 13))))

    cands = [sentence(0) for _ in range(size)]  # lo=0: some candidates are empty
    refs = [[sentence(1) for _ in range(int(rng.integers(1, 6)))] for _ in range(size)]
    return cands, refs


def test_tokenize_lowercases_drops_punctuation_and_is_idempotent() -> None:
    assert tokenize("A Man, riding a WAVE... on top of a surfboard!") == [
        "a",
        "man",
        "riding",
        "a",
        "wave",
        "on",
        "top",
        "of",
        "a",
        "surfboard",
    ]
    assert tokenize("The dog's T-shirt doesn't fit (3.5 kg) -- ok?") == [
        "the",
        "dog",
        "'s",
        "t-shirt",
        "does",
        "n't",
        "fit",
        "3.5",
        "kg",
        "ok",
    ]
    assert tokenize("  \t ") == []
    for text in [c for rs in REALISTIC_REFS for c in rs] + REALISTIC_CANDS + ["can\u2019t won't"]:
        toks = tokenize(text)
        assert tokenize(" ".join(toks)) == toks


def test_cider_matches_pycocoevalcap_on_realistic_captions() -> None:
    ref_mean, ref_scores = _pycoco(REALISTIC_CANDS, REALISTIC_REFS)
    mean, scores = CiderD().compute_score(
        [_joined(c) for c in REALISTIC_CANDS], [[_joined(r) for r in rs] for rs in REALISTIC_REFS]
    )
    assert scores.shape == (len(REALISTIC_CANDS),)
    assert mean == pytest.approx(ref_mean, abs=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    assert ref_mean > 0.5  # sanity: these candidates are decent captions
    # Raw text gives the same numbers: CiderD tokenises with the same tokenize().
    np.testing.assert_allclose(CiderD().score(REALISTIC_CANDS, REALISTIC_REFS), ref_scores, atol=1e-6)


def test_cider_matches_pycocoevalcap_on_200_random_sets() -> None:
    cands, refs = _random_set(seed=1234, size=200)
    assert any(c == "" for c in cands)
    ref_mean, ref_scores = _pycoco(cands, refs)
    mean, scores = CiderD().compute_score(cands, refs)
    assert mean == pytest.approx(ref_mean, abs=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


def test_cider_fixed_df_equals_pycocoevalcap_when_corpus_is_the_refs() -> None:
    cands, refs = _random_set(seed=7, size=120)
    scorer = CiderD(df_corpus=refs)
    # Warm the scorer on unrelated references first: interning more n-grams must not change results.
    other_cands, other_refs = _random_set(seed=8, size=30)
    scorer.score(other_cands, other_refs)
    _, ref_scores = _pycoco(cands, refs)
    np.testing.assert_allclose(scorer.score(cands, refs), ref_scores, rtol=0, atol=1e-6)
    # Second call is served from the ref-set cache and is identical.
    np.testing.assert_array_equal(scorer.score(cands, refs), scorer.score(cands, refs))


def test_repeat_equals_duplicated_refs_and_pycocoevalcap() -> None:
    cands, refs = _random_set(seed=99, size=90)
    k = 3
    per_image = refs[:30]
    duplicated = [per_image[i // k] for i in range(len(cands))]
    _, ref_scores = _pycoco(cands, duplicated)
    scorer = CiderD()
    np.testing.assert_allclose(scorer.score(cands, per_image, repeat=k), ref_scores, atol=1e-6)
    np.testing.assert_allclose(scorer.score(cands, duplicated), ref_scores, atol=1e-6)


def test_identical_candidate_beats_shuffled_and_empty_scores_zero() -> None:
    refs = [
        ["a dog runs on the beach"] * 3,
        ["a red car parked near a house"] * 3,
        ["two people eating pizza at a table"] * 3,
    ]
    rng = np.random.default_rng(0)
    shuffled = []
    for rs in refs:
        words = rs[0].split()
        perm = rng.permutation(len(words))
        while (perm == np.arange(len(words))).all():
            perm = rng.permutation(len(words))
        shuffled.append(" ".join(words[i] for i in perm))
    scorer = CiderD()
    same = scorer.score([rs[0] for rs in refs], refs)
    shuf = scorer.score(shuffled, refs)
    assert (same > shuf).all()
    assert (same > 0).all()
    # (Two different ref sets: with df from the refs, n-grams shared by every document get idf 0.)
    empty = scorer.score(["", refs[1][0]], [refs[0], refs[1]])
    assert empty[0] == 0.0
    assert empty[1] > 0.0


def test_hand_computed_values_with_separate_df_corpus() -> None:
    # One-document corpus: ref_len = log(1) = 0 and every idf is 0 - log(max(1, df)) = 0, so every
    # tf-idf vector is zero and even a perfect match scores 0.
    one_doc = CiderD(df_corpus=[["a cat"]])
    assert one_doc.ref_len == 0.0
    np.testing.assert_array_equal(one_doc.score(["a cat"], [["a cat"]]), [0.0])

    # Two documents {"a cat"}, {"a dog"}: ref_len = log 2 =: l.  df("a") = 2 -> idf 0; "cat", "a cat"
    # have df 1 and unseen n-grams df 0 -> both idf l.
    scorer = CiderD(df_corpus=[["a cat"], ["a dog"]])
    assert scorer.ref_len == pytest.approx(math.log(2))
    # "a cat" vs ref "a cat": 1-grams {a:0, cat:l} vs same -> cosine 1; 2-grams {"a cat": l} -> 1;
    # no 3-/4-grams -> 0.  Equal lengths -> penalty 1.  Score = 10 * mean(1, 1, 0, 0) / 1 ref = 5.
    np.testing.assert_allclose(scorer.score(["a cat"], [["a cat"]]), [5.0], atol=1e-12)
    # "a cat cat" vs "a cat": 1-grams hyp {a:0, cat:2l}, ref {cat:l}: min(2l, l) * l / (2l * l) = 1/2.
    # 2-grams hyp {"a cat": l, "cat cat": l} (norm l*sqrt2), ref {"a cat": l}: l^2 / (l*sqrt2 * l)
    # = 1/sqrt2.  3-gram "a cat cat" has no reference counterpart (ref norm 0) -> 0.  Length (bigram
    # count) 2 vs 1 -> penalty exp(-1 / (2 * 6^2)).  Score = 10 * (1/2 + 1/sqrt2) / 4 * exp(-1/72).
    expected = 10.0 * (0.5 + 1.0 / math.sqrt(2.0)) / 4.0 * math.exp(-1.0 / 72.0)
    assert expected == pytest.approx(2.976143, abs=1e-6)
    np.testing.assert_allclose(scorer.score(["a cat cat"], [["a cat"]]), [expected], atol=1e-12)
    # df is fixed: scoring a batch does not change these numbers.
    batch = scorer.score(["a cat", "a cat cat", "a dog"], [["a cat"], ["a cat"], ["a cat"]])
    np.testing.assert_allclose(batch[:2], [5.0, expected], atol=1e-12)


def test_input_validation() -> None:
    scorer = CiderD()
    with pytest.raises(ValueError):
        scorer.score(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        scorer.score(["a"], [[]])
    with pytest.raises(TypeError):
        scorer.score(["a"], ["a dog"])
    with pytest.raises(ValueError):
        CiderD(df_corpus=[])
    assert scorer.score([], []).shape == (0,)


def test_bleu4_identical_is_one_and_disjoint_is_zero() -> None:
    refs = [["a man riding a wave on a surfboard"], ["two dogs playing with a red frisbee"]]
    assert bleu4([rs[0] for rs in refs], refs) == pytest.approx(1.0, abs=1e-6)
    # Tokenisation is applied: case and punctuation do not matter.
    assert bleu4(["A man riding a wave, on a surfboard."], refs[:1]) == pytest.approx(1.0, abs=1e-6)
    disjoint = ["purple elephants juggle seven tiny umbrellas", "quantum soup evaporates under violet stars"]
    assert bleu4(disjoint, refs) < 1e-6


def test_caption_metrics_keys_and_values() -> None:
    out = caption_metrics(REALISTIC_CANDS, REALISTIC_REFS)
    assert set(out) == {"cider_d", "bleu4"}
    ref_mean, _ = _pycoco(REALISTIC_CANDS, REALISTIC_REFS)
    assert out["cider_d"] == pytest.approx(ref_mean, abs=1e-6)
    assert 0.0 < out["bleu4"] <= 1.0
    fixed = caption_metrics(REALISTIC_CANDS, REALISTIC_REFS, df_corpus=REALISTIC_REFS)
    assert fixed["cider_d"] == pytest.approx(ref_mean, abs=1e-6)  # corpus == refs -> same df


def test_edge_cases_empty_reference_strings_and_tiny_cache() -> None:
    cands, refs = ["a b", "c"], [["", "a b"], ["c d e", ""]]
    _, ref_scores = _pycoco(cands, refs)
    np.testing.assert_allclose(CiderD().score(cands, refs), ref_scores, atol=1e-12)
    # Only empty references: nothing can match, every score is 0 (pycocoevalcap itself errors here).
    np.testing.assert_array_equal(CiderD().score(["a b", ""], [[""], [""]]), [0.0, 0.0])
    # LRU eviction (cache smaller than a batch) does not change results.
    cands, refs = _random_set(seed=5, size=60)
    small = CiderD(df_corpus=refs, cache_size=7)
    first = small.score(cands, refs)
    again = small.score(cands[::-1], refs[::-1])[::-1]
    assert len(small._cache) == 7
    np.testing.assert_allclose(first, again, atol=1e-12)
    np.testing.assert_allclose(first, _pycoco(cands, refs)[1], atol=1e-6)


def _naive_cider(cands: list[str], refs: list[list[str]], n: int, sigma: float = 6.0) -> np.ndarray:
    """pycocoevalcap's CIDEr-D transcribed loop for loop, with n a parameter (pycocoevalcap's own ``Cider(n=...)``
    still cooks 4-grams, so it cannot check other orders)."""
    from collections import Counter

    def grams(text: str) -> Counter:
        w = tokenize(text)
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    crefs = [[grams(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in crefs:
        df.update({g for r in rs for g in r})
    ref_len = math.log(float(len(cands)))

    def vec(c: Counter, text: str) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        for g, tf in c.items():
            v[len(g) - 1][g] = tf * (ref_len - math.log(max(1.0, df[g])))
        # "length" = the number of bigrams counted (none when n == 1), as pycocoevalcap's counts2vec
        length = max(len(tokenize(text)) - 1, 0) if n >= 2 else 0
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], length

    out = []
    for cand, rs, crs in zip(cands, refs, crefs, strict=True):
        vh, nh, lh = vec(grams(cand), cand)
        score = np.zeros(n)
        for r, cr in zip(rs, crs, strict=True):
            vr, nr, lr = vec(cr, r)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                score[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        out.append(score.mean() / len(rs) * 10.0)
    return np.array(out)


def test_shared_and_interleaved_reference_sets_match_pycocoevalcap() -> None:
    # Sets used by several candidates, not next to each other, equal by value but distinct objects, and
    # with repeat=k on top: the sort groups each set's candidates before its references whatever the order.
    cands, pool = _random_set(seed=21, size=40)
    order = [0, 1, 0, 2, 1, 1, 3, 0] * 5
    refs = [list(pool[i]) for i in order]  # copies: dedup by value, not only by object
    _, expected = _pycoco(cands, refs)
    np.testing.assert_allclose(CiderD().score(cands, refs), expected, rtol=0, atol=1e-6)
    k = 4
    per_image = refs[:10]
    _, expected = _pycoco(cands, [per_image[i // k] for i in range(len(cands))])
    np.testing.assert_allclose(CiderD().score(cands, per_image, repeat=k), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_other_ngram_orders_match_the_transcribed_reference(n: int) -> None:
    cands, refs = _random_set(seed=30 + n, size=80)
    expected = _naive_cider(cands, refs, n)
    if n == 4:  # the transcription is pycocoevalcap's algorithm
        np.testing.assert_allclose(expected, _pycoco(cands, refs)[1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(CiderD(n=n).score(cands, refs), expected, rtol=0, atol=1e-6)


def test_rank_compressed_codes_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    # n-gram codes are word ids packed side by side while they fit in the int64 sort key; past that
    # (large vocabularies, high n) they are replaced by ranks.  Force that path with a tiny key budget.
    cands, refs = _random_set(seed=3, size=120)
    expected = CiderD().score(cands, refs)
    fixed_expected = CiderD(df_corpus=refs[:60]).score(cands, refs)
    monkeypatch.setattr(CiderD, "_KEY_BITS", 20)
    np.testing.assert_allclose(CiderD().score(cands, refs), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(CiderD(df_corpus=refs[:60]).score(cands, refs), fixed_expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected, _pycoco(cands, refs)[1], rtol=0, atol=1e-6)


def test_batched_tokenisation_equals_tokenize() -> None:
    # The batched path (one split of the joined texts) is taken only where it equals tokenize():
    # letters/digits and white space, any case.  Punctuation sends the batch through tokenize().
    plain = ["A Dog  runs\tON the  GRASS", "", "  ", "caf\u00e9 n\u00b0 3 2024", "x"]
    punct = plain + ["don't stop: a t-shirt, 3.5 m!"]
    for texts in (plain, punct):
        scorer = CiderD()
        ids, lengths = scorer._encode(texts)
        words = {i: w for w, i in scorer._words.items()}
        got, start = [], 0
        for n_tok in lengths.tolist():
            got.append([words[i] for i in ids[start : start + n_tok].tolist()])
            start += n_tok
        assert got == [tokenize(t) for t in texts]
    split = CiderD(tokenizer=str.split)
    ids, lengths = split._encode(["A b  c", "D\te"])
    assert lengths.tolist() == [3, 2] and len(split._words) == 5  # case kept: "A" and "D" are words


def test_fixed_df_is_stable_across_calls_and_ignores_candidate_ngrams() -> None:
    train_cands, train_refs = _random_set(seed=11, size=100)
    cands, refs = _random_set(seed=12, size=50)
    refs = [rs + ["zebra crossing near a zebra"] for rs in refs]  # n-grams the df corpus lacks
    fresh = CiderD(df_corpus=train_refs).score(cands, refs)
    scorer = CiderD(df_corpus=train_refs)
    scorer.score(train_cands, train_refs)
    first = scorer.score(cands, refs)
    sizes = [t[0].size for t in scorer._tables]
    # New candidate n-grams (RL samples) never enter the tables; cached references give the same numbers.
    junk = [f"quux{i} blorf{i} zebra crossing" for i in range(len(cands))]
    scorer.score(junk, refs)
    assert [t[0].size for t in scorer._tables] == sizes
    np.testing.assert_allclose(scorer.score(cands, refs), first, rtol=0, atol=1e-12)
    np.testing.assert_allclose(first, fresh, rtol=0, atol=1e-12)
    # A candidate n-gram that only a reference (not the corpus) has still matches it, with df 0 -> idf
    # ref_len: "zebra crossing" scores above an unrelated word pair.
    hit = scorer.score(["zebra crossing"], [["zebra crossing near a zebra"]])
    miss = scorer.score(["quux blorf"], [["zebra crossing near a zebra"]])
    assert hit[0] > 0.0 and miss[0] == 0.0
