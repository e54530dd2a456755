"""1-D optimal k-means, vector k-means and bit packing (onnxcomp.linalg): no ONNX here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcomp.linalg import bitpack, kmeans


def _brute_force(v: np.ndarray, w: np.ndarray, k: int) -> float:
    """The least weighted SSE over every partition of the sorted values into k contiguous runs
    (optimal 1-D clusters are contiguous)."""
    order = np.argsort(v)
    v, w = v[order], w[order]
    best = np.inf
    for cuts in itertools.combinations(range(1, v.size), k - 1):
        bounds = [0, *cuts, v.size]
        total = 0.0
        for a, b in itertools.pairwise(bounds):
            m = np.average(v[a:b], weights=w[a:b])
            total += float(np.sum(w[a:b] * (v[a:b] - m) ** 2))
        best = min(best, total)
    return best


def _sse(v, w, cl, g=0):
    d = v - cl.centroids[g][cl.labels[g]]
    return float(np.sum(w * d * d))


@pytest.mark.parametrize("seed", range(40))
def test_dp_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 10))
    k = int(rng.integers(1, n))
    v = rng.standard_normal(n) * rng.uniform(0.01, 10)
    w = rng.uniform(0.05, 3.0, n)
    cl = kmeans.kmeans_1d(v, k, w)
    assert _sse(v, w, cl) <= _brute_force(v, w, k) * (1 + 1e-9) + 1e-12


def test_groups_are_solved_independently_and_at_once():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 9))
    together = kmeans.kmeans_1d(values, 3)
    for g in range(6):
        alone = kmeans.kmeans_1d(values[g], 3)
        np.testing.assert_allclose(together.centroids[g], alone.centroids[0], rtol=1e-12)
        assert _sse(values[g], np.ones(9), together, g) <= _brute_force(values[g], np.ones(9), 3) * (1 + 1e-9)


def test_k_equal_to_the_distinct_values_is_exact_and_k_above_is_capped():
    v = np.array([0.5, -1.25, 0.5, 3.0, 1e-30, -1.25], dtype=np.float32)
    cl = kmeans.kmeans_1d(v, 4)
    assert not cl.capped and cl.k == 4
    assert np.array_equal(cl.decoded().astype(np.float32)[0], v)
    over = kmeans.kmeans_1d(v, 16)
    assert over.capped and over.k == 4 and np.array_equal(over.decoded().astype(np.float32)[0], v)


def test_a_big_tensor_is_binned_near_optimal_and_fast_enough():
    rng = np.random.default_rng(2)
    v = rng.standard_normal(2_000_000).astype(np.float32)
    cl = kmeans.kmeans_1d(v, 16)
    assert cl.binned and cl.labels.dtype == np.uint8
    # Lloyd from the optimum of the binned problem cannot do better by much: compare with 30 more
    # Lloyd steps from a quantile seeding, on the raw values
    lloyd = kmeans.kmeans_1d(v, 16, init="quantile")
    mine, theirs = _sse(v, 1.0, cl), _sse(v, 1.0, lloyd)
    assert mine <= theirs * 1.001
    # the classic result for a unit Gaussian at k=16: relative MSE about 0.0095 (Max, 1960)
    assert 0.0090 < mine / v.size < 0.0100


def test_weights_move_centroids_towards_heavy_values():
    v = np.array([0.0, 0.1, 0.2, 1.0, 1.1])
    plain = kmeans.kmeans_1d(v, 2)
    heavy = kmeans.kmeans_1d(v, 2, np.array([1, 1, 100, 1, 1.0]))
    assert abs(heavy.centroids[0, 0] - 0.2) < abs(plain.centroids[0, 0] - 0.2)


def test_zero_weights_and_all_zero_weight_groups_give_finite_centroids():
    v = np.random.default_rng(3).standard_normal((2, 50))
    w = np.ones_like(v)
    w[0] = 0.0
    w[1, :25] = 0.0
    cl = kmeans.kmeans_1d(v, 8, w)
    assert np.all(np.isfinite(cl.centroids))


def test_a_group_spread_over_a_few_denormals_is_binned_without_overflow():
    """A BN-zeroed channel of a real model (PP-OCRv4 rec): hundreds of distinct values within 1e-40,
    more than max_points, so the histogram's scale (bins / spread) overflows float32."""
    v = (np.arange(600, dtype=np.float64) * 1e-43).astype(np.float32)[None, :]
    v = np.concatenate([v, np.random.default_rng(4).standard_normal((1, 600)).astype(np.float32)])
    summaries = kmeans.summarise(v, np.ones_like(v), max_points=64)
    assert all(np.all(np.isfinite(sm.points)) and sm.weights.sum() == 600 for sm in summaries)
    cent = kmeans.fit_centroids(summaries, 16).centroids
    assert np.all(np.isfinite(cent)) and float(np.abs(cent[0]).max()) <= float(v[0].max())


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([1.0, np.inf])])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        kmeans.kmeans_1d(bad, 2)


@pytest.mark.parametrize("init", ["kmeans++", "linear", "quantile"])
def test_lloyd_inits_never_beat_the_optimum(init):
    v = np.random.default_rng(4).standard_normal(3000)
    best = _sse(v, 1.0, kmeans.kmeans_1d(v, 8))
    other = _sse(v, 1.0, kmeans.kmeans_1d(v, 8, init=init, rng=np.random.default_rng(0)))
    assert best <= other * (1 + 1e-9)


def test_row_kmeans_finds_planted_rows():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((4, 3)) * 5
    rows = centres[rng.integers(0, 4, 400)] + 0.01 * rng.standard_normal((400, 3))
    cl = kmeans.kmeans_rows(rows, 4, rng=np.random.default_rng(0))
    err = np.mean(np.sum((cl.decoded() - rows) ** 2, axis=1))
    assert err < 1e-3
    capped = kmeans.kmeans_rows(np.repeat(centres[:2], 10, axis=0), 8)
    assert capped.capped and capped.k == 2


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 9, 1000):
        v = rng.integers(0, 2**bits, n)
        packed = bitpack.pack(v, bits)
        assert packed.dtype == np.uint8 and packed.size == bitpack.packed_size(n, bits)
        assert np.array_equal(bitpack.unpack(packed, bits, n), v)


def test_sub_byte_layout_is_low_bits_first():
    assert bitpack.sub_byte(np.array([1, 2, 3]), 4) == bytes([0x21, 0x03])
    assert bitpack.sub_byte(np.array([1, 2, 3, 0, 1]), 2) == bytes([0b00111001, 0b01])


def test_entropy_bits():
    assert bitpack.entropy_bits(np.array([0, 1, 2, 3] * 10), 4) == pytest.approx(2.0)
    assert bitpack.entropy_bits(np.zeros(10, dtype=int), 4) == 0.0
