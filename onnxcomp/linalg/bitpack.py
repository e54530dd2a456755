"""Dense bit packing of small unsigned integers (codebook indices), and their entropy.

Pure numpy. Layout (what `onnxcomp.passes.codebook` unpacks with standard ONNX ops): indices are
taken 8 at a time; the 8 b-bit values of a group form one 8b-bit little-endian integer (value t at
bits t*b .. t*b+b-1), stored as b bytes, least significant first. n indices take ceil(n / 8) * b
bytes; the tail group is padded with zeros. `nibbles` packs 4-bit values two per byte (low nibble
first) and `crumbs` 2-bit values four per byte, the layouts of ONNX's UINT4 / UINT2 tensors.
"""

from __future__ import annotations

import numpy as np


def packed_size(n: int, bits: int) -> int:
    """Bytes `pack` uses for n values of `bits` bits."""
    return -(-n // 8) * bits


_CHUNK = 1 << 23  # values per chunk (a multiple of 8): temporaries stay at a few chunk sizes


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes holding `values` (each < 2**bits, 1 <= bits <= 8) densely, 8 per `bits` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = np.asarray(values).ravel()
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    if bits in (1, 2, 4):  # 8 / bits values per byte, low bits first: the same layout, in uint8 arithmetic
        return _pad_bytes(sub_byte(v, bits), packed_size(v.size, bits))
    out = np.empty(packed_size(v.size, bits), dtype=np.uint8)
    for a in range(0, v.size, _CHUNK):
        part = v[a : a + _CHUNK].astype(np.uint64)
        groups = -(-part.size // 8)
        padded = np.zeros(groups * 8, dtype=np.uint64)
        padded[: part.size] = part
        words = np.zeros(groups, dtype=np.uint64)
        for t in range(8):
            words |= padded[t::8] << np.uint64(t * bits)
        block = np.empty((groups, bits), dtype=np.uint8)
        for byte in range(bits):
            block[:, byte] = ((words >> np.uint64(8 * byte)) & np.uint64(0xFF)).astype(np.uint8)
        start = a // 8 * bits
        out[start : start + block.size] = block.ravel()
    return out


def _pad_bytes(data: bytes, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.uint8)
    out[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def unpack(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first n values `pack(values, bits)` stored in `data` (uint8 result)."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, bits).astype(np.uint64)
    words = np.zeros(b.shape[0], dtype=np.uint64)
    for byte in range(bits):
        words |= b[:, byte] << np.uint64(8 * byte)
    mask = np.uint64((1 << bits) - 1)
    out = np.stack([(words >> np.uint64(t * bits)) & mask for t in range(8)], axis=1)
    return out.ravel()[:n].astype(np.uint8)


def sub_byte(values: np.ndarray, bits: int) -> bytes:
    """Raw bytes of an ONNX UINT4 (bits=4) or UINT2 (bits=2) tensor: low bits first."""
    per = 8 // bits
    v = np.asarray(values, dtype=np.uint8).ravel()
    padded = np.zeros(-(-v.size // per) * per, dtype=np.uint8)
    padded[: v.size] = v
    grid = padded.reshape(-1, per)
    out = np.zeros(grid.shape[0], dtype=np.uint8)
    for t in range(per):
        out |= grid[:, t] << np.uint8(t * bits)
    return out.tobytes()


def entropy_bits(labels: np.ndarray, k: int) -> float:
    """Shannon entropy of the label histogram, bits per label: the bound a lossless coder can reach."""
    return entropy_of_counts(np.bincount(np.asarray(labels).ravel(), minlength=k))


def entropy_of_counts(counts: np.ndarray) -> float:
    """Shannon entropy, bits per symbol, of a histogram of symbol counts."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if p.size > 1 else 0.0
