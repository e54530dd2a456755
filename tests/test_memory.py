"""Memory: what a pass or a pipeline holds at once (issue: peak memory on large models). Figures on
the zoo's VGG-16 come from benchmarks/memory.py; these tests pin the mechanisms on small models."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from _tiny_models import tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.graph import GraphEditor
from onnxcomp.model import model_bytes
from onnxcomp.passes.base import Context, get_pass
from onnxcomp.pipeline import OwnedModel, Pipeline


def _parallel_dense(layers: int = 4, n_in: int = 4096, n_out: int = 256, last_in: int | None = None) -> onnx.ModelProto:
    """x[N, n_in] -> `layers` MatMuls side by side (each n_in x n_out) -> Sum: the weights are
    layers * n_in * n_out * 4 bytes, each Gram matrix only n_out^2. `last_in`: the last layer reads
    that many of x's columns instead (a larger input for a larger last layer: x is that wide)."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    width = max(n_in, last_in or 0)
    if width > n_in:
        nodes.append(helper.make_node("Slice", ["x", "s0", "s1", "s_ax"], ["x_head"], name="head"))
        inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("s0", 0), ("s1", n_in), ("s_ax", 1))]
    for k in range(layers):
        rows = last_in if (last_in and k == layers - 1) else n_in
        src = "x" if rows == width else "x_head"
        w = (rng.standard_normal((rows, n_out)) / np.sqrt(rows)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes.append(helper.make_node("MatMul", [src, f"w{k}"], [f"y{k}"], name=f"fc{k}"))
        outs.append(f"y{k}")
    nodes.append(helper.make_node("Sum", outs, ["y"], name="sum"))
    graph = helper.make_graph(nodes, "parallel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _tucker_peak(layers: int, last_in: int | None = None) -> int:
    tucker = get_pass("tucker")(rank="0.25", objective="macs", round=1)
    model = _parallel_dense(layers, last_in=last_in)
    tracemalloc.start()
    try:
        result = tucker.run(model, Context())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.figures["rewritten"] == layers
    return peak


def test_tucker_holds_one_layers_weight_at_a_time():
    """Without data, each layer's weight is read when needed and dropped after (its spectrum, then
    its decomposition). numpy's peak then grows per layer by that layer's factors only (about 2 MB
    here, float64 until written), not by its 4 MB weight as well: holding every weight at once
    grew it by about 6 MB per layer."""
    weight = 4096 * 256 * 4
    per_layer = (_tucker_peak(8) - _tucker_peak(2)) / 6
    assert per_layer < 0.75 * weight, (per_layer, weight)


def test_tucker_decomposes_the_largest_weight_first():
    """The pass peaks at its largest layer (VGG-16's fc6): decomposed first, it does not find the
    other layers' factors already held. Here the large layer (32 MB) comes last in the graph, after
    six small ones whose factors come to about 12 MB: the peak stays within 3 MB of the large
    layer decomposed alone."""
    alone = _tucker_peak(1, last_in=32768)
    with_small = _tucker_peak(7, last_in=32768)
    assert with_small - alone < 3 * 2**20, (with_small - alone) / 2**20


def test_editor_apply_consume_moves_the_new_weights():
    model = tiny_cnn()
    def edited():
        ed = GraphEditor(model)
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
        name = ed.add_initializer("conv1/w2", w * 2)
        new = helper.make_node("Conv", [conv.input[0], name, *conv.input[2:]], list(conv.output), name=conv.name)
        new.attribute.extend(conv.attribute)
        ed.replace(conv, [new])
        return ed
    plain = edited().apply()
    ed = edited()
    moved = ed.apply(consume=True)
    assert model_bytes(moved) == model_bytes(plain)
    with pytest.raises(RuntimeError, match="consume"):
        ed.apply()


def test_an_owned_input_gives_the_same_model_and_is_refused_with_checks():
    model = tiny_cnn()
    pipe = Pipeline.parse("normalize,tucker{rank=0.5,objective=macs,round=1}")
    expected, _ = pipe.run(model, Context())
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    got, _ = pipe.run(OwnedModel(copy), Context())
    assert model_bytes(got) == model_bytes(expected)
    with pytest.raises(ValueError, match="OwnedModel"):
        pipe.run(OwnedModel(model), Context(), validate=True)
    owned = OwnedModel(model)
    owned.take()
    with pytest.raises(RuntimeError, match="twice"):
        owned.take()
