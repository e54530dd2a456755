"""Winograd form: the Cook-Toom matrices, joint sparsity, the `winograd` pass and its inverse.

Math tests need no ONNX; graph tests check every rewrite in onnxruntime against the original conv.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
from _helpers import ort_run
from onnx import helper, numpy_helper
from scipy.signal import correlate

from onnxcomp import zoo
from onnxcomp.analysis import layer_costs
from onnxcomp.linalg import winograd as wg
from onnxcomp.model import max_runtime_ir_version
from onnxcomp.passes import REWRITTEN, SKIPPED, Context, get_pass
from onnxcomp.passes.winograd import function as fn

# ---------------------------------------------------------------------------------------------
# the matrices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_transforms_compute_the_correlation(m):
    t = wg.transforms(m)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((3, 3 * m + 2, 2 * m + 2))
    w = rng.standard_normal((4, 3, 3, 3))
    ref = np.stack([sum(correlate(x[c], w[o, c], mode="valid") for c in range(3)) for o in range(4)])
    got = wg.conv2d_reference(x, w, t)
    assert np.abs(got - ref).max() <= 1e-11 * np.abs(ref).max()


def test_f43_matrices_are_lavins():
    """The default points (0, 1, -1, 2, -2) give the matrices of Lavin and Gray (2016) exactly."""
    t = wg.transforms(4)
    bt = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=float)
    g = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
    at = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=float)
    assert np.array_equal(t.BT, bt) and np.array_equal(t.AT, at)
    assert np.abs(t.G - g).max() < 1e-16


def test_transforms_reject_bad_points():
    with pytest.raises(ValueError, match="distinct"):
        wg.transforms(2, 3, (Fraction(0), Fraction(0), Fraction(1)))
    with pytest.raises(ValueError, match="needs 3 finite points"):
        wg.transforms(2, 3, (Fraction(0), Fraction(1)))
    with pytest.raises(ValueError):
        wg.transforms(0)


def test_custom_points_are_exact_too():
    t = wg.transforms(2, 3, (Fraction(0), Fraction(1, 2), Fraction(-3)))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 6, 6)), rng.standard_normal((3, 2, 3, 3))
    ref = np.stack([sum(correlate(x[c], w[o, c], mode="valid") for c in range(2)) for o in range(3)])
    assert np.abs(wg.conv2d_reference(x, w, t) - ref).max() < 1e-11


@pytest.mark.parametrize("m", [2, 4, 6])
def test_filter_inverse_undoes_the_transform(m):
    t = wg.transforms(m)
    w = np.random.default_rng(1).standard_normal((5, 3, 3, 3))
    u = wg.filter_transform(w, t)
    assert u.shape == (t.alpha**2, 5, 3)
    assert np.abs(wg.filter_inverse(u, t) - w).max() < 1e-12


# ---------------------------------------------------------------------------------------------
# joint sparsity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("spatial", "winograd"), [(0.5, 0.5), (0.6, 0.3), (0.0, 0.5), (0.4, 0.0)])
def test_joint_sparsity_meets_both_targets_from_one_artifact(m, spatial, winograd):
    t = wg.transforms(m)
    w = np.random.default_rng(2).standard_normal((16, 8, 3, 3))
    res = wg.joint_sparsify(w, t, spatial, winograd, rounds=5)
    # at least the targets (pruning zeroes exactly that many; a least-squares map back may add exact zeros)
    assert np.mean(res.u == 0) >= winograd - 1.0 / res.u.size
    assert np.mean(res.spatial == 0) >= spatial - 1.0 / res.spatial.size
    assert np.mean(res.u == 0) <= winograd + 0.02
    # the spatial deployment is computed from the Winograd artifact alone
    assert np.array_equal(res.spatial, wg.spatial_from(res.u, t, spatial))
    # reported errors are what they say
    assert res.spatial_error == pytest.approx(np.linalg.norm(res.spatial - w) / np.linalg.norm(w), rel=1e-9)
    scale = wg.position_weights(t)
    ref_u = wg.filter_transform(w, t)
    assert res.u_error == pytest.approx(np.linalg.norm((res.u - ref_u) * scale) / np.linalg.norm(ref_u * scale), rel=1e-9)
    # the kept round is the best scored one
    assert res.history[res.round] == pytest.approx(min(res.history))


def test_prune_smallest_counts_exactly_and_respects_scale():
    v = np.arange(1.0, 9.0).reshape(2, 4)
    assert np.count_nonzero(wg.prune_smallest(v, 0.5)) == 4
    scaled = wg.prune_smallest(v, 0.25, scale=np.array([[100.0], [1.0]]))
    assert np.all(scaled[0] != 0) and np.count_nonzero(scaled[1]) == 2


# ---------------------------------------------------------------------------------------------
# the pass on one-layer models
# ---------------------------------------------------------------------------------------------


def _conv_model(*, pads=(1, 1, 1, 1), hw=(10, 13), cin=6, cout=5, bias=True, opset=17, batch="N",
                auto_pad=None, strides=(1, 1), dilations=(1, 1), group=1, kernel=3, relu=False, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        ins.append("b")
    attrs = {"kernel_shape": [kernel, kernel], "strides": list(strides), "dilations": list(dilations), "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    nodes = [helper.make_node("Conv", ins, ["c" if relu else "y"], name="conv", **attrs)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, cin, *hw])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, cout, "ho", "wo"])
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(max_runtime_ir_version(), 8 if opset < 15 else 9)
    return m


def _winograd(model, **options):
    return get_pass("winograd")(**{"objective": "macs", **options}).run(model, Context())


def _feeds(model, batch=2, seed=3):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal([batch, *dims[1:]]).astype(np.float32)}


def _rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("products", ["matmul", "grouped"])
@pytest.mark.parametrize(("tile", "tol"), [("2", 1e-5), ("4", 1e-4), ("6", 1e-3)])
@pytest.mark.parametrize("case", [
    {"pads": (1, 1, 1, 1)}, {"pads": (0, 0, 0, 0)}, {"pads": (2, 0, 1, 3)}, {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "VALID"}, {"bias": False}, {"hw": (8, 8)}, {"hw": (3, 5), "pads": (0, 1, 0, 1)},
])
def test_rewrite_matches_the_conv(tile, tol, case, products):
    model = _conv_model(**case)
    res = _winograd(model, tile=tile, products=products)
    (rec,) = res.layers
    assert rec.action == REWRITTEN, rec.reason
    onnx.checker.check_model(res.model, full_check=True)
    assert [n.op_type for n in res.model.graph.node] == [fn.OP]
    (body,) = res.model.functions
    assert ("Conv" if products == "grouped" else "MatMul") in [n.op_type for n in body.node]
    assert body.overload.endswith("grouped") == (products == "grouped") == (rec.figures["products"] == "grouped conv")
    # grouped: the bias is the products Conv's, at tile position (1, 1) (point 1), no Add over the output
    ops = [n.op_type for n in body.node]
    assert ("Add" in ops) == (case.get("bias", True) and products == "matmul")
    assert ("Pad" in ops) == (case.get("bias", True) and products == "grouped")
    feeds = _feeds(model)
    ref, got = ort_run(model, feeds)["y"], ort_run(res.model, feeds)["y"]
    assert got.shape == ref.shape
    assert _rel_err(got, ref) <= tol
    assert rec.figures["tile"] == int(tile)
    assert rec.params_after == (int(tile) + 2) ** 2 * rec.params_before // 9
    # the direct count is the conv's own, not over the tile grid where it overhangs the output
    assert rec.figures["multiplications"]["direct"] == rec.macs_before


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_rewrite_at_every_opset(opset):
    model = _conv_model(opset=opset, relu=True)
    res = _winograd(model, tile="4")
    assert res.layers[0].action == REWRITTEN, res.layers[0].reason
    onnx.checker.check_model(res.model, full_check=True)
    assert res.model.ir_version <= max_runtime_ir_version()
    feeds = _feeds(model)
    assert _rel_err(ort_run(res.model, feeds)["y"], ort_run(model, feeds)["y"]) <= 1e-4


@pytest.mark.parametrize(("case", "reason"), [
    ({"strides": (2, 2)}, "stride 1"), ({"dilations": (2, 2)}, "dilation 1"), ({"group": 2, "cin": 6, "cout": 4}, "group=2"),
    ({"kernel": 1, "pads": (0, 0, 0, 0)}, "kernel 1x1"), ({"kernel": 5, "pads": (2, 2, 2, 2)}, "kernel 5x5"),
    ({"hw": ("H", "W")}, "not fixed"),
])
def test_ineligible_layers_are_skipped_untouched(case, reason):
    model = _conv_model(**case)
    res = _winograd(model)
    (rec,) = res.layers
    assert rec.action == SKIPPED and reason in rec.reason
    assert res.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("products", ["matmul", "grouped"])
def test_dynamic_batch_runs_at_any_batch(products):
    model = _conv_model(hw=(9, 9))
    res = _winograd(model, tile="4", products=products)
    for batch in (1, 4):
        feeds = _feeds(model, batch=batch)
        assert _rel_err(ort_run(res.model, feeds)["y"], ort_run(model, feeds)["y"]) <= 1e-4


@pytest.mark.parametrize("opset", [13, 17])  # below 15 onnx's shape inference follows no Concat of Constants
@pytest.mark.parametrize("products", ["matmul", "grouped"])
def test_macs_reported_match_the_inlined_body(products, opset):
    model = _conv_model(hw=(16, 12), cin=8, cout=16, opset=opset)
    res = _winograd(model, tile="4", products=products)
    (cost,) = layer_costs(res.model)
    assert cost.macs == res.layers[0].macs_after
    (orig,) = layer_costs(model)
    assert orig.macs == res.layers[0].macs_before


def test_latency_objective_keeps_slow_layers_direct_with_both_figures():
    """A 3-channel layer gains nothing from Winograd on any CPU: it stays direct, with the times."""
    model = _conv_model(cin=3, cout=8, hw=(32, 32))
    res = get_pass("winograd")().run(model, Context())
    (rec,) = res.layers
    assert rec.action == SKIPPED and "direct is faster" in rec.reason
    lat = rec.figures["latency"]
    assert {"direct_ms", "F2_ms", "F4_ms", "F2_grouped_ms", "F4_grouped_ms", "speedup"} <= set(lat)


class _GivenCosts:
    """A cost model whose timings are given: a layer's direct form 10 ms, the `fastest` Winograd form
    5 ms, the others `others_ms`; whole models (input, result) `whole_ms`, on every reading."""

    def __init__(self, fastest: str, whole_ms: tuple[float, float], others_ms: float = 9.0):
        self.fastest, self.whole_ms, self.others_ms = fastest, whole_ms, others_ms
        self.cold: list[bool] = []  # how each estimate was asked for

    def estimate(self, units, cold=False, **_):
        from onnxcomp.costmodel import Estimate

        self.cold.append(cold)
        return [Estimate(10.0 if u.name.endswith(":direct") else 5.0 if u.name.endswith(f":{self.fastest}")
                         else self.others_ms, "measured") for u in units]

    def paired_timings(self, base, candidate, feeds, *, pairings, **_):
        assert set(feeds) == {"x"}
        return [self.whole_ms] * pairings


def test_latency_objective_keeps_the_input_when_the_rewritten_model_is_not_faster():
    """Layers are chosen by their time alone; on zoo resnet18 layers 1.08-1.19x faster alone made the
    model 0.97x as fast. verify=on times the whole result and keeps the input when it is not faster."""
    model = _conv_model(cin=8, cout=8, hw=(16, 16))
    res = get_pass("winograd")().run(model, Context(cost_model=_GivenCosts("F4", whole_ms=(10.0, 10.5))))
    assert res.model.SerializeToString() == model.SerializeToString()
    (rec,) = res.layers
    assert rec.action == SKIPPED and "0.952x as fast as the input" in rec.reason and "verify=on" in rec.reason
    assert res.figures["measured_speedup"]["median"] == pytest.approx(10.0 / 10.5, abs=1e-4)
    off = get_pass("winograd")(verify="off").run(model, Context(cost_model=_GivenCosts("F4", whole_ms=(10.0, 10.5))))
    assert off.layers[0].action == REWRITTEN and "measured_speedup" not in off.figures


@pytest.mark.parametrize("exceeds", [False, True])
def test_layers_are_timed_with_cold_weights_when_the_models_exceed_the_cache(exceeds, monkeypatch):
    """Timed alone, a layer's weights stay cached between runs; in a model whose weights exceed the
    cache they come from memory, and the Winograd weights are 1.78-4x the direct ones (zoo resnet18's
    256-channel layer at 14: 1.09x faster cached, 0.97x cold). Such a model's layers are timed cold."""
    import onnxcomp.passes.winograd as winograd

    monkeypatch.setattr(winograd, "model_weights_exceed_cache", lambda model: exceeds)
    costs = _GivenCosts("F4", whole_ms=(10.0, 5.0))
    res = get_pass("winograd")().run(_conv_model(cin=8, cout=8, hw=(16, 16)), Context(cost_model=costs))
    (rec,) = res.layers
    assert costs.cold == [exceeds] and rec.figures["latency"]["weights"] == ("cold" if exceeds else "cached")
    slow = _GivenCosts("none", whole_ms=(10.0, 5.0), others_ms=9.9)  # 1.01x: under min_speedup
    (skip,) = get_pass("winograd")().run(_conv_model(cin=8, cout=8, hw=(16, 16)), Context(cost_model=slow)).layers
    assert skip.action == SKIPPED and (", weights cold)" in skip.reason) == exceeds


