"""Universal (dithered uniform) quantization of weights (Choi, El-Khamy and Lee 2018/2020).

Each weight w is quantized as  q = step * round((w + u) / step) - u  with a dither u drawn uniform in
[-step/2, step/2) from a seed shared by encoder and decoder, so the quantization error is uniform and
independent of w whatever the weights' distribution; the integer codes round((w + u) / step) are what
a lossless coder stores. Zeros stay exactly zero and carry no code (a dithered zero would not be
zero, and pruned weights must stay pruned). No ONNX here.

Exactness contract: `codes(quantize(w))` returns the codes `quantize` used, and `dequantize` of them
gives the same float32 bits, on any machine: the dither comes from numpy's PCG64 stream (the same on
every platform) keyed by (seed, key), and the float32 arithmetic is the same elementwise operations.
"""

from __future__ import annotations

import zlib

import numpy as np


def dither(seed: int, key: str, count: int, step: float) -> np.ndarray:
    """`count` dither values in [-step/2, step/2) (float64) for the tensor named `key`."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
    return (rng.random(count) - 0.5) * float(step)


def step_for_bits(weight: np.ndarray, bits: int) -> float:
    """The step that spreads 2^bits levels over the nonzero weights' range (a b-bit-equivalent
    quantizer; the dither adds at most one level). 0.0 for a tensor with fewer than two distinct
    nonzero values."""
    nz = weight[weight != 0]
    if nz.size == 0:
        return 0.0
    span = float(nz.max()) - float(nz.min())
    # one distinct value: nothing to quantize (the dither would only add noise to an exact tensor)
    return span / (2**bits - 1) if span > 0 else 0.0


def quantize(weight: np.ndarray, step: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 quantized weights of weight's shape, int64 codes of its nonzero entries in C order)."""
    w = np.asarray(weight, dtype=np.float32)
    flat = w.reshape(-1)
    nz = np.flatnonzero(flat)
    u = dither(seed, key, nz.size, step)
    codes = np.rint((flat[nz].astype(np.float64) + u) / step).astype(np.int64)
    out = np.zeros_like(flat)
    out[nz] = _values(codes, u, step)
    return out.reshape(w.shape), codes


def dequantize(codes: np.ndarray, mask: np.ndarray, step: float, seed: int, key: str) -> np.ndarray:
    """The float32 weights (mask's shape) from the codes of the entries where `mask` is True."""
    out = np.zeros(mask.shape, dtype=np.float32).reshape(-1)
    nz = np.flatnonzero(mask.reshape(-1))
    if nz.size != codes.size:
        raise ValueError(f"{codes.size} codes for {nz.size} nonzero weights")
    out[nz] = _values(codes.astype(np.int64), dither(seed, key, nz.size, step), step)
    return out.reshape(mask.shape)


def codes_of(quantized: np.ndarray, step: float, seed: int, key: str) -> np.ndarray | None:
    """The codes behind `quantized` (as `quantize` returned them), or None when these values are not
    a universal quantization with this step, seed and key (checked by re-quantizing exactly)."""
    flat = np.asarray(quantized, dtype=np.float32).reshape(-1)
    nz = np.flatnonzero(flat)
    u = dither(seed, key, nz.size, step)
    codes = np.rint((flat[nz].astype(np.float64) + u) / step).astype(np.int64)
    if not np.array_equal(_values(codes, u, step), flat[nz]):
        return None
    return codes


def _values(codes: np.ndarray, u: np.ndarray, step: float) -> np.ndarray:
    # the one place values are made from codes, so encoder and decoder agree to the bit
    return (codes.astype(np.float64) * float(step) - u).astype(np.float32)
