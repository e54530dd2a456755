"""The `trim` pass (value-locality channel trimming) and the channel-coupling analysis it rests on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.channels import ChannelGraph
from onnxcomp.data import open_source
from onnxcomp.errors import BadInputError, PipelineSyntaxError
from onnxcomp.graph import GraphIndex
from onnxcomp.passes.base import REWRITTEN, Context
from onnxcomp.passes.trim import TrimPass
from onnxcomp.pipeline import Pipeline

DEAD = [2, 5]  # ReLU of a strongly negative bias: exactly 0
CONSTANT = {7: 0.5, 11: 1.5}  # zero weights, positive bias: exactly constant, non-zero


def _model(nodes, inits, x_dims, out="y", out_dims=("N", 10), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_dims))],
                          [numpy_helper.from_array(np.asarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype), n)
                           for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def dead_channel_cnn(dims=("N", 3, 12, 12)) -> onnx.ModelProto:
    """conv1 (16, some channels dead or constant) -> relu -> conv2 3x3 pad 1 -> relu -> GAP -> fc."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 3, 3)) * 0.3
    b1 = rng.standard_normal(16) * 0.1
    b1[DEAD] = -100.0
    for ch, v in CONSTANT.items():
        w1[ch], b1[ch] = 0.0, v
    inits = {"w1": w1, "b1": b1, "w2": rng.standard_normal((16, 16, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
             "wf": rng.standard_normal((10, 16)) * 0.5, "bf": np.zeros(10)}
    return _model(_two_conv_nodes(), inits, dims)


def _two_conv_nodes() -> list[onnx.NodeProto]:
    """conv1 -> relu -> conv2 (3x3, pad 1) -> relu -> GAP -> flatten -> fc, on weights w1 b1 w2 b2 wf bf."""
    return [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]


def coupled_cnn() -> onnx.ModelProto:
    """A residual Add and a Concat: a = relu(conva x); s = relu(a + convb a); c = relu(convc x);
    convd(concat(s, c)) -> GAP -> fc. Channel 3 is dead in both conva and convb (the residual group
    can go); channel 2 is dead in conva only (its group varies at convd: it stays); convc channel 1
    is dead (it goes, from convd's columns 8 + 1)."""
    rng = np.random.default_rng(1)
    wa, ba = rng.standard_normal((8, 3, 3, 3)) * 0.3, rng.standard_normal(8) * 0.1
    wb, bb = rng.standard_normal((8, 8, 3, 3)) * 0.2, rng.standard_normal(8) * 0.1
    wc, bc = rng.standard_normal((8, 3, 1, 1)) * 0.3, rng.standard_normal(8) * 0.1
    ba[[2, 3]] = -100.0
    bb[3] = -100.0
    bc[1] = -100.0
    inits = {"wa": wa, "ba": ba, "wb": wb, "bb": bb, "wc": wc, "bc": bc,
             "wd": rng.standard_normal((8, 16, 3, 3)) * 0.2, "bd": np.zeros(8),
             "wf": rng.standard_normal((10, 8)) * 0.5, "bf": np.zeros(10)}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="conva", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["a"], name="relua"),
        helper.make_node("Conv", ["a", "wb", "bb"], ["cb"], name="convb", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "cb"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["s"], name="relus"),
        helper.make_node("Conv", ["x", "wc", "bc"], ["cc"], name="convc"),
        helper.make_node("Relu", ["cc"], ["c"], name="reluc"),
        helper.make_node("Concat", ["s", "c"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wd", "bd"], ["cd"], name="convd", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cd"], ["d"], name="relud"),
        helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, ("N", 3, 10, 10))


def _data(model, n=48, hw=(12, 12), seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)
    return x, open_source({"x": x}, model=model, batch_size=16)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _weight_shapes(model) -> dict[str, tuple]:
    index = GraphIndex(model)
    return {n.name: tuple(index.initializers[n.input[1]].dims) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in index.initializers and "/trim_fold" not in n.name}