@pytest.mark.parametrize(("fastest", "tile", "grouped"), [("F4g", 4, True), ("F4", 4, False), ("F2g", 2, True)])
def test_latency_objective_takes_the_fastest_tile_and_product_form(fastest, tile, grouped):
    """Every (tile, products) form is timed; the fastest is the one written, its body to match."""
    model = _conv_model(cin=8, cout=8, hw=(16, 16))
    res = get_pass("winograd")().run(model, Context(cost_model=_GivenCosts(fastest, whole_ms=(10.0, 5.0))))
    (rec,) = res.layers
    assert rec.action == REWRITTEN, rec.reason
    assert rec.figures["tile"] == tile and (rec.figures["products"] == "grouped conv") == grouped
    assert rec.figures["latency"]["speedup"] == 2.0
    assert res.figures["measured_speedup"] == {"median": 2.0, "timings": [2.0, 2.0, 2.0]}
    (body,) = res.model.functions
    assert body.overload.endswith("grouped") == grouped
    feeds = _feeds(model)
    assert _rel_err(ort_run(res.model, feeds)["y"], ort_run(model, feeds)["y"]) <= 1e-4


@pytest.mark.parametrize("products", ["matmul", "grouped"])
def test_to_spatial_is_the_exact_inverse(products):
    model = _conv_model(pads=(2, 0, 1, 3), relu=True)
    wino = _winograd(model, tile="4", products=products).model
    back = get_pass("winograd-to-spatial")().run(wino, Context())
    (rec,) = back.layers
    assert rec.action == REWRITTEN and rec.reason == "exact inverse"
    assert not back.model.functions and all(o.domain in ("", "ai.onnx") for o in back.model.opset_import)
    conv = next(n for n in back.model.graph.node if n.op_type == "Conv")
    w = {t.name: numpy_helper.to_array(t) for t in back.model.graph.initializer}[conv.input[1]]
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    assert np.abs(w - w0).max() <= 1e-5 * np.abs(w0).max()
    feeds = _feeds(model)
    assert _rel_err(ort_run(back.model, feeds)["y"], ort_run(model, feeds)["y"]) <= 1e-5


