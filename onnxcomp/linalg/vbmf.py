"""Analytic empirical variational Bayesian matrix factorization (EVBMF) rank estimation.

Implements the global analytic solution of fully observed VBMF with the prior variances and the
noise variance estimated from the data (empirical Bayes), following

- S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of fully-observed
  variational Bayesian matrix factorization", JMLR 14 (2013) — the shrinkage estimator, and
- S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for perfect dimensionality
  recovery by variational Bayesian PCA", JMLR 16 (2015) — the EVB threshold and the closed-form
  objective for the noise variance.

The model: V (L x M, L <= M) = B A^T + E with E iid N(0, sigma^2). Let gamma_1 >= ... >= gamma_L be
the singular values of V and alpha = L / M. Define

    Phi(z)        = log(1 + z) / z - 1/2
    tau_bar       = the unique zero of  Phi(tau) + Phi(tau / alpha)   (tau_bar ~ 2.5129 sqrt(alpha))
    x_bar         = (1 + tau_bar) (1 + alpha / tau_bar)
    tau(x)        = ( x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha) ) / 2      (x >= x_bar)

Given sigma^2, the EVB solution keeps exactly the components whose singular value passes the threshold

    gamma_h > gamma_EVB = sqrt(M sigma^2 x_bar)

and shrinks each kept one to

    gamma_h' = gamma_h / 2 * ( 1 - (L + M) sigma^2 / gamma_h^2
                               + sqrt( (1 - (L + M) sigma^2 / gamma_h^2)^2 - 4 L M sigma^4 / gamma_h^4 ) ).

The noise variance is the minimiser of the (scaled) free energy, with x_h = gamma_h^2 / (M sigma^2):

    Omega(sigma^2) = sum_h psi(x_h),   psi(x) = x - log x + [x > x_bar] * psi1(x),
    psi1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x),

searched over [sigma_lo^2, sigma_hi^2] with sigma_hi^2 = ||V||_F^2 / (L M) and
sigma_lo^2 = max( gamma_{H+1}^2 / (M x_bar),  sum_{h > H} gamma_h^2 / (M (L - H)) ),
H = ceil(L / (1 + alpha)) - 1 being the largest rank EVB can return. psi is continuous at x_bar
(psi1(x_bar) = 0) but Omega need not be unimodal, so we scan a log-spaced grid and refine the best
bracket with a bounded scalar minimisation.

The estimated rank is 0 on pure iid noise (no singular value passes the threshold), and the
solution is symmetric in V and V^T, so L > M is handled by transposing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar


@dataclass(frozen=True)
class EVBMFResult:
    """The EVBMF estimate for one matrix.

    rank: number of components kept; sigma2: estimated (or given) noise variance;
    threshold: the singular-value threshold gamma_EVB; singular_values: all min(L, M) singular
    values of the matrix (descending); estimates: the shrunk singular values of the kept components.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    estimates: np.ndarray