def test_removes_exactly_the_dead_and_constant_channels_and_the_output_is_unchanged():
    model = dead_channel_cnn()
    x, src = _data(model)
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    conv1 = next(r for r in result.layers if r.node == "conv1")
    assert conv1.action == REWRITTEN and conv1.figures["out_channels_trimmed"] == len(DEAD) + len(CONSTANT)
    conv2 = next(r for r in result.layers if r.node == "conv2")
    assert conv2.figures["in_channels_trimmed"] == 4 and conv2.figures["fold"].startswith("exact border map")
    shapes = _weight_shapes(result.model)
    assert shapes["conv1"] == (12, 3, 3, 3) and shapes["conv2"] == (16, 12, 3, 3)
    onnx.checker.check_model(result.model)
    ref, got = _run(model, x), _run(result.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert result.figures["channels_trimmed"] == 4 and conv1.figures["locality"] == 0.0


def test_exact_fold_map_is_constant_folded_by_onnxruntime(tmp_path):
    """The border map is a constant subgraph: onnxruntime folds it at load, no extra conv runs."""
    model = dead_channel_cnn()
    _, src = _data(model)
    new = TrimPass(threshold=0.0, round=1).run(model, Context(data=src)).model
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert sum(op in ("Conv", "FusedConv") for op in ops) == 2, ops


def test_dynamic_spatial_dims_fold_the_interior_value_and_say_so():
    model = dead_channel_cnn(dims=("N", 3, "H", "W"))
    x, src = _data(model)
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    conv2 = next(r for r in result.layers if r.node == "conv2")
    assert "border is approximated" in conv2.figures["fold"]
    ref, got = _run(model, x), _run(result.model, x)
    # dead channels fold to 0 exactly; the constant ones only away from the zero-padded border
    assert 1e-4 < float(np.abs(got - ref).max()) / float(np.abs(ref).max()) < 0.3
    assert result.figures["channels_trimmed"] == 4


def test_residual_and_concat_channels_are_trimmed_as_groups():
    model = coupled_cnn()
    x, src = _data(model, hw=(10, 10))
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    shapes = _weight_shapes(result.model)
    # the residual group {conva 3, convb 3} goes; conva's channel 2 stays (convb fills it: it varies)
    assert shapes["conva"][0] == 7 and shapes["convb"] == (7, 7, 3, 3)
    assert shapes["convc"][0] == 7 and shapes["convd"] == (8, 14, 3, 3)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_channel_graph_groups_couple_add_concat_and_block_what_it_does_not_understand():
    cg = ChannelGraph(coupled_cnn())
    assert cg.group_id("ca", 3) == cg.group_id("cb", 3) == cg.group_id("s", 3) == cg.group_id("cat", 3)
    assert cg.group_id("c", 1) == cg.group_id("cat", 9) and cg.group_id("c", 1) != cg.group_id("s", 1)
    blocked = {g.id: g.blocked for g in cg.groups()}
    assert blocked[cg.group_id("cd", 0)] is None and blocked[cg.group_id("y", 0)].endswith("a graph output")
    # a Transpose consumer blocks the channels it reads
    m = dead_channel_cnn()
    m.graph.node[1].CopyFrom(helper.make_node("Transpose", ["c1"], ["t1"], name="tr", perm=[0, 1, 3, 2]))
    m.graph.node.insert(2, helper.make_node("Relu", ["t1"], ["r1"], name="relu1"))
    reasons = {g.blocked for g in ChannelGraph(m).groups() if g.blocked}
    assert any("consumed by Transpose 'tr'" in r for r in reasons)


def test_depthwise_and_squeeze_excitation_lanes_shrink_together():
    """pw1 -> relu -> depthwise -> SE gate (GAP -> fc1 -> relu -> fc2 -> sigmoid) * x -> pw2: a dead
    pw1 channel takes its depthwise lane and its SE lane with it."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.standard_normal((16, 3, 1, 1)), rng.standard_normal(16) * 0.1
    b1[[4, 9]] = -100.0
    inits = {"w1": w1, "b1": b1, "wd": rng.standard_normal((16, 1, 3, 3)), "bd": np.zeros(16),
             "ws1": rng.standard_normal((4, 16, 1, 1)) * 0.3, "bs1": np.zeros(4),
             "ws2": rng.standard_normal((16, 4, 1, 1)) * 0.3, "bs2": np.zeros(16),
             "w2": rng.standard_normal((8, 16, 1, 1)) * 0.3, "b2": np.zeros(8)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pw1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["dw"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["dw"], ["g"], name="se_pool"),
        helper.make_node("Conv", ["g", "ws1", "bs1"], ["s1"], name="se_fc1"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se_fc2"),
        helper.make_node("Sigmoid", ["s2"], ["gate"], name="se_gate"),
        helper.make_node("Mul", ["dw", "gate"], ["se"], name="se_mul"),
        helper.make_node("Conv", ["se", "w2", "b2"], ["y"], name="pw2"),
    ]
    model = _model(nodes, inits, ("N", 3, 8, 8), out_dims=("N", 8, 8, 8))
    cg = ChannelGraph(model)
    assert cg.group_id("c1", 4) == cg.group_id("dw", 4) == cg.group_id("s2", 4) == cg.group_id("se", 4)
    x, src = _data(model, hw=(8, 8))
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    shapes = _weight_shapes(result.model)
    # the dead lanes are exactly 0 after the depthwise conv (no bias), so the SE product is 0: they go
    assert shapes["pw1"][0] == 14 and shapes["dw"] == (14, 1, 3, 3) and shapes["se_fc2"][0] == 14
    assert shapes["se_fc1"] == (4, 14, 1, 1) and shapes["pw2"] == (8, 14, 1, 1)
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 14
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_flatten_of_a_spatial_map_into_a_dense_layer_trims_its_rows():
    """A VGG-style classifier: conv -> relu -> Flatten of [N, 8, 4, 4] -> Gemm; a dead channel takes
    its 16 input rows of the Gemm with it, and a constant one folds its per-position values."""
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8) * 0.1
    b[1] = -100.0
    w[6], b[6] = 0.0, 0.7
    inits = {"w": w, "b": b, "wf": rng.standard_normal((10, 128)) * 0.2, "bf": np.zeros(10)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    model = _model(nodes, inits, ("N", 3, 8, 8))
    x, src = _data(model, hw=(8, 8))
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    shapes = _weight_shapes(result.model)
    assert shapes["conv"][0] == 6 and shapes["fc"] == (10, 96)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_round_keeps_multiples_and_never_trims_a_channel_that_did_not_qualify():
    model = dead_channel_cnn()
    _, src = _data(model)
    r4 = TrimPass(threshold=0.0, round=4).run(model, Context(data=src))
    assert _weight_shapes(r4.model)["conv1"][0] == 12  # 4 qualify, 12 kept: a multiple of 4
    r8 = TrimPass(threshold=0.0, round=8).run(model, Context(data=src))
    conv1 = next(r for r in r8.layers if r.node == "conv1")
    assert conv1.action != REWRITTEN and "round=8" in conv1.reason and r8.model is model


class _FakeCosts:
    """A cost model timing trim's probe convs by a rule of their channel count (in the unit's name)."""

    measure_enabled = True

    def __init__(self, rule):
        self.rule = rule
        self.asked: list[int] = []

    def estimate(self, units):
        from onnxcomp.costmodel import Estimate

        kept = [int(u.name.rsplit(":", 1)[1]) for u in units]
        self.asked += kept
        return [Estimate(float(self.rule(k)), "measured") for k in kept]


def _stairs(step):
    return lambda c: (-(-c // step) * step) ** 2  # a count runs at the speed of the next multiple of step


@pytest.mark.parametrize("step", [4, 8, 16, 32])
def test_the_measured_step_is_the_width_of_the_stairs_the_machine_runs_counts_in(step):
    from onnxcomp.passes.trim.latency import measured_step

    found, figures = measured_step(_FakeCosts(_stairs(step)))
    assert found == step and set(figures["probe_ms"]) == {"3x3@28", "1x1@56"}
    # time follows every channel: 2 of 64 channels save too little to tell from noise (step 4); 1 when steep
    assert measured_step(_FakeCosts(lambda c: c * c))[0] == 4 and measured_step(_FakeCosts(lambda c: c ** 4))[0] == 1


def _wide_dead_cnn(channels: int, dead: int) -> onnx.ModelProto:
    """conv1 (`channels`, the first `dead` of them dead) -> relu -> conv2 (16) -> relu -> GAP -> fc."""
    rng = np.random.default_rng(0)
    b1 = rng.standard_normal(channels) * 0.1
    b1[:dead] = -100.0
    inits = {"w1": rng.standard_normal((channels, 3, 3, 3)) * 0.3, "b1": b1,
             "w2": rng.standard_normal((16, channels, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
             "wf": rng.standard_normal((10, 16)) * 0.5, "bf": np.zeros(10)}
    return _model(_two_conv_nodes(), inits, ("N", 3, 12, 12))


def test_round_latency_rounds_kept_counts_to_the_step_measured_here_and_falls_back_without_measuring():
    from onnxcomp.costmodel import CostModel

    model = _wide_dead_cnn(40, 20)  # 20 of 40 channels would be kept
    x, src = _data(model)
    assert _weight_shapes(TrimPass(threshold=0.0, round=1).run(model, Context(data=src)).model)["conv1"][0] == 20
    for step, kept in ((4, 20), (8, 24), (16, 32)):
        r = TrimPass(threshold=0.0).run(model, Context(data=src, cost_model=_FakeCosts(_stairs(step))))
        shapes = _weight_shapes(r.model)
        assert shapes["conv1"][0] == kept and shapes["conv2"][1] == kept, step
        assert r.figures["rounding"]["round"] == "latency" and r.figures["rounding"]["step"] == step
        np.testing.assert_allclose(_run(r.model, x), _run(model, x), rtol=1e-4, atol=1e-4)  # dead channels: exact
    # no measuring (--no-measure): multiples of 16, said in the figures
    off = TrimPass(threshold=0.0).run(model, Context(data=src, cost_model=CostModel(measure=False)))
    assert _weight_shapes(off.model)["conv1"][0] == 32 and "measuring is off" in off.figures["rounding"]["note"]
    # no channel qualifies: nothing to round, no probe timed
    costs = _FakeCosts(_stairs(8))
    none = TrimPass(threshold=0.0).run(_wide_dead_cnn(40, 0), Context(data=src, cost_model=costs))
    assert none.figures["groups_trimmed"] == 0 and not costs.asked and "rounding" not in none.figures


def test_dead_channels_are_trimmed_without_a_fold():
    """A channel that is exactly 0 on the data (a ReLU that never fires) folds nothing: no Add after
    its consumer (which would stop onnxruntime's conv fusions), no bias change."""
    model = _wide_dead_cnn(40, 8)
    x, src = _data(model)
    r = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    conv2 = next(rec for rec in r.layers if rec.node == "conv2")
    assert conv2.figures["fold"].startswith("none") and conv2.figures["in_channels_trimmed"] == 8
    assert not any(n.op_type == "Add" for n in r.model.graph.node)
    np.testing.assert_allclose(_run(r.model, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_target_removes_about_the_requested_macs_and_l1_is_the_baseline():
    model = dead_channel_cnn()
    x, src = _data(model)
    for criterion in ("locality", "l1"):
        result = TrimPass(target=0.3, round=1, criterion=criterion, max_per_layer=0.9).run(
            model, Context(data=src, input_shapes={"x": [1, 3, 12, 12]}))
        frac = result.figures["macs_removed_fraction"]
        assert 0.25 <= frac <= 0.4, (criterion, frac)
        assert _run(result.model, x).shape == (48, 10)


def test_share_metric_and_held_out_locality_in_the_report():
    model = dead_channel_cnn()
    x, src = _data(model)
    _, held = _data(model, n=16, seed=9)
    result = TrimPass(metric="share", threshold=1.0, round=1).run(model, Context(data=src, held_data=held))
    conv1 = next(r for r in result.layers if r.node == "conv1")
    assert conv1.figures["out_channels_trimmed"] == 4 and conv1.figures["locality_heldout"] == 0.0


def test_a_channel_constant_only_on_the_calibration_samples_is_counted_on_the_held_out_ones():
    """threshold=0 folds a channel constant on the calibration samples exactly there; a held-out
    sample that wakes it is not hidden: the report counts the groups above the threshold there."""
    model = dead_channel_cnn()
    x, src = _data(model)
    _, quiet = _data(model, n=16, seed=9)
    loud_x = 1e4 * np.random.default_rng(9).standard_normal((16, 3, 12, 12)).astype(np.float32)  # wakes bias -100
    loud = open_source({"x": loud_x}, model=model, batch_size=16)
    figures = {}
    for name, held in (("quiet", quiet), ("loud", loud)):
        result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src, held_data=held))
        figures[name] = result.figures
        np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)  # exact on its data
    assert figures["quiet"]["groups_trimmed"] == figures["loud"]["groups_trimmed"] == len(DEAD) + len(CONSTANT)
    assert figures["quiet"]["groups_above_threshold_heldout"] == 0
    assert figures["loud"]["groups_above_threshold_heldout"] == len(DEAD)  # the constant ones have zero weights


