"""Caption metrics: a fast, vectorised CIDEr-D and corpus BLEU-4.

CIDEr-D follows Vedantam et al. (2015) exactly as implemented by pycocoevalcap's ``cider`` scorer
(n-grams 1..n, tf-idf vectors, clipped hypothesis counts ``min(hyp, ref)``, a Gaussian length
penalty with ``sigma``, mean over references and n-gram orders, x10).  It reproduces that
implementation's numbers (including its quirks, see ``CiderD``) but replaces the per-n-gram Python
dict walks with integer-interned n-grams and numpy array arithmetic, so it is cheap enough to be
the reward of self-critical sequence training (Rennie et al. 2017), where it is called on batches
of hundreds of sampled captions per step.

BLEU-4 is not re-implemented: ``bleu4`` delegates to pycocoevalcap's ``Bleu(4)`` so reported
numbers are the reference ones.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain, count, filterfalse
from itertools import repeat as _forever

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CiderD", "bleu4", "caption_metrics", "tokenize"]

# Words are runs of letters/digits, optionally joined by internal hyphens or apostrophes ("t-shirt",
# "don't") or by a decimal point between digits ("3.5"), which the PTB tokenizer also keeps whole.
# The two leading alternatives accept clitics that are already split off ("n't", "'s"), which keeps
# tokenize() idempotent on its own output.
_TOKEN_RE = re.compile(r"n't\b|'(?:s|re|ve|ll|m|d)\b|[^\W_]+(?:(?:['\-]|(?<=\d)\.(?=\d))[^\W_]+)*")
# PTB splits these clitics off the word ("dog's" -> "dog 's", "can't" -> "ca n't").
_CLITIC_RE = re.compile(r"(.+?)(n't|'(?:s|re|ve|ll|m|d))")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into word tokens, dropping punctuation.

    A pure-Python approximation of the COCO caption pipeline (Stanford PTBTokenizer followed by
    removal of punctuation tokens): clitics are split the PTB way ("don't" -> "do", "n't"),
    hyphenated words stay whole, and punctuation/symbols are dropped.  It is idempotent:
    ``tokenize(" ".join(tokenize(s))) == tokenize(s)``.
    """
    text = text.lower()
    if "\u2019" in text:  # typographic apostrophe, common in scraped captions
        text = text.replace("\u2019", "'")
    tokens = _TOKEN_RE.findall(text)
    if "'" not in text:
        return tokens
    out: list[str] = []
    for tok in tokens:
        m = _CLITIC_RE.fullmatch(tok)
        if m is None:
            out.append(tok)
        else:
            out.extend(m.groups())
    return out


class _RefSet:
    """One reference set, cooked: a table of its distinct n-grams x its references."""

    __slots__ = ("counts", "lengths", "m", "norms", "orders", "uids", "weights")

    def __init__(
        self, m: int, uids: np.ndarray, orders: np.ndarray, counts: np.ndarray, lengths: np.ndarray
    ) -> None:
        self.m = m  # number of references
        self.uids = uids  # (u,) distinct n-gram ids of the set, sorted ascending
        self.orders = orders  # (u,) n-gram order index (length - 1) of each id
        self.counts = counts  # (u, m) term frequency of each n-gram in each reference
        self.lengths = lengths  # (m,) reference lengths as pycocoevalcap defines them
        self.weights: np.ndarray | None = None  # (u,) idf of each id (fixed-df mode only)
        self.norms: np.ndarray | None = None  # (m, n) tf-idf vector norms (fixed-df mode only)


