"""Low-rank decompositions of layer weights, rank-selection rules and least-squares refits.

Pure numpy / scipy / tensorly; nothing here knows about ONNX. Conventions:

- A conv weight is W (T, S, *k): T output channels, S input channels, kernel k.
- Tucker-2 (Kim et al., ICLR 2016): W ~= core x_0 U_out x_1 U_in with U_out (T, r_out),
  U_in (S, r_in) orthonormal and core (r_out, r_in, *k). As a layer chain:
  1x1 conv U_in^T (S -> r_in), KxK conv `core` (r_in -> r_out, original geometry), 1x1 conv U_out
  (r_out -> T, original bias). A mode may be left undecomposed (`None` rank): Tucker-1 on the output
  mode is the two-layer KxK (S -> r_out) + 1x1 (r_out -> T) chain, which for a 1x1 conv or a dense
  matrix is exactly the truncated SVD.
- Costs are in MACs. `ChainCost` counts a chain's MACs from per-sample input/output positions.
- Errors are relative squared Frobenius errors ||W - W_hat||^2 / ||W||^2. For rank selection we use
  the truncated-HOSVD bound tail_out(r_out) + tail_in(r_in) (the energy each mode discards), which is
  cheap for every rank pair and exact for single-mode (SVD) truncation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxcomp.linalg.vbmf import evbmf_spectrum

# -- unfoldings and spectra --------------------------------------------------------------------


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-`mode` unfolding: shape (tensor.shape[mode], prod(other dims))."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_energy(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Squared singular values (descending) of the mode-`mode` unfolding, length shape[mode]
    (padded with zeros when the unfolding has fewer columns than rows)."""
    m = unfold(np.asarray(tensor, dtype=np.float64), mode)
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    vals = np.maximum(np.linalg.eigvalsh(small)[::-1], 0.0)
    out = np.zeros(m.shape[0])
    out[: vals.size] = vals
    return out


def tail_fraction(energy: np.ndarray) -> np.ndarray:
    """tail[r] = share of total energy discarded when keeping the top r components (r = 0..n)."""
    e = np.asarray(energy, dtype=np.float64)
    total = e.sum()
    if total <= 0:
        return np.zeros(e.size + 1)
    kept = np.concatenate([[0.0], np.cumsum(e)])
    return np.clip(1.0 - kept / total, 0.0, 1.0)


# -- rank rules ----------------------------------------------------------------------------------


def evbmf_mode_rank(tensor: np.ndarray, mode: int) -> int:
    """EVBMF rank of the mode-`mode` unfolding (0 = indistinguishable from noise)."""
    m = unfold(np.asarray(tensor, dtype=np.float64), mode)
    energy = mode_energy(tensor, mode)[: min(m.shape)]
    return evbmf_spectrum(np.sqrt(energy), m.shape).rank


def fraction_rank(dim: int, fraction: float) -> int:
    """ceil(fraction * dim), at least 1."""
    return max(1, math.ceil(fraction * dim - 1e-9))


def energy_rank(energy: np.ndarray, keep: float) -> int:
    """Smallest r whose top-r components hold at least `keep` of the energy (at least 1)."""
    tail = tail_fraction(energy)
    ok = np.nonzero(tail <= 1.0 - keep + 1e-12)[0]
    return max(1, int(ok[0]) if ok.size else len(energy))


def weaken_rank(full: int, rank: int, weaken: float) -> int:
    """MUSCO's weakening: r = R - w (R - r_sel), rounded up. w = 1 keeps r_sel, w = 0 gives R."""
    return int(math.ceil(full - weaken * (full - rank) - 1e-9))


def round_rank(rank: int, multiple: int, dim: int, min_rank: int = 1) -> int:
    """`rank` rounded to the nearest multiple of `multiple` (halves round up), clamped to
    [max(min_rank, multiple), dim]. Multiples of 16/32 run much faster in MLAS."""
    r = int(rank)
    if multiple > 1:
        r = max(multiple, int(math.floor(r / multiple + 0.5)) * multiple)
    return int(min(dim, max(r, min_rank, 1)))


def rank_grid(dim: int, multiple: int, min_rank: int = 1) -> list[int]:
    """Candidate ranks for a mode: multiples of `multiple` (>= min_rank) below dim, then dim itself."""
    step = max(1, multiple)
    start = max(step, int(math.ceil(max(min_rank, 1) / step)) * step)
    return [r for r in range(start, dim, step)] + [dim]


