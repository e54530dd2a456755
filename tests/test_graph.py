"""Shared graph helpers (onnxcomp.graph): initializer clean-up after edits."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import model_inputs
from onnxcomp.graph import GraphEditor, make_node, remove_unused_initializers


def _ir3_conv() -> onnx.ModelProto:
    """x -> conv (weight w) -> y, IR 3 style: the initializer w is also listed as a graph input."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 1, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    return m


def test_dropping_an_initializer_drops_its_graph_input_entry():
    """An IR<4 input entry left behind turned the dropped weight into an input callers must feed."""
    model = _ir3_conv()
    ed = GraphEditor(model)
    w2 = ed.add_initializer("conv/w2", np.full((2, 1, 1, 1), 2.0, np.float32))
    ed.replace(model.graph.node[0], [make_node("Conv", ["x", w2], ["y"], "conv")])
    out = ed.apply()
    assert [t.name for t in out.graph.initializer] == ["conv/w2"]
    assert [i.name for i in out.graph.input] == ["x"]
    assert [s.name for s in model_inputs(out)] == ["x"]
    assert [i.name for i in model.graph.input] == ["x", "w"]  # the editor's source is untouched
    # an unused initializer that is not a graph input goes too; the count is returned
    out.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), "dead"))
    assert remove_unused_initializers(out) == 1 and [i.name for i in out.graph.input] == ["x"]


def test_drop_unused_functions_keeps_what_is_called_at_any_depth():
    from onnx import TensorProto, helper

    from onnxcomp.graph import drop_unused_functions

    def fn(domain, name, body_op, body_domain=""):
        return helper.make_function(domain, name, ["X"], ["Y"], [helper.make_node(body_op, ["X"], ["Y"], domain=body_domain)],
                                    [helper.make_opsetid("", 17), helper.make_opsetid("inner", 1)])

    outer = fn("outer", "Outer", "Inner", "inner")  # calls a function of another domain
    inner = fn("inner", "Inner", "Relu")
    unused = fn("gone", "Unused", "Relu")
    g = helper.make_graph([helper.make_node("Outer", ["x"], ["y"], domain="outer")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, functions=[outer, inner, unused], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("outer", 1), helper.make_opsetid("inner", 1),
        helper.make_opsetid("gone", 1)])
    assert drop_unused_functions(m) == 1
    assert [f.name for f in m.functions] == ["Outer", "Inner"]
    assert {o.domain for o in m.opset_import} == {"", "outer", "inner"}
