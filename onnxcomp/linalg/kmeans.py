"""k-means for weight sharing: optimal 1-D clustering by dynamic programming, and vector k-means.

Pure numpy / scipy; nothing here knows about ONNX.

**1-D, optimal** (`kmeans_1d`): the points of each group are reduced to their weighted distinct
values, or, when there are more than `max_points` of them, to a fine histogram (each bin becomes
one point at the weighted mean of its values, carrying their total weight). On those sorted points
the optimal partition into k contiguous clusters is found exactly by the dynamic programme of
Ckmeans.1d.dp (Wang & Song, R Journal 2011): D[m][i] = min_j D[m-1][j] + cost(j, i), where
cost(j, i) is the weighted within-cluster sum of squares of points j..i-1 from prefix sums. The
argmin j is monotone in i, so each row is solved by divide and conquer in O(n log n). No library on
PyPI does this for weighted points, batched over thousands of channels, fast enough: one numpy
call here handles every group's row at once, level by level of the recursion, so per-channel
codebooks of a VGG-16 layer cost a few dozen vectorised passes, not a Python loop per channel.
When the points were binned, a few weighted Lloyd steps on the raw values polish the result
(Lloyd never increases the cost, and on exact distinct values the optimum is its fixed point).

**Vectors** (`kmeans_rows`): weighted Lloyd from k-means++ seeding. scipy's `kmeans2` takes no
sample weights, so the loop is written here; the nearest-centroid search is scipy's `vq` (C).

Every function is deterministic for a given `rng` and never returns NaN centroids: a cluster that
gets no weight keeps its seed value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INITS = ("optimal", "kmeans++", "linear", "quantile")


@dataclass
class Clustering:
    """Centroids and the label of every value. 1-D: centroids (G, k), labels (G, n), one row per
    group. Rows: centroids (k, d), labels (n,)."""

    centroids: np.ndarray
    labels: np.ndarray
    k: int  # centroids per group (capped to the most distinct values any group has)
    capped: bool  # k was above the number of distinct values of some group
    binned: bool  # the DP ran on a histogram (more distinct values than max_points)

    def decoded(self) -> np.ndarray:
        """Every value replaced by its centroid: (G, n) for 1-D, (n, d) for rows."""
        if self.labels.ndim == 1:
            return self.centroids[self.labels]
        return np.take_along_axis(self.centroids, self.labels, axis=1)


# -- the exact dynamic programme --------------------------------------------------------------------


_FINE = 16  # fine histogram bins per DP point: Lloyd polishes on them
_CHUNK = 1 << 23  # values per chunk when summarising or labelling a big group (bounds temporaries)
_SAMPLE = 1 << 16


@dataclass
class _Summary:
    """A group reduced to weighted points: `points` (sorted) for the DP, `fine` for Lloyd (the
    same when exact). `exact`: the points are the group's distinct values."""

    points: np.ndarray
    weights: np.ndarray
    fine: np.ndarray
    fine_weights: np.ndarray
    exact: bool


