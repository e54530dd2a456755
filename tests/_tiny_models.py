"""Small hand-built ONNX models for the validation / runtime / analysis tests (no zoo needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, functions=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", OPSET), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def tiny_cnn(seed: int = 0, spatial: tuple = (16, 16), classes: int = 10) -> onnx.ModelProto:
    """x[N,3,H,W] -> conv1 3x3 (8) -> relu -> conv2 3x3/2 (16) -> relu -> GAP -> flatten -> fc (classes)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    wf = (rng.standard_normal((classes, 16)) * 0.5).astype(np.float32)
    bf = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"),
                                                          (wf, "wf"), (bf, "bf"))]
    dims = ["N", 3, *spatial]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )


def perturb(model: onnx.ModelProto, init: str, index: tuple, delta: float) -> onnx.ModelProto:
    """A copy of `model` with one element of initializer `init` shifted by `delta`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, t in enumerate(out.graph.initializer):
        if t.name == init:
            a = numpy_helper.to_array(t).copy()
            a[index] += delta
            out.graph.initializer[k].CopyFrom(numpy_helper.from_array(a, init))
            return out
    raise KeyError(init)