def test_nothing_qualifies_leaves_the_model_and_says_why_per_layer():
    model = dead_channel_cnn()
    _, src = _data(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:  # no dead or constant channel any more
        if t.name == "b1":
            t.CopyFrom(numpy_helper.from_array(np.zeros(16, np.float32), "b1"))
        if t.name == "w1":
            t.CopyFrom(numpy_helper.from_array(np.random.default_rng(5).standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"))
    result = TrimPass(threshold=0.0, round=1).run(m, Context(data=src))
    assert result.model is m and not result.modified
    assert all(r.reason for r in result.layers)
    assert "every locality score is above threshold=0" in next(r.reason for r in result.layers if r.node == "conv1")


@pytest.mark.parametrize("spec, message", [
    ("trim{target=1.5}", "target=1.5"),
    ("trim{target=-0.1}", "target=-0.1"),
    ("trim{criterion=l1}", "criterion=l1 has no threshold"),
    ("trim{metric=share,threshold=2}", "a share lies in (0, 1]"),
    ("trim{samples=2}", "at least 8"),
])
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(PipelineSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Pipeline.parse(spec)


def test_needs_data_and_enough_samples():
    model = dead_channel_cnn()
    with pytest.raises(BadInputError, match="give --data"):
        TrimPass().run(model, Context())
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    with pytest.raises(BadInputError, match="need at least 8"):
        TrimPass().run(model, Context(data=open_source({"x": x}, model=model, batch_size=4)))


def test_cli_trim_on_the_trained_resnet_reports_per_layer(tmp_path, capsys):
    """End to end through the CLI and the guard on a real trained model and its digits task."""
    import json

    from onnxcomp import evaldata
    from onnxcomp.cli import main

    x, y = evaldata.glyph_dataset("calib", "digits")
    data = tmp_path / "digits.npz"
    evaldata.save_npz(data, x, y, "input")
    out, report = tmp_path / "t.onnx", tmp_path / "r.json"
    src = Path(__file__).resolve().parents[1] / "models" / "glyph_resnet.onnx"
    before = src.read_bytes()
    code = main(["optimize", str(src), "-p", "trim{target=0.3}", "--data", str(data), "-o", str(out),
                 "--report", str(report), "-q"])
    assert code == 0 and src.read_bytes() == before
    rep = json.loads(report.read_text())
    trim = next(p for p in rep["passes"] if p["name"] == "trim")
    assert trim["figures"]["macs_removed_fraction"] > 0.2
    rewritten = [r for r in trim["layers"] if r["action"] == "rewritten"]
    assert rewritten and all("locality" in r["figures"] and "locality_heldout" in r["figures"] for r in rewritten
                             if r["figures"].get("out_channels_trimmed"))
    onnx.checker.check_model(onnx.load(str(out)))
    assert rep["validation"]["passed"]
    rounding = trim["figures"]["rounding"]  # round=latency, the default: the step measured on this machine
    assert rounding["round"] == "latency" and rounding["step"] in (1, 4, 8, 16, 32) and "note" not in rounding
    for r in rewritten:
        f = r["figures"]
        if f.get("out_channels_trimmed"):
            assert (f["out_channels"] - f["out_channels_trimmed"]) % rounding["step"] == 0, r["node"]


# 200-550 MB once normalize unfolds their weights (13 s and 6 s here): `benchmarks/trim.py --part models`
# runs them with every zoo model.
_BENCHMARK_ONLY = ("light_vgg19", "light_zfnet512")


def test_trim_on_every_real_model(real_model_path):
    """onnx's light_* models and rapidocr's PP-OCR models: trimmed or skipped with a reason per layer;
    what it writes passes the checker and runs in onnxruntime with the same output shapes."""
    from _helpers import input_shapes_for

    if real_model_path.stem in _BENCHMARK_ONLY:
        pytest.skip("run by benchmarks/trim.py --part models (too slow for the default suite)")

    from onnxcomp.model import runtime_compatible
    from onnxcomp.passes.normalize import NormalizePass

    model = NormalizePass().run(onnx.load(str(real_model_path)), Context()).model
    shapes = input_shapes_for(model, real_model_path)
    (name, shape), = shapes.items()
    x = np.random.default_rng(0).standard_normal((8, *shape[1:])).astype(np.float32)
    ctx = Context(data=open_source({name: x}, model=model, batch_size=4), input_shapes=shapes)
    result = TrimPass(target=0.2, samples=8).run(model, ctx)
    assert all(r.action == REWRITTEN or r.reason for r in result.layers)
    out = result.model
    runtime_compatible(out)
    if out.ByteSize() < 2**31 - 2**20:
        onnx.checker.check_model(out)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graphs, not ORT's fusions
    ref = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {name: x[:1]})
    got = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {name: x[:1]})
    assert [g.shape for g in got] == [r.shape for r in ref]
    if "shufflenet" not in real_model_path.stem:  # channel shuffles and grouped convs block every group
        assert result.modified and 0.05 < result.figures["macs_removed_fraction"] < 0.3


def correlated_cnn() -> onnx.ModelProto:
    """dead_channel_cnn without dead channels, where conv1's rows 8-11 are 0.05 x rows 0-3: those four
    channels vary little (they are trimmed first) but are exact copies of kept ones, so a refit of
    conv2 can carry their signal over to channels 0-3 where folding alone loses it."""
    m = dead_channel_cnn()
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((16, 3, 3, 3)) * 0.3
    b1 = rng.standard_normal(16) * 0.1
    w1[8:12], b1[8:12] = 0.05 * w1[0:4], 0.05 * b1[0:4]
    new = {"w1": w1, "b1": b1}
    for t in m.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    return m


def test_refit_lowers_the_output_error_against_plain_folding():
    """Trimming channels that do vary, then refitting the consumers by least squares, must land
    closer to the original output than folding alone, on samples the pass never saw."""
    model = correlated_cnn()
    _, src = _data(model, n=96)
    x_test, _ = _data(model, n=64, seed=7)
    ref = _run(model, x_test)
    errors = {}
    for mode in ("off", "on", "sequential"):
        # exclude the classifier: conv2's channels (which feed it) stay, conv1's go
        result = TrimPass(threshold=0.08, round=1, refit=mode, exclude="^fc$").run(model, Context(data=src))
        assert _weight_shapes(result.model)["conv2"] == (16, 12, 3, 3)  # the four scaled copies went
        got = _run(result.model, x_test)
        errors[mode] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        if mode != "off":
            conv2 = next(r for r in result.layers if r.node == "conv2")
            assert conv2.figures["refit"] == "applied", conv2.figures
            assert conv2.figures["refit_heldout_error_after"] < conv2.figures["refit_heldout_error_before"]
            assert result.figures["refit_applied"] >= 1
    assert errors["on"] < 0.5 * errors["off"] and errors["sequential"] < 0.5 * errors["off"], errors


def test_an_untracked_per_channel_operand_blocks_its_groups():
    """conv -> Add(c, s) with s a graph input [8, 1, 1]: s would keep 8 channels while c lost some, so
    the group cannot go (a lower-rank operand's channel axis is checked too)."""
    rng = np.random.default_rng(5)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((4, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "s"], ["a"], name="add"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6]),
                                       helper.make_tensor_value_info("s", TensorProto.FLOAT, [8, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    reasons = {gr.blocked for gr in ChannelGraph(m).groups() if gr.tensors & {"c"}}
    assert all(r and "consumed by Add 'add'" in r for r in reasons), reasons


def test_refit_of_a_gemm_with_beta_zero_writes_a_finite_bias():
    """A Gemm whose C is ignored (beta=0): the fold makes C the bias with beta=1, and the refit reads
    the rewritten node's beta, not the original's."""
    rng = np.random.default_rng(6)
    w, b = rng.standard_normal((16, 3, 3, 3)) * 0.3, rng.standard_normal(16) * 0.1
    w[8:12], b[8:12] = 0.05 * w[0:4], 0.05 * b[0:4]
    inits = {"w": w, "b": b, "wf": rng.standard_normal((10, 16)), "cf": rng.standard_normal(10)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "cf"], ["y"], name="fc", transB=1, beta=0.0, alpha=2.0)]
    model = _model(nodes, inits, ("N", 3, 8, 8))
    x, src = _data(model, n=96, hw=(8, 8))
    result = TrimPass(threshold=0.08, round=1, refit="on").run(model, Context(data=src))
    fc = next(r for r in result.layers if r.node == "fc")
    assert fc.figures["in_channels_trimmed"] >= 4 and fc.figures["refit"] == "applied", fc.figures
    got, ref = _run(result.model, x), _run(model, x)
    assert np.all(np.isfinite(got)) and np.linalg.norm(got - ref) < 0.1 * np.linalg.norm(ref)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_follow_the_trimmed_channels(opset):
    """conv (16, channel 2 dead) -> Split in halves -> each half into its own conv: the first half
    loses channel 2, and the Split's sizes (attribute before opset 13, input from 13, num_outputs
    from 18) say 7 and 8."""
    rng = np.random.default_rng(8)
    w, b = rng.standard_normal((16, 3, 3, 3)), rng.standard_normal(16) * 0.1
    b[2] = -100.0
    inits = {"w": w, "b": b, "wa": rng.standard_normal((4, 8, 1, 1)), "wb": rng.standard_normal((4, 8, 1, 1))}
    if opset >= 18:
        split = helper.make_node("Split", ["r"], ["s0", "s1"], name="split", axis=1, num_outputs=2)
    elif opset >= 13:
        inits["sizes"] = np.array([8, 8], dtype=np.int64)
        split = helper.make_node("Split", ["r", "sizes"], ["s0", "s1"], name="split", axis=1)
    else:
        split = helper.make_node("Split", ["r"], ["s0", "s1"], name="split", axis=1, split=[8, 8])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), split,
             helper.make_node("Conv", ["s0", "wa"], ["a"], name="conva"),
             helper.make_node("Conv", ["s1", "wb"], ["bb"], name="convb"),
             helper.make_node("Add", ["a", "bb"], ["y"], name="add")]
    model = _model(nodes, inits, ("N", 3, 6, 6), out_dims=("N", 4, 6, 6), opset=opset)
    x, src = _data(model, hw=(6, 6))
    result = TrimPass(threshold=0.0, round=1).run(model, Context(data=src))
    shapes = _weight_shapes(result.model)
    assert shapes["conv"][0] == 15 and shapes["conva"] == (4, 7, 1, 1) and shapes["convb"] == (4, 8, 1, 1)
    onnx.checker.check_model(result.model)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
