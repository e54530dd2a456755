"""Each layer's weight as input columns, and its input second moment H = E[x x^T] on calibration data,
for the codebook pass's error-compensated rounding (onnxcomp.linalg.gptq).

A layer's weight is seen as G independent groups of R output rows over D input columns, so that
y[g, r] = sum_d W[g, r, d] x[g, d]:
* Conv (2-D, explicit pads): W [C_out, C_in/g, kh, kw] -> [g, C_out/g, C_in/g * kh * kw], x the input
  patch of its group (onnxcomp.linalg.patches, columns in (c, kh, kw) order);
* Gemm: W [out, in] (transB) or [in, out] -> [1, out, in], x a row of A (A^T with transA);
* MatMul x @ W with a 2-D W [in, out] -> [1, out, in], x the last axis of the input.
Anything else (1-D / 3-D convs, SAME auto_pad, batched MatMul weights) has no layout: the pass rounds
it to the nearest centroid and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcomp.graph import GraphIndex, attr, read_conv
from onnxcomp.linalg.patches import conv_patches, output_size

ROWS_PER_BATCH = 4096  # conv input patches sampled per calibration batch and layer
MAX_COLUMNS = 6144  # input columns per group above which H is not built (D^2 float32 kept: 150 MB at the cap)


@dataclass(frozen=True)
class ColumnLayout:
    """How one layer's weight maps to [G, R, D] and how its input becomes rows [n, G, D]."""

    shape: tuple[int, ...]
    groups: int
    kind: str  # "conv" | "gemm" | "matmul"
    transposed: bool = False  # the weight is [in, out] (Gemm without transB, MatMul)
    trans_a: bool = False
    geometry: tuple = ()  # a conv's (kernel, strides, dilations, pads)

    def matrix(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return w.reshape(self.groups, self.shape[0] // self.groups, -1)
        return (w.T if self.transposed else w)[None]

    def weight(self, m: np.ndarray) -> np.ndarray:
        """Inverse of `matrix`."""
        if self.kind == "conv":
            return m.reshape(self.shape)
        return m[0].T if self.transposed else m[0]

    def output_channel(self) -> np.ndarray:
        """[G, R]: the output channel each matrix row is."""
        return np.arange(self.matrix_rows).reshape(self.groups, -1)

    @property
    def matrix_rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def columns(self) -> int:
        """D: input columns per group."""
        if self.kind == "conv":
            return int(np.prod(self.shape[1:]))
        return self.shape[0] if self.transposed else self.shape[1]

    def rows(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[n, G, D] float32 input rows of one captured batch."""
        if self.kind == "conv":
            kernel, strides, dilations, pads = self.geometry
            n, _, h, w = x.shape
            ho = output_size(h, kernel[0], strides[0], dilations[0], pads[0], pads[2])
            wo = output_size(w, kernel[1], strides[1], dilations[1], pads[1], pads[3])
            total = n * ho * wo
            pick = np.sort(rng.choice(total, ROWS_PER_BATCH, replace=False)) if total > ROWS_PER_BATCH else np.arange(total)
            pos = np.stack(np.unravel_index(pick, (n, ho, wo)), axis=1)
            z = conv_patches(x, kernel, strides, dilations, pads, positions=pos)
            return z.reshape(len(z), self.groups, -1).astype(np.float32, copy=False)
        if self.kind == "gemm":
            a = x.T if self.trans_a else x
            return a.reshape(a.shape[0], 1, -1).astype(np.float32, copy=False)
        return x.reshape(-1, 1, x.shape[-1]).astype(np.float32, copy=False)


def column_layout(index: GraphIndex, node: onnx.NodeProto, shape: tuple[int, ...]) -> ColumnLayout | str:
    """The layer's ColumnLayout, or why it has none."""
    if node.op_type == "Conv":
        conv = read_conv(index, node)
        if isinstance(conv, str):
            return conv
        if conv.spatial_rank != 2:
            return f"{conv.spatial_rank}-D conv (input columns are read for 2-D convs)"
        if conv.pads is None:
            return f"auto_pad={conv.auto_pad} (run normalize for explicit pads)"
        lay = ColumnLayout(shape, conv.group, "conv", geometry=(conv.kernel, conv.strides, conv.dilations, conv.pads))
    elif node.op_type == "Gemm":
        lay = ColumnLayout(shape, 1, "gemm", transposed=not attr(node, "transB", 0), trans_a=bool(attr(node, "transA", 0)))
    elif len(shape) != 2:
        return f"MatMul weight of rank {len(shape)}"
    else:
        lay = ColumnLayout(shape, 1, "matmul", transposed=True)
    if lay.columns > MAX_COLUMNS:
        return f"{lay.columns} input columns > {MAX_COLUMNS} (its input Hessian would take {lay.columns**2 / 2**18:.0f} MB)"
    return lay


def input_hessians(model: onnx.ModelProto, layers: dict[str, tuple[str, ColumnLayout]], source, max_samples: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """E[x x^T] per group, [G, D, D] float32, for each layer name -> (input tensor, layout), over about
    `max_samples` samples of `source` (conv patches sampled, ROWS_PER_BATCH per batch). Products and
    sums in float32: every layer's Hessian is held at once (float64 doubled vgg16's peak memory and
    the BLAS time) and GPTQ's damping (1% of the mean diagonal) dwarfs float32's round-off."""
    from onnxcomp.runtime import run_batches

    if not layers:
        return {}
    names = sorted({t for t, _ in layers.values()})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)
    seen = 0
    for _, values, _ in run_batches(model, source, names, max_bytes=256 * 2**20):
        for layer, (tensor, lay) in layers.items():
            z = lay.rows(values[tensor], rng).transpose(1, 0, 2)  # [G, n, D]
            part = np.matmul(z.transpose(0, 2, 1), z)
            if layer in sums:
                sums[layer] += part
            else:
                sums[layer] = part
            counts[layer] += len(z)
        seen += len(values[names[0]]) if values[names[0]].ndim else 1
        if seen >= max_samples:
            break
    return {k: v / np.float32(max(counts[k], 1)) for k, v in sums.items()}
