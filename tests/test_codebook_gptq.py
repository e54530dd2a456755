"""codebook{compensate=gptq}: the weight's column layout, the input Hessians, and that compensated
rounding keeps trained models closer to their output than nearest-centroid rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _helpers import ort_run
from onnx import helper, numpy_helper

from onnxcomp import evaldata
from onnxcomp.data import open_source
from onnxcomp.errors import BadInputError, PipelineSyntaxError
from onnxcomp.graph import GraphIndex
from onnxcomp.passes import REWRITTEN, Context, get_pass
from onnxcomp.passes.codebook.hessian import column_layout
from onnxcomp.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def _conv(group: int, pads=(1, 0, 2, 1), strides=(1, 2)):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=group, pads=list(pads), strides=list(strides))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 9, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_columns_times_input_rows_are_the_conv_output(group):
    model, w = _conv(group)
    lay = column_layout(GraphIndex(model), model.graph.node[0], w.shape)
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 8)).astype(np.float32)
    y = ort_run(model, {"x": x})["y"]
    rows = lay.rows(x, np.random.default_rng(2))  # every position (fewer than the sample cap), sample-major
    got = np.einsum("grd,ngd->ngr", lay.matrix(w.astype(np.float64)), rows).reshape(len(rows), -1)
    assert np.allclose(got, y.transpose(0, 2, 3, 1).reshape(len(rows), -1), atol=1e-4)
    assert np.array_equal(lay.weight(lay.matrix(w)), w)


@pytest.mark.parametrize("op", ["Gemm", "GemmT", "MatMul"])
def test_dense_columns_times_input_rows_are_the_layer_output(op):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7) if op == "GemmT" else (7, 5)).astype(np.float32)
    kind = "Gemm" if op.startswith("Gemm") else "MatMul"
    node = helper.make_node(kind, ["x", "w"], ["y"], name="d", **({"transB": 1} if op == "GemmT" else {}))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 7])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    lay = column_layout(GraphIndex(model), node, w.shape)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    got = np.einsum("grd,ngd->nr", lay.matrix(w.astype(np.float64)), lay.rows(x, rng))
    assert np.allclose(got, ort_run(model, {"x": x})["y"], atol=1e-4)
    assert np.array_equal(lay.weight(lay.matrix(w)), w)


def test_gptq_needs_data_and_scalar_weights():
    model, _ = _conv(1)
    with pytest.raises(BadInputError, match="compensate=gptq needs calibration data"):
        get_pass("codebook")(bits=3, compensate="gptq", min_params=16).run(model, Context())
    with pytest.raises(PipelineSyntaxError, match="compensate=gptq"):
        Pipeline.parse("codebook{bits=2,vector=row,compensate=gptq}")


def _relative_output_error(model, out, x) -> float:
    ref = ort_run(model, {"input": x})
    got = ort_run(out, {"input": x})
    name = model.graph.output[0].name
    return float(np.sum((got[name] - ref[name]) ** 2) / np.sum(ref[name] ** 2))


@pytest.mark.parametrize("stem", ["glyph_resnet", "glyph_mobilenetv2"])  # plain convs; depthwise convs and a Gemm
def test_compensated_rounding_keeps_trained_models_closer_on_held_out_images(stem):
    model = onnx.load(ROOT / "models" / f"{stem}.onnx")
    x_test, _ = evaldata.glyph_dataset("test", n=124)
    errors, results = {}, {}
    for mode in ("none", "gptq"):
        ctx = Context(data=open_source(str(ROOT / "models" / "glyph_calib.npz"), model=model))
        results[mode] = get_pass("codebook")(bits=3, scale="channel", compensate=mode).run(model, ctx)
        errors[mode] = _relative_output_error(model, results[mode].model, x_test)
    assert errors["gptq"] < 0.7 * errors["none"], errors
    rewritten = [r for r in results["gptq"].layers if r.action == REWRITTEN]
    assert rewritten and all("output_error_compensated" in r.figures for r in rewritten)
    # on its own calibration Hessian, compensation never loses to nearest rounding (up to round-off)
    assert all(r.figures["output_error_compensated"] <= r.figures["output_error_nearest"] * (1 + 1e-6) + 1e-12
               for r in rewritten)


def test_a_layer_too_wide_for_its_hessian_is_rounded_plainly_with_the_reason():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 7000])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    why = column_layout(GraphIndex(model), node, (10, 7000))
    assert isinstance(why, str) and "7000 input columns" in why


def test_the_default_with_data_rounds_by_gptq_and_beats_the_nearest_rounding_default():
    model = onnx.load(ROOT / "models" / "glyph_resnet.onnx")
    x_test, _ = evaldata.glyph_dataset("test", n=124)
    results = {}
    for mode in ("auto", "none"):
        ctx = Context(data=open_source(str(ROOT / "models" / "glyph_calib.npz"), model=model))
        results[mode] = get_pass("codebook")(avg_bits=3.0, compensate=mode).run(model, ctx)
    assert "gptq" in results["auto"].figures["compensation"] and "gptq" in results["auto"].figures["allocation"]
    assert "compensation" not in results["none"].figures
    errors = {m: _relative_output_error(model, r.model, x_test) for m, r in results.items()}
    assert errors["auto"] < 0.7 * errors["none"], errors  # measured 0.123 vs 0.200 (relative norm)


def test_data_but_no_layer_with_columns_rounds_plainly_without_a_crash():
    # a 1-D conv has no column layout: the fuzz found the empty capture crashing the pass (exit 3)
    w = np.random.default_rng(5).standard_normal((8, 4, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c1", pads=[1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 20])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(6).standard_normal((8, 4, 20)).astype(np.float32)
    res = get_pass("codebook")(bits=3, min_params=16).run(model, Context(data=open_source({"x": x}, model=model)))
    (rec,) = res.layers
    assert rec.action == REWRITTEN and rec.figures["compensation"].startswith("none: 1-D conv")
    assert "output_error_compensated" not in rec.figures


def test_gptq_output_is_deterministic():
    model = onnx.load(ROOT / "models" / "glyph_mobilenetv2.onnx")
    outs = []
    for _ in range(2):
        ctx = Context(data=open_source(str(ROOT / "models" / "glyph_calib.npz"), model=model))
        outs.append(get_pass("codebook")(bits=4, scale="channel").run(model, ctx).model.SerializeToString(deterministic=True))
    assert outs[0] == outs[1]
