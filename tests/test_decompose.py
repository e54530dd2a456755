"""onnxcomp.linalg.decompose: Tucker / SVD decompositions, rank rules, MAC budget, least squares."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcomp.linalg import decompose as d


def low_rank_conv(T=32, S=24, k=3, r_out=6, r_in=5, noise=0.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, k, k))
    uo, _ = np.linalg.qr(rng.standard_normal((T, r_out)))
    ui, _ = np.linalg.qr(rng.standard_normal((S, r_in)))
    w = np.einsum("abhw,ta,sb->tshw", core, uo, ui)
    return w + noise * rng.standard_normal(w.shape)


def _roundoff_bound(w: np.ndarray) -> float:
    """What float64 guarantees for an exact decomposition's reported error.

    The error is 1 - kept / total, two sums of w.size squares; each sum carries a relative round-off of
    at most w.size * eps (the worst case of recursive summation), so their difference can be anywhere in
    [0, 2 * w.size * eps] even when the decomposition is exact (seen: 0 on one BLAS, 2.6e-16 on another).
    """
    return 2.0 * w.size * np.finfo(np.float64).eps


def test_unfold_and_mode_basis_match_numpy_svd():
    w = np.random.default_rng(0).standard_normal((12, 7, 3, 3))
    assert d.unfold(w, 1).shape == (7, 12 * 9)
    assert np.array_equal(d.unfold(w, 0), w.reshape(12, -1))
    for mode in (0, 1):
        m = d.unfold(w, mode)
        s = np.linalg.svd(m, compute_uv=False)
        basis = d.mode_basis(w, mode)
        np.testing.assert_allclose(basis.energy[: s.size], s**2, rtol=1e-9, atol=1e-9)
        u = basis.vectors(4)
        np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-10)
        # spans the top-4 left singular subspace
        uu = np.linalg.svd(m, full_matrices=False)[0][:, :4]
        np.testing.assert_allclose(np.abs(np.linalg.svd(u.T @ uu, compute_uv=False)), 1.0, atol=1e-8)
    np.testing.assert_allclose(d.mode_energy(w, 1), d.mode_basis(w, 1).energy, rtol=1e-9, atol=1e-9)


def test_tall_unfolding_basis_is_completed():
    # the RGB stem: 16 output channels but only 3*1*1 = 3 columns in the mode-0 unfolding
    w = np.random.default_rng(1).standard_normal((16, 3, 1, 1))
    basis = d.mode_basis(w, 0)
    assert basis.energy.shape == (16,) and np.all(basis.energy[3:] == 0)
    t = d.tucker_decompose(w, 8, None)  # rank above the unfolding's rank: still orthonormal
    np.testing.assert_allclose(t.out_factor.T @ t.out_factor, np.eye(8), atol=1e-10)
    assert t.error <= _roundoff_bound(w)


@pytest.mark.parametrize("r_out,r_in", [(32, 24), (None, 24), (32, None), (None, None)])
def test_full_rank_is_exact(r_out, r_in):
    w = np.random.default_rng(2).standard_normal((32, 24, 3, 3))
    t = d.tucker_decompose(w, r_out, r_in)
    np.testing.assert_allclose(t.reconstruct(), w, atol=1e-10)
    assert t.error <= _roundoff_bound(w)


def test_planted_tucker_rank_is_recovered_exactly():
    w = low_rank_conv()
    t = d.tucker_decompose(w, 6, 5)
    assert t.core.shape == (6, 5, 3, 3)
    np.testing.assert_allclose(t.reconstruct(), w, atol=1e-10)
    # and EVBMF finds the planted ranks on each mode when noise is added
    noisy = low_rank_conv(T=64, S=48, r_out=9, r_in=7, noise=0.02, seed=3)
    assert d.evbmf_mode_rank(noisy, 0) == 9
    assert d.evbmf_mode_rank(noisy, 1) == 7


def test_hooi_matches_tensorly_partial_tucker():
    from tensorly.decomposition import partial_tucker

    w = low_rank_conv(T=40, S=30, r_out=12, r_in=10, noise=0.3, seed=4)
    ours = d.tucker_decompose(w, 8, 6, n_iter_max=50, tol=1e-12)
    (core, _factors), _ = partial_tucker(w, rank=[8, 6], modes=[0, 1], init="svd", n_iter_max=50, tol=1e-12)
    theirs = 1.0 - float(np.sum(core**2)) / float(np.sum(w**2))
    assert ours.error == pytest.approx(theirs, rel=1e-6)
    assert ours.error == pytest.approx(d.relative_error(w, ours.reconstruct()), rel=1e-9)
    # HOOI never ends worse than its HOSVD start
    assert ours.error <= d.tucker_decompose(w, 8, 6, n_iter_max=0).error + 1e-12


def test_single_mode_truncation_is_the_optimal_svd():
    w = np.random.default_rng(5).standard_normal((20, 9, 3, 3))
    t = d.tucker_decompose(w, 7, None)
    tail = d.tail_fraction(d.mode_energy(w, 0))
    assert t.error == pytest.approx(tail[7], rel=1e-9)  # Eckart-Young
    assert t.error == pytest.approx(d.relative_error(w, t.reconstruct()), rel=1e-9)
    a, b = d.truncated_svd(w.reshape(20, -1), 7)
    assert d.relative_error(w.reshape(20, -1), a @ b) == pytest.approx(tail[7], rel=1e-9)


def test_rank_rules():
    assert d.fraction_rank(64, 0.5) == 32 and d.fraction_rank(10, 0.01) == 1 and d.fraction_rank(64, 1.0) == 64
    e = np.array([50.0, 30.0, 10.0, 5.0, 5.0])
    assert d.energy_rank(e, 0.8) == 2 and d.energy_rank(e, 0.81) == 3 and d.energy_rank(e, 1.0) == 5
    np.testing.assert_allclose(d.tail_fraction(e), [1.0, 0.5, 0.2, 0.1, 0.05, 0.0])
    assert d.weaken_rank(512, 100, 1.0) == 100
    assert d.weaken_rank(512, 100, 0.0) == 512
    assert d.weaken_rank(512, 100, 0.5) == 306
    assert d.round_rank(20, 16, 512) == 16  # nearest multiple
    assert d.round_rank(24, 16, 512) == 32  # halves round up
    assert d.round_rank(3, 16, 512) == 16  # never below one multiple
    assert d.round_rank(500, 16, 384) == 384  # never above the dimension
    assert d.round_rank(5, 1, 64, min_rank=8) == 8
    assert d.rank_grid(64, 16) == [16, 32, 48, 64]
    assert d.rank_grid(50, 16, min_rank=20) == [32, 48, 50]


def test_chain_cost_counts_every_layer():
    c = d.ChainCost(out_channels=128, in_channels=64, ksize=9, pos_in=32 * 32, pos_out=16 * 16)
    assert c.original == 16 * 16 * 128 * 64 * 9
    assert c.tucker(32, 16) == 32 * 32 * 64 * 16 + 16 * 16 * (16 * 32 * 9 + 32 * 128)
    assert c.tucker(32, None) == 16 * 16 * (64 * 32 * 9 + 32 * 128)
    assert c.tucker(None, 16) == 32 * 32 * 64 * 16 + 16 * 16 * 16 * 128 * 9
    assert c.tucker(None, None) == c.original


def test_rank_options_form_a_pareto_front_and_best_under():
    w = low_rank_conv(T=64, S=48, r_out=20, r_in=16, noise=0.1, seed=6)
    cost = d.ChainCost(64, 48, 9, 100.0, 100.0)
    t_out, t_in = d.tail_fraction(d.mode_energy(w, 0)), d.tail_fraction(d.mode_energy(w, 1))
    opts = d.rank_options(cost, t_out, t_in, multiple=8)
    macs = [o.macs for o in opts]
    errs = [o.error for o in opts]
    assert macs == sorted(macs) and all(a > b for a, b in itertools.pairwise(errs))
    # every option's estimate lies between the larger tail and the HOSVD bound (sum of tails)
    for o in opts:
        to = t_out[o.r_out or 64]
        ti = t_in[o.r_in or 48]
        assert max(to, ti) - 1e-12 <= o.error <= to + ti + 1e-12
    best = d.best_under(opts, 0.3 * cost.original)
    assert best is not None and best.macs <= 0.3 * cost.original
    # brute force over the same grid agrees
    grid = [(ro, ri) for ro in d.rank_grid(64, 8) for ri in d.rank_grid(48, 8) if (ro, ri) != (64, 48)]
    feasible = []
    for ro, ri in grid:
        r_out, r_in = (None if ro == 64 else ro), (None if ri == 48 else ri)
        if cost.tucker(r_out, r_in) <= 0.3 * cost.original:
            feasible.append(1 - (1 - t_out[ro]) * (1 - t_in[ri]))
    assert best.error == pytest.approx(min(feasible))
    assert d.best_under(opts, 1.0) is None


def test_allocate_budget_greedy():
    # Two layers: layer 0 compresses almost for free, layer 1 is costly to compress.
    cheap = [d.RankOption(8, None, 30.0, 0.01), d.RankOption(4, None, 10.0, 0.05)]
    dear = [d.RankOption(8, None, 60.0, 0.30), d.RankOption(4, None, 20.0, 0.60)]
    # start: 10 + 100 + 100 = 210; the best error per MAC saved is layer 0's first option
    choice, total = d.allocate_budget([(100.0, cheap), (100.0, dear)], target_macs=140.0, fixed_macs=10.0)
    assert choice == [0, None] and total == 140.0
    choice, total = d.allocate_budget([(100.0, cheap), (100.0, dear)], target_macs=80.0, fixed_macs=10.0)
    assert choice == [1, 0] and total == 80.0
    # unreachable target: everything at its cheapest, reported honestly
    choice, total = d.allocate_budget([(100.0, cheap), (100.0, dear)], target_macs=1.0)
    assert choice == [1, 1] and total == 30.0
    assert d.allocate_budget([(100.0, cheap)], target_macs=500.0) == ([None], 100.0)


def test_least_squares_accumulates_batches():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((500, 6))
    w_true, b_true = rng.standard_normal((6, 4)), rng.standard_normal(4)
    y = z @ w_true + b_true + 0.01 * rng.standard_normal((500, 4))
    ls = d.LeastSquares(6, 4, bias=True)
    for k in range(0, 500, 128):
        ls.add(z[k : k + 128], y[k : k + 128])
    w, b = ls.solve(ridge=0.0)
    ref = np.linalg.lstsq(np.c_[z, np.ones(500)], y, rcond=None)[0]
    np.testing.assert_allclose(w, ref[:6], atol=1e-9)
    np.testing.assert_allclose(b, ref[6], atol=1e-9)
    direct = float(np.sum((y - z @ w - b) ** 2) / np.sum(y**2))
    assert ls.residual(w, b) == pytest.approx(direct, rel=1e-6)
    assert ls.residual(w_true, None) > ls.residual(w, b)
    nobias = d.LeastSquares(6, 4, bias=False)
    nobias.add(z, z @ w_true)
    w0, b0 = nobias.solve()
    assert b0 is None and np.allclose(w0, w_true, atol=1e-4)


def test_response_projection_reconstructs_low_rank_responses():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 10))
    b = rng.standard_normal(16)
    x = rng.standard_normal((2000, 3)) @ rng.standard_normal((3, 10))  # inputs on a 3-D subspace
    y = x @ w.T + b
    stats = d.ResponseStats(16)
    stats.add(y[:1000])
    stats.add(y[1000:])
    vals, vecs = stats.principal()
    assert np.all(vals[3:] < 1e-8 * vals[0])  # responses have rank 3 around their mean
    w1, w2, b2 = d.response_projection(w, b, vecs[:, :3], stats.mean)
    assert w1.shape == (3, 10) and w2.shape == (16, 3)
    np.testing.assert_allclose(x @ w1.T @ w2.T + b2, y, atol=1e-8)


def test_mode_basis_paths_agree_and_large_layers_use_float32():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((12, 30)) * np.linspace(3, 0.1, 12)[:, None]
    lazy = d.ModeBasis(w)
    u_full = lazy.vectors(10)  # more than half the vectors before the spectrum: one full eigh
    assert lazy._energy is not None
    fresh = d.ModeBasis(w)
    _ = fresh.energy
    u_sub = fresh.vectors(10)  # spectrum first, then only the top 10 eigenvectors
    np.testing.assert_allclose(np.abs(u_full.T @ u_sub), np.eye(10), atol=1e-8)
    np.testing.assert_allclose(lazy.energy, fresh.energy, rtol=1e-12)
    # a dense layer above the float32 threshold: same optimum as float64 math
    big = rng.standard_normal((1100, 4000)).astype(np.float32)
    big[:, :40] *= 30.0
    t = d.tucker_decompose(big, 64, None)
    assert t.core.dtype == np.float32
    s = np.linalg.svd(big.astype(np.float64), compute_uv=False)
    assert t.error == pytest.approx(float(np.sum(s[64:] ** 2) / np.sum(s**2)), rel=1e-4)
    # the float32 path: spectrum still accurate where it matters, factors orthonormal to float32 precision
    basis = d.ModeBasis(big)
    np.testing.assert_allclose(basis.energy[:100], s[:100] ** 2, rtol=1e-4)
    u = basis.vectors(64)
    assert u.dtype == np.float32
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.eye(64), atol=1e-5)


def test_allocate_budget_spreads_cuts_instead_of_wrecking_the_largest_layer():
    # Flat spectra (random weights): keeping r of 10 components costs r/10 of the layer's MACs and
    # loses 1 - r/10 of its energy. Summed relative errors cost the same per MAC saved at every r,
    # so a sum-of-errors greedy sent the largest layer straight to r = 1 (90% error) and the next
    # one too (kept product 0.01). The product objective spreads the cuts.
    def flat(orig):
        return [d.RankOption(r, None, orig * r / 10, 1 - r / 10) for r in range(1, 10)]

    layers = [(100.0, flat(100.0)), (300.0, flat(300.0)), (200.0, flat(200.0))]
    choice, total = d.allocate_budget(layers, target_macs=300.0)

    def kept(ch):
        return np.prod([1.0 if j is None else 1.0 - layers[i][1][j].error for i, j in enumerate(ch)])

    def macs(ch):
        return sum(layers[i][0] if j is None else layers[i][1][j].macs for i, j in enumerate(ch))

    assert total == macs(choice) <= 300.0
    assert max(layers[i][1][j].error for i, j in enumerate(choice) if j is not None) < 0.9
    best = max(kept(ch) for ch in itertools.product(*[[None, *range(9)]] * 3) if macs(ch) <= 300.0)
    assert kept(choice) >= 0.9 * best  # greedy, but close to the brute-force optimum (0.150 vs 0.162)
    # a layer with a free option (zero error) is cut first and fully
    free = [d.RankOption(2, None, 20.0, 0.0), d.RankOption(1, None, 10.0, 0.5)]
    assert d.allocate_budget([(100.0, flat(100.0)), (100.0, free)], target_macs=150.0) == ([None, 0], 120.0)


def test_squared_norm_is_float64_accurate_without_copies():
    a = np.random.default_rng(10).standard_normal((300, 7001)).astype(np.float32).T  # a transposed view
    ref = float(np.sum(a.astype(np.float64) ** 2))
    assert d.squared_norm(a, chunk=4096) == pytest.approx(ref, rel=1e-12)
    assert d.squared_norm(np.zeros((0, 3))) == 0.0


def test_ridge_pulls_towards_the_prior_and_merge_adds_rows():
    rng = np.random.default_rng(11)
    z = rng.standard_normal((60, 5))
    w0, b0 = rng.standard_normal((5, 3)), rng.standard_normal(3)
    y = z @ (w0 + 0.3 * rng.standard_normal((5, 3))) + b0
    a, b = d.LeastSquares(5, 3), d.LeastSquares(5, 3)
    a.add(z[:40], y[:40])
    b.add(z[40:], y[40:])
    b.add(z[:0], y[:0])  # empty batches are fine
    both = a.merged(b)
    assert both.count == 60
    ref = d.LeastSquares(5, 3)
    ref.add(z, y)
    for got, want in zip(both.solve(1e-3), ref.solve(1e-3), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    # an overwhelming ridge keeps W at the prior and fits only the (never penalised) bias
    w, bias = both.solve(1e9, prior=w0)
    np.testing.assert_allclose(w, w0, atol=1e-6)
    np.testing.assert_allclose(bias, (y - z @ w0).mean(axis=0), atol=1e-6)


def _refit_problem(n_train, n_held, p=12, q=6, shift=0.0, seed=0):
    """Y = Z W_old + noise (+ a bias shift the old weights miss): the old weights are the truth up
    to that shift, so only the bias is worth refitting."""
    rng = np.random.default_rng(seed)
    w_old = rng.standard_normal((p, q))
    systems = []
    for n in (n_train, n_held):
        s = d.LeastSquares(p, q)
        z = rng.standard_normal((n, p))
        s.add(z, z @ w_old + shift + 0.5 * rng.standard_normal((n, q)))
        systems.append(s)
    test = d.LeastSquares(p, q)
    z = rng.standard_normal((4000, p))
    test.add(z, z @ w_old + shift + 0.5 * rng.standard_normal((4000, q)))
    return systems[0], systems[1], w_old, test


def test_validated_refit_applies_only_what_generalises():
    # Few rows (fewer than the 13 unknowns per output): an unregularised fit interpolates the noise.
    # The held-out check must not make the weights worse on fresh data.
    for seed in range(5):
        train, held, w_old, test = _refit_problem(8, 3, seed=seed)
        r = d.validated_refit(train, held, w_old, None)
        assert test.residual(r.w, r.b) <= test.residual(w_old, None) * 1.02, (seed, r.reason)
        naive_w, naive_b = train.solve()
        assert test.residual(naive_w, naive_b) > 1.5 * test.residual(w_old, None)  # what the check prevents
    # No held-out rows: nothing is applied, and the reason says so.
    train, held, w_old, _ = _refit_problem(50, 0)
    r = d.validated_refit(train, held, w_old, None)
    assert not r.applied and "too few calibration samples" in r.reason and r.w is not None
    # Chance improvements on a small held-out set are not taken: over many splits where the old
    # weights are the truth, a plain "held-out error went down" rule swapped in worse weights about
    # a quarter of the time; the sampling-noise margin takes none.
    applied = sum(d.validated_refit(*_refit_problem(30, 10, seed=s)[:3], None).applied for s in range(40))
    assert applied == 0
    # A real improvement (a bias shift the old weights miss) is found even from 11 samples ...
    train, held, w_old, test = _refit_problem(8, 3, shift=2.0, seed=1)
    r = d.validated_refit(train, held, w_old, np.zeros(6))
    assert r.applied and test.residual(r.w, r.b) < 0.2 * test.residual(w_old, np.zeros(6))
    # ... and from many, applied with the ridge that did best on the held-out rows.
    train, held, w_old, test = _refit_problem(400, 100, shift=2.0)
    r = d.validated_refit(train, held, w_old, np.zeros(6))
    assert r.applied and r.reason == "applied" and r.ridge in d.REFIT_RIDGES
    assert r.heldout_after < 0.5 * r.heldout_before and r.calib_after < r.calib_before
    assert test.residual(r.w, r.b) < 0.5 * test.residual(w_old, np.zeros(6))
    np.testing.assert_allclose(r.b, 2.0, atol=0.15)
