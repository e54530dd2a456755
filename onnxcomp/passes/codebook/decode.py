"""The codebook weight in the graph: index storage and the standard-op subgraph that decodes it.

`Gather(codebook, Cast(indices)) -> Reshape` is folded back into a dense weight by onnxruntime at
session load, so the file shrinks and the run does not slow down. Index storage, per layer:

* ``uint4`` / ``uint2``: ONNX's sub-byte tensors (opset >= 21 / >= 25), read by one Cast;
* ``packed``: b-bit indices packed densely into uint8 (onnxcomp.linalg.bitpack's layout: 8 indices
  per b bytes) and unpacked with integer arithmetic (Reshape, Cast, Mul, ReduceSum, Div, Mod), which
  every opset >= 10 has, so 3-, 5-, 6- and 7-bit codebooks cost 3, 5, 6 and 7 bits per index;
* ``uint8``: one index per byte (8-bit codebooks, or opsets below 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcomp.graph import GraphEditor, make_node
from onnxcomp.linalg import bitpack

NATIVE_OPSET = {4: 21, 2: 25}  # index bits -> the opset whose Cast reads that sub-byte type
NATIVE_TYPE = {4: TensorProto.UINT4, 2: TensorProto.UINT2}
PACK_OPSET = 10  # Mod


def index_bits(k: int) -> int:
    """Bits an index into k centroids takes."""
    return max(1, int(np.ceil(np.log2(k)))) if k > 1 else 1


def storage_for(bits: int, opset: int, wanted: str) -> tuple[str, str]:
    """(storage, why) for indices of `bits` bits at `opset`. `wanted`: auto | native | packed | uint8."""
    if wanted == "uint8" or bits == 8:
        return "uint8", "one index per byte" + ("" if wanted == "uint8" else " (8-bit indices)")
    if wanted in ("auto", "native") and bits in NATIVE_OPSET and opset >= NATIVE_OPSET[bits]:
        return f"uint{bits}", f"ONNX UINT{bits} tensor (opset {opset})"
    if opset < PACK_OPSET:
        return "uint8", f"opset {opset} < {PACK_OPSET} has no integer Mod to unpack with: one index per byte"
    why = f"{bits}-bit indices packed into uint8 with a standard-op unpack step"
    if wanted == "native":
        why += (f" (no ONNX {bits}-bit type)" if bits not in NATIVE_OPSET else
                f" (UINT{bits} needs opset {NATIVE_OPSET[bits]}, the model has {opset})")
    return "packed", why


def storage_bytes(storage: str, bits: int, n: int) -> int:
    """Bytes the indices of n weights take in `storage`."""
    if storage == "uint8":
        return n
    if storage == "packed":
        return bitpack.packed_size(n, bits)
    per = 8 // bits
    return -(-n // per)


@dataclass
class Layout:
    """How a weight of `shape` maps to (groups, values per group): `axis` (the output-channel axis)
    moved first, channels taken `per_group` at a time, the last group padded by `pad` values; or
    `rows` of the last axis (vector codebooks)."""

    shape: tuple[int, ...]
    axis: int = 0
    per_group: int = 0  # 0: one group (per tensor)
    pad: int = 0
    rows: bool = False

    @property
    def moved_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        return (s.pop(self.axis), *s)


def index_initializer(name: str, labels: np.ndarray, bits: int, storage: str) -> onnx.TensorProto:
    """The stored index tensor (built from raw bytes: a Python list would be stored as varints)."""
    from onnxcomp.analysis import CODEBOOK_INDICES

    flat = np.ascontiguousarray(labels, dtype=np.uint8).ravel()
    t = TensorProto()
    t.name = name
    t.doc_string = f"{CODEBOOK_INDICES}{flat.size} x {bits} bits"
    if storage in ("uint4", "uint2"):
        t.data_type = NATIVE_TYPE[bits]
        t.dims.append(flat.size)
        t.raw_data = bitpack.sub_byte(flat, bits)
        return t
    data = bitpack.pack(flat, bits) if storage == "packed" else flat
    t.data_type = TensorProto.UINT8
    t.dims.append(data.size)
    t.raw_data = data.tobytes()
    return t


def _const(ed: GraphEditor, name: str, values, dtype=np.int64) -> str:
    return ed.add_initializer(name, np.asarray(values, dtype=dtype))


def decode_nodes(ed: GraphEditor, base: str, layout: Layout, labels: np.ndarray, codebook: np.ndarray,
                 bits: int, storage: str, opset: int, output: str, scale: str | None = None) -> list[onnx.NodeProto]:
    """Nodes computing the dense weight `output` from the stored indices and codebook.

    `labels`: (G, L) per-group indices (L including padding) or (R,) row indices; `codebook`:
    (G, K) scalars or (K, d) rows; `scale`: an initializer multiplied into the decoded weight
    (per-channel scales, shaped to broadcast), or None."""
    if scale is not None:
        unscaled = ed.unique_name(f"{base}/codebook_unscaled")
        nodes = decode_nodes(ed, base, layout, labels, codebook, bits, storage, opset, unscaled)
        nodes.append(make_node("Mul", [unscaled, scale], [output], ed.unique_name(f"{base}/codebook_scaled")))
        return nodes
    nodes: list[onnx.NodeProto] = []
    n = int(labels.size)
    cur = ed.add_tensor(index_initializer(f"{base}/codebook_indices", labels, bits, storage))

    def add(op: str, inputs: list[str], tag: str, **attrs) -> str:
        out = ed.unique_name(f"{base}/codebook_{tag}")
        nodes.append(make_node(op, inputs, [out], out, **attrs))
        return out

    if storage == "packed":
        cur = add("Reshape", [cur, _const(ed, f"{base}/codebook_pack_shape", [-1, bits])], "bytes")
        cur = add("Cast", [cur], "bytes_i64", to=TensorProto.INT64)
        shifts = _const(ed, f"{base}/codebook_shifts", [2 ** (t * bits) for t in range(8)])

        def word(src: str, first: int, last: int, tag: str) -> str:
            """sum_j byte_j 256^(j - first) over bytes first..last-1 of each group, as [M, 1]."""
            if (first, last) != (0, bits):
                src = add("Slice", [src, _const(ed, f"{base}/codebook_{tag}_from", [first]),
                                    _const(ed, f"{base}/codebook_{tag}_to", [last]),
                                    _const(ed, f"{base}/codebook_{tag}_axis", [1])], f"{tag}_bytes")
            src = add("Mul", [src, _const(ed, f"{base}/codebook_{tag}_weights", [256**j for j in range(last - first)])],
                      f"{tag}_scaled")
            if opset >= 13:
                return add("ReduceSum", [src, _const(ed, f"{base}/codebook_{tag}_sum_axis", [1])], tag, keepdims=1)
            return add("ReduceSum", [src], tag, axes=[1], keepdims=1)

        if bits * 8 <= 53:
            cur = add("Div", [word(cur, 0, bits, "words"), shifts], "shifted")
        else:
            # onnxruntime's int64 ReduceSum accumulates in double: exact only below 2^53, so a 56-bit
            # word is summed as a 32-bit low and a high part (floor((lo + hi 2^32) / 2^s) =
            # floor(lo / 2^s) + floor(hi 2^32 / 2^s) for lo < 2^32), Mul and Div being exact
            low = add("Div", [word(cur, 0, 4, "low"), shifts], "low_shifted")
            high = add("Mul", [word(cur, 4, bits, "high"), _const(ed, f"{base}/codebook_two32", [2**32])], "high_up")
            cur = add("Add", [low, add("Div", [high, shifts], "high_shifted")], "shifted")
        cur = add("Mod", [cur, _const(ed, f"{base}/codebook_modulus", [2**bits])], "digits")
        cur = add("Reshape", [cur, _const(ed, f"{base}/codebook_flat", [-1])], "unpacked")
        if bitpack.packed_size(n, bits) // bits * 8 != n:
            cur = add("Slice", [cur, _const(ed, f"{base}/codebook_start", [0]), _const(ed, f"{base}/codebook_end", [n]),
                                _const(ed, f"{base}/codebook_slice_axis", [0])], "trimmed")
    else:
        cur = add("Cast", [cur], "index_i64", to=TensorProto.INT64)

    if layout.rows:
        book = ed.add_initializer(f"{base}/codebook", codebook.astype(np.float32))
        cur = add("Gather", [book, cur], "rows", axis=0)
        nodes.append(make_node("Reshape", [cur, _const(ed, f"{base}/codebook_shape", layout.shape)], [output],
                               ed.unique_name(f"{base}/codebook_weight")))
        return nodes

    G, K = codebook.shape
    if G > 1:
        cur = add("Reshape", [cur, _const(ed, f"{base}/codebook_groups", [G, -1])], "grouped")
        cur = add("Add", [cur, _const(ed, f"{base}/codebook_offsets", (np.arange(G) * K)[:, None])], "global")
    book = ed.add_initializer(f"{base}/codebook", codebook.astype(np.float32).ravel())
    cur = add("Gather", [book, cur], "values", axis=0)
    moved = layout.moved_shape
    if layout.pad:
        cur = add("Reshape", [cur, _const(ed, f"{base}/codebook_flat_values", [-1])], "flat_values")
        cur = add("Slice", [cur, _const(ed, f"{base}/codebook_vstart", [0]),
                            _const(ed, f"{base}/codebook_vend", [int(np.prod(moved))]),
                            _const(ed, f"{base}/codebook_vaxis", [0])], "unpadded")
    if layout.axis == 0:
        nodes.append(make_node("Reshape", [cur, _const(ed, f"{base}/codebook_shape", layout.shape)], [output],
                               ed.unique_name(f"{base}/codebook_weight")))
        return nodes
    cur = add("Reshape", [cur, _const(ed, f"{base}/codebook_moved_shape", moved)], "moved")
    rank = len(layout.shape)
    order = list(range(1, rank))
    order.insert(layout.axis, 0)  # moved axis 0 goes back to `axis`
    nodes.append(make_node("Transpose", [cur], [output], ed.unique_name(f"{base}/codebook_weight"), perm=order))
    return nodes


def min_ir_version(opset: int) -> int:
    """The lowest IR version that declares `opset` of the default domain (UINT4 needs IR 10)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