def tau_bar(alpha: float) -> float:
    """The zero of Phi(tau) + Phi(tau / alpha), Phi(z) = log(1 + z) / z - 1/2 (0 < alpha <= 1)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    def xi(t: float) -> float:
        return phi(t) + phi(t / alpha)

    # xi is decreasing from +1 (tau -> 0) to -1 (tau -> inf); the root lies near 2.5 sqrt(alpha).
    lo, hi = 1e-6, 10.0
    while xi(hi) > 0:
        hi *= 2.0
    return float(brentq(xi, lo, hi, xtol=1e-12, rtol=1e-12))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: np.ndarray, s2: np.ndarray, M: int, alpha: float, x_bar: float) -> np.ndarray:
    """Omega for each sigma2 (vectorised over a 1-D array of sigma2 values)."""
    x = s2[None, :] / (M * sigma2[:, None])
    psi = x - np.log(x)
    above = x > x_bar
    if np.any(above):
        t = _tau(np.where(above, x, x_bar), alpha)
        psi1 = np.log1p(t) + alpha * np.log1p(t / alpha) - t
        psi = psi + np.where(above, psi1, 0.0)
    return psi.sum(axis=1)


def evbmf_max_rank(shape: tuple[int, int]) -> int:
    """The largest rank EVBMF can return for an L x M matrix: ceil(L / (1 + L/M)) - 1 (L <= M).

    0 for tiny or square-ish small matrices (1 x M, 2 x 2, 3 x 3, ...): there EVBMF keeps nothing
    whatever the data, which says nothing about noise.
    """
    L, M = sorted(int(d) for d in shape)
    if L == 0:
        return 0
    return max(0, min(math.ceil(L / (1.0 + L / M)) - 1, L - 1))


def evbmf_spectrum(singular_values: np.ndarray, shape: tuple[int, int], sigma2: float | None = None) -> EVBMFResult:
    """EVBMF from the singular values of an L x M matrix (any orientation; only min/max matter).

    `singular_values` must hold all min(L, M) singular values (zeros included). Useful when only a
    spectrum is at hand (e.g. eigenvalues of a response covariance over M samples). ValueError on
    a wrong count or non-finite values.
    """
    L, M = sorted(int(d) for d in shape)
    s = np.sort(np.asarray(singular_values, dtype=np.float64).ravel())[::-1]
    if s.size != L:
        raise ValueError(f"expected {L} singular values for a {shape[0]}x{shape[1]} matrix, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite (the matrix holds NaN or inf)")
    empty = np.zeros(0)
    if L == 0 or not np.any(s > 0):
        return EVBMFResult(0, 0.0, 0.0, s, empty)
    alpha = L / M
    tb = tau_bar(alpha)
    x_bar = (1.0 + tb) * (1.0 + alpha / tb)
    # Exactly-zero singular values would make log x = -inf; floor them far below any signal.
    s2 = np.maximum(s * s, (s[0] * s[0]) * 1e-30)

    if sigma2 is None:
        H = evbmf_max_rank((L, M))
        hi = float(s2.sum() / (L * M))
        lo = max(float(s2[H] / (M * x_bar)), float(s2[H:].mean() / M))
        lo = max(lo, hi * 1e-12)
        if lo >= hi:
            sigma2 = hi
        else:
            grid = np.geomspace(lo, hi, 129)
            vals = _free_energy(grid, s2, M, alpha, x_bar)
            k = int(np.argmin(vals))
            a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
            res = minimize_scalar(
                lambda v: float(_free_energy(np.array([v]), s2, M, alpha, x_bar)[0]),
                bounds=(a, b),
                method="bounded",
                options={"xatol": a * 1e-8},
            )
            sigma2 = float(res.x) if res.fun <= vals[k] else float(grid[k])
    sigma2 = float(sigma2)
    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(np.sum(s > threshold))
    g2 = s[:rank] ** 2
    q = 1.0 - (L + M) * sigma2 / g2
    est = 0.5 * s[:rank] * (q + np.sqrt(np.maximum(q * q - 4.0 * L * M * sigma2 * sigma2 / (g2 * g2), 0.0)))
    return EVBMFResult(rank, sigma2, threshold, s, est)


def evbmf(matrix: np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """EVBMF of a 2-D matrix (L > M is handled by transposing; the estimate is symmetric).
    ValueError if the matrix is not 2-D or holds NaN / inf."""
    V = np.asarray(matrix, dtype=np.float64)
    if V.ndim != 2:
        raise ValueError(f"evbmf needs a 2-D matrix, got shape {V.shape}")
    if not np.all(np.isfinite(V)):
        raise ValueError("evbmf needs a finite matrix (it holds NaN or inf)")
    # Singular values through the smaller Gram matrix: much faster than a LAPACK SVD for the wide
    # unfoldings of conv weights, and accurate enough (~1e-8 relative) for a threshold decision.
    small = V @ V.T if V.shape[0] <= V.shape[1] else V.T @ V
    s = np.sqrt(np.maximum(np.linalg.eigvalsh(small), 0.0))
    return evbmf_spectrum(s, V.shape, sigma2)


def evbmf_rank(matrix: np.ndarray) -> int:
    """The EVBMF rank estimate of a matrix (0 means: indistinguishable from noise)."""
    return evbmf(matrix).rank
