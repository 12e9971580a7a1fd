"""Near duplicates: pHash properties, the descriptor on real photos, grouping on hand-made inputs,
evidence strings and representative policies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from mmplatform.data import neardup as nd

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_sample_images()
    return {name.rsplit("/", 1)[-1].split(".")[0]: Image.fromarray(arr)
            for name, arr in zip(data.filenames, data.images, strict=True)}


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, f: float, corner: str) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * f), round(h * f)
    x = 0 if corner[1] == "l" else w - cw
    y = 0 if corner[0] == "t" else h - ch
    return im.crop((x, y, x + cw, y + ch))


def _copies(im: Image.Image) -> list[Image.Image]:
    """Edits the descriptor promises to survive (the bench's kinds)."""
    w, h = im.size
    rotated = im.rotate(-8, resample=Image.BICUBIC, fillcolor=(0, 0, 0))
    return [
        im.resize((w // 2, h // 2), Image.LANCZOS),
        _jpeg(im, 30),
        _crop(im, 0.85, "br"),
        ImageEnhance.Brightness(im).enhance(1.25),
        im.rotate(7, resample=Image.BICUBIC, fillcolor=(0, 0, 0)),
        rotated.crop((int(0.1 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h))),
    ]


def _best_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The pair score the grouping uses: whole view of one against any view of the other."""
    return float(max((a[0] @ b.T).max(), (b[0] @ a.T).max()))


# ---------------------------------------------------------------------------------------------------- pHash


def test_phash_of_a_constant_image_is_the_dc_bit_only():
    # All AC coefficients are 0 and the DC is positive: median 0, only the first (DC) bit exceeds it.
    ph, _ = nd.image_signature(Image.new("RGB", (40, 30), (120, 120, 120)))
    assert ph == 1 << 63


def test_phash_identical_resized_recompressed_and_unrelated(photos):
    china, flower = photos["china"], photos["flower"]
    h_china = nd.image_signature(china)[0]
    assert nd.image_signature(china.copy())[0] == h_china
    assert nd.phash_distance(h_china, nd.image_signature(china.resize((320, 214), Image.LANCZOS))[0]) <= 2
    assert nd.phash_distance(h_china, nd.image_signature(_jpeg(china, 30))[0]) <= 4
    assert nd.phash_distance(h_china, nd.image_signature(flower)[0]) >= 20


def test_phash_distance_counts_bits():
    assert nd.phash_distance(0, 0) == 0
    assert nd.phash_distance(0b1011, 0b0001) == 2
    assert nd.phash_distance(0, (1 << 64) - 1) == 64


# ---------------------------------------------------------------------------------------------- descriptor


def test_signature_shape_norm_and_size_independence(photos):
    china = photos["china"]
    ph, views = nd.image_signature(china)
    assert views.shape == (nd.N_VIEWS, nd.DESCRIPTOR_DIM) == (10, 128)
    assert views.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(views, axis=1), 1.0, atol=1e-5)
    # A 2x smaller and a 2x larger input give (nearly) the same signature: it is computed on a 64x64 copy.
    for size in ((320, 214), (1280, 854)):
        ph2, views2 = nd.image_signature(china.resize(size, Image.LANCZOS))
        assert nd.phash_distance(ph, ph2) <= 2
        assert float(views[0] @ views2[0]) > 0.995


def test_descriptor_matches_edited_copies_and_separates_photos(photos):
    sigs = {name: nd.image_signature(im)[1] for name, im in photos.items()}
    for name, im in photos.items():
        for k, copy in enumerate(_copies(im)):
            score = _best_cosine(sigs[name], nd.image_signature(copy)[1])
            assert score >= nd.DEFAULT_COSINE_THRESHOLD, (name, k, score)
    assert _best_cosine(sigs["china"], sigs["flower"]) < 0.7


def test_real_photos_form_two_groups_without_cross_edges(photos):
    names, images = [], []
    for name, im in sorted(photos.items()):
        for k, copy in enumerate([im, *_copies(im)]):
            names.append(f"{name}_{k}")
            images.append(copy)
    sigs = [nd.image_signature(im) for im in images]
    res = nd.find_near_duplicates(names, [s[0] for s in sigs], np.stack([s[1] for s in sigs]))
    half = len(names) // 2
    assert res.groups == [list(range(half)), list(range(half, len(names)))]
    assert all((i < half) == (j < half) for i, j in res.edges)
    # Same answer from the thin wrapper and with connected linkage.
    assert nd.near_duplicate_groups(names, [s[0] for s in sigs], np.stack([s[1] for s in sigs]),
                                    hamming_radius=4, cosine_threshold=0.94, linkage="connected") == res.groups


def test_mirror_image_is_not_a_near_duplicate(photos):
    # Captions say "left of": a mirrored image is a different training sample.
    im = photos["china"]
    assert _best_cosine(nd.image_signature(im)[1],
                        nd.image_signature(im.transpose(Image.FLIP_LEFT_RIGHT))[1]) < 0.9


# ------------------------------------------------------------------------------------------------ grouping


FAR = 0xFFFF_FFFF_0000_0000  # 32 bits from 0


def test_hamming_pairs_radius_is_inclusive():
    hashes = [0b0, 0b1, 0b11, 0b111, FAR]
    pairs = nd.hamming_pairs(hashes, 2)
    assert pairs == {(0, 1): 1, (0, 2): 2, (1, 2): 1, (1, 3): 2, (2, 3): 1}
    assert nd.hamming_pairs(hashes, -1) == {}
    # numpy uint64 input works the same, including the top bit
    assert nd.hamming_pairs(np.array([1 << 63, (1 << 63) | 1], dtype=np.uint64), 1) == {(0, 1): 1}


def test_groups_from_hashes_only():
    ids = list("abcde")
    hashes = [0b0, 0b1, 0b11, FAR, FAR | 0b101]
    groups = nd.near_duplicate_groups(ids, hashes, None, hamming_radius=2, cosine_threshold=0.9,
                                      linkage="connected")
    assert groups == [[0, 1, 2], [3, 4]]
    assert nd.near_duplicate_groups(ids, hashes, None, hamming_radius=0, cosine_threshold=0.9) == []


def _unit(*angles_deg: float) -> np.ndarray:
    a = np.deg2rad(np.array(angles_deg))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_cosine_pairs_threshold_and_views():
    # 2-D unit vectors at angles 0, 10, 40 degrees: cos(10) = 0.985, cos(30) = 0.866, cos(40) = 0.766.
    emb = _unit(0, 10, 40)
    pairs = nd.cosine_pairs(emb, 0.85)
    assert set(pairs) == {(0, 1), (1, 2)}
    assert pairs[(0, 1)] == pytest.approx(np.cos(np.deg2rad(10)), abs=1e-6)
    # Multi-view: image 1's whole view is far from image 0's, but one of image 0's views equals it.
    views = np.zeros((2, 2, 2), dtype=np.float32)
    views[0] = _unit(0, 90)
    views[1] = _unit(90, 180)
    assert nd.cosine_pairs(views, 0.99) == {(0, 1): pytest.approx(1.0)}
    assert nd.cosine_pairs(views[:, :1], 0.99) == {}
    with pytest.raises(ValueError, match="embeddings"):
        nd.cosine_pairs(np.zeros(4), 0.9)


def test_ivf_search_finds_the_same_pairs_as_exact():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(150, 32)).astype(np.float32)
    noisy = base + 0.05 * rng.normal(size=base.shape).astype(np.float32)
    emb = np.concatenate([base, noisy])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    exact = nd.cosine_pairs(emb, 0.95)
    approx = nd.cosine_pairs(emb, 0.95, exact_max_n=0)
    assert set(exact) == {(i, i + 150) for i in range(150)}
    assert set(approx) == set(exact)


def _chain_edges(*cosines: float) -> dict[tuple[int, int], nd.Match]:
    return {(i, i + 1): nd.Match(cosine=c) for i, c in enumerate(cosines)}


def test_linkages_on_a_chain():
    # 0-1-2-3-4, each linked only to its neighbours: connected merges the chain, star keeps every member
    # directly linked to a centre, complete keeps only mutually linked pairs (strongest first).
    edges = _chain_edges(0.99, 0.97, 0.98, 0.96)
    assert nd.group_edges(5, edges, "connected") == [[0, 1, 2, 3, 4]]
    assert nd.group_edges(5, edges, "star") == [[0, 1, 2], [3, 4]]
    assert nd.group_edges(5, edges, "complete") == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="linkage"):
        nd.group_edges(5, edges, "single")


def test_complete_linkage_merges_cliques():
    edges = {k: nd.Match(cosine=0.95) for k in [(0, 1), (0, 2), (1, 2), (2, 3)]}
    assert nd.group_edges(4, edges, "complete") == [[0, 1, 2]]


def test_hash_match_needs_cosine_corroboration():
    ids = ["a", "b", "c"]
    hashes = [0, 0b1, FAR]
    emb = _unit(0, 30, 90)  # cos(a, b) = 0.866
    edges = nd.near_duplicate_edges(hashes, emb, hamming_radius=2, cosine_threshold=0.95, hash_min_cosine=0.9)
    assert edges == {}
    edges = nd.near_duplicate_edges(hashes, emb, hamming_radius=2, cosine_threshold=0.95, hash_min_cosine=0.85)
    assert edges == {(0, 1): nd.Match(hamming=1, cosine=pytest.approx(0.866, abs=1e-3))}
    edges = nd.near_duplicate_edges(hashes, emb, hamming_radius=2, cosine_threshold=0.95, hash_min_cosine=None)
    assert list(edges) == [(0, 1)] and edges[(0, 1)].hamming == 1
    res = nd.find_near_duplicates(ids, hashes, emb, hamming_radius=2, cosine_threshold=0.8, hash_min_cosine=0.9)
    assert res.edges == {(0, 1): nd.Match(hamming=None, cosine=pytest.approx(0.866, abs=1e-3))}


def test_evidence_and_reasons():
    assert nd.Match(hamming=4).describe() == "hamming 4"
    assert nd.Match(cosine=0.96234).describe() == "cosine 0.962"
    assert nd.Match(hamming=2, cosine=0.951).describe() == "hamming 2, cosine 0.951"
    ids = ["s0", "s1", "s2"]
    res = nd.NearDuplicates(ids=ids, groups=[[0, 1, 2]],
                            edges={(0, 1): nd.Match(hamming=3), (1, 2): nd.Match(cosine=0.95)})
    assert res.reason(1, 0) == "near_duplicate: of s0 (hamming 3)"
    assert res.reason(2, 0) == "near_duplicate: of s0 (via s1: cosine 0.950)"
    assert res.match(1, 0) == res.match(0, 1) == nd.Match(hamming=3)
    assert res.match(0, 2) is None
    with pytest.raises(ValueError, match="not in one group"):
        nd.NearDuplicates(ids=ids, groups=[[0, 1]], edges={(0, 1): nd.Match(hamming=1)}).how(2, 0)


def test_input_lengths_are_checked():
    with pytest.raises(ValueError, match="phashes has 1 rows for 2 ids"):
        nd.find_near_duplicates(["a", "b"], [0], None)
    assert nd.find_near_duplicates(["a"], [0], np.ones((1, 2), np.float32)).groups == []


# ----------------------------------------------------------------------------------------- representatives


RECORDS = [
    {"sample_id": "c", "width": 100, "height": 100, "captions": ["x"]},
    {"sample_id": "b", "width": 200, "height": 100, "captions": []},
    {"sample_id": "a", "width": 200, "height": 100, "captions": ["x", "y"]},
    {"sample_id": "d", "width": 50, "height": 50, "captions": ["x", "y", "z"]},
    {"sample_id": "f", "width": 64, "height": 64, "captions": ["x"]},
    {"sample_id": "e", "width": 64, "height": 64, "captions": ["x"]},
]


@pytest.mark.parametrize(("policy", "expected"), [
    ("largest", {0: 2, 1: 5}),  # 2: most pixels tied with 1, more captions; 5: full tie, smaller sample_id
    ("most_captions", {0: 3, 1: 5}),
    ("first", {0: 0, 1: 4}),
])
def test_choose_representatives(policy, expected):
    groups = [[0, 1, 2, 3], [4, 5]]
    assert nd.choose_representatives(groups, RECORDS, policy) == expected


def test_choose_representatives_rejects_unknown_policy_and_empty_group():
    with pytest.raises(ValueError, match="policy"):
        nd.choose_representatives([[0]], RECORDS, "best")
    with pytest.raises(ValueError, match="empty"):
        nd.choose_representatives([[]], RECORDS)
    # caption counts instead of lists are accepted
    assert nd.choose_representatives([[0, 1]], [{"sample_id": "x", "width": 1, "height": 1, "captions": 3},
                                                {"sample_id": "y", "width": 1, "height": 1, "captions": 1}],
                                     "most_captions") == {0: 0}
