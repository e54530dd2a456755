"""Analysis: params, bits and MACs of plain, codebook, quantized and function-call layers; sizes;
known MACs of the zoo's architectures."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny_models import tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import analysis, sizes
from onnxcomp.analysis import LayerCost, count_params, layer_costs, register_cost, summary, total_macs

X = {"x": [2, 3, 8, 8]}


def _run(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _one_conv(weight_nodes, inits, opset=17, functions=(), extra_opsets=(), call=None):
    nodes = list(weight_nodes)
    nodes.append(call or helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], functions=list(functions))
    m.ir_version = 8
    return m


def test_plain_layers():
    m = tiny_cnn(spatial=(8, 8))
    costs = {c.node: c for c in layer_costs(m, X)}
    assert list(costs) == ["conv1", "conv2", "fc"]
    c1, c2, fc = costs["conv1"], costs["conv2"], costs["fc"]
    assert (c1.params, c1.macs, c1.kernel, c1.in_channels, c1.out_channels) == (8 * 27 + 8, 2 * 8 * 64 * 27, (3, 3), 3, 8)
    assert (c2.macs, c2.strides) == (2 * 16 * 16 * 72, (2, 2))
    assert (fc.op, fc.params, fc.macs, fc.in_channels, fc.out_channels) == ("Gemm", 170, 2 * 160, 16, 10)
    assert c1.weight_bits == 32 * c1.params and c1.kind == "dense"
    assert total_macs(m, X) == c1.macs + c2.macs + fc.macs
    s = summary(m, X)
    assert s["params"] == count_params(m) and s["param_bits"] == 32 * s["params"] and s["macs"] == total_macs(m, X)
    assert "lzma_bytes" not in s and summary(m, X, lzma=True)["lzma_bytes"] > 0


def test_codebook_weights_count_indices_and_entries_not_the_dense_weight():
    rng = np.random.default_rng(0)
    codebook = np.linspace(-1, 1, 16).astype(np.float32)
    idx = rng.integers(0, 16, (8, 3, 3, 3)).astype(np.uint8)
    b = rng.standard_normal(8).astype(np.float32)
    inits = [numpy_helper.from_array(codebook, "cb"), numpy_helper.from_array(idx, "idx"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("Cast", ["idx"], ["idx32"], to=TensorProto.INT32, name="cast"),
             helper.make_node("Gather", ["cb", "idx32"], ["w"], name="gather")]
    m = _one_conv(nodes, inits)
    (c,) = layer_costs(m, X)
    assert c.kind == "codebook" and c.op == "Conv"
    assert c.params == 216 + 16 + 8
    assert c.weight_bits == 216 * 8 + 16 * 32 + 8 * 32
    assert c.macs == 2 * 8 * 64 * 27 and c.kernel == (3, 3) and c.in_channels == 3
    dense = _one_conv([], [numpy_helper.from_array(codebook[idx.astype(np.int64)], "w"), inits[2]])
    assert layer_costs(dense, X)[0].macs == c.macs
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(m, x), _run(dense, x), rtol=1e-6)  # the structure is what we think it is
    assert analysis.param_bits(m) < analysis.param_bits(dense)


def test_dequantized_weights():
    rng = np.random.default_rng(1)
    q = rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.full(8, 0.01, np.float32), "s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "zp"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    m = _one_conv([helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], axis=0, name="dq")], inits)
    (c,) = layer_costs(m, X)
    assert c.kind == "quantized" and c.params == 216 + 8 + 8 + 8
    assert c.weight_bits == 216 * 8 + 8 * 32 + 8 * 8 + 8 * 32 and c.macs == 2 * 8 * 64 * 27
    assert _run(m, np.ones((1, 3, 8, 8), np.float32)).shape == (1, 8, 8, 8)


def _function_model():
    """y = fn(x, W): body = MatMul(Mul(x, s), W) with s a Constant [4] inside the body; x [N, 3, 4]."""
    body = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32), "s")),
        helper.make_node("Mul", ["a", "s"], ["t"]),
        helper.make_node("MatMul", ["t", "w"], ["out"]),
    ]
    fn = helper.make_function("test.wino", "ScaledDense", ["a", "w"], ["out"], body, [helper.make_opsetid("", 17)])
    w = np.ones((4, 5), np.float32)
    g = helper.make_graph(
        [helper.make_node("ScaledDense", ["x", "W"], ["y"], domain="test.wino", name="call")], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.wino", 1)],
                          functions=[fn])
    m.ir_version = 8
    return m


def test_function_calls_are_costed_by_their_body():
    m = _function_model()
    (c,) = layer_costs(m, {"x": [2, 3, 4]})
    assert c.op == "test.wino.ScaledDense" and c.kind == "function"
    assert c.macs == 2 * 3 * 4 + 2 * 3 * 5 * 4  # elementwise Mul + MatMul
    assert c.params == 20 + 4  # the weight it is given + the constant in its body
    assert "MatMul MACs 120" in c.detail and "Mul MACs 24" in c.detail
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((2, 3, 4), np.float32)})[0]
    assert y.shape == (2, 3, 5)


def test_a_function_wrapping_a_conv_costs_like_the_conv():
    rng = np.random.default_rng(2)
    body = [helper.make_node("Conv", ["a", "k"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["o"])]
    fn = helper.make_function("test.fn", "ConvRelu", ["a", "k"], ["o"], body, [helper.make_opsetid("", 17)])
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    call = helper.make_node("ConvRelu", ["x", "w"], ["y"], domain="test.fn", name="wrapped")
    m = _one_conv([], [numpy_helper.from_array(w, "w")], functions=[fn],
                  extra_opsets=[helper.make_opsetid("test.fn", 1)], call=call)
    (c,) = layer_costs(m, X)
    assert (c.node, c.macs, c.params, c.in_channels, c.out_channels) == ("wrapped", 2 * 8 * 64 * 27, 216, 3, 8)


def test_register_cost_overrides_a_custom_op():
    m = _function_model()

    def hook(node, ctx):
        default = ctx.function_cost(node)
        return LayerCost(default.node, "winograd", default.params, 7, kernel=(3, 3), kind="winograd")

    register_cost("test.wino", "ScaledDense", hook)
    try:
        (c,) = layer_costs(m, {"x": [2, 3, 4]})
        assert (c.op, c.macs, c.kind, c.params) == ("winograd", 7, "winograd", 24)
    finally:
        analysis.unregister_cost("test.wino", "ScaledDense")
    assert layer_costs(m, {"x": [2, 3, 4]})[0].macs == 144


def test_unknown_spatial_dims_leave_macs_unknown():
    m = tiny_cnn(spatial=("H", "W"))
    costs = layer_costs(m, {})
    assert costs[0].macs is None and costs[0].params == 224
    assert total_macs(m, {"x": [1, 3, 8, 8]}) == 8 * 64 * 27 + 16 * 16 * 72 + 160


def test_sizes_on_disk_with_external_data_and_lzma(tmp_path):
    from onnxcomp.model import save_model

    m = tiny_cnn(spatial=(8, 8))
    inline = save_model(m, tmp_path / "a.onnx")
    ext = save_model(m, tmp_path / "b.onnx", external_data=True)
    assert sizes.file_bytes(inline) == inline.stat().st_size
    assert sizes.external_data_files(ext) == [tmp_path / "b.onnx.data"]
    assert sizes.file_bytes(ext) == ext.stat().st_size + (tmp_path / "b.onnx.data").stat().st_size
    # repetitive weights compress far below their raw bytes; random ones barely do
    flat = onnx.ModelProto()
    flat.CopyFrom(m)
    for t in flat.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), t.name))
    assert sizes.lzma_bytes(flat) < 0.5 * flat.ByteSize()
    assert 0 < sizes.lzma_bytes(inline) <= sizes.file_bytes(inline) + 64


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.81), ("mobilenetv2", 0.30)])
def test_zoo_macs_match_published(name, gmacs):
    zoo = pytest.importorskip("onnxcomp.zoo")
    m = zoo.build(name)
    macs = total_macs(m, {m.graph.input[0].name: [1, 3, 224, 224]})
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.02


@pytest.mark.slow
def test_zoo_vgg16_macs_match_published():
    zoo = pytest.importorskip("onnxcomp.zoo")
    m = zoo.build("vgg16")
    insp = analysis.inspect(m, {m.graph.input[0].name: [1, 3, 224, 224]})
    assert abs(insp.macs / 1e9 - 15.47) / 15.47 < 0.02 and insp.macs_complete
    assert len(insp.layers) == 16  # 13 convs + 3 fully connected


def test_runtime_shapes_complete_what_shape_inference_cannot(ppocr_models):
    """PP-OCR's classifier reshapes with a target computed from `Shape` through int32 casts, which
    onnx shape inference does not follow; one onnxruntime run at the given shape fills it in."""
    from onnxcomp.model import load_model

    cls = next(p for p in ppocr_models if "_cls_" in p.name)
    m = load_model(cls)
    shapes = {"x": [1, 3, 48, 192]}
    inferred = {c.node: c for c in layer_costs(m, shapes, runtime_shapes=False)}
    measured = {c.node: c for c in layer_costs(m, shapes)}
    gaps = [n for n, c in inferred.items() if c.macs is None]
    assert gaps and all(measured[n].macs is not None for n in gaps)
    assert all(measured[n].macs == c.macs for n, c in inferred.items() if c.macs is not None)
    mm = next(c for c in measured.values() if c.op == "MatMul")
    assert mm.macs == mm.in_channels * mm.out_channels  # batch 1: one row


def test_input_shapes_that_do_not_fit_the_model_are_bad_input():
    """A wrong-rank or wrong-name --input-shape used to give silently wrong MACs (or none at all)."""
    from onnxcomp.errors import BadInputError
    from onnxcomp.shapes import parse_input_shapes

    m = tiny_cnn(spatial=(8, 8))
    right = total_macs(m, {"x": [1, 3, 8, 8]})
    assert total_macs(m, {"": [1, 3, 8, 8]}) == right  # a bare shape names the first input
    for shapes, words in [
        ({"x": [1, 3, 8]}, "3 dims given, the model input has 4 [N,3,8,8]"),  # used to cost 8x8 as 8x?
        ({"y": [1, 3, 8, 8]}, "names 'y', but the model's inputs are: x"),
        ({"x": [1, 4, 8, 8]}, "dim 1 is 4 but the model fixes it to 3"),
        ({"x": [1, 3, 16, 16]}, "dim 2 is 16 but the model fixes it to 8"),
        ({"x": [0, 3, 8, 8]}, "dims must be positive"),
    ]:
        with pytest.raises(BadInputError, match=words.replace("[", r"\[").replace("]", r"\]")):
            layer_costs(m, shapes)
    with pytest.raises(BadInputError, match="dims must be positive"):
        parse_input_shapes(["x:1,-3,8,8"])
    with pytest.raises(BadInputError, match="given twice"):
        parse_input_shapes(["x:1,3,8,8", "x:2,3,8,8"])
    assert parse_input_shapes(["x:1x3x8x8", "in:0:2,5"]) == {"x": [1, 3, 8, 8], "in:0": [2, 5]}
