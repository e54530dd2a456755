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
- Errors are relative squared Frobenius errors ||W - W_hat||^2 / ||W||^2. To rank many candidate
  rank pairs cheaply we estimate a pair's error from the energy each mode discards
  (tail_out, tail_in) as 1 - (1 - tail_out)(1 - tail_in): exact for single-mode (SVD) truncation,
  and between max(tail_out, tail_in) and the truncated-HOSVD bound tail_out + tail_in otherwise.
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


# Unfoldings with more elements than this (dense layers such as VGG-16's 4096 x 25088) get their
# Gram matrix in float32 (half the time of a float64 GEMM) and their singular *vectors* from a
# float32 eigensolver (half the time again: at 4096 x 4096, 3 s instead of 6 s); the spectrum
# (eigenvalues, which EVBMF and the energy rules read) stays a float64 eigvalsh of that Gram. The
# Gram's rounding only blurs singular values below ~1e-3 of the largest, which neither rank rule
# nor the factors (stored as float32) care about.
_F32_GRAM_ELEMENTS = 2**22


class ModeBasis:
    """Singular spectrum and (on demand) leading left singular vectors of one mode unfolding.

    Built from one Gram matrix of the unfolding (the smaller side); `energy` (length = the mode
    size, zero-padded) are the squared singular values, descending; `vectors(r)` returns the top r
    left singular vectors as orthonormal columns (r is capped at min(rows, cols)), computing only
    those eigenvectors. Shared by rank selection (spectrum, EVBMF) and the HOSVD initialisation.
    Large unfoldings (> 2**22 elements) are handled in float32 (see `_F32_GRAM_ELEMENTS`).
    """

    def __init__(self, unfolding: np.ndarray):
        m = np.asarray(unfolding)
        rows, cols = m.shape
        work = m.astype(np.float32 if m.size > _F32_GRAM_ELEMENTS else np.float64, copy=False)
        self._wide = rows <= cols
        self._m = None if self._wide else work
        self._gram = work @ work.T if self._wide else work.T @ work
        self._max_rank = int(self._gram.shape[0])
        self._rows = rows
        self._energy: np.ndarray | None = None
        self._cache: np.ndarray | None = None

    @property
    def energy(self) -> np.ndarray:
        """Squared singular values, descending, zero-padded to the mode size (computed on first use)."""
        if self._energy is None:
            vals = np.linalg.eigvalsh(np.asarray(self._gram, dtype=np.float64))
            self._set_energy(vals)
        assert self._energy is not None
        return self._energy

    def _set_energy(self, ascending: np.ndarray) -> None:
        self._energy = np.zeros(self._rows)
        self._energy[: ascending.size] = np.maximum(np.asarray(ascending, dtype=np.float64)[::-1], 0.0)

    @property
    def max_rank(self) -> int:
        return self._max_rank

    def vectors(self, r: int) -> np.ndarray:
        r = int(min(max(r, 1), self.max_rank))
        if self._cache is not None and self._cache.shape[1] >= r:
            return self._cache[:, :r]
        if self._gram is None:
            raise RuntimeError(f"ModeBasis frozen at {0 if self._cache is None else self._cache.shape[1]} vectors, "
                               f"asked for {r}")
        n = self.max_rank
        if r == n or (self._energy is None and r > n // 2):
            vals, vecs = np.linalg.eigh(self._gram)
            if self._energy is None:  # one full eigendecomposition serves both
                self._set_energy(vals)
        else:
            from scipy.linalg import eigh

            vals, vecs = eigh(self._gram, subset_by_index=[n - r, n - 1])
        vecs = vecs[:, ::-1]
        if self._wide:
            u = vecs
        else:  # left vectors of a tall unfolding: orthonormalise M V (robust to zero singular values)
            u, _ = np.linalg.qr(self._m @ vecs)
        self._cache = _fix_signs(u)
        return self._cache[:, :r]


    def freeze(self, r: int) -> None:
        """Compute the top `r` vectors now and drop the Gram matrix (the energy and those vectors
        stay; asking for more vectors afterwards is an error). A 4096-wide layer's Gram is 64 MB:
        the decomposition then never holds it beside the weight."""
        self.energy  # noqa: B018 - computed while the Gram is here
        self.vectors(r)
        self._gram = None  # type: ignore[assignment]
        self._m = None


def mode_basis(tensor: np.ndarray, mode: int) -> ModeBasis:
    """`ModeBasis` of the mode-`mode` unfolding of `tensor`."""
    return ModeBasis(unfold(np.asarray(tensor), mode))


def _fix_signs(u: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest-magnitude entry of each column is positive."""
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    return u * sign


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


def evbmf_energy_rank(energy: np.ndarray, shape: tuple[int, int]) -> int:
    """EVBMF rank from the squared singular values of a matrix of `shape` (extra zeros ignored)."""
    n = min(shape)
    return evbmf_spectrum(np.sqrt(np.maximum(np.asarray(energy, dtype=np.float64)[:n], 0.0)), shape).rank


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
    n_iter_max: int = 10,
    tol: float = 1e-6,
    bases: dict[int, ModeBasis] | None = None,
) -> Tucker:
    """Tucker decomposition of W (T, S, *k) on the modes whose rank is not None.

    Both modes: HOSVD initialisation + HOOI on modes [0, 1] (the algorithm of tensorly's
    `partial_tucker`, see `_hooi2`). One mode: the truncated SVD of that mode's unfolding (optimal,
    no iteration). Ranks are clamped to the mode sizes. `bases` may hold precomputed `mode_basis`
    results by mode (they are reused instead of recomputed). Deterministic.
    """
    # Large layers (dense 4096 x 25088) are projected in float32: the result is stored as float32
    # anyway, and float64 copies would cost gigabytes and seconds.
    w = np.asarray(weight)
    w = w.astype(np.float32 if w.size > _F32_GRAM_ELEMENTS else np.float64, copy=False)
    T, S = w.shape[:2]
    bases = dict(bases or {})
    if r_out is not None:
        r_out = int(min(max(r_out, 1), T))
    if r_in is not None:
        r_in = int(min(max(r_in, 1), S))

    def top(mode: int, r: int) -> np.ndarray:
        if mode not in bases:
            bases[mode] = mode_basis(w, mode)
        u = bases[mode].vectors(r).astype(w.dtype, copy=False)
        if u.shape[1] < r:  # the unfolding has fewer columns than the rank: complete the basis
            q, _ = np.linalg.qr(np.concatenate([u, np.eye(u.shape[0])], axis=1))
            u = np.concatenate([u, q[:, u.shape[1] : r]], axis=1)
        return u

    if r_out is not None and r_in is not None:
        dec = _hooi2(w, top(0, r_out), top(1, r_in), n_iter_max, tol)
    elif r_out is not None:
        u = top(0, r_out)
        dec = Tucker(np.tensordot(u.T, w, axes=(1, 0)), u, None, 0.0)
    elif r_in is not None:
        u = top(1, r_in)
        dec = Tucker(np.moveaxis(np.tensordot(u.T, w, axes=(1, 1)), 0, 1), None, u, 0.0)
    else:
        dec = Tucker(w.copy(), None, None, 0.0)
    # Orthonormal factors make W_hat an orthogonal projection of W: ||W - W_hat||^2 = ||W||^2 - ||core||^2.
    norm2 = squared_norm(w)
    kept = squared_norm(dec.core)
    dec.error = max(norm2 - kept, 0.0) / norm2 if norm2 > 0 else 0.0
    return dec


def squared_norm(a: np.ndarray, chunk: int = 2**20) -> float:
    """sum(a**2) accumulated in float64 a chunk at a time (no float64 copy of a large float32 array)."""
    flat = np.asarray(a).ravel(order="K")  # memory order: no copy of a transposed view
    total = 0.0
    for k in range(0, flat.size, chunk):
        c = flat[k : k + chunk].astype(np.float64)
        total += float(c @ c)
    return total


def _hooi2(w: np.ndarray, u_out: np.ndarray, u_in: np.ndarray, n_iter_max: int, tol: float) -> Tucker:
    """Higher-order orthogonal iteration on modes 0 and 1 of w (T, S, *k) from HOSVD factors.

    Same algorithm and result as tensorly 0.10 `partial_tucker(w, [r_out, r_in], modes=[0, 1],
    init="svd")` (tested against it), but every SVD goes through `gram_svd`: tensorly's HOOI loop
    ignores its `svd=` argument and calls a full LAPACK SVD, which on this 2-core machine under load
    took 10-30x longer (vgg16 alone would need minutes).
    """
    r_out, r_in = u_out.shape[1], u_in.shape[1]
    norm2 = squared_norm(w)
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


def gram_svd(matrix: np.ndarray, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top `rank` left singular vectors U (m, r) and singular values (r,) of a matrix, through the
    eigendecomposition of the smaller Gram matrix.

    Conv unfoldings are short and wide (T x S*k*k); eigh of the T x T Gram is ~10x faster than a
    LAPACK SVD and accurate for the leading vectors. Signs are made deterministic.
    """
    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = m.shape
    r = min(rows, cols) if rank is None else min(int(rank), rows, cols)
    if rows <= cols:
        vals, vecs = np.linalg.eigh(m @ m.T)
        u = vecs[:, ::-1][:, :r]
        s = np.sqrt(np.maximum(vals[::-1][:r], 0.0))
    else:
        vals, vecs = np.linalg.eigh(m.T @ m)
        s = np.sqrt(np.maximum(vals[::-1][:r], 0.0))
        u, _ = np.linalg.qr(m @ vecs[:, ::-1][:, :r])
    return _fix_signs(u), s


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
            err = pair_error(float(tail_out[ro]), float(tail_in[ri]) if tail_in is not None else 0.0)
            opts.append(RankOption(r_out, r_in, cost.tucker(r_out, r_in), err))
    opts.sort(key=lambda o: (o.macs, o.error))
    front: list[RankOption] = []
    best = math.inf
    for o in opts:
        if o.error < best - 1e-15:
            front.append(o)
            best = o.error
    return front


def pair_error(tail_out: float, tail_in: float) -> float:
    """Estimated relative error of truncating two modes that discard tail_out / tail_in of their
    energy: 1 - (1 - tail_out)(1 - tail_in), i.e. the kept shares multiply. Exact for a single mode
    and when the two modes' energy is spread independently (e.g. iid weights); between
    max(tails) and their sum (the HOSVD bound) in general."""
    return 1.0 - (1.0 - tail_out) * (1.0 - tail_in)


def best_under(options: Sequence[RankOption], max_macs: float) -> RankOption | None:
    """The least-error option whose MACs do not exceed `max_macs` (None if there is none)."""
    ok = [o for o in options if o.macs <= max_macs]
    return min(ok, key=lambda o: (o.error, o.macs)) if ok else None


def allocate_budget(
    layers: Sequence[tuple[float, Sequence[RankOption]]],
    target_macs: float,
    fixed_macs: float = 0.0,
) -> tuple[list[int | None], float]:
    """Greedy global rank allocation under a MAC budget.

    `layers` holds, per decomposable layer, (its undecomposed MACs, its options). The objective is
    the product over layers of the energy each keeps, prod_l (1 - e_l) with e_l the layer's
    relative reconstruction error (Zhang et al., TPAMI 2016, eq. 14): the share of the signal that
    survives every layer when each layer's loss compounds the next. Equivalently, minimise
    sum_l -log(1 - e_l). Starting with every layer undecomposed, repeatedly take the single move
    (one layer to one of its cheaper options) with the smallest increase of -log(1 - e) per MAC
    saved (ties: lower layer index, then cheaper option), until fixed_macs + sum(layer MACs)
    <= target_macs or no move is left. Unlike a plain sum of relative errors, which on flat
    spectra costs the same per MAC saved whether a layer keeps 90% or 5% of its energy and so
    wrecks the largest layers first, the log makes each further cut of a layer dearer.
    Returns the chosen option index per layer (None = undecomposed) and the resulting total MACs
    (above the target when it is out of reach).
    """
    def cost(err: float) -> float:
        return -math.log(max(1.0 - err, 1e-12))

    state: list[int | None] = [None] * len(layers)
    cur_macs = [float(orig) for orig, _ in layers]
    cur_cost = [0.0] * len(layers)
    opt_cost = [[cost(o.error) for o in opts] for _, opts in layers]

    def best_move(i: int) -> tuple[float, int] | None:
        best = None
        for j, o in enumerate(layers[i][1]):
            saved = cur_macs[i] - o.macs
            if saved <= 0:
                continue
            ratio = max(opt_cost[i][j] - cur_cost[i], 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, j)
        return best

    moves = [best_move(i) for i in range(len(layers))]  # only the moved layer's entry changes
    total = fixed_macs + sum(cur_macs)
    while total > target_macs:
        cands = [(m[0], i, m[1]) for i, m in enumerate(moves) if m is not None]
        if not cands:
            break
        _, i, j = min(cands)
        o = layers[i][1][j]
        total -= cur_macs[i] - o.macs
        state[i], cur_macs[i], cur_cost[i] = j, o.macs, opt_cost[i][j]
        moves[i] = best_move(i)
    return state, total


# -- least-squares refits ------------------------------------------------------------------------


class LeastSquares:
    """Accumulates the normal equations of Y ~= Z @ W (+ b) over batches, in float64.

    `add(Z, Y)` takes rows (samples or positions) of inputs Z (n, p) and targets Y (n, q). `solve`
    returns the ridge-regularised least-squares W (p, q) and b (q,) (b None without bias); the
    ridge is relative to the mean diagonal of Z^T Z, pulls W towards `prior` (default 0) and never
    penalises the bias. Memory is O((p + q) p) whatever the number of rows.
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
        if z.shape[0] == 0:
            return
        za = self._aug(z)
        y = np.asarray(y, dtype=np.float64)
        self.gram += za.T @ za
        self.cross += za.T @ y
        self.yy += float(np.sum(y * y))
        self.count += z.shape[0]

    def merged(self, other: LeastSquares) -> LeastSquares:
        """A new system holding the rows of both."""
        out = LeastSquares(self.n_in, self.n_out, self.bias)
        out.gram = self.gram + other.gram
        out.cross = self.cross + other.cross
        out.yy = self.yy + other.yy
        out.count = self.count + other.count
        return out

    def solve(self, ridge: float = 1e-6, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """argmin ||Y - Z W - b||^2 + lam ||W - prior||^2, lam = ridge * trace(Z^T Z) / p."""
        g = self.gram.copy()
        rhs = self.cross.copy()
        p = self.n_in
        lam = max(ridge * float(np.trace(g[:p, :p])) / max(p, 1), 1e-300)
        g[np.arange(p), np.arange(p)] += lam
        if prior is not None:
            rhs[:p] += lam * np.asarray(prior, dtype=np.float64)
        try:
            sol = np.linalg.solve(g, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(g, rhs, rcond=None)[0]
        return (sol[:p], sol[p]) if self.bias else (sol, None)

    def residual(self, w: np.ndarray, b: np.ndarray | None = None) -> float:
        """Relative squared error sum ||Y - Z W - b||^2 / sum ||Y||^2 over everything added."""
        x = np.asarray(w, dtype=np.float64)
        if self.bias:
            x = np.concatenate([x, (np.zeros(self.n_out) if b is None else np.asarray(b, np.float64))[None]], 0)
        sq = self.yy - 2.0 * float(np.sum(x * self.cross)) + float(np.sum(x * (self.gram @ x)))
        return max(sq, 0.0) / self.yy if self.yy > 0 else 0.0


# Ridge strengths tried by `validated_refit`, relative to the mean diagonal of Z^T Z. The ridge
# pulls towards the decomposition's own weights, so the largest ones mostly just refit the bias.
REFIT_RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class Refit:
    """Outcome of `validated_refit`. `applied` False keeps the old weights (w, b are then the old
    ones); `reason` says why. Errors are relative squared errors (see `LeastSquares.residual`)."""

    applied: bool
    w: np.ndarray
    b: np.ndarray | None
    reason: str
    ridge: float | None = None
    heldout_before: float | None = None
    heldout_after: float | None = None
    calib_before: float | None = None
    calib_after: float | None = None


def validated_refit(
    train: LeastSquares,
    held: LeastSquares,
    w_old: np.ndarray,
    b_old: np.ndarray | None,
    ridges: Sequence[float] = REFIT_RIDGES,
    held_samples: int | None = None,
) -> Refit:
    """Refit W, b of Y ~= Z W + b only if it generalises.

    For each ridge (pulling W towards `w_old`), solve on `train` and measure the relative error on
    `held` (rows the fit never saw); take the ridge with the lowest held-out error. That solution
    is applied only if its held-out error is below the held-out error of (w_old, b_old) by more than
    twice the estimate's relative standard error, sqrt(2 / (held_samples * q)) (a chi-square
    approximation; `held_samples` = independent held-out units, default the held-out rows; give
    the number of samples when rows are correlated positions of the same image). A lucky split of a
    few samples therefore does not swap in a worse layer. The applied weights are re-solved on all
    rows with the chosen ridge when there are at least 4 rows per unknown; otherwise they are exactly
    the checked solution (fitted on `train` only: re-solving a nearly square system can land far from
    it). Without held-out rows nothing is applied: a fit with as many unknowns as rows reproduces its
    own rows exactly and can be far worse on any other input.
    """
    w_old = np.asarray(w_old, dtype=np.float64)
    b_ref = b_old if train.bias else None
    keep = Refit(False, w_old, b_old, "", calib_before=train.merged(held).residual(w_old, b_ref))
    if held.count == 0 or train.count == 0:
        keep.reason = "not refit: too few calibration samples to hold some out (needs 2)"
        return keep
    keep.heldout_before = held.residual(w_old, b_ref)
    best = None
    for ridge in ridges:
        w, b = train.solve(ridge, prior=w_old)
        err = held.residual(w, b)
        if math.isfinite(err) and (best is None or err < best[0]):
            best = (err, ridge, w, b)
    units = held.count if held_samples is None else max(int(held_samples), 1)
    margin = 2.0 * math.sqrt(2.0 / (units * max(held.n_out, 1)))
    if best is None or not best[0] < keep.heldout_before * (1.0 - margin):
        keep.heldout_after = None if best is None else best[0]
        keep.reason = ("not refit (the refit did not lower the error on held-out calibration samples "
                       f"by more than their sampling noise, {min(margin, 1.0):.0%})")
        return keep
    err, ridge, w, b = best
    both = train.merged(held)
    if both.count >= 4 * (train.n_in + int(train.bias)):  # well determined: use every row, same ridge
        w, b = both.solve(ridge, prior=w_old)
    return Refit(True, w, b, "applied", ridge=ridge, heldout_before=keep.heldout_before, heldout_after=err,
                 calib_before=keep.calib_before, calib_after=both.residual(w, b))


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
