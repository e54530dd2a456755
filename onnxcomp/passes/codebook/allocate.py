"""What the codebook pass measures on data: input second moments (the Hessian diagonal) per layer,
and the bits each layer gets under a whole-model average (`avg_bits`).

Sensitivity weighting (GPTQ / OBQ's diagonal): for a layer y = W x, the output error of a weight
perturbation dW is E||dW x||^2 = sum_o dW_o H dW_o^T with H = E[x x^T]; keeping only H's diagonal,
each weight's squared error counts h_j = E[x_j^2] of the input channel it multiplies. Weighted
k-means on (w, h) minimises exactly that proxy, where plain k-means treats a weight on a dead
channel like one on the busiest.

Mixed bits: each layer l offers its relative weighted error e_l(b) at every b in [min_bits,
max_bits] (from one clustering per b on the layer's summary, onnxcomp.linalg.kmeans). With data,
one probe per layer measures the whole model's relative squared output error with only that layer
at `probe` bits (onnxcomp.sensitivity.OutputErrorProbe), which gives the layer's gain
g_l = model error / e_l(probe); without data g_l = 1 (the weight-error proxy, said in the report).
Starting with every layer in float (32 bits, error 0; `keep_float=off`: at max_bits), a greedy loop
steps down the layer whose predicted model error g_l e_l(b) grows least per bit of storage saved
(float -> max_bits, then one bit at a time), until the average bits per weight (weighted by weight
count, float layers at 32) reaches the target. A small fragile layer (a depthwise conv whose
per-tensor codebook wrecks its weakest channels, a gating layer) can so stay float for few bytes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np
import onnx


def input_second_moments(model: onnx.ModelProto, names: Sequence[tuple[str, int]], source, max_samples: int,
                         ) -> dict[str, np.ndarray]:
    """E[x^2] = var + mean^2 per channel of each (tensor, channel axis) in `names`, over about
    `max_samples` samples of `source` (onnxcomp.runtime.activation_stats, one pass per axis)."""
    from onnxcomp.runtime import activation_stats

    batches = max(1, -(-max_samples // int(getattr(source, "batch_size", 8) or 8)))
    out: dict[str, np.ndarray] = {}
    for axis in sorted({ax for _, ax in names}):
        tensors = [n for n, ax in names if ax == axis and n not in out]
        for name, st in activation_stats(model, source, tensors, axis, max_batches=batches).items():
            out[name] = st.var + st.mean**2
    return out


FLOAT_BITS = 32  # a layer left in float under avg_bits counts its 32 bits per weight


def allocate_bits(errors: Sequence[dict[int, float]], sizes: Sequence[int], gains: Sequence[float], avg_bits: float,
                  ) -> tuple[list[int], float]:
    """Bits per layer whose weight-count-weighted average is <= avg_bits, stepping each layer down
    its allowed widths (the keys of `errors[l]`, its relative error at each; FLOAT_BITS with error 0
    when float is allowed) where the predicted model error gain * e(b) grows least per bit of
    storage saved. Returns (bits, achieved average)."""
    bits = [max(e) for e in errors]
    total = float(sum(sizes))
    used = float(sum(b * n for b, n in zip(bits, sizes, strict=True)))
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        b = bits[layer]
        lower = [w for w in errors[layer] if w < b]
        if lower:
            nxt = max(lower)
            cost = gains[layer] * (errors[layer][nxt] - errors[layer][b])
            heapq.heappush(heap, (max(cost, 0.0) / (sizes[layer] * (b - nxt)), layer))

    for layer in range(len(bits)):
        push(layer)
    while heap and used > avg_bits * total + 1e-9:
        _, layer = heapq.heappop(heap)
        nxt = max(w for w in errors[layer] if w < bits[layer])
        used -= sizes[layer] * (bits[layer] - nxt)
        bits[layer] = nxt
        push(layer)
    return bits, used / total if total else 0.0


def measured_gains(probe_error: Callable[[int], float], layer_errors: Sequence[float]) -> list[float]:
    """g_l = model error with only layer l at the probe bits / that layer's relative error there."""
    gains = []
    for layer, e in enumerate(layer_errors):
        m = probe_error(layer)
        gains.append(m / e if e > 0 and np.isfinite(m) else (0.0 if m == 0 else 1e12))
    return gains
