"""EVBMF (onnxcomp.linalg.vbmf): the analytic rank estimate on planted low-rank + noise matrices."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.linalg.vbmf import _free_energy, evbmf, evbmf_max_rank, evbmf_rank, evbmf_spectrum, tau_bar


def planted(L: int, M: int, rank: int, signal: float, noise: float, seed: int) -> np.ndarray:
    """A rank-`rank` matrix plus iid N(0, noise^2). Its singular values run from `signal` down to
    `signal`/2 times the noise edge noise * (sqrt(L) + sqrt(M)), the largest singular value of pure
    noise: signal > 2 is clearly detectable."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((L, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((M, rank)))
    s = signal * noise * (np.sqrt(L) + np.sqrt(M)) * np.linspace(1.0, 0.5, rank)
    return (u * s) @ v.T + noise * rng.standard_normal((L, M))


def test_tau_bar_matches_the_papers_constant():
    # For alpha = 1 the threshold constant is tau_bar = 2.5129 (Nakajima et al. 2015).
    assert tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    # and it is the zero of Phi(tau) + Phi(tau/alpha), Phi(z) = log(1+z)/z - 1/2
    phi = lambda z: np.log1p(z) / z - 0.5  # noqa: E731
    for alpha in (0.01, 0.05, 0.3, 0.7):
        t = tau_bar(alpha)
        assert abs(phi(t) + phi(t / alpha)) < 1e-9
    # the paper's approximation tau_bar ~ 2.5129 sqrt(alpha) holds well for moderate alpha
    for alpha in (0.3, 0.7):
        assert tau_bar(alpha) == pytest.approx(2.5129 * np.sqrt(alpha), rel=0.02)


@pytest.mark.parametrize(
    "L,M,rank,seed",
    [(64, 256, 10, 0), (100, 100, 20, 1), (50, 500, 5, 2), (256, 2304, 40, 3), (32, 288, 1, 4)],
)
def test_recovers_planted_rank(L, M, rank, seed):
    x = planted(L, M, rank, signal=4.0, noise=1.0, seed=seed)
    res = evbmf(x)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(1.0, rel=0.1)  # the noise variance is estimated too
    # shrinkage: every kept estimate is positive and below its observed singular value
    assert np.all(res.estimates > 0) and np.all(res.estimates < res.singular_values[:rank])
    assert res.singular_values[rank - 1] > res.threshold > res.singular_values[rank]


@pytest.mark.parametrize("L,M,seed", [(64, 256, 0), (100, 100, 1), (512, 64, 2), (30, 3000, 3)])
def test_pure_noise_gives_rank_zero(L, M, seed):
    rng = np.random.default_rng(seed)
    for scale in (1e-3, 1.0, 50.0):
        assert evbmf_rank(scale * rng.standard_normal((L, M))) == 0


def test_tall_matrix_is_transposed():
    x = planted(300, 60, 7, signal=4.0, noise=1.0, seed=5)
    a, b = evbmf(x), evbmf(x.T)
    assert a.rank == b.rank == 7
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-9)


def test_signal_below_detectability_is_not_kept():
    # A spike below the phase transition (LM)^(1/4) noise ~ 13.9 here does not leave the noise bulk,
    # so no method can detect it; EVBMF must not invent components.
    x = planted(64, 576, 8, signal=0.4, noise=1.0, seed=6)
    assert evbmf_rank(x) == 0


def test_exact_low_rank_without_noise():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 90))
    assert evbmf_rank(x) == 6


def test_known_noise_variance_and_spectrum_entry_point():
    x = planted(80, 400, 12, signal=4.0, noise=0.5, seed=8)
    s = np.linalg.svd(x, compute_uv=False)
    assert evbmf_spectrum(s, x.shape).rank == 12
    assert evbmf_spectrum(s, x.shape, sigma2=0.25).rank == 12
    # an absurdly large noise variance explains everything away
    assert evbmf_spectrum(s, x.shape, sigma2=1e6).rank == 0
    with pytest.raises(ValueError):
        evbmf_spectrum(s[:5], x.shape)
    assert evbmf_spectrum(np.zeros(5), (5, 9)).rank == 0


def test_non_finite_input_raises_value_error():
    x = planted(20, 40, 3, signal=4.0, noise=1.0, seed=9)
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            evbmf(y)
        with pytest.raises(ValueError, match="NaN or inf"):
            evbmf_spectrum(np.r_[np.linalg.svd(x, compute_uv=False)[:-1], bad], x.shape)


def test_tiny_matrices_and_the_largest_possible_rank():
    # EVBMF keeps at most ceil(L / (1 + L/M)) - 1 components: none for 1 x M or 2 x 2.
    assert evbmf_max_rank((1, 500)) == 0 and evbmf_max_rank((500, 1)) == 0
    assert evbmf_max_rank((2, 2)) == 0 and evbmf_max_rank((3, 3)) == 1 and evbmf_max_rank((100, 100)) == 49
    assert evbmf_max_rank((10, 1000)) == 9 and evbmf_max_rank((0, 5)) == 0
    rng = np.random.default_rng(10)
    for shape in [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (4, 4)]:
        x = 10.0 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))  # rank 1, no noise
        res = evbmf(x + 1e-3 * rng.standard_normal(shape))
        assert 0 <= res.rank <= evbmf_max_rank(shape)
        assert np.isfinite(res.sigma2) and res.sigma2 >= 0
    # a strong rank-3 signal in a 4 x 4 matrix: the bound (1) wins over the data
    q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    assert evbmf((q[:, :3] * [100.0, 90.0, 80.0]) @ q[:, :3].T).rank <= 1


def test_noise_variance_is_the_free_energy_minimiser():
    # The estimated sigma^2 must minimise Omega (Nakajima et al. 2015) over the admissible interval
    # [max(gamma_{H+1}^2 / (M x_bar), mean_{h > H} gamma_h^2 / M), ||V||^2 / (L M)]; Omega is not
    # unimodal, so a dense brute-force grid checks the grid + refinement search.
    for L, M, rank, seed in [(40, 300, 6, 11), (64, 64, 10, 12), (30, 90, 2, 13)]:
        x = planted(L, M, rank, signal=2.5, noise=0.7, seed=seed)
        res = evbmf(x)
        s2 = res.singular_values**2
        alpha = L / M
        tb = tau_bar(alpha)
        x_bar = (1 + tb) * (1 + alpha / tb)
        H = int(np.ceil(L / (1 + alpha))) - 1
        lo = max(s2[H] / (M * x_bar), s2[H:].mean() / M)
        hi = s2.sum() / (L * M)
        grid = np.linspace(lo, hi, 20001)
        omega = _free_energy(grid, s2, M, alpha, x_bar)
        assert lo <= res.sigma2 <= hi
        assert _free_energy(np.array([res.sigma2]), s2, M, alpha, x_bar)[0] <= omega.min() + 1e-9
        # and the threshold / shrinkage follow from it (Nakajima et al. 2013, 2015)
        assert res.threshold == pytest.approx(np.sqrt(M * res.sigma2 * x_bar), rel=1e-12)
        g = res.singular_values[: res.rank]
        q = 1 - (L + M) * res.sigma2 / g**2
        np.testing.assert_allclose(res.estimates, g / 2 * (q + np.sqrt(q**2 - 4 * L * M * res.sigma2**2 / g**4)))
