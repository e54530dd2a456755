"""Read-only model analysis: parameter counts, MACs per layer, sizes. Never edits a model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from onnxcomp import costs
from onnxcomp.graph import GraphIndex, attr, node_label
from onnxcomp.shapes import static_shapes


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer (constants held in Constant nodes are counted too)."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = attr(node, "value")
            if value is not None:
                total += math.prod(value.dims)
    return int(total)


@dataclass
class LayerCost:
    node: str
    op: str
    params: int
    macs: int | None
    kernel: tuple[int, ...] = ()
    in_channels: int | None = None
    out_channels: int | None = None
    groups: int = 1
    strides: tuple[int, ...] = ()


def layer_costs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> list[LayerCost]:
    """One LayerCost per Conv / ConvTranspose / Gemm / MatMul-with-constant, in graph order."""
    index = GraphIndex(model)
    shapes = static_shapes(model, input_shapes)
    out: list[LayerCost] = []
    for node in model.graph.node:
        cost = _node_cost(index, node, shapes)
        if cost is not None:
            out.append(cost)
    return out


def _node_cost(index: GraphIndex, node: onnx.NodeProto, shapes: dict) -> LayerCost | None:
    label = node_label(node)
    if node.op_type == "Conv" and len(node.input) > 1 and index.is_constant(node.input[1]):
        w = list(index.initializers[node.input[1]].dims)
        has_b = len(node.input) > 2 and bool(node.input[2])
        g = int(attr(node, "group", 1))
        return LayerCost(label, "Conv", costs.conv_params(w, has_b), costs.conv_macs(w, shapes.get(node.output[0])),
                         tuple(w[2:]), w[1] * g, w[0], g, tuple(attr(node, "strides", [1] * (len(w) - 2))))
    if node.op_type == "ConvTranspose" and len(node.input) > 1 and index.is_constant(node.input[1]):
        w = list(index.initializers[node.input[1]].dims)
        g = int(attr(node, "group", 1))
        has_b = len(node.input) > 2 and bool(node.input[2])
        return LayerCost(label, "ConvTranspose", math.prod(w) + (w[1] * g if has_b else 0),
                         costs.conv_transpose_macs(w, g, shapes.get(node.input[0])), tuple(w[2:]), w[0], w[1] * g, g,
                         tuple(attr(node, "strides", [1] * (len(w) - 2))))
    if node.op_type in ("Gemm", "MatMul"):
        const = [i for i in node.input[:2] if index.is_constant(i)]
        if len(const) != 1:
            return None
        w = list(index.initializers[const[0]].dims)
        if len(w) != 2:
            return None
        if node.op_type == "Gemm" and attr(node, "transB", 0):
            w = w[::-1]
        has_b = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
        bias = math.prod(index.initializers[node.input[2]].dims) if has_b and index.is_constant(node.input[2]) else 0
        x = node.input[0] if const[0] == node.input[1] else node.input[1]
        rows = costs.leading_rows(shapes.get(x)) if const[0] == node.input[1] else None
        return LayerCost(label, node.op_type, math.prod(w) + bias, costs.dense_macs(w[0], w[1], rows), (), w[0], w[1])
    return None


def total_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int | None:
    layers = layer_costs(model, input_shapes)
    if any(layer.macs is None for layer in layers):
        known = [layer.macs for layer in layers if layer.macs is not None]
        return sum(known) if known else None
    return sum(layer.macs for layer in layers)  # type: ignore[misc]


def summary(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict:
    """Totals for a report: params, MACs (None if unknown), serialized bytes, node count."""
    return {
        "params": count_params(model),
        "macs": total_macs(model, input_shapes),
        "bytes": model.ByteSize(),
        "nodes": len(model.graph.node),
    }
