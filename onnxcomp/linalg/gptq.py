"""Error-compensated rounding onto a fixed grid (GPTQ, Frantar et al., ICLR 2023; OBQ's column
order). No ONNX inside.

For a layer y = W x with input second moment H = E[x x^T], the output error of a rounded weight Q is
tr((W - Q) H (W - Q)^T). Rounding every weight to its nearest grid point ignores H's off-diagonal
terms; GPTQ rounds one input column at a time and moves what that column lost onto the columns not yet
rounded, along H^-1, so that later columns absorb it. The grid here is any per-row set of values (a
codebook, optionally times a row scale), given as a `nearest` function, so the same routine serves
scalar k-means codebooks, per-channel ones and uniform grids.

Written here rather than taken from a library: the public GPTQ implementations (auto-gptq, optimum,
llm-compressor) are torch code for Linear layers with uniform int grids; this needs numpy, grouped
convolutions (one H per group) and arbitrary per-row codebooks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def damped_inverse_factor(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, batched over leading axes
    ([..., D, D] float64). Columns of H with a zero diagonal (inputs never seen) get diagonal 1:
    their weights do not touch the output, and the factor stays finite."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.arange(h.shape[-1])
    d = h[..., diag, diag]
    d = np.where(d > 0, d, 1.0)
    h[..., diag, diag] = d + damp * np.maximum(d.mean(axis=-1, keepdims=True), 1e-30)
    if h.shape[-1] < 64:  # many small groups (depthwise convs): numpy's batched inverse
        inv = np.linalg.inv(h)
    else:  # the inverse from the Cholesky factor (LAPACK potri): a third of a general inverse's work
        inv = np.stack([_spd_inverse(a) for a in h.reshape(-1, *h.shape[-2:])]).reshape(h.shape)
    inv = 0.5 * (inv + np.swapaxes(inv, -1, -2))
    return np.swapaxes(np.linalg.cholesky(inv), -1, -2)


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    from scipy.linalg import lapack

    c, info = lapack.dpotrf(a, lower=0)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"input Hessian is not positive definite (LAPACK info {info})")
    return np.triu(inv) + np.triu(inv, 1).T


def compensated_rounding(w: np.ndarray, h: np.ndarray, nearest: Callable[[np.ndarray], np.ndarray], *,
                         damp: float = 0.01, block: int = 128, act_order: bool = True) -> np.ndarray:
    """Round w [G, R, D] (G independent groups of R rows over D input columns, each group with its
    input second moment h [G, D, D]) column by column onto the grid `nearest(values)`, which maps
    values [G, R, c] to grid points of the same shape (the grid may differ per row, not per column).
    `act_order`: columns with the largest input second moment first (GPTQ's act-order: the columns
    that matter most are rounded while the most columns are left to absorb their error). Returns the
    rounded weights (float64, every entry a grid point, in the original column order). `block` columns
    are rounded between two updates of the rest (GPTQ's lazy batch update; the result does not depend
    on it)."""
    w = np.array(w, dtype=np.float64, copy=True)
    if w.ndim != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"need w [G, R, D] and h [G, D, D], got {w.shape} and {h.shape}")
    cols = w.shape[2]
    perm = None
    if act_order:
        diag = h[:, np.arange(cols), np.arange(cols)]
        perm = np.argsort(-diag, axis=1, kind="stable")  # [G, D]
        w = np.take_along_axis(w, perm[:, None, :], axis=2)
        h = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    u = damped_inverse_factor(h, damp)
    q = np.empty_like(w)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        lost = np.empty((w.shape[0], w.shape[1], stop - start))
        for j in range(start, stop):
            qj = nearest(w[:, :, j : j + 1])[:, :, 0]
            q[:, :, j] = qj
            e = (w[:, :, j] - qj) / u[:, j, j][:, None]
            lost[:, :, j - start] = e
            if j + 1 < stop:  # within the block: column by column
                w[:, :, j + 1 : stop] -= e[:, :, None] * u[:, None, j, j + 1 : stop]
        if stop < cols:  # the block's losses onto every later column at once
            w[:, :, stop:] -= np.matmul(lost, u[:, start:stop, stop:])
    if perm is not None:
        out = np.empty_like(q)
        np.put_along_axis(out, perm[:, None, :], q, axis=2)
        return out
    return q


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T) over all groups: the relative output error the rounding
    causes on inputs with second moment H (in float32: a reported figure, not a step of the rounding)."""
    w = np.asarray(w, np.float32)
    d = w - np.asarray(q, np.float32)
    h = np.asarray(h, np.float32)
    num = float(np.sum(np.matmul(d, h) * d, dtype=np.float64))
    den = float(np.sum(np.matmul(w, h) * w, dtype=np.float64))
    return num / max(den, 1e-300)
