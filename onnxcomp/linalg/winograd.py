"""Winograd minimal filtering F(m x m, r x r): transform matrices, weight transforms, joint sparsity.

`transforms(m, r)` generates the matrices of the Cook-Toom construction for chosen interpolation
points (0, +-1, +-2, +-1/2, ... and infinity) instead of typing them in: A^T (m x a) evaluates the
output polynomial at the points, G (a x r) evaluates the filter with the Lagrange denominators folded
in, and B^T (a x a) is the unique matrix that makes A^T [(G g) . (B^T d)] the correlation of g and d
for every g and d (solved in float64 and checked exact). With a = m + r - 1, one output tile costs a^2
multiplications instead of m^2 r^2.

2-D: V = B^T d B per a x a input tile, U = G g G^T per filter, Y = A^T (U . V) A per m x m output
tile. No ONNX here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

# Interpolation points in the order they are taken (after which the point at infinity closes the
# set): small integers and their reciprocals keep the transforms' entries, and so the fp32 error, small.
_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2),
           Fraction(3), Fraction(-3), Fraction(1, 3), Fraction(-1, 3))


@dataclass(frozen=True)
class Transforms:
    """F(m, r) matrices (float64): `AT` (m x a), `G` (a x r), `BT` (a x a), with a = m + r - 1."""

    m: int
    r: int
    points: tuple[Fraction, ...]  # the finite points; infinity is the last row/column
    AT: np.ndarray
    G: np.ndarray
    BT: np.ndarray

    @property
    def alpha(self) -> int:
        return self.m + self.r - 1

    def multiplications(self) -> tuple[int, int]:
        """(Winograd, direct) multiplications per m x m output tile and input/output channel pair."""
        return self.alpha**2, self.m**2 * self.r**2


def transforms(m: int, r: int = 3, points: tuple[Fraction, ...] | None = None) -> Transforms:
    """The Cook-Toom matrices of F(m, r) for `points` (a - 1 distinct finite points; default the first
    a - 1 of 0, 1, -1, 2, -2, 1/2, -1/2, ...). ValueError for m < 1, r < 1 or unusable points."""
    if m < 1 or r < 1:
        raise ValueError(f"F({m},{r}): tile and filter sizes must be at least 1")
    a = m + r - 1
    pts = tuple(Fraction(p) for p in (points if points is not None else _POINTS[: a - 1]))
    if len(pts) != a - 1:
        raise ValueError(f"F({m},{r}) needs {a - 1} finite points, got {len(pts)}")
    if len(set(pts)) != len(pts):
        raise ValueError(f"F({m},{r}): interpolation points must be distinct, got {[str(p) for p in pts]}")
    # exact rational arithmetic: the matrices are the same bits on every machine and BLAS
    at = [[Fraction(0)] * a for _ in range(m)]
    g = [[Fraction(0)] * r for _ in range(a)]
    for j, p in enumerate(pts):
        denom = Fraction(1)
        for q in pts:
            if q != p:
                denom *= p - q
        for i in range(m):
            at[i][j] = p**i
        for k in range(r):
            g[j][k] = p**k / denom
    at[m - 1][a - 1] = Fraction(1)  # the point at infinity: leading coefficients
    g[a - 1][r - 1] = Fraction(1)
    bt = _solve_input_transform(at, g)
    return Transforms(m, r, pts, _floats(at), _floats(g), _floats(bt))


def _floats(rows: list[list[Fraction]]) -> np.ndarray:
    return np.array([[float(v) for v in row] for row in rows], dtype=np.float64)


def _solve_input_transform(at: list[list[Fraction]], g: list[list[Fraction]]) -> list[list[Fraction]]:
    """B^T (exact) such that sum_j AT[i,j] G[j,k] BT[j,l] = [l == i + k] for all i, k, l: the normal
    equations C^T C BT = C^T T solved by Gauss-Jordan elimination over the rationals. ValueError when
    the system has no exact solution (never for distinct points)."""
    m, a, r = len(at), len(g), len(g[0])
    rows = [(i, k) for i in range(m) for k in range(r)]
    C = [[at[i][j] * g[j][k] for j in range(a)] for i, k in rows]
    T = [[Fraction(int(col == i + k)) for col in range(a)] for i, k in rows]
    n = len(rows)
    # augmented [C^T C | C^T T]
    aug = [[sum((C[q][j] * C[q][c] for q in range(n)), Fraction(0)) for c in range(a)]
           + [sum((C[q][j] * T[q][c] for q in range(n)), Fraction(0)) for c in range(a)] for j in range(a)]
    for col in range(a):
        pivot = next((row for row in range(col, a) if aug[row][col] != 0), None)
        if pivot is None:
            raise ValueError("the interpolation points give no exact Winograd algorithm")
        aug[col], aug[pivot] = aug[pivot], aug[col]
        lead = aug[col][col]
        aug[col] = [v / lead for v in aug[col]]
        for row in range(a):
            if row != col and aug[row][col] != 0:
                f = aug[row][col]
                aug[row] = [v - f * w for v, w in zip(aug[row], aug[col], strict=True)]
    bt = [row[a:] for row in aug]
    for q in range(n):  # exactness check: C BT == T
        for c in range(a):
            if sum((C[q][j] * bt[j][c] for j in range(a)), Fraction(0)) != T[q][c]:
                raise ValueError("the interpolation points give no exact Winograd algorithm")
    return bt


# ---------------------------------------------------------------------------------------------
# weight transforms (filters W [Co, Ci, r, r] <-> U [a*a, Co, Ci])
# ---------------------------------------------------------------------------------------------
def filter_transform(weight: np.ndarray, t: Transforms) -> np.ndarray:
    """U = G g G^T of every filter, as [a*a, Co, Ci] (float64)."""
    w = np.asarray(weight, dtype=np.float64)
    u = np.einsum("xk,oikl,yl->xyoi", t.G, w, t.G, optimize=True)
    return u.reshape(t.alpha * t.alpha, w.shape[0], w.shape[1])


def filter_inverse(u: np.ndarray, t: Transforms) -> np.ndarray:
    """The spatial filters [Co, Ci, r, r] whose transform is closest to `u` in least squares
    (g = G^+ U G^+T): the exact inverse of `filter_transform`, a projection for any other U."""
    a = t.alpha
    Gp = np.linalg.pinv(t.G)
    uu = np.asarray(u, dtype=np.float64).reshape(a, a, *u.shape[1:])
    return np.einsum("kx,xyoi,ly->oikl", Gp, uu, Gp, optimize=True)


def input_transform_kernel(t: Transforms) -> np.ndarray:
    """The input transform V = B^T d B as a correlation kernel [a*a, 1, a, a]: output channel
    (x, y) of a stride-m convolution over one channel is V[x, y] of each tile."""
    return np.einsum("xi,yj->xyij", t.BT, t.BT).reshape(t.alpha * t.alpha, 1, t.alpha, t.alpha)


def output_transform_matrix(t: Transforms) -> np.ndarray:
    """kron(A^T, A^T) [m*m, a*a]: Y[(i, j)] = sum_(x, y) A^T[i, x] A^T[j, y] M[(x, y)]."""
    return np.kron(t.AT, t.AT)


def conv2d_reference(x: np.ndarray, w: np.ndarray, t: Transforms) -> np.ndarray:
    """'valid' correlation of x [Ci, H, W] with w [Co, Ci, r, r] computed tile by tile the Winograd
    way, in float64; H - r + 1 and W - r + 1 must be multiples of m. For tests and error studies."""
    m, a = t.m, t.alpha
    ci, h, wd = x.shape
    th, tw = (h - t.r + 1) // m, (wd - t.r + 1) // m
    u = filter_transform(w, t).reshape(a, a, w.shape[0], ci)
    y = np.zeros((w.shape[0], th * m, tw * m))
    for p in range(th):
        for q in range(tw):
            d = x[:, p * m: p * m + a, q * m: q * m + a].astype(np.float64)
            v = np.einsum("xi,cij,yj->xyc", t.BT, d, t.BT)
            mm = np.einsum("xyoc,xyc->xyo", u, v)
            y[:, p * m:(p + 1) * m, q * m:(q + 1) * m] = np.einsum("ix,xyo,jy->oij", t.AT, mm, t.AT)
    return y


def multiplications(ci: int, co: int, tiles: int, t: Transforms, outputs: int | None = None) -> dict[str, int]:
    """Multiplications per image of a Winograd layer as its standard-op body computes them (the
    input transform as a dense a x a correlation per channel and tile, the elementwise products as
    a batched matrix product, the output transform as one matrix product): what `onnxcomp.analysis`
    counts by inlining the function body; and of the direct convolution at `outputs` positions per
    channel (H_out * W_out), by default the tiles' (m * m * tiles, more where the grid overhangs:
    a 14 x 14 output has 16 x 16 under F(4,3))."""
    a2, m2 = t.alpha**2, t.m**2
    positions = m2 * tiles if outputs is None else outputs
    return {"input_transform": ci * tiles * a2 * a2, "products": a2 * co * ci * tiles,
            "output_transform": m2 * a2 * co * tiles, "direct": co * ci * t.r * t.r * positions}


# ---------------------------------------------------------------------------------------------
# joint spatial / Winograd-domain sparsity (Choi, El-Khamy and Lee 2018), without retraining
# ---------------------------------------------------------------------------------------------
def position_weights(t: Transforms) -> np.ndarray:
    """How much an error at Winograd position (x, y) moves the output, for white input: the norms
    of A^T's columns x and y times those of B^T's rows x and y. [a*a, 1, 1], to scale |U| before
    magnitude pruning (positions differ by up to 100x in F(4,3), so raw |U| would prune the wrong ones)."""
    a_norm = np.linalg.norm(t.AT, axis=0)
    b_norm = np.linalg.norm(t.BT, axis=1)
    w = np.outer(a_norm * b_norm, a_norm * b_norm)
    return w.reshape(-1, 1, 1)


def prune_smallest(values: np.ndarray, fraction: float, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """`values` with the `fraction` of entries smallest in |values| * scale set to 0 (ties broken by
    position, so the count is exact). A copy; fraction 0 returns the values unchanged."""
    out = np.array(values, dtype=np.float64, order="C", copy=True)
    k = int(round(fraction * out.size))
    if k <= 0:
        return out
    score = (np.abs(out) * scale).reshape(-1)
    drop = np.argpartition(score, k - 1)[:k] if k < out.size else np.arange(out.size)
    out.reshape(-1)[drop] = 0.0  # a view: `out` is C-contiguous
    return out


@dataclass
class JointSparse:
    """The outcome of `joint_sparsify`: the Winograd-domain weights to deploy (`u`, [a*a, Co, Ci],
    exactly `winograd` sparse) and the spatial weights the same artifact gives back (`spatial`,
    [Co, Ci, r, r], exactly `spatial` sparse: `spatial_from(u)`); their errors against the original
    layer (`u_error`: relative L2 in the Winograd domain, each position's error scaled by
    `position_weights`, its effect on the output;
    `spatial_error`: relative L2 of the filters), the round kept, and the summed error per round."""

    u: np.ndarray
    spatial: np.ndarray
    u_error: float
    spatial_error: float
    round: int
    history: list[float]


def spatial_from(u: np.ndarray, t: Transforms, spatial: float) -> np.ndarray:
    """The spatial filters a (possibly Winograd-pruned) U stands for, pruned to `spatial` sparsity:
    the spatial deployment of a jointly sparse layer, computed from its Winograd weights alone."""
    return prune_smallest(filter_inverse(u, t), spatial)


def joint_sparsify(weight: np.ndarray, t: Transforms, spatial: float, winograd: float,
                   rounds: int = 10) -> JointSparse:
    """One Winograd-domain artifact serving both deployments of a layer: U exactly `winograd` sparse
    and the spatial filters it gives back (`spatial_from`) exactly `spatial` sparse, both close to
    `weight`. Alternating projections (prune spatially, transform, prune in the Winograd domain with
    magnitudes scaled by `position_weights`, map back by least squares, repeat) pull the two
    deployments towards a common point; since without retraining that point also drifts away from
    the original, every round is scored by the sum of both deployments' errors and the best round
    (round 0: both pruned straight from the original) is kept."""
    w = np.asarray(weight, dtype=np.float64)
    scale = position_weights(t)
    ref_u = filter_transform(w, t)
    nw = max(float(np.linalg.norm(w)), 1e-30)
    nu = max(float(np.linalg.norm(ref_u * scale)), 1e-30)

    def deployments(point: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        u = prune_smallest(filter_transform(point, t), winograd, scale)
        g = spatial_from(u, t, spatial)
        return u, g, float(np.linalg.norm((u - ref_u) * scale) / nu), float(np.linalg.norm(g - w) / nw)

    point = w
    best = (*deployments(point), 0)
    history = [best[2] + best[3]]
    g = best[1]
    for k in range(1, max(rounds, 0) + 1):
        point = g  # the next common point: the spatial deployment of the last one
        u, g, eu, es = deployments(point)
        history.append(eu + es)
        if eu + es < best[2] + best[3]:
            best = (u, g, eu, es, k)
    u, g, eu, es, k = best
    return JointSparse(u, g, eu, es, k, history)
