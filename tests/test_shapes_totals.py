"""MAC totals on models with symbolic spatial dims: concrete from --data, honest when unknown."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.data import open_source
from onnxcomp.shapes import shapes_from_data


def symbolic_model() -> onnx.ModelProto:
    """x[N, 3, H, W] -> Conv 3x3 (3->8, pad 1) -> Relu -> Conv 1x1 (8->4) -> y."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "sym", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


EXACT_MACS = 16 * 24 * (8 * 3 * 9 + 4 * 8)  # at H=16, W=24


def test_shapes_from_data_fill_only_symbolic_inputs():
    model = symbolic_model()
    src = open_source({"x": np.zeros((5, 3, 16, 24), np.float32)}, model=model)
    assert shapes_from_data(model, src, {}) == {"x": [1, 3, 16, 24]}
    assert shapes_from_data(model, src, {"x": [1, 3, 8, 8]}) == {"x": [1, 3, 8, 8]}  # the user's wins
    assert shapes_from_data(model, None, {}) == {}


def test_optimize_totals_use_the_data_shapes_and_never_a_ratio_on_partial_totals(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(symbolic_model(), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((40, 3, 16, 24)).astype(np.float32))
    rep = tmp_path / "r.json"
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "-p", "normalize", "--report", str(rep), "-q"]) == 0
    out = capsys.readouterr().out
    macs_row = next(line for line in out.splitlines() if line.startswith("MACs"))
    assert "layers unknown" in macs_row and macs_row.rstrip().endswith("-")  # no ratio on a lower bound
    assert json.loads(rep.read_text())["before"]["macs_unknown"] == 2
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "-p", "normalize", "--data", str(data),
                 "--report", str(rep), "-q"]) == 0
    before = json.loads(rep.read_text())["before"]
    assert before["macs"] == EXACT_MACS and before["macs_unknown"] == 0
    macs_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("MACs"))
    assert "unknown" not in macs_row and macs_row.rstrip().endswith("1.00x")
