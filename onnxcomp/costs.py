"""Parameter and MAC counts of the layers that carry weights (Conv, ConvTranspose, Gemm, MatMul)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def conv_params(weight_shape: Sequence[int], has_bias: bool) -> int:
    return math.prod(weight_shape) + (int(weight_shape[0]) if has_bias else 0)


def conv_macs(weight_shape: Sequence[int], out_shape: Sequence[int | None] | None) -> int | None:
    """MACs of a (grouped) Conv: every output element costs (C_in/group) * prod(kernel) MACs.

    `weight_shape` is (T, S/g, *k); `out_shape` is (N, T, *spatial). None when a dim is unknown.
    """
    if out_shape is None or any(d is None for d in out_shape):
        return None
    per_output = math.prod(weight_shape[1:])
    return int(per_output * math.prod(out_shape))


def conv_transpose_macs(weight_shape: Sequence[int], group: int, in_shape: Sequence[int | None] | None) -> int | None:
    """ConvTranspose weight is (S, T/g, *k); each input element scatters into (T/g)*prod(k) outputs."""
    if in_shape is None or any(d is None for d in in_shape):
        return None
    return int(math.prod(weight_shape[1:]) * math.prod(in_shape))


def dense_macs(in_features: int, out_features: int, rows: int | None) -> int | None:
    """x (rows, in) @ W (in, out): rows * in * out MACs (rows = product of the leading dims)."""
    if rows is None:
        return None
    return int(rows * in_features * out_features)


def leading_rows(shape: Sequence[int | None] | None) -> int | None:
    """Product of all but the last dim of a MatMul/Gemm input, or None if unknown."""
    if shape is None or any(d is None for d in shape[:-1]):
        return None
    return int(math.prod(shape[:-1])) if len(shape) > 1 else 1