# -- costs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainCost:
    """MACs of a layer and of its decompositions, from per-sample positions.

    pos_in / pos_out: spatial positions of the layer's input / output (1 for a dense row; for a
    dense layer with extra leading dims, the number of rows). ksize: prod(kernel).
    """

    out_channels: int  # T
    in_channels: int  # S
    ksize: int
    pos_in: float
    pos_out: float

    @property
    def original(self) -> float:
        return self.pos_out * self.out_channels * self.in_channels * self.ksize

    def tucker(self, r_out: int | None, r_in: int | None) -> float:
        """MACs of the chain; a None rank means that mode is not decomposed (no factor layer)."""
        T, S = self.out_channels, self.in_channels
        ro = T if r_out is None else r_out
        ri = S if r_in is None else r_in
        macs = self.pos_out * ro * ri * self.ksize
        if r_in is not None:
            macs += self.pos_in * S * r_in
        if r_out is not None:
            macs += self.pos_out * r_out * T
        return macs


# -- decompositions ------------------------------------------------------------------------------


@dataclass
class Tucker:
    """A (partial) Tucker decomposition of a conv weight: W ~= core x_0 out_factor x_1 in_factor.

    out_factor (T, r_out) or None (mode kept), in_factor (S, r_in) or None, core (r_out|T, r_in|S, *k).
    `error` is the relative squared reconstruction error.
    """

    core: np.ndarray
    out_factor: np.ndarray | None
    in_factor: np.ndarray | None
    error: float

    def reconstruct(self) -> np.ndarray:
        w = self.core
        if self.in_factor is not None:
            w = np.moveaxis(np.tensordot(self.in_factor, w, axes=(1, 1)), 0, 1)
        if self.out_factor is not None:
            w = np.tensordot(self.out_factor, w, axes=(1, 0))
        return w


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||w - w_hat||^2 / ||w||^2 (0 for an all-zero w)."""
    w = np.asarray(w, dtype=np.float64)
    den = float(np.sum(w * w))
    return float(np.sum((w - w_hat) ** 2) / den) if den > 0 else 0.0


def tucker_decompose(
    weight: np.ndarray,
    r_out: int | None,
    r_in: int | None,
    *,
    n_iter_max: int = 30,
    tol: float = 1e-6,
    seed: int = 0,
) -> Tucker:
    """Tucker decomposition of W (T, S, *k) on the modes whose rank is not None.

    Both modes: HOSVD initialisation + HOOI on modes [0, 1] (the algorithm of tensorly's
    `partial_tucker`, see `_hooi2`). One mode: the truncated SVD of that mode's unfolding (optimal,
    no iteration). Ranks are clamped to the mode sizes. `seed` is accepted for API stability; the
    computation is deterministic.
    """
    w = np.asarray(weight, dtype=np.float64)
    T, S = w.shape[:2]
    if r_out is not None:
        r_out = int(min(max(r_out, 1), T))
    if r_in is not None:
        r_in = int(min(max(r_in, 1), S))
    if r_out is not None and r_in is not None:
        dec = _hooi2(w, r_out, r_in, n_iter_max, tol)
    elif r_out is not None:
        u = _top_left_vectors(unfold(w, 0), r_out)
        core = np.tensordot(u.T, w, axes=(1, 0))
        dec = Tucker(core, u, None, 0.0)
    elif r_in is not None:
        u = _top_left_vectors(unfold(w, 1), r_in)
        core = np.moveaxis(np.tensordot(u.T, w, axes=(1, 1)), 0, 1)
        dec = Tucker(core, None, u, 0.0)
    else:
        dec = Tucker(w.copy(), None, None, 0.0)
    dec.error = relative_error(w, dec.reconstruct())
    return dec


def _hooi2(w: np.ndarray, r_out: int, r_in: int, n_iter_max: int, tol: float) -> Tucker:
    """Higher-order orthogonal iteration on modes 0 and 1 of w (T, S, *k).

    Same algorithm and result as tensorly 0.10 `partial_tucker(w, [r_out, r_in], modes=[0, 1],
    init="svd")` (tested against it), but every SVD goes through `gram_svd`: tensorly's HOOI loop
    ignores its `svd=` argument and calls a full LAPACK SVD, which on this 2-core machine under load
    took 10-30x longer (vgg16 alone would need minutes).
    """
    norm2 = float(np.sum(w * w))
    u_out = gram_svd(unfold(w, 0), r_out)[0]
    u_in = gram_svd(unfold(w, 1), r_in)[0]
    prev = None
    for _ in range(max(n_iter_max, 0)):
        y = np.tensordot(u_in.T, w, axes=(1, 1))  # (r_in, T, *k)
        u_out = gram_svd(unfold(y, 1), r_out)[0]
        y = np.tensordot(u_out.T, w, axes=(1, 0))  # (r_out, S, *k)
        u_in = gram_svd(unfold(y, 1), r_in)[0]
        core = np.moveaxis(np.tensordot(u_in.T, y, axes=(1, 1)), 0, 1)
        err = max(norm2 - float(np.sum(core * core)), 0.0) / norm2 if norm2 > 0 else 0.0
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
    y = np.tensordot(u_out.T, w, axes=(1, 0))
    core = np.moveaxis(np.tensordot(u_in.T, y, axes=(1, 1)), 0, 1)
    return Tucker(core, u_out, u_in, 0.0)


def gram_svd(matrix: np.ndarray, n_eigenvecs: int | None = None, **_: object):
    """Truncated SVD through the eigendecomposition of the smaller Gram matrix.

    Conv unfoldings are short and wide (T x S*k*k); eigh of the T x T Gram is ~10x faster than a
    full SVD and accurate for the leading vectors. Signature matches tensorly's SVD functions, so
    it can be passed as `svd=` to `partial_tucker`. Returns U (m, r), S (r,), V (r, n).
    """
    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = m.shape
    r = min(rows, cols) if n_eigenvecs is None else min(int(n_eigenvecs), rows, cols)
    if rows <= cols:
        vals, vecs = np.linalg.eigh(m @ m.T)
        u = vecs[:, ::-1][:, :r]
        s = np.sqrt(np.maximum(vals[::-1][:r], 0.0))
        v = (u.T @ m) / np.where(s > 0, s, 1.0)[:, None]
    else:
        vals, vecs = np.linalg.eigh(m.T @ m)
        vt = vecs[:, ::-1][:, :r]
        s = np.sqrt(np.maximum(vals[::-1][:r], 0.0))
        u = (m @ vt) / np.where(s > 0, s, 1.0)[None, :]
        v = vt.T
    # Deterministic signs: the largest-magnitude entry of each left vector is positive.
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    return u * sign, s, v * sign[:, None]


def _top_left_vectors(m: np.ndarray, r: int) -> np.ndarray:
    u = gram_svd(m, r)[0]
    if u.shape[1] < r:  # fewer columns than the rank asked: complete with an orthonormal basis
        q, _ = np.linalg.qr(np.concatenate([u, np.eye(m.shape[0])], axis=1))
        u = q[:, :r]
    return u


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """M (m, n) ~= A @ B with A (m, r), B (r, n); singular values split as sqrt into both."""
    m = np.asarray(matrix, dtype=np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = int(min(max(rank, 1), s.size))
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


# -- rank choice under a MAC budget -------------------------------------------------------------


@dataclass(frozen=True)
class RankOption:
    """One way to decompose a layer: ranks (None = mode kept), its MACs and its error proxy."""

    r_out: int | None
    r_in: int | None
    macs: float
    error: float


def rank_options(
    cost: ChainCost,
    tail_out: np.ndarray,
    tail_in: np.ndarray | None,
    multiple: int,
    min_rank: int = 1,
) -> list[RankOption]:
    """The Pareto front (MACs ascending, error strictly descending) of rank choices for a layer.

    `tail_out` / `tail_in` are `tail_fraction` arrays of the output / input mode; `tail_in=None`
    means the input mode is never decomposed (first layer, 1x1 conv, dense). A full-size rank in
    one mode drops that mode's factor layer. The undecomposed layer itself is not included.
    """
    T, S = cost.out_channels, cost.in_channels
    outs = rank_grid(T, multiple, min_rank)
    ins = rank_grid(S, multiple, min_rank) if tail_in is not None else [S]
    opts: list[RankOption] = []
    for ro in outs:
        for ri in ins:
            if ro == T and ri == S:
                continue
            r_out = None if ro == T else ro
            r_in = None if (tail_in is None or ri == S) else ri
            err = float(tail_out[ro]) + (float(tail_in[ri]) if tail_in is not None else 0.0)
            opts.append(RankOption(r_out, r_in, cost.tucker(r_out, r_in), err))
    opts.sort(key=lambda o: (o.macs, o.error))
    front: list[RankOption] = []
    best = math.inf
    for o in opts:
        if o.error < best - 1e-15:
            front.append(o)
            best = o.error
    return front


def best_under(options: Sequence[RankOption], max_macs: float) -> RankOption | None:
    """The least-error option whose MACs do not exceed `max_macs` (None if there is none)."""
    ok = [o for o in options if o.macs <= max_macs]
    return min(ok, key=lambda o: (o.error, o.macs)) if ok else None


def allocate_budget(
    layers: Sequence[tuple[float, Sequence[RankOption]]],
    target_macs: float,
    fixed_macs: float = 0.0,
) -> tuple[list[int | None], float]:
    """Greedy global rank allocation.

    `layers` holds, per decomposable layer, (its undecomposed MACs, its Pareto options). Starting
    with every layer undecomposed, repeatedly take the single move (one layer to one of its
    cheaper options) with the smallest error increase per MAC saved, until
    fixed_macs + sum(layer MACs) <= target_macs or no move is left. Error is the per-layer relative
    reconstruction error, so layers are weighed equally regardless of size. Returns the chosen
    option index per layer (None = undecomposed) and the resulting total MACs.
    """
    state: list[int | None] = [None] * len(layers)
    cur_macs = [float(orig) for orig, _ in layers]
    cur_err = [0.0] * len(layers)
    total = fixed_macs + sum(cur_macs)
    while total > target_macs:
        best = None  # (ratio, layer, option index)
        for i, (_, opts) in enumerate(layers):
            for j, o in enumerate(opts):
                saved = cur_macs[i] - o.macs
                if saved <= 0:
                    continue
                ratio = max(o.error - cur_err[i], 0.0) / saved
                if best is None or ratio < best[0] - 1e-18:
                    best = (ratio, i, j)
        if best is None:
            break
        _, i, j = best
        o = layers[i][1][j]
        total -= cur_macs[i] - o.macs
        state[i], cur_macs[i], cur_err[i] = j, o.macs, o.error
    return state, total


# -- least-squares refits ------------------------------------------------------------------------


class LeastSquares:
    """Accumulates the normal equations of Y ~= Z @ W (+ b) over batches, in float64.

    `add(Z, Y)` takes rows (samples or positions) of inputs Z (n, p) and targets Y (n, q). `solve`
    returns the ridge-regularised least-squares W (p, q) and b (q,) (b None without bias); the
    ridge is relative to the mean diagonal of Z^T Z and never penalises the bias.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        self.bias = bias
        k = n_in + (1 if bias else 0)
        self.n_in, self.n_out = n_in, n_out
        self.gram = np.zeros((k, k))
        self.cross = np.zeros((k, n_out))
        self.yy = 0.0
        self.count = 0

    def _aug(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        return np.concatenate([z, np.ones((z.shape[0], 1))], axis=1) if self.bias else z

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        za = self._aug(z)
        y = np.asarray(y, dtype=np.float64)
        self.gram += za.T @ za
        self.cross += za.T @ y
        self.yy += float(np.sum(y * y))
        self.count += z.shape[0]

    def solve(self, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray | None]:
        g = self.gram.copy()
        p = self.n_in
        lam = ridge * float(np.trace(g[:p, :p])) / max(p, 1)
        g[np.arange(p), np.arange(p)] += max(lam, 1e-300)
        try:
            sol = np.linalg.solve(g, self.cross)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(g, self.cross, rcond=None)[0]
        return (sol[:p], sol[p]) if self.bias else (sol, None)

    def residual(self, w: np.ndarray, b: np.ndarray | None = None) -> float:
        """Relative squared error sum ||Y - Z W - b||^2 / sum ||Y||^2 over everything added."""
        x = np.asarray(w, dtype=np.float64)
        if self.bias:
            x = np.concatenate([x, (np.zeros(self.n_out) if b is None else np.asarray(b, np.float64))[None]], 0)
        sq = self.yy - 2.0 * float(np.sum(x * self.cross)) + float(np.sum(x * (self.gram @ x)))
        return max(sq, 0.0) / self.yy if self.yy > 0 else 0.0


class ResponseStats:
    """Running mean and second moment of layer responses Y (n, q), for a PCA of the responses."""

    def __init__(self, n_out: int):
        self.sum = np.zeros(n_out)
        self.outer = np.zeros((n_out, n_out))
        self.count = 0

    def add(self, y: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        self.sum += y.sum(axis=0)
        self.outer += y.T @ y
        self.count += y.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        m = self.mean
        return self.outer / max(self.count, 1) - np.outer(m, m)

    def principal(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending) and eigenvectors (columns) of the response covariance."""
        vals, vecs = np.linalg.eigh(self.covariance())
        order = np.argsort(vals)[::-1]
        return np.maximum(vals[order], 0.0), vecs[:, order]


def response_projection(
    weight: np.ndarray, bias: np.ndarray | None, basis: np.ndarray, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zhang et al.'s response reconstruction for a linear layer y = W x + b (W (T, ...)).

    With P (T, r) the top principal directions of the responses and m their mean,
    y ~= P P^T (y - m) + m = P (P^T W) x + [m + P P^T (b - m)]. Returns (first W1 = P^T W of shape
    (r, ...), second W2 = P (T, r), bias of the second layer (T,)).
    """
    w = np.asarray(weight, dtype=np.float64)
    p = np.asarray(basis, dtype=np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    w1 = np.tensordot(p.T, w, axes=(1, 0))
    b2 = mean + p @ (p.T @ (b - mean))
    return w1, p, b2