def _summarise(v: np.ndarray, w: np.ndarray | None, max_points: int) -> _Summary:
    """Distinct values with their total weight when there are at most max_points of them, else a
    histogram of max_points * _FINE bins (merged _FINE at a time for the DP). Chunked: a 100M-value
    tensor needs a few chunk-sized temporaries, not copies of itself."""
    sample = v if v.size <= 4 * max_points else v[:: max(1, v.size // _SAMPLE)]
    if np.unique(sample).size <= max_points:
        uniq, inv = np.unique(v, return_inverse=True)
        if uniq.size <= max_points:
            cw = np.bincount(inv.ravel(), weights=None if w is None else w, minlength=uniq.size).astype(np.float64)
            u = uniq.astype(np.float64)
            return _Summary(u, cw, u, cw, True)
    lo, hi = float(v.min()), float(v.max())
    bins = max_points * _FINE
    scale = bins / (hi - lo)  # float64: a spread of a few denormals (a BN-zeroed channel) overflows float32
    sw = np.zeros(bins)
    sx = np.zeros(bins)
    for a in range(0, v.size, _CHUNK):
        part = v[a : a + _CHUNK]
        idx = np.clip(((part.astype(np.float64) - lo) * scale).astype(np.int64), 0, bins - 1)
        pw = None if w is None else w[a : a + _CHUNK]
        sw += np.bincount(idx, weights=pw, minlength=bins)
        sx += np.bincount(idx, weights=part if pw is None else pw * part, minlength=bins)
    centre = lo + (np.arange(bins) + 0.5) / scale  # a weightless bin sits at its centre
    fine = np.where(sw > 0, sx / np.where(sw > 0, sw, 1.0), centre)
    keep = sw > 0
    cw = sw.reshape(max_points, _FINE).sum(axis=1)
    cs = sx.reshape(max_points, _FINE).sum(axis=1)
    ckeep = cw > 0
    points = cs[ckeep] / cw[ckeep]
    return _Summary(points, cw[ckeep], fine[keep], sw[keep], False)


def _segment_argmin(values: np.ndarray, starts: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Index (into `values`) of the first minimum of each segment; `seg` is each value's segment."""
    mins = np.minimum.reduceat(values, starts)
    hit = np.flatnonzero(values <= mins[seg])
    seg_hit = seg[hit]
    first = np.ones(hit.size, dtype=bool)  # hits are sorted: a segment's first is where seg changes
    first[1:] = seg_hit[1:] != seg_hit[:-1]
    out = np.empty(starts.size, dtype=np.int64)
    out[seg_hit[first]] = hit[first]
    return out


def _dp_rows(x: np.ndarray, w: np.ndarray, n: np.ndarray, k: int) -> np.ndarray:
    """Optimal centroids (G, k) of G padded groups of sorted points x (G, P) with weights w; group g
    uses its first n[g] > k points. Divide and conquer over each DP row, every group at once (all
    tables flat, indexed g * (P + 1) + i)."""
    G, P = x.shape
    stride = P + 1
    zeros = np.zeros((G, 1))
    W = np.concatenate([zeros, np.cumsum(w, axis=1)], axis=1).ravel()
    S1 = np.concatenate([zeros, np.cumsum(w * x, axis=1)], axis=1).ravel()
    S2 = np.concatenate([zeros, np.cumsum(w * x * x, axis=1)], axis=1).ravel()

    def cost(fj: np.ndarray, fi: np.ndarray) -> np.ndarray:
        """Weighted within-cluster sum of squares of points [j, i), both as flat positions."""
        ww = W[fi] - W[fj]
        s = S1[fi] - S1[fj]
        q = np.divide(s * s, ww, out=np.zeros_like(s), where=ww > 0)
        return np.maximum(S2[fi] - S2[fj] - q, 0.0)

    base = np.arange(G) * stride
    flat_i = np.arange(G * stride)
    D = cost(np.repeat(base, stride), flat_i)  # one cluster: the first i points
    back = np.zeros((k, G * stride), dtype=np.int32)
    for m in range(1, k):
        new = np.full(G * stride, np.inf)
        # tasks (group offset, i_lo, i_hi, j_lo, j_hi): i in [m+1, n_g], j in [m, i-1]
        tb = base.copy()
        ilo = np.full(G, m + 1, dtype=np.int64)
        ihi = n.astype(np.int64)
        jlo = np.full(G, m, dtype=np.int64)
        jhi = ihi - 1
        live = ilo <= ihi
        tb, ilo, ihi, jlo, jhi = tb[live], ilo[live], ihi[live], jlo[live], jhi[live]
        while tb.size:
            mid = (ilo + ihi) // 2
            cnt = np.minimum(mid - 1, jhi) - jlo + 1
            starts = np.zeros(tb.size, dtype=np.int64)
            np.cumsum(cnt[:-1], out=starts[1:])
            seg = np.repeat(np.arange(tb.size), cnt)
            j = jlo[seg] + (np.arange(seg.size) - starts[seg])
            fj = tb[seg] + j
            val = D[fj] + cost(fj, tb[seg] + mid[seg])
            best = _segment_argmin(val, starts, seg)
            bj = j[best]
            new[tb + mid] = val[best]
            back[m, tb + mid] = bj
            # left: i in [ilo, mid-1] with j in [jlo, bj]; right: i in [mid+1, ihi] with j in [bj, jhi]
            left = ilo <= mid - 1
            right = mid + 1 <= ihi
            tb, ilo, ihi, jlo, jhi = (np.concatenate([a[left], b[right]]) for a, b in
                                      ((tb, tb), (ilo, mid + 1), (mid - 1, ihi), (jlo, bj), (bj, jhi)))
        D = new
    # backtrack from i = n_g: cluster m covers points [j, i)
    cent = np.zeros((G, k))
    i = n.astype(np.int64)
    rows = np.arange(G)
    for m in range(k - 1, -1, -1):
        j = back[m, base + i].astype(np.int64) if m > 0 else np.zeros(G, dtype=np.int64)
        ww = W[base + i] - W[base + j]
        s = S1[base + i] - S1[base + j]
        # a weightless cluster takes the middle of its points (it matters to nothing)
        middle = 0.5 * (x[rows, j] + x[rows, i - 1])
        cent[:, m] = np.divide(s, ww, out=middle, where=ww > 0)
        i = j
    return cent


# -- public API -------------------------------------------------------------------------------------


def _seed_1d(v: np.ndarray, w: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Starting centroids for Lloyd (init != optimal) from weighted points: k sorted values."""
    if init == "linear":
        return np.linspace(v.min(), v.max(), k)
    if init == "quantile":
        cw = np.cumsum(w)
        q = (np.arange(k) + 0.5) / k * cw[-1]
        return v[np.minimum(np.searchsorted(cw, q), v.size - 1)]
    # k-means++ (weighted D^2 sampling)
    c = [v[rng.choice(v.size, p=w / w.sum())]]
    d2 = (v - c[0]) ** 2
    for _ in range(1, k):
        p = w * d2
        total = p.sum()
        c.append(v[rng.choice(v.size, p=p / total)] if total > 0 else v[rng.integers(v.size)])
        d2 = np.minimum(d2, (v - c[-1]) ** 2)
    return np.sort(np.asarray(c))


def _ward_seeds(summaries: list[_Summary], k: int) -> np.ndarray:
    """Centroids (G, k) by agglomerative merging of adjacent clusters, cheapest SSE increase first
    (Ward's criterion; in 1-D only neighbours ever merge), every group at once: each round merges
    the pairs whose cost is a local minimum among their neighbours (never two overlapping pairs)
    and among the cheapest half of the merges the group still needs. Near-optimal where Lloyd
    from quantiles gets stuck (k near n: 50x the optimal SSE on 576 values, 256 centroids)."""
    G = len(summaries)
    n = np.array([sm.points.size for sm in summaries])
    P = int(n.max())
    W = np.zeros((G, P))
    S = np.zeros((G, P))
    for g, sm in enumerate(summaries):
        W[g, : n[g]] = np.maximum(sm.weights, 1e-300)  # a weightless point still forms a cluster
        S[g, : n[g]] = sm.weights * sm.points if np.any(sm.weights > 0) else sm.points
        if not np.any(sm.weights > 0):
            W[g, : n[g]] = 1.0
    valid = np.arange(P)[None, :] < n[:, None]
    while True:
        count = valid.sum(axis=1)
        need = count - k
        if not np.any(need > 0):
            break
        m = np.where(valid, S / np.where(valid, W, 1.0), 0.0)
        pair_ok = valid[:, :-1] & valid[:, 1:]
        wsum = W[:, :-1] + W[:, 1:]
        cost = np.where(pair_ok, W[:, :-1] * W[:, 1:] / np.where(pair_ok, wsum, 1.0) * (m[:, :-1] - m[:, 1:]) ** 2, np.inf)
        left = np.concatenate([np.full((G, 1), np.inf), cost[:, :-1]], axis=1)
        right = np.concatenate([cost[:, 1:], np.full((G, 1), np.inf)], axis=1)
        local = pair_ok & (cost < left) & (cost <= right)
        # a local minimum is merged only if it is also among the cheapest half of the merges the
        # group still needs, over all its pairs: close to merging one cheapest pair at a time
        quota = np.minimum(np.maximum(need // 2, 1), P - 1)
        threshold = np.take_along_axis(np.sort(cost, axis=1), (quota - 1)[:, None], axis=1)
        take = local & (cost <= threshold)
        take &= np.cumsum(take, axis=1) <= need[:, None]  # ties (equal values) never overshoot k
        # merge pair (i, i+1) into i+1; i leaves
        i_idx = np.nonzero(take)
        W[i_idx[0], i_idx[1] + 1] += W[i_idx]
        S[i_idx[0], i_idx[1] + 1] += S[i_idx]
        valid[i_idx] = False
        # compact each row: valid clusters first, in order
        rows, cols = np.nonzero(valid)
        new_cols = (np.cumsum(valid, axis=1) - 1)[rows, cols]
        W2, S2 = np.zeros_like(W), np.zeros_like(S)
        W2[rows, new_cols], S2[rows, new_cols] = W[rows, cols], S[rows, cols]
        W, S = W2, S2
        valid = np.arange(P)[None, :] < valid.sum(axis=1)[:, None]
    return S[:, :k] / W[:, :k]


@dataclass
class _Stacked:
    """Every group's fine points in one array (group g's mapped into [2g, 2g + 1] for one global
    searchsorted), built once per fit."""

    owner: np.ndarray
    pts: np.ndarray
    w: np.ndarray
    lo: np.ndarray
    span: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, summaries: list[_Summary]) -> _Stacked:
        sizes = np.array([sm.fine.size for sm in summaries])
        lo = np.array([sm.fine[0] for sm in summaries])
        hi = np.array([sm.fine[-1] for sm in summaries])
        return cls(np.repeat(np.arange(len(summaries)), sizes), np.concatenate([sm.fine for sm in summaries]),
                   np.concatenate([sm.fine_weights for sm in summaries]), lo, np.where(hi > lo, hi - lo, 1.0), sizes)

    def labels(self, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(local label of every point, weighted SSE per group) for sorted centroids (G, k)."""
        G, k = cent.shape
        # centroids may fall outside a group's point range: clip the mapped midpoints into [2g, 2g + 1]
        mids = np.clip((0.5 * (cent[:, 1:] + cent[:, :-1]) - self.lo[:, None]) / self.span[:, None], 0.0, 1.0)
        mids = mids + 2.0 * np.arange(G)[:, None]
        u = (self.pts - self.lo[self.owner]) / self.span[self.owner] + 2.0 * self.owner
        local = np.searchsorted(mids.ravel(), u) - self.owner * (k - 1)
        d = self.pts - cent[self.owner, local]
        return local, np.bincount(self.owner, weights=self.w * d * d, minlength=G)


def _lloyd_batch(summaries: list[_Summary], cent: np.ndarray, steps: int) -> np.ndarray:
    """Weighted Lloyd steps on every group's fine points at once; sorted centroids (G, k) back."""
    G, k = cent.shape
    st = _Stacked.of(summaries)
    for _ in range(steps):
        local, _ = st.labels(cent)
        flat = st.owner * k + local
        sw = np.bincount(flat, weights=st.w, minlength=G * k).reshape(G, k)
        sx = np.bincount(flat, weights=st.w * st.pts, minlength=G * k).reshape(G, k)
        moved = np.sort(np.where(sw > 0, sx / np.where(sw > 0, sw, 1.0), cent), axis=1)
        if np.array_equal(moved, cent):
            break
        cent = moved
    return cent


def _labels(v: np.ndarray, cent: np.ndarray, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest sorted centroid for every value, uint8 when k <= 256; count per
    centroid), chunked. `exact`: compared in float64, since the float32 midpoint of two neighbouring
    float32 values may round onto one of them (a codebook of the distinct values must reproduce
    them); otherwise in the values' own dtype (a sub-ulp tie going either way changes nothing)."""
    mids = 0.5 * (cent[1:] + cent[:-1])
    if not exact:
        mids = mids.astype(v.dtype)
    out = np.empty(v.shape, dtype=np.uint8 if cent.size <= 256 else np.int32)
    counts = np.zeros(cent.size, dtype=np.int64)
    for a in range(0, v.size, _CHUNK):
        part = v[a : a + _CHUNK]
        lab = np.searchsorted(mids, part.astype(np.float64) if exact else part)
        counts += np.bincount(lab, minlength=cent.size)
        out[a : a + _CHUNK] = lab
    return out, counts


@dataclass
class Fit:
    """Centroids (G, k) fit to summaries, with each group's weighted SSE on its summary points
    (exact for exact summaries; the histogram's between-bin part otherwise)."""

    centroids: np.ndarray
    sse: np.ndarray
    k: int
    capped: bool
    method: str = "exact DP"


def summarise(values: np.ndarray, weights: np.ndarray | None = None, *, max_points: int = 4096) -> list[_Summary]:
    """Each row of `values` (G, n) (1-D: one group) reduced to weighted points, once for any k."""
    x = _as_groups(values)
    w = None
    if weights is not None:
        w = np.atleast_2d(np.asarray(weights, dtype=x.dtype))
        if w.shape != x.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
            raise ValueError("weights must be finite, >= 0 and shaped like values")
    # a group whose weights are all zero is clustered unweighted (its errors cost nothing anyway)
    return [_summarise(x[g], None if w is None or w[g].sum() <= 0 else w[g], max_points) for g in range(x.shape[0])]


def total_weight(summaries: list[_Summary]) -> np.ndarray:
    """sum of w x^2 per group, from its summary: the SSE of the all-zero codebook (an error scale)."""
    return np.array([float(np.sum(sm.fine_weights * sm.fine * sm.fine)) for sm in summaries])


def _coarsened(sm: _Summary, points: int) -> _Summary:
    """The summary with its DP points merged, runs of consecutive points at a time, to at most
    `points` (its fine points, on which Lloyd polishes and errors are measured, kept)."""
    if sm.points.size <= points:
        return sm
    run = -(-sm.points.size // points)
    cut = np.arange(0, sm.points.size, run)
    w = np.add.reduceat(sm.weights, cut)
    s = np.add.reduceat(sm.weights * sm.points, cut)
    p = np.where(w > 0, s / np.where(w > 0, w, 1.0), sm.points[cut])
    return _Summary(p, w, sm.fine, sm.fine_weights, False)


def fit_centroids(summaries: list[_Summary], k: int, *, init: str = "optimal", polish: int = 8,
                  rng: np.random.Generator | None = None, dp_points: int | None = None,
                  max_dp_work: float = 1.5e8) -> Fit:
    """Centroids for every group: exact DP (init="optimal") or Lloyd from a seeding; see kmeans_1d.
    `dp_points` coarsens each group's DP points to at most that many first (then Lloyd polishes on
    the fine points): near-optimal, several times faster at large k; for estimates. Past
    `max_dp_work` (k log2(P) P groups element operations, about 5 s of numpy) Lloyd from a
    quantile seeding replaces the DP; `method` says which ran."""
    if dp_points is not None:
        summaries = [_coarsened(sm, dp_points) for sm in summaries]
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {', '.join(INITS)}")
    if k < 1:
        raise ValueError("k must be >= 1")
    rng = rng or np.random.default_rng(0)
    G = len(summaries)
    distinct = [sm.points.size if sm.exact else 1 << 62 for sm in summaries]
    capped = k > min(distinct)
    k_used = min(k, max(distinct))
    cent = np.empty((G, k_used))
    many = [g for g in range(G) if distinct[g] > k_used]
    for g in range(G):
        if distinct[g] <= k_used:  # no more distinct values than centroids: each is its own
            p = summaries[g].points
            cent[g] = np.concatenate([p, np.full(k_used - p.size, p[-1])])
    method = "exact DP" if init == "optimal" else f"Lloyd from {init}"
    dp = many if init == "optimal" else []
    if dp:
        P = max(summaries[g].points.size for g in dp)
        work = k_used * max(math.log2(P), 1.0) * P * len(dp)
        if work > max_dp_work:  # numpy's per-level cost would run to minutes: near-optimal instead
            dp, method = [], "Ward merging + Lloyd (the exact DP is over its work budget at this k and size)"
    if dp:
        # centred per group: the prefix sums of squares then lose nothing to a common offset
        shift = np.array([np.average(summaries[g].points, weights=summaries[g].weights) for g in dp])
        n = np.array([summaries[g].points.size for g in dp])
        px = np.empty((len(dp), P))
        pw = np.zeros((len(dp), P))
        for r, g in enumerate(dp):
            sm = summaries[g]
            px[r, : sm.points.size] = sm.points - shift[r]
            px[r, sm.points.size :] = sm.points[-1] - shift[r]
            pw[r, : sm.points.size] = sm.weights
        step = max(1, (1 << 24) // max(k_used * (P + 1), 1))  # backpointers <= ~64 MB per batch
        for a in range(0, len(dp), step):
            rows = dp[a : a + step]
            cent[rows] = _dp_rows(px[a : a + step], pw[a : a + step], n[a : a + step], k_used) + shift[a : a + step, None]
        binned = [g for g in dp if not summaries[g].exact]
        if binned:
            cent[binned] = _lloyd_batch([summaries[g] for g in binned], np.sort(cent[binned], axis=1), polish)
    elif many and init == "optimal":
        cent[many] = _lloyd_batch([summaries[g] for g in many], _ward_seeds([summaries[g] for g in many], k_used), 30)
    elif many:
        seeds = np.stack([_seed_1d(summaries[g].fine, summaries[g].fine_weights, k_used, init, rng) for g in many])
        cent[many] = _lloyd_batch([summaries[g] for g in many], np.sort(seeds, axis=1), 30)
    cent.sort(axis=1)
    _, sse = _Stacked.of(summaries).labels(cent)
    return Fit(cent, sse, k_used, capped, method)


def assign(values: np.ndarray, centroids: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """Labels (G, n) of the nearest of each group's sorted centroids (G, k); uint8 for k <= 256."""
    return assign_counted(values, centroids, exact=exact)[0]


def assign_counted(values: np.ndarray, centroids: np.ndarray, *, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels (G, n), how many values each centroid got (G, k)). `exact=False` compares float32
    values in float32 (faster on big binned tensors; a value within an ulp of a midpoint may go to
    either side)."""
    x = _as_groups(values)
    parts = [_labels(x[g], centroids[g], exact) for g in range(x.shape[0])]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def _as_groups(values: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(values))
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    return x


def kmeans_1d(values: np.ndarray, k: int, weights: np.ndarray | None = None, *, init: str = "optimal",
              max_points: int = 4096, polish: int = 8, rng: np.random.Generator | None = None) -> Clustering:
    """Cluster each row of `values` (G, n) (a 1-D array is one group) into at most k centroids.

    `weights` (same shape, >= 0) weight each value's squared error. `init="optimal"` solves the
    problem exactly on the weighted distinct values, or, past `max_points` of them, on a histogram
    (then up to `polish` Lloyd steps on a 16x finer one); the other inits run up to 30 Lloyd steps
    from their seeding. k is capped to the most distinct values any group has (`capped` says that
    some group has fewer than k: its extra centroids repeat its last value). Float32 input stays
    float32 (no float64 copy of a big tensor). Centroids come back sorted (G, k) as float64,
    labels (G, n) as uint8 for k <= 256."""
    sums = summarise(values, weights, max_points=max_points)
    fit = fit_centroids(sums, k, init=init, polish=polish, rng=rng)
    return Clustering(fit.centroids, assign(values, fit.centroids), fit.k, fit.capped, not all(sm.exact for sm in sums))


def kmeans_rows(rows: np.ndarray, k: int, weights: np.ndarray | None = None, *, init: str = "kmeans++",
                steps: int = 30, rng: np.random.Generator | None = None) -> Clustering:
    """Weighted k-means of vectors `rows` (n, d): centroids (k, d), labels (n,). k is capped to the
    distinct rows. init: kmeans++ (weighted), linear (evenly spaced along the first principal
    axis), quantile (rows at weighted quantiles of that axis); "optimal" is not defined for vectors."""
    from scipy.cluster.vq import vq

    if init == "optimal" or init not in INITS:
        raise ValueError(f"init={init!r} for vectors: expected kmeans++, linear or quantile")
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError("rows must be a finite (n, d) array")
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (x.shape[0],) or np.any(w < 0):
        raise ValueError("weights must be >= 0, one per row")
    if w.sum() <= 0:
        w = np.ones_like(w)
    rng = rng or np.random.default_rng(0)
    distinct = np.unique(x, axis=0)
    capped = k > distinct.shape[0]
    k = min(k, distinct.shape[0])
    if capped:
        cent = distinct
    elif init == "kmeans++":
        first = rng.choice(x.shape[0], p=w / w.sum())
        cent = [x[first]]
        d2 = np.sum((x - x[first]) ** 2, axis=1)
        for _ in range(1, k):
            p = w * d2
            pick = rng.choice(x.shape[0], p=p / p.sum()) if p.sum() > 0 else rng.integers(x.shape[0])
            cent.append(x[pick])
            d2 = np.minimum(d2, np.sum((x - x[pick]) ** 2, axis=1))
        cent = np.stack(cent)
    else:
        mean = np.average(x, axis=0, weights=w)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        t = (x - mean) @ vt[0]
        order = np.argsort(t)
        if init == "linear":
            targets = np.linspace(t.min(), t.max(), k)
            pick = order[np.minimum(np.searchsorted(t[order], targets), x.shape[0] - 1)]
        else:
            cw = np.cumsum(w[order])
            pick = order[np.minimum(np.searchsorted(cw, (np.arange(k) + 0.5) / k * cw[-1]), x.shape[0] - 1)]
        cent = x[pick]
    labels, _ = vq(x, cent)
    for _ in range(steps):
        sw = np.bincount(labels, weights=w, minlength=k)
        moved = np.stack([np.bincount(labels, weights=w * x[:, c], minlength=k) for c in range(x.shape[1])], axis=1)
        moved = np.where(sw[:, None] > 0, moved / np.where(sw > 0, sw, 1.0)[:, None], cent)
        if np.array_equal(moved, cent):
            break
        cent = moved
        labels, _ = vq(x, cent)
    return Clustering(cent, labels.astype(np.int64), k, capped, False)
