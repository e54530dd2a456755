"""Energy of a CNN on a row-stationary accelerator (Eyeriss), per layer: the model Deep k-Means
(Wu et al., ICML 2018) and Yang et al. (CVPR 2017) use to show what weight sharing saves.

Energy = MACs x e_mac + sum over data types (weights, inputs, partial sums) and memory levels (DRAM,
global buffer, array = the network between PEs, register file) of accesses x e_level, in units of one
register-file access. Defaults are Eyeriss' normalised costs: DRAM 200, buffer 6, array 2, RF 1,
MAC 1 (Chen et al., ISCA 2016; Yang et al.); every number is in a user-editable JSON file
(`onnxcomp inspect --energy --energy-costs FILE`, keys as in `DEFAULT_COSTS`).

Dataflow assumptions (row stationary, Chen et al.), per Conv / Gemm / MatMul layer of T output
channels, S/g input channels per group, kernel Kh x Kw, output Ho x Wo, batch 1, in words of
`word_bits` (16):

* **RF**: every MAC reads its weight and its input from the PE's register file, and reads and writes
  its partial sum: 4 RF accesses per MAC.
* **Weights**: read once from DRAM and once from the buffer (the buffer holds a layer's working set;
  no spills are modelled); a filter row stays in a PE's RF while it slides along an output row
  (reuse Wo there) and is passed between PEs for each of the Ho output rows: Ho array accesses per
  weight.
* **Inputs**: read once from DRAM; re-read from the buffer once per pass over `filters_per_pass`
  output channels (ceil(T / p) times), each time passed diagonally to the Kh PEs that need the row.
* **Partial sums**: accumulated vertically across the Kh PEs of a column (Kh array accesses per
  output per input-channel pass), written to and read back from the buffer once per pass over
  `channels_per_pass` input channels except the first read, and written to DRAM once.
* Dense layers are 1x1 convolutions on a 1x1 output.

Codebook weights (onnxcomp's `codebook` pass) move b-bit indices instead of `word_bits`-bit weights at
DRAM, buffer and array: their weight accesses there are scaled by b / word_bits, plus the codebook
read once from DRAM and the buffer; in the PE the index is looked up in a codebook held in the RF
(the one RF read per MAC it replaces). int8 (DequantizeLinear) weights count 8 bits the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcomp.errors import BadInputError

DEFAULT_COSTS: dict[str, float] = {
    "dram": 200.0, "buffer": 6.0, "array": 2.0, "rf": 1.0, "mac": 1.0,
    "word_bits": 16, "filters_per_pass": 16, "channels_per_pass": 16,
}
LEVELS = ("dram", "buffer", "array", "rf")


def load_costs(path: str | Path | None) -> dict[str, float]:
    """The default cost table updated from a JSON file (unknown keys or bad values: BadInputError)."""
    costs = dict(DEFAULT_COSTS)
    if path is None:
        return costs
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable JSON cost table ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: the cost table must be a JSON object")
    unknown = sorted(set(data) - set(costs))
    if unknown:
        raise BadInputError(f"{path}: unknown cost key(s) {', '.join(unknown)}; known: {', '.join(costs)}")
    for key, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or \
                (key.endswith(("_bits", "_pass")) and value < 1):
            raise BadInputError(f"{path}: {key}={value!r} must be a non-negative number (>= 1 for {key})")
        costs[key] = float(value)
    return costs


@dataclass
class LayerShape:
    """What the energy of one layer depends on."""

    T: int  # output channels
    S_per_group: int  # input channels per group
    kh: int
    kw: int
    ho: int
    wo: int
    inputs: int  # input elements (S * Hi * Wi)
    groups: int = 1
    weight_bits: float | None = None  # index / int8 bits; None: full words
    codebook_entries: int = 0

    @property
    def macs(self) -> int:
        return self.T * self.S_per_group * self.kh * self.kw * self.ho * self.wo

    @property
    def weights(self) -> int:
        return self.T * self.S_per_group * self.kh * self.kw

    @property
    def outputs(self) -> int:
        return self.T * self.ho * self.wo


@dataclass
class LayerEnergy:
    node: str
    macs: int
    accesses: dict[str, dict[str, float]]  # data type -> level -> accesses (in words)
    energy: dict[str, float] = field(default_factory=dict)  # "mac" and each level, weighted
    total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_energy(node: str, s: LayerShape, costs: dict[str, float]) -> LayerEnergy:
    """Accesses and energy of one layer under the row-stationary assumptions of the module docstring."""
    p, c = costs["filters_per_pass"], costs["channels_per_pass"]
    filter_passes = math.ceil(s.T / p)
    channel_passes = math.ceil(s.S_per_group / c)
    scale = 1.0 if s.weight_bits is None else s.weight_bits / costs["word_bits"]
    weights = {"dram": s.weights * scale + s.codebook_entries, "buffer": s.weights * scale + s.codebook_entries,
               "array": s.weights * s.ho * scale, "rf": float(s.macs)}
    inputs = {"dram": float(s.inputs), "buffer": float(s.inputs * filter_passes),
              "array": float(s.inputs * filter_passes * s.kh), "rf": float(s.macs)}
    psums = {"dram": float(s.outputs), "buffer": float(s.outputs * (2 * channel_passes - 1)),
             "array": float(s.outputs * s.kh * channel_passes), "rf": 2.0 * s.macs}
    acc = {"weights": weights, "inputs": inputs, "psums": psums}
    energy = {"mac": s.macs * costs["mac"]}
    for level in LEVELS:
        energy[level] = costs[level] * sum(acc[d][level] for d in acc)
    return LayerEnergy(node, s.macs, acc, energy, sum(energy.values()))


def model_energy(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                 costs: dict[str, float] | None = None) -> tuple[list[LayerEnergy], list[str]]:
    """Energy per Conv / Gemm / MatMul layer with known shapes, and the layers left out (with why)."""
    from onnxcomp.analysis import CostContext, codebook_layers, layer_costs

    costs = costs or dict(DEFAULT_COSTS)
    ctx = CostContext(model, input_shapes)
    books = {c.node: c for c in codebook_layers(model)}
    nodes = {n.name: n for n in model.graph.node}
    out, missing = [], []
    for lc in layer_costs(model, input_shapes):
        node = nodes.get(lc.node)
        if lc.macs is None or node is None or lc.op not in ("Conv", "Gemm", "MatMul"):
            missing.append(f"{lc.node}: {'shape unknown' if lc.macs is None else lc.op + ' not modelled'}")
            continue
        shape = _shape(ctx, node, lc)
        if shape is None:
            missing.append(f"{lc.node}: shape unknown")
            continue
        if lc.node in books:
            shape.weight_bits = books[lc.node].bits
            shape.codebook_entries = books[lc.node].codebook_bytes // 4
        elif lc.kind == "quantized":
            shape.weight_bits = 8
        out.append(layer_energy(lc.node, shape, costs))
    return out, missing


def _shape(ctx: Any, node: onnx.NodeProto, lc: Any) -> LayerShape | None:
    import numpy as np

    if node.op_type == "Conv":
        w = ctx.weight_shape(node.input[1])
        y = ctx.static_shape(node.output[0])
        x = ctx.static_shape(node.input[0])
        if w is None or y is None or x is None or len(w) != 4:
            return None
        return LayerShape(int(w[0]), int(w[1]), int(w[2]), int(w[3]), int(y[2]), int(y[3]),
                          int(np.prod(x[1:])), lc.groups)
    if lc.in_channels is None or lc.out_channels is None:
        return None
    rows = max(int(lc.macs // max(lc.in_channels * lc.out_channels, 1)), 1)  # x [M, K] @ W [K, N]: M positions
    return LayerShape(int(lc.out_channels), int(lc.in_channels), 1, 1, rows, 1, rows * int(lc.in_channels))
