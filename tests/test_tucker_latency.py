"""Tucker's objective=latency and budget=latency: each layer's options are timed alone by the cost
model; a rewrite that does not pay in measured time is left out, with the figures saying why.
(Whether the models get faster is benchmarks/latency.py's and tucker_latency.py's job: no timing
goal in a unit test; here the decisions must follow the measurements the report shows.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from _helpers import make_conv_model

from onnxcomp.passes.base import REWRITTEN, SKIPPED, Context, get_pass
from onnxcomp.passes.tucker import latency

Tucker = get_pass("tucker")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_CACHE_DIR", str(tmp_path))


def _plan(model, **opts):
    from onnxcomp.graph import GraphIndex
    from onnxcomp.shapes import static_shapes

    p = Tucker(**opts)
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    return p._plan(GraphIndex(model), node, static_shapes(model, {"x": [1, *[d.dim_value for d in
                   model.graph.input[0].type.tensor_type.shape.dim[1:]]]}), p.config)


def test_alternatives_and_units_match_the_layer():
    model = make_conv_model(cin=64, cout=64, hw=16, seed=1)
    plan = _plan(model)
    opts = latency.alternatives(plan, (20, 24))
    assert opts[:3] == [(20, 24), (20, None), (None, 24)]  # Tucker-2, then either mode alone
    assert (32, 32) in opts and (None, None) not in opts  # rounded up to MLAS's 32
    for ranks in [None, *opts]:
        unit = latency.layer_unit(plan, ranks)
        sess = ort.InferenceSession(unit.model().SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, unit.make_feeds())
        assert y.shape == (1, 64, 16, 16)
        want = plan.cost.original if ranks is None else plan.cost.tucker(*ranks)
        assert unit.macs == int(want)


def test_a_rewrite_that_pays_is_kept_and_one_that_does_not_is_left_alone():
    big = make_conv_model(cin=128, cout=128, hw=28, seed=2)
    res = Tucker(rank="0.25").run(big, Context(input_shapes={"x": [1, 128, 28, 28]}))
    rec = res.layers[0]
    lat = rec.figures["latency"]
    assert rec.action == REWRITTEN, rec.reason
    assert lat["source"] == "measured" and lat["speedup"] >= 1.05
    chosen = (rec.figures["ranks"]["output"], rec.figures["ranks"]["input"])
    fastest = lat["options"][0]
    assert (fastest["ranks"]["output"], fastest["ranks"]["input"]) == chosen  # the fastest option won
    assert lat["speedup"] == pytest.approx(lat["layer_ms"] / fastest["ms"], rel=1e-3)
    assert all(o["error_estimate"] <= lat["options"][-1]["error_estimate"] + 1 for o in lat["options"])
    assert res.figures["cost_model"] == {"measured": 1}

    tiny = make_conv_model(cin=4, cout=8, hw=4, seed=3)
    rec = Tucker(rank="0.5", round=1, min_gain=-10).run(tiny, Context(input_shapes={"x": [1, 4, 4, 4]})).layers[0]
    if rec.action == SKIPPED:  # a 4x4 layer: a chain of convs costs more calls than it saves MACs
        assert rec.reason.startswith("its fastest option runs") and "min_speedup=0.05" in rec.reason
        assert rec.figures["latency"]["speedup"] < 1.0 / 0.95
    else:
        assert rec.figures["latency"]["speedup"] >= 1.0 / 0.95


def test_options_keep_the_rank_rules_error_and_mac_bounds():
    model = make_conv_model(cin=96, cout=96, hw=16, seed=4)
    rec = Tucker(rank="macs:0.5").run(model, Context(input_shapes={"x": [1, 96, 16, 16]})).layers[0]
    lat = rec.figures.get("latency")
    assert lat is not None
    plan = _plan(model)
    for o in lat["options"]:
        assert plan.cost.tucker(o["ranks"]["output"], o["ranks"]["input"]) <= 0.5 * plan.cost.original * (1 + 1e-9)


def test_unknown_shapes_fall_back_to_macs_with_the_reason():
    model = make_conv_model(cin=32, cout=32, hw=8)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "H"
    dims[3].Clear()
    dims[3].dim_param = "W"
    rec = Tucker(rank="0.25").run(model, Context()).layers[0]
    assert rec.figures.get("cost", "").startswith("macs: the layer's input shape is unknown")
    assert "latency" not in rec.figures


def _three_convs():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits, nodes, src = [], [], "x"
    for k, c in enumerate([64, 128, 128]):
        w = (rng.standard_normal((128, c, 3, 3)) * (2 / (9 * c)) ** 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        out = "y" if k == 2 else f"h{k}"
        nodes.append(helper.make_node("Conv", [src, f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [out], name=f"relu{k}"))
        src = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 28, 28])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_latency_budget_spends_measured_time():
    model = _three_convs()
    res = Tucker(budget="latency:0.6", round=16).run(model, Context())
    f = res.figures
    assert f["budget_met"] is True and f["budget_achieved"] <= 0.6
    assert 0.0 <= f["budget_fixed"] < f["budget_floor"] <= f["budget_achieved"]
    assert f["model_ms_before"] > 0 and f["model_ms_after_predicted"] <= 0.6 * f["model_ms_before"]
    assert f["cost_model"]["layers"] and f["cost_model"]["model_ms_measured"] > 0
    # the result is timed against the input too: the median of the interleaved pairings is reported
    assert len(f["budget_measured_ratios"]) == 3 and f["budget_measured"] == sorted(f["budget_measured_ratios"])[1]
    assert 0 < f["budget_measured"] < 1.5 and all(ms > 0 for ms in f["model_ms_measured_pair"])
    rewritten = [r for r in res.layers if r.action == REWRITTEN]
    assert rewritten and all("timed" in r.figures["latency"] for r in rewritten)
    for r in rewritten:  # every chosen rank pays measurably in time (the front in time, not MACs)
        lat = r.figures["latency"]
        assert lat["chosen_ms"] <= (1 - 0.05) * lat["layer_ms"] + 1e-9, lat
        assert lat["run_start_ms"] >= 0 and lat["options_on_time_front"] >= 1
    from onnxcomp.errors import PipelineSyntaxError

    with pytest.raises(PipelineSyntaxError, match="latency:<fraction"):
        Tucker(budget="latency:2")


def test_latency_budget_reads_the_whole_model_in_its_fast_state(monkeypatch):
    """This VM has spells of seconds to minutes in which a whole model runs up to 1.6x slower while
    its layers alone do not; one reading from such a spell made the fixed part look large and took
    every layer to its lowest rank. The budget keeps the fastest of several readings."""
    from onnxcomp.costmodel import ModelTimer

    real = ModelTimer.read
    seen: list[float] = []

    def spell_but_once(self, *args, **kw):  # the second reading fast, every other one in a spell
        out = real(self, *args, **kw)
        slow = [dataclasses.replace(e, ms=e.ms * (1.0 if len(seen) == 1 else 1.6)) for e in out]
        seen.extend(e.ms for e in slow)
        return slow

    built: list[int] = []
    real_init = ModelTimer.__init__

    def counted(self, *args, **kw):
        built.append(1)
        real_init(self, *args, **kw)

    monkeypatch.setattr(ModelTimer, "read", spell_but_once)
    monkeypatch.setattr(ModelTimer, "__init__", counted)
    f = Tucker(budget="latency:0.6", round=16, allocate="energy").run(_three_convs(), Context()).figures
    readings = f["cost_model"]["model_ms_readings"]
    assert len(readings) >= 3 and readings == [round(v, 4) for v in seen[:len(readings)]]
    assert f["cost_model"]["model_ms_measured"] == min(readings) == readings[1]
    assert f["model_ms_before"] == pytest.approx(max(readings[1], f["cost_model"]["layers_ms"]), abs=1e-3)
    assert f["budget_met"] is True
    # one session for every budget reading (vgg16 would be loaded six times), then one pair (input and
    # result) for budget_measured
    assert len(built) == 2 and len(seen) == len(readings) + 2 * 3