def test_joint_sparsity_in_the_pass_and_back():
    model = _conv_model(cin=16, cout=16, hw=(12, 12))
    res = _winograd(model, tile="2", sparsity="0.5:0.5")
    (rec,) = res.layers
    sp = rec.figures["sparsity"]
    assert sp["spatial"] == pytest.approx(0.5, abs=0.01) and sp["winograd"] == pytest.approx(0.5, abs=0.01)
    u = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}[res.model.graph.node[0].input[1]]
    assert np.mean(u == 0) == pytest.approx(0.5, abs=0.01)
    assert sp["winograd_multiplications"] == np.count_nonzero(u) * 36  # 6x6 tiles of F(2,3) at 12x12
    back = get_pass("winograd-to-spatial")().run(res.model, Context())
    assert back.layers[0].reason.startswith("least-squares inverse")
    conv = back.model.graph.node[0]
    w = {t.name: numpy_helper.to_array(t) for t in back.model.graph.initializer}[conv.input[1]]
    assert np.mean(w == 0) == pytest.approx(0.5, abs=0.01)
    assert res.figures["sparsity"]["winograd_skipped"] == pytest.approx(0.5, abs=0.01)


def test_bad_sparsity_option_is_a_usage_error():
    from onnxcomp.errors import PipelineSyntaxError

    for bad in ("0.5", "a:b", "1.2:0.3", "0.1:0.2:0.3"):
        with pytest.raises(PipelineSyntaxError, match="sparsity"):
            get_pass("winograd")(sparsity=bad)