class CiderD:
    """CIDEr-D scorer, numerically equal to pycocoevalcap's ``Cider`` (to float rounding).

    ``df_corpus`` is a list of reference sets (each a list of caption strings).  When given,
    document frequencies and ``ref_len = log(len(df_corpus))`` are computed from it once and kept
    fixed (the usual setting for an RL reward: df from the training captions).  When ``None``,
    every call takes df from the reference sets of that call, one document per candidate, exactly
    as pycocoevalcap's ``compute_score`` does.

    Quirks reproduced on purpose so numbers match the reference implementation:
    the length used by the Gaussian penalty is the number of *bigrams* (``len(tokens) - 1``), and
    n-grams with df 0 get the same idf as df 1 (``log(max(1, df))``).

    Reference sets are cooked once and cached by their tuple of strings (LRU, ``cache_size``
    entries), so repeated references -- k sampled candidates per image, or the same images every
    epoch -- cost a dict lookup.  Strings are passed through ``tokenizer`` (default ``tokenize``;
    pass ``str.split`` for text that is already tokenised).  Instances are not thread-safe.

    Memory: every distinct reference n-gram ever seen is interned (an entry in a dict), and the
    cache holds one small table per reference set; candidate n-grams are never interned.
    """

    def __init__(
        self,
        df_corpus: Sequence[Sequence[str]] | None = None,
        n: int = 4,
        sigma: float = 6.0,
        *,
        tokenizer: Callable[[str], list[str]] = tokenize,
        cache_size: int = 200_000,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.n = int(n)
        self.sigma = float(sigma)
        self._tok = tokenizer
        self._cache_size = max(int(cache_size), 1)
        self._cache: OrderedDict[tuple[str, ...], _RefSet] = OrderedDict()
        self._fixed = df_corpus is not None
        # n-gram (tuple of tokens) -> integer id.  Only reference n-grams are interned, so the
        # junk sampled during RL never grows it: a candidate n-gram that is not interned cannot
        # match any reference and only contributes to the candidate's norm.
        self._ids: dict[tuple[str, ...], int] = {}
        self.ref_len: float | None = None
        self._w = np.empty(0, np.float64)  # idf per id (fixed-df mode)
        if df_corpus is not None:
            self._build_df(df_corpus)

    # ------------------------------------------------------------------ cooking
    def _ngram_counts(self, toks: list[str]) -> Counter:
        # zip over shifted slices builds the n-gram tuples and Counter counts them, both in C.  The
        # slices have different lengths on purpose (zip stops at the shortest), hence strict=False.
        shifted = [toks[j:] for j in range(self.n)]
        return Counter(chain.from_iterable([zip(*shifted[:k], strict=False) for k in range(1, self.n + 1)]))

    def _length(self, n_tokens: int) -> float:
        # pycocoevalcap uses the term frequencies of order-2 n-grams as the "length" of a sentence.
        return float(max(n_tokens - 1, 0)) if self.n >= 2 else 0.0

    def _build_df(self, df_corpus: Sequence[Sequence[str]]) -> None:
        df: Counter = Counter()
        n_docs = 0
        for refs in df_corpus:
            if isinstance(refs, str):
                raise TypeError("df_corpus must be a sequence of reference sets (lists of strings)")
            doc: set[tuple[str, ...]] = set()
            for ref in refs:
                doc.update(self._ngram_counts(self._tok(ref)))
            df.update(doc)
            n_docs += 1
        if n_docs == 0:
            raise ValueError("df_corpus is empty")
        self.ref_len = math.log(float(n_docs))
        self._ids = {g: i for i, g in enumerate(df)}
        dfa = np.fromiter(df.values(), dtype=np.float64, count=len(df))
        self._w = self.ref_len - np.log(np.maximum(dfa, 1.0))
        logger.info("CIDEr-D document frequencies from %d documents, %d n-grams", n_docs, len(df))

    def _weights(self) -> np.ndarray:
        """Idf per interned id (fixed-df mode); ids interned after construction have df 0."""
        if self._w.size < len(self._ids):
            assert self.ref_len is not None
            extra = np.full(len(self._ids) - self._w.size, self.ref_len)
            self._w = np.concatenate([self._w, extra])
        return self._w

    def _cook(self, keys: list[tuple[str, ...]]) -> list[_RefSet]:
        """Cook many reference sets in one vectorised pass (the per-set numpy overhead dominates
        otherwise, and the first RL epoch sees every training image once)."""
        n = self.n
        counters: list[Counter] = []
        lengths: list[float] = []
        for key in keys:
            for ref in key:
                toks = self._tok(ref)
                lengths.append(self._length(len(toks)))
                counters.append(self._ngram_counts(toks))
        grams = list(chain.from_iterable(counters))
        n_e = len(grams)
        ids = self._ids
        # Intern unseen n-grams without a Python-level loop: dedupe them in insertion order, then
        # number them from len(ids) on.
        new = dict.fromkeys(filterfalse(ids.__contains__, grams))
        if new:
            ids.update(zip(new, count(len(ids)), strict=False))
        gid = np.fromiter(map(ids.__getitem__, grams), dtype=np.int64, count=n_e)
        tf = np.fromiter(chain.from_iterable(c.values() for c in counters), dtype=np.float64, count=n_e)
        order = np.fromiter(map(len, grams), dtype=np.int64, count=n_e) - 1

        m_s = np.array([len(k) for k in keys], dtype=np.int64)
        n_refs = int(m_s.sum())
        ref_set = np.repeat(np.arange(len(keys), dtype=np.int64), m_s)
        ref_local = np.arange(n_refs, dtype=np.int64) - np.repeat(np.cumsum(m_s) - m_s, m_s)
        entry_ref = np.repeat(np.arange(n_refs, dtype=np.int64), [len(c) for c in counters])
        e_set = ref_set[entry_ref]
        # One table row per distinct (set, n-gram), rows sorted by (set, id).
        perm = np.lexsort((gid, e_set))
        gid, e_set, tf, order = gid[perm], e_set[perm], tf[perm], order[perm]
        e_k = ref_local[entry_ref[perm]]
        first = np.ones(n_e, dtype=bool)
        first[1:] = (gid[1:] != gid[:-1]) | (e_set[1:] != e_set[:-1])
        row = np.cumsum(first) - 1
        n_rows = int(first.sum())
        table = np.zeros((n_rows, int(m_s.max()) if len(keys) else 0), dtype=np.float64)
        table[row, e_k] = tf
        uids, uorder, useg = gid[first], order[first], e_set[first]
        rows_per_set = np.bincount(useg, minlength=len(keys))
        bounds = np.concatenate([[0], np.cumsum(rows_per_set)])
        ref_bounds = np.concatenate([[0], np.cumsum(m_s)])
        lens = np.array(lengths, dtype=np.float64)

        if self._fixed:
            # df is fixed, so idf and the reference norms can be cooked once.
            uw = self._weights()[uids]
            sq = (table * uw[:, None]) ** 2
            m_max = table.shape[1]
            idx = ((useg * n + uorder)[:, None] * m_max + np.arange(m_max)).ravel()
            norms = np.sqrt(np.bincount(idx, weights=sq.ravel(), minlength=len(keys) * n * m_max))
            norms = norms.reshape(len(keys), n, m_max).transpose(0, 2, 1)

        out: list[_RefSet] = []
        for s, key in enumerate(keys):
            a, b, m = bounds[s], bounds[s + 1], len(key)
            # Copies, so that evicting some sets of this batch from the cache frees their memory.
            rs = _RefSet(
                m,
                uids[a:b].copy(),
                uorder[a:b].copy(),
                table[a:b, :m].copy(),
                lens[ref_bounds[s] : ref_bounds[s + 1]].copy(),
            )
            if self._fixed:
                rs.weights = uw[a:b].copy()
                rs.norms = norms[s, :m].copy()
            out.append(rs)
        return out

    # ------------------------------------------------------------------ scoring
    def score(
        self, candidates: Sequence[str], refs: Sequence[Sequence[str]], *, repeat: int = 1
    ) -> np.ndarray:
        """CIDEr-D of each candidate against its reference set; float64 array of len(candidates).

        ``refs`` is aligned by position.  With ``repeat=k`` (SCST layout, k samples per image stored
        contiguously) ``refs`` holds one set per image and ``candidates[i]`` uses ``refs[i // k]``;
        this is the same as passing each set k times, which is also cheap.
        """
        if isinstance(candidates, str):
            raise TypeError("candidates must be a sequence of strings, not a string")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        n_cand = len(candidates)
        if len(refs) * repeat != n_cand:
            raise ValueError(
                f"{n_cand} candidates but {len(refs)} reference sets (repeat={repeat}); they must align"
            )
        if n_cand == 0:
            return np.zeros(0, dtype=np.float64)
        n = self.n

        # -- distinct reference sets of this call, cooked (or fetched) before the candidates are
        # looked up so that every reference n-gram is interned by then.
        keys: list[tuple[str, ...]] = []
        by_key: dict[tuple[str, ...], int] = {}
        by_obj: dict[int, int] = {}
        alive = []  # keeps the objects referenced so that their id() cannot be recycled meanwhile
        u_of_ref = np.empty(len(refs), dtype=np.int64)
        for j, r in enumerate(refs):
            u = by_obj.get(id(r))
            if u is None:
                if isinstance(r, str):
                    raise TypeError(f"refs[{j}] is a string; each entry must be a list of reference strings")
                key = tuple(r)
                if not key:
                    raise ValueError(f"refs[{j}] is empty; every candidate needs at least one reference")
                u = by_key.get(key)
                if u is None:
                    u = by_key[key] = len(keys)
                    keys.append(key)
                by_obj[id(r)] = u
                alive.append(r)
            u_of_ref[j] = u
        sets = self._lookup(keys)
        u_of_cand = np.repeat(u_of_ref, repeat) if repeat > 1 else u_of_ref
        n_sets = len(sets)
        vocab_size = len(self._ids)

        # -- batch reference table: rows = (set, n-gram), columns = references (zero-padded to m_max).
        m_u = np.array([s.m for s in sets], dtype=np.int64)
        m_max = int(m_u.max())
        rows_u = [s.uids.size for s in sets]
        seg = np.repeat(np.arange(n_sets, dtype=np.int64), rows_u)
        uids = np.concatenate([s.uids for s in sets])
        if (m_u == m_max).all():
            table = np.concatenate([s.counts for s in sets])
        else:
            table = np.zeros((uids.size, m_max), dtype=np.float64)
            start = 0
            for s, r in zip(sets, rows_u, strict=True):
                table[start : start + r, : s.m] = s.counts
                start += r
        ref_lens = np.zeros((n_sets, m_max), dtype=np.float64)
        for u, s in enumerate(sets):
            ref_lens[u, : s.m] = s.lengths

        if self._fixed:
            assert self.ref_len is not None
            ref_len = self.ref_len
            w_ids = self._weights()
            norm_r = np.zeros((n_sets, m_max, n), dtype=np.float64)
            for u, s in enumerate(sets):
                norm_r[u, : s.m] = s.norms
        else:
            # One document per candidate, as pycocoevalcap counts them (a set used k times counts k).
            ref_len = math.log(float(n_cand))
            mult_u = np.bincount(u_of_cand, minlength=n_sets).astype(np.float64)
            df = np.bincount(uids, weights=mult_u[seg], minlength=vocab_size)
            orders = np.concatenate([s.orders for s in sets])
            sq = (table * (ref_len - np.log(np.maximum(df[uids], 1.0)))[:, None]) ** 2
            idx = ((seg * n + orders)[:, None] * m_max + np.arange(m_max)).ravel()
            norm_r = np.sqrt(np.bincount(idx, weights=sq.ravel(), minlength=n_sets * n * m_max))
            norm_r = norm_r.reshape(n_sets, n, m_max).transpose(0, 2, 1)

        # -- candidates: n-gram counts, mapped to interned ids (-1: in no reference seen so far).
        ids_get = self._ids.get
        c_gid: list[int] = []
        c_tf: list[int] = []
        c_len: list[int] = []
        c_size: list[int] = []
        c_ntok: list[int] = []
        for text in candidates:
            toks = self._tok(text)
            c_ntok.append(len(toks))
            c = self._ngram_counts(toks)
            c_gid.extend(map(ids_get, c, _forever(-1)))
            c_tf.extend(c.values())
            c_len.extend(map(len, c))
            c_size.append(len(c))
        gid = np.array(c_gid, dtype=np.int64)
        tf = np.array(c_tf, dtype=np.float64)
        order = np.array(c_len, dtype=np.int64) - 1
        cand = np.repeat(np.arange(n_cand, dtype=np.int64), c_size)
        len_h = np.array([self._length(t) for t in c_ntok], dtype=np.float64)

        # idf of candidate n-grams; one never seen in a reference has df 0 -> idf ref_len.
        known = gid >= 0
        w = np.full(gid.size, ref_len, dtype=np.float64)
        if self._fixed:
            w[known] = w_ids[gid[known]]
        else:  # idf only where needed: the vocabulary can be much larger than this batch
            w[known] = ref_len - np.log(np.maximum(df[gid[known]], 1.0))
        norm_h = np.sqrt(np.bincount(cand * n + order, weights=(tf * w) ** 2, minlength=n_cand * n)).reshape(
            n_cand, n
        )

        # -- clipped dot products: find each candidate n-gram's row in its own set's table, which
        # gives its count in all references at once.  Keys set * V + id are sorted because each
        # set's ids are sorted and sets follow each other.
        cand, gid, tf, order, w = cand[known], gid[known], tf[known], order[known], w[known]
        keys_q = u_of_cand[cand] * vocab_size + gid
        table_keys = seg * vocab_size + uids
        pos = np.searchsorted(table_keys, keys_q)
        np.minimum(pos, max(table_keys.size - 1, 0), out=pos)
        hit = table_keys[pos] == keys_q if table_keys.size else np.zeros(keys_q.size, dtype=bool)
        cand, tf, order, w, pos = cand[hit], tf[hit], order[hit], w[hit], pos[hit]
        tf_r = table[pos]  # (hits, m_max)
        # min(tf_h * idf, tf_r * idf) * tf_r * idf, with idf >= 0 shared by both sides.
        contrib = np.minimum(tf[:, None], tf_r) * tf_r * (w * w)[:, None]
        idx = ((cand[:, None] * m_max + np.arange(m_max)) * n + order[:, None]).ravel()
        num = np.bincount(idx, weights=contrib.ravel(), minlength=n_cand * m_max * n)
        num = num.astype(np.float64, copy=False).reshape(n_cand, m_max, n)  # int64 when nothing matched

        denom = norm_h[:, None, :] * norm_r[u_of_cand]
        # A zero norm means every weight on that side is 0, so the numerator is 0 too; padded
        # reference columns have zero norms and so contribute nothing.
        val = np.divide(num, denom, out=np.zeros_like(num), where=denom != 0)
        delta = len_h[:, None] - ref_lens[u_of_cand]
        penalty = np.exp(-(delta**2) / (2.0 * self.sigma**2))
        per_cand = (val.sum(axis=2) * penalty).sum(axis=1)
        return per_cand * (10.0 / n) / m_u[u_of_cand]

    def _lookup(self, keys: list[tuple[str, ...]]) -> list[_RefSet]:
        """Cached cooked sets for ``keys``; the missing ones are cooked together."""
        cache = self._cache
        found: list[_RefSet | None] = [cache.get(k) for k in keys]
        missing = [i for i, rs in enumerate(found) if rs is None]
        for i, rs in enumerate(found):
            if rs is not None:
                cache.move_to_end(keys[i])
        if missing:
            for i, rs in zip(missing, self._cook([keys[i] for i in missing]), strict=True):
                found[i] = rs
                cache[keys[i]] = rs
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
        return found  # type: ignore[return-value]

    def compute_score(
        self, candidates: Sequence[str], refs: Sequence[Sequence[str]], *, repeat: int = 1
    ) -> tuple[float, np.ndarray]:
        """``(corpus mean, per-candidate scores)``, like pycocoevalcap's ``Cider.compute_score``."""
        scores = self.score(candidates, refs, repeat=repeat)
        return (float(scores.mean()) if scores.size else 0.0), scores


def _check_aligned(candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of strings, not a string")
    if len(candidates) != len(refs):
        raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference sets")


def bleu4(candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 via pycocoevalcap's ``Bleu(4)`` on ``tokenize``d, space-joined text."""
    from pycocoevalcap.bleu.bleu import Bleu  # imported lazily: only needed for evaluation

    _check_aligned(candidates, refs)
    if len(candidates) == 0:
        return 0.0
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (cand, rs) in enumerate(zip(candidates, refs, strict=True)):
        if isinstance(rs, str) or len(rs) == 0:
            raise ValueError(f"refs[{i}] must be a non-empty list of strings")
        gts[i] = [" ".join(tokenize(r)) for r in rs]
        res[i] = [" ".join(tokenize(cand))]
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def caption_metrics(
    candidates: Sequence[str],
    refs: Sequence[Sequence[str]],
    df_corpus: Sequence[Sequence[str]] | None = None,
    *,
    scorer: CiderD | None = None,
) -> dict[str, float]:
    """``{"cider_d": corpus mean CIDEr-D, "bleu4": corpus BLEU-4}``.

    Pass ``scorer`` to reuse a ``CiderD`` (its df setting wins over ``df_corpus``) instead of
    recomputing document frequencies from ``df_corpus`` on every call.
    """
    _check_aligned(candidates, refs)
    cider = scorer if scorer is not None else CiderD(df_corpus)
    mean, _ = cider.compute_score(candidates, refs)
    return {"cider_d": mean, "bleu4": bleu4(candidates, refs)}
