"""Convolution input patches (im2col) for least-squares refits of conv layers. No ONNX inside."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def output_size(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - (kernel - 1) * dilation - 1) // stride + 1


def conv_patches(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 pads: Sequence[int], positions: np.ndarray | None = None) -> np.ndarray:
    """Rows of a 2-D convolution's input patches: x [N, C, H, W] -> [rows, C * kh * kw], columns in
    (c, kh, kw) order, so `patches @ W.reshape(O, -1).T` is the conv's output at those positions.

    `pads` are ONNX's [top, left, bottom, right] (zero padding). `positions` (k, 3) picks (n, ho, wo)
    output positions; None takes every position, sample-major. Only the picked patches are copied.
    """
    n, c, h, w = x.shape
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    top, left, bottom, right = (int(p) for p in pads)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    if positions is None:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
    ni, hi, wi = positions[:, 0], positions[:, 1], positions[:, 2]
    return win[ni, :, hi, wi].reshape(len(positions), c * kh * kw)