# ---------------------------------------------------------------------------------------------
# the zoo: every eligible conv of resnet18 and vgg16
# ---------------------------------------------------------------------------------------------


def _conv_stack(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` cut before its classifier (Flatten / GlobalAveragePool): every conv, none of vgg16's
    400 MB of dense weights, which only slow onnxruntime's session creation here."""
    from onnxcomp.graph import remove_unused_initializers

    cut = next(i for i, n in enumerate(model.graph.node) if n.op_type in ("Flatten", "GlobalAveragePool"))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tail = out.graph.node[cut].input[0]
    del out.graph.node[cut:]
    del out.graph.output[:]
    out.graph.output.append(helper.make_empty_tensor_value_info(tail))
    remove_unused_initializers(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_zoo_dense_rewrites_match_and_invert(arch):
    normalized = _conv_stack(get_pass("normalize")().run(zoo.build(arch), Context()).model)
    convs = [n for n in normalized.graph.node if n.op_type == "Conv"]
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    outs = [c.output[0] for c in convs]
    ref = ort_run(normalized, feeds, outs)
    w0 = {t.name: numpy_helper.to_array(t) for t in normalized.graph.initializer}
    for tile, tol, products in (("2", 1e-4, "matmul"), ("4", 1e-3, "matmul"), ("4", 1e-3, "grouped")):
        res = _winograd(normalized, tile=tile, products=products)
        done = [r for r in res.layers if r.action == REWRITTEN]
        eligible = [c for c in convs if all(a.name != "strides" or list(a.ints) == [1, 1] for a in c.attribute)
                    and numpy_helper.to_array(next(t for t in normalized.graph.initializer if t.name == c.input[1])).shape[2:] == (3, 3)]
        assert len(done) == len(eligible) > 0
        got = ort_run(res.model, feeds, [r.output for r in done])
        for r in done:
            assert _rel_err(got[r.output], ref[r.output]) <= tol, (tile, r.node)
        back = get_pass("winograd-to-spatial")().run(res.model, Context()).model
        w1 = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
        for node in back.graph.node:
            if node.op_type == "Conv" and node.input[1].endswith("/weight"):
                original = next(c for c in convs if c.output[0] == node.output[0])
                assert node.name == original.name
                a, b = w1[node.input[1]], w0[original.input[1]]
                assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), node.name
