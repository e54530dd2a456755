"""The normalize pass: equivalence on the 12 real models, BatchNorm / affine folding, constant folding
rules, dead code, symbolic shapes, options, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _helpers import make_conv_model, ort_run, random_feeds
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import max_runtime_ir_version, model_bytes
from onnxcomp.passes import REWRITTEN, SKIPPED, Context, get_pass
from onnxcomp.passes.normalize import NormalizePass
from onnxcomp.pipeline import Pipeline

RTOL, ATOL = 1e-4, 1e-5


def normalize(model: onnx.ModelProto, **options):
    return NormalizePass(**options).run(model, Context())


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _data_dependent(model: onnx.ModelProto) -> set[str]:
    """Tensors whose value depends on a graph data input (forward propagation in graph order)."""
    inits = _initializers(model)
    live = {vi.name for vi in model.graph.input if vi.name not in inits}
    for n in model.graph.node:
        if any(i in live for i in n.input):
            live.update(n.output)
    return live


# -- the 12 real models --------------------------------------------------------------------------


def test_real_model_lists(light_models, ppocr_models):
    assert {p.stem for p in light_models} >= {"light_resnet50", "light_vgg19", "light_densenet121"}
    assert sorted(p.stem.split("_")[-2] for p in ppocr_models) == ["cls", "det", "rec"]


def test_normalize_is_equivalent_on_real_models(real_model_path):
    model = onnx.load(str(real_model_path))
    original_bytes = model_bytes(model)
    result = normalize(model)
    out = result.model
    assert model_bytes(model) == original_bytes, "normalize modified its input"

    # Every Conv/ConvTranspose/Gemm weight and bias is an initializer, none comes from a Constant node.
    inits = _initializers(out)
    producers = {o: n for n in out.graph.node for o in n.output}
    for n in out.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            for name in n.input[1:]:
                if name:
                    assert name in inits, f"{n.op_type} {n.name}: {name} is not an initializer"
                    assert name not in producers
    assert not any(n.op_type in ("Constant", "ConstantOfShape", "Identity") for n in out.graph.node)
    # Nothing constant is left to fold: every remaining node depends on the data input.
    live = _data_dependent(out)
    for n in out.graph.node:
        assert any(i in live for i in n.input), f"node {n.name} ({n.op_type}) has only constant inputs"
    # MatMul second operands are initializers or computed from the data.
    for n in out.graph.node:
        if n.op_type == "MatMul":
            assert n.input[1] in inits or n.input[1] in live

    assert len(out.graph.node) <= len(model.graph.node)
    assert result.figures["nodes_before"] == len(model.graph.node)
    assert result.figures["nodes_after"] == len(out.graph.node)
    assert result.figures["initializers_after"] == len(out.graph.initializer)
    assert result.figures["shape_inference"] == "ok"
    assert list(out.opset_import) == list(model.opset_import)
    assert out.ir_version <= max_runtime_ir_version()
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input if i.name not in _initializers(model)]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]

    # Outputs agree on the same random inputs, and so does every intermediate tensor both graphs
    # still compute (the light_* weights are constant fills, so their final outputs alone say
    # little). Intermediates are compared relative to their own scale: activations reach the
    # hundreds, where float32 reassociation of a folded scale moves values by ~1e-5 of that scale.
    feeds = random_feeds(model, real_model_path)
    original_tensors = {o for n in model.graph.node for o in n.output}
    common = [
        o
        for n in out.graph.node
        for o in n.output
        if o in original_tensors and n.op_type not in ("Shape", "Cast") and o not in {x.name for x in out.graph.output}
    ]
    # Graph optimisations off: the check is about the graphs, and onnxruntime's optimisers take
    # seconds on the 550 MB of weights light_vgg19 unfolds to.
    ref = ort_run(model, feeds, common, optimize=False)
    got = ort_run(out, feeds, common, optimize=False)
    for o in model.graph.output:
        np.testing.assert_allclose(got[o.name], ref[o.name], rtol=RTOL, atol=ATOL, err_msg=o.name)
    for name in common:
        a, b = ref[name], got[name]
        if a.dtype.kind != "f" or a.size == 0:
            np.testing.assert_array_equal(a, b)
            continue
        assert np.all(np.isfinite(a) == np.isfinite(b)), name
        finite = np.isfinite(a)
        scale = float(np.max(np.abs(a[finite]))) if finite.any() else 0.0
        err = float(np.max(np.abs(a[finite] - b[finite]))) if finite.any() else 0.0
        assert err <= RTOL * scale + ATOL, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def test_normalize_folds_batchnorm_in_real_models(light_models, ppocr_models):
    by_name = {p.stem: p for p in light_models + ppocr_models}
    for stem in ("light_resnet50", "light_shufflenet", "ch_ppocr_mobile_v2.0_cls_infer"):
        model = onnx.load(str(by_name[stem]))
        count = _bn_after_conv(model)  # from the file itself, not the count of one onnx release
        assert count > 10, stem
        result = normalize(model)
        folded = [r for r in result.layers if r.action == REWRITTEN and r.figures.get("folded") == "BatchNormalization"]
        assert len(folded) == count == result.figures["bn_folded"], stem
        assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node), stem
        assert all(r.op == "Conv" and r.params_after < r.params_before for r in folded)


def _bn_after_conv(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes whose input is a Conv output that nothing else reads: the folds."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    graph_outputs = {o.name for o in model.graph.output}
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization"
               and getattr(producer.get(n.input[0]), "op_type", "") == "Conv"
               and readers.get(n.input[0], 0) == 1 and n.input[0] not in graph_outputs)


def test_normalize_is_deterministic_and_idempotent(ppocr_models, light_models):
    by_name = {p.stem: p for p in light_models}
    det = next(p for p in ppocr_models if "_det_" in p.name)
    for path in (det, by_name["light_densenet121"]):  # Paddle export; BN + Mul/Add scale
        model = onnx.load(str(path))
        first = normalize(model).model
        second = normalize(model).model
        assert model_bytes(first) == model_bytes(second), path.stem
        again = normalize(first)
        assert model_bytes(again.model) == model_bytes(first), path.stem
        assert again.figures["modified"] is False


def test_symbolic_dims_stay_symbolic(ppocr_models):
    rec = next(p for p in ppocr_models if "_rec_" in p.stem)
    model = onnx.load(str(rec))
    out = normalize(model).model
    assert out.graph.input[0].type == model.graph.input[0].type
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert batch
    annotated = [vi for vi in out.graph.value_info if vi.type.tensor_type.shape.dim]
    assert len(annotated) > 100
    assert any(vi.type.tensor_type.shape.dim[0].dim_param == batch for vi in annotated)
    # onnxruntime still accepts another batch size and width.
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 48, 160)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feeds)[out.graph.output[0].name],
                               ort_run(model, feeds)[model.graph.output[0].name], rtol=RTOL, atol=ATOL)


# -- BatchNorm and affine folding on tiny models ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bias": True},
        {"bias": False},
        {"group": 2, "cin": 4, "cout": 8},
        {"group": 8, "cin": 8, "cout": 8, "bias": False},  # depthwise
        {"transpose": True, "bias": True},
        {"transpose": True, "group": 2, "cin": 4, "cout": 6, "bias": False},
        {"opset": 9, "kernel": 1},
    ],
    ids=["bias", "nobias", "grouped", "depthwise", "convtranspose", "convtranspose-grouped", "opset9-1x1"],
)
def test_bn_fold(tiny_conv_model, kwargs):
    model = tiny_conv_model(bn=True, **kwargs)
    result = normalize(model)
    out = result.model
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose" if kwargs.get("transpose") else "Conv"]
    conv = out.graph.node[0]
    assert conv.name == "conv" and conv.output[0] == "y" and len(conv.input) == 3
    assert set(conv.input[1:]) <= _initializers(out)
    rec = [r for r in result.layers if r.action == REWRITTEN]
    assert len(rec) == 1 and rec[0].node == "conv" and rec[0].figures["folded"] == "BatchNormalization"
    assert rec[0].output == "y"
    feeds = {"x": np.random.default_rng(3).standard_normal((2, kwargs.get("cin", 4), 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


def test_bn_fold_with_shared_weight_keeps_other_conv_intact():
    model = make_conv_model(bn=True)
    g = model.graph
    g.node.append(helper.make_node("Conv", ["x", "conv.weight"], ["z"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4))
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    out = normalize(model).model
    convs = {n.name: n for n in out.graph.node}
    assert set(convs) == {"conv", "conv2"}
    assert convs["conv2"].input[1] == "conv.weight"
    assert convs["conv"].input[1] != "conv.weight"
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    ref, got = ort_run(model, feeds), ort_run(out, feeds)
    for k in ("y", "z"):
        np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL)


def test_bn_not_folded_when_conv_output_has_other_consumers():
    model = make_conv_model(bn=True)
    model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    result = normalize(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    skipped = [r for r in result.layers if r.action == SKIPPED]
    assert len(skipped) == 1 and skipped[0].node == "bn" and "other consumers" in skipped[0].reason


def test_bn_with_runtime_statistics_is_skipped_with_reason():
    model = make_conv_model(bn=True)
    g = model.graph
    mean = next(t for t in g.initializer if t.name == "bn.mean")
    g.input.append(helper.make_tensor_value_info("bn.mean", TensorProto.FLOAT, list(mean.dims)))
    g.initializer.remove(mean)
    result = normalize(model)
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
    skipped = [r for r in result.layers if r.action == SKIPPED and r.node == "bn"]
    assert len(skipped) == 1 and "not constant" in skipped[0].reason


def test_bn_not_after_conv_is_reported():
    model = make_conv_model(bn=True)
    g = model.graph
    g.node[1].input[0] = "x"  # BN reads the input; the Conv output becomes a second graph output
    g.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None))
    result = normalize(model)
    skipped = [r for r in result.layers if r.action == SKIPPED]
    assert [r.node for r in skipped] == ["bn"] and "graph input" in skipped[0].reason


def test_fold_bn_option_off_and_include_filter(tiny_conv_model):
    model = tiny_conv_model(bn=True)
    assert "BatchNormalization" in [n.op_type for n in normalize(model, fold_bn=False).model.graph.node]
    result = normalize(model, exclude="^conv$")
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
    assert any(r.action == SKIPPED and "exclude" in r.reason for r in result.layers)


def _conv_then(ops: list[tuple[str, np.ndarray, bool]]) -> onnx.ModelProto:
    """Conv followed by a chain of binary ops with constant operands (conv output first unless
    the flag says the constant comes first)."""
    model = make_conv_model(bias=False)
    g = model.graph
    g.node[0].output[0] = "t0"
    for k, (op, value, const_first) in enumerate(ops):
        cname = f"c{k}"
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), cname))
        ins = [cname, f"t{k}"] if const_first else [f"t{k}", cname]
        out = "y" if k == len(ops) - 1 else f"t{k + 1}"
        g.node.append(helper.make_node(op, ins, [out], name=f"{op.lower()}{k}"))
    return model


def test_affine_fold_per_channel_mul_add_sub_div():
    rng = np.random.default_rng(5)
    per_channel = rng.uniform(0.5, 2.0, (8, 1, 1))
    model = _conv_then(
        [
            ("Mul", per_channel, False),
            ("Add", rng.standard_normal((1, 8, 1, 1)), True),
            ("Sub", rng.standard_normal((8, 1, 1)), False),
            ("Div", np.array([1.5]), False),
        ]
    )
    result = normalize(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [r.figures["folded"] for r in result.layers] == ["Mul", "Add", "Sub", "Div"]
    assert result.figures["affine_folded"] == 4
    feeds = {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(result.model, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


def test_affine_not_folded_when_not_per_channel_or_reversed():
    rng = np.random.default_rng(6)
    for ops in (
        [("Mul", rng.standard_normal((8, 8, 8)), False)],  # spatially varying
        [("Sub", rng.standard_normal((8, 1, 1)), True)],  # c - conv
        [("Div", np.zeros((8, 1, 1)), False)],  # division by zero
    ):
        model = _conv_then(ops)
        result = normalize(model)
        assert [n.op_type for n in result.model.graph.node] == ["Conv", ops[0][0]]
        feeds = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(ort_run(result.model, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


# -- constant folding, aliases, dead code, inputs ---------------------------------------------------


def _ir3_model() -> onnx.ModelProto:
    """IR-3 style: weights from ConstantOfShape and Constant->Transpose, initializers listed as inputs,
    an Identity, an inference Dropout and a dead branch."""
    rng = np.random.default_rng(2)
    shape = numpy_helper.from_array(np.array([8, 4, 3, 3], np.int64), "w_shape")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    wt = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="cos",
                         value=numpy_helper.from_array(np.array([0.05], np.float32))),
        helper.make_node("Constant", [], ["wt"], name="const", value=numpy_helper.from_array(wt)),
        helper.make_node("Transpose", ["wt"], ["w2"], name="tr", perm=[1, 0, 2, 3]),
        helper.make_node("Identity", ["x"], ["xi"], name="id"),
        helper.make_node("Conv", ["xi", "w", "b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Dropout", ["c1"], ["d1"], name="drop", ratio=0.5),
        helper.make_node("Conv", ["xi", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["d1", "c2"], ["y"], name="add"),
        helper.make_node("Relu", ["c2"], ["dead"], name="dead_relu"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6]),
        helper.make_tensor_value_info("w_shape", TensorProto.INT64, [4]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [8]),
    ]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [shape, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


def test_constants_aliases_dead_nodes_and_mirrored_inputs():
    model = _ir3_model()
    result = normalize(model)
    out = result.model
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv", "Add"]
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert all(n.input[0] == "x" for n in convs)
    assert {convs[0].input[1], convs[1].input[1]} <= _initializers(out)
    assert "w_shape" not in _initializers(out)
    f = result.figures
    assert (f["constants_folded"], f["aliases_removed"], f["dead_nodes_removed"], f["inputs_dropped"]) == (3, 2, 1, 2)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


def test_fold_constants_option_off_keeps_constant_nodes():
    model = _ir3_model()
    out = normalize(model, fold_constants=False).model
    assert {"ConstantOfShape", "Constant", "Transpose"} <= {n.op_type for n in out.graph.node}
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


def test_shape_inference_option():
    model = make_conv_model(bn=True)
    on = normalize(model).model
    assert len(on.graph.value_info) == 0  # one Conv left: nothing between input and output
    relu = make_conv_model()
    relu.graph.node[0].output[0] = "c"
    relu.graph.node.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    annotated = normalize(relu).model.graph.value_info
    assert [vi.name for vi in annotated] == ["c"]
    assert annotated[0].type.tensor_type.shape.dim[0].dim_param == "N"  # batch stays symbolic
    assert [d.dim_value for d in annotated[0].type.tensor_type.shape.dim[1:]] == [8, 8, 8]
    off = normalize(relu, shape_inference=False)
    assert len(off.model.graph.value_info) == 0 and off.figures["shape_inference"] == "off"


def test_codebook_and_dequantize_weights_stay_compressed():
    """Gather(codebook, Cast(uint8 indices)), Gather(codebook, int64 indices) and DequantizeLinear
    feeding a Conv are deliberate compressed forms and stay; a Gather that only selects rows of a
    constant is folded."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "codebook"),
        numpy_helper.from_array(rng.integers(0, 16, (16, 32, 3, 3)).astype(np.uint8), "idx_u8"),
        numpy_helper.from_array(rng.integers(-100, 100, (16, 32, 3, 3)).astype(np.int8), "q"),
        numpy_helper.from_array(np.array(0.02, np.float32), "qs"),
        numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "bank"),
        numpy_helper.from_array(np.arange(0, 32, 2, dtype=np.int64), "rows"),
        numpy_helper.from_array(rng.integers(0, 16, (16, 32, 3, 3)).astype(np.int64), "idx64"),
    ]
    conv = {"kernel_shape": [3, 3]}
    nodes = [
        helper.make_node("Cast", ["idx_u8"], ["idx"], name="widen", to=TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "idx"], ["w1"], name="decode"),
        helper.make_node("DequantizeLinear", ["q", "qs"], ["w2"], name="dq"),
        helper.make_node("Gather", ["bank", "rows"], ["w3"], name="select"),
        helper.make_node("Gather", ["codebook", "idx64"], ["w4"], name="decode64"),
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", **conv),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="conv2", **conv),
        helper.make_node("Conv", ["x", "w3"], ["c"], name="conv3", **conv),
        helper.make_node("Conv", ["x", "w4"], ["d"], name="conv4", **conv),
        helper.make_node("Sum", ["a", "b", "c", "d"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(nodes, "cb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = normalize(model)
    out = result.model
    assert [n.name for n in out.graph.node] == [
        "widen", "decode", "dq", "decode64", "conv1", "conv2", "conv3", "conv4", "sum"
    ]
    conv3 = next(n for n in out.graph.node if n.name == "conv3")
    assert conv3.input[1] == "w3" and "w3" in _initializers(out)
    reasons = {r.node: r.reason for r in result.layers if r.action == SKIPPED}
    assert "Gather" in reasons["conv1"] and "Gather" in reasons["conv4"] and "DequantizeLinear" in reasons["conv2"]
    assert "conv3" not in reasons
    feeds = {"x": rng.standard_normal((1, 32, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"], rtol=RTOL, atol=ATOL)


def test_unsorted_graph_is_sorted():
    model = make_conv_model()
    model.graph.node[0].output[0] = "c"
    model.graph.node.insert(0, helper.make_node("Relu", ["c"], ["y"], name="relu"))
    out = normalize(model).model
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]


def test_pipeline_prepends_normalize_and_pass_is_registered():
    assert get_pass("normalize") is NormalizePass
    assert [p.name for p in Pipeline.parse("normalize").passes] == ["normalize"]
    assert Pipeline.parse("normalize{fold_bn=false}").passes[0].config.fold_bn is False


def test_subgraph_references_are_renamed_and_kept_alive():
    """An If branch reads an outer Identity output and an outer Constant: both get rewritten to
    what they alias / fold to, inside the branch too, and stay alive."""
    out_vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Add", ["xi", "k"], ["t"], name="then_add")], "then", [],
                               [out_vi("t", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([helper.make_node("Mul", ["xi", "k"], ["e"], name="else_mul")], "else", [],
                               [out_vi("e", TensorProto.FLOAT, [3])])
    nodes = [
        helper.make_node("Constant", [], ["k"], name="kc", value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Identity", ["x"], ["xi"], name="id"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(nodes, "g", [out_vi("x", TensorProto.FLOAT, [3])], [out_vi("y", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    out = normalize(model).model
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["ReduceSum", "Greater", "If"]
    assert "k" in _initializers(out)
    branch_inputs = {i for a in out.graph.node[-1].attribute for n in a.g.node for i in n.input}
    assert branch_inputs == {"x", "k"}
    for x in ([1, 2, 3], [-1, -2, -3]):
        feeds = {"x": np.array(x, np.float32)}
        np.testing.assert_array_equal(ort_run(out, feeds)["y"], ort_run(model, feeds)["y"])


@pytest.mark.parametrize(("opset", "attrs", "expected"), [(13, {}, [2, 3, 4, 5]), (15, {"start": 1}, [3, 4, 5]),
                                                           (15, {"start": -2, "end": -1}, [4])])
def test_shape_of_a_constant_is_folded(opset, attrs, expected):
    w = numpy_helper.from_array(np.zeros((2, 3, 4, 5), np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["w"], ["s"], name="shape", **attrs),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "sf"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(expected)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    out = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).model
    assert [n.op_type for n in out.graph.node] == ["Add"]
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), np.array(expected, np.float32))
