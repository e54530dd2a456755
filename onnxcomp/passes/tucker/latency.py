"""Tucker's side of the cost model: a layer and its rewrite options as one-layer units to time.

A unit is the layer alone (the original Conv with its geometry, or x @ W + b for a dense layer) or
the chain a rank choice would put in its place, with random weights of the real shapes at the real
input shape: the timing depends on shapes, not values, so it is cached across layers and models.
"""

from __future__ import annotations

import math
from typing import Any

from onnx import TensorProto, helper

from onnxcomp.linalg import decompose as dec
from onnxcomp.units import Unit, unit_for_nodes

Ranks = tuple[int | None, int | None]
_F = TensorProto.FLOAT
_ROUND_UP = 32  # MLAS's widest fast path; a rank rounded up to it often runs faster at lower error


def layer_unit(plan: Any, ranks: Ranks | None, opset: int = 17) -> Unit | None:
    """The layer (ranks None) or its chain at `ranks`, as a unit; None when its input shape is unknown."""
    if plan.in_shape is None:
        return None
    x = "x"
    inputs = {x: (tuple(plan.in_shape), _F)}
    T, S = plan.shape[0], plan.shape[1]
    if plan.conv is not None:
        geometry = plan.conv.geometry_attributes()
        kernel = tuple(plan.shape[2:])
        point = {"kernel_shape": [1] * len(kernel)}
        one = (1,) * len(kernel)
        if ranks is None:
            stages = [(T, S, kernel, geometry)]
        else:
            r_out, r_in = ranks
            pointwise = plan.kind == "svd"
            stages = []
            if r_in is not None:
                stages.append((r_in, S, one, point))
            core_in = S if r_in is None else r_in
            core_out = T if r_out is None else r_out
            stages.append((core_out, core_in, one if pointwise else kernel, geometry))
            if r_out is not None:
                stages.append((T, r_out, one, point))
        nodes, consts, src = [], {}, x
        for k, (o, i, ks, attrs) in enumerate(stages):
            w, out = f"w{k}", ("y" if k == len(stages) - 1 else f"t{k}")
            consts[w] = ((o, i, *ks), _F)
            ins = [src, w]
            if k == len(stages) - 1 and plan.bias is not None:
                consts["b"] = ((T,), _F)
                ins.append("b")
            nodes.append(helper.make_node("Conv", ins, [out], name=f"stage{k}", **attrs))
            src = out
    else:
        dims = [(S, T)] if ranks is None else [(S, ranks[0]), (ranks[0], T)]
        nodes, consts, src = [], {}, x
        for k, (i, o) in enumerate(dims):
            w, out = f"w{k}", f"t{k}"
            consts[w] = ((int(i), int(o)), _F)
            nodes.append(helper.make_node("MatMul", [src, w], [out], name=f"stage{k}"))
            src = out
        if plan.bias is not None:
            consts["b"] = ((T,), _F)
            nodes.append(helper.make_node("Add", [src, "b"], ["y"], name="bias"))
        else:
            nodes[-1].output[0] = "y"
    macs = plan.cost.original if ranks is None else plan.cost.tucker(*ranks)
    return unit_for_nodes(f"{plan.name}:{ranks}", nodes, inputs, consts, ["y"], opset, macs=int(macs))


def alternatives(plan: Any, ranks: Ranks) -> list[Ranks]:
    """The rank rule's choice, the same with one mode kept whole (Tucker-1 in either mode), and each
    with its ranks rounded up to a multiple of 32; never both modes whole."""
    T, S = plan.shape[0], plan.shape[1]
    r_out, r_in = ranks
    opts: list[Ranks] = [ranks]
    if plan.kind == "tucker2" and r_out is not None and r_in is not None:
        opts += [(r_out, None), (None, r_in)]

    def up(r: int | None, dim: int) -> int | None:
        if r is None:
            return None
        v = min(dim, math.ceil(r / _ROUND_UP) * _ROUND_UP)
        return None if v >= dim else v

    opts += [(up(a, T), up(b, S)) for a, b in opts]
    seen: list[Ranks] = []
    for o in opts:
        if o not in seen and o != (None, None):
            seen.append(o)
    return seen


def option_error(ranks: Ranks, tail_out: Any, tail_in: Any, T: int, S: int) -> float:
    """Estimated relative reconstruction error at `ranks` (onnxcomp.linalg.decompose.pair_error)."""
    r_out, r_in = ranks
    e_out = float(tail_out[min(T if r_out is None else r_out, len(tail_out) - 1)])
    e_in = 0.0 if tail_in is None else float(tail_in[min(S if r_in is None else r_in, len(tail_in) - 1)])
    return dec.pair_error(e_out, e_in)
