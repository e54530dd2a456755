"""The int8 pass: onnxruntime static quantization wrapped as a pass, calibrated on a DataSource."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _tiny_models import tiny_cnn

from onnxcomp.data import random_source
from onnxcomp.errors import BadInputError
from onnxcomp.passes.base import REWRITTEN, SKIPPED, Context
from onnxcomp.pipeline import Pipeline


def _ctx(model: onnx.ModelProto) -> Context:
    return Context(data=random_source(model, {"x": [1, 3, 16, 16]}, samples=16, batch_size=4, seed=1))


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_int8_quantizes_every_weight_layer_and_stays_close():
    model = tiny_cnn(seed=3)
    out, report = Pipeline.parse("int8{objective=any,samples=16}").run(model, _ctx(model))
    records = report.passes[-1].layers
    assert {r["node"] for r in records if r["action"] == REWRITTEN} == {"conv1", "conv2", "fc"}
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("DequantizeLinear") >= 3 and "QuantizeLinear" in ops
    # int8 weights: the serialized model shrinks (biases and scales stay float).
    weights_before = sum(t.ByteSize() for t in model.graph.initializer)
    weights_after = sum(t.ByteSize() for t in out.graph.initializer)
    assert weights_after < 0.5 * weights_before
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref, got = _run(model, {"x": x}), _run(out, {"x": x})
    # int8 rounding on a 256-level grid leaves ~2% relative error here (measured 0.018, cosine 0.9998);
    # an uncalibrated or mis-scaled layer gives tens of percent
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert rel < 0.05 and cos > 0.998, (rel, cos)


def test_int8_exclude_keeps_layer_float():
    model = tiny_cnn(seed=3)
    out, report = Pipeline.parse("int8{objective=any,exclude=fc,samples=8}").run(model, _ctx(model))
    by_node = {r["node"]: r for r in report.passes[-1].layers}
    assert by_node["fc"]["action"] == SKIPPED and "exclude" in by_node["fc"]["reason"]
    fc = next(n for n in out.graph.node if n.name == "fc")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers.get(fc.input[1]) != "DequantizeLinear"


def test_int8_needs_data():
    with pytest.raises(BadInputError, match="needs calibration data"):
        Pipeline.parse("int8").run(tiny_cnn(), Context())


def test_int8_calibrates_a_model_with_a_fixed_batch_of_4():
    """Calibration fed one sample at a time, which a model fixing its batch dim to 4 cannot run."""
    model = tiny_cnn(seed=3)
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    ctx = Context(data=random_source(model, {}, samples=12, seed=1))
    out, report = Pipeline.parse("int8{objective=any,samples=8}").run(model, ctx)
    assert report.passes[-1].figures["calibration_samples"] == 8  # two whole batches of 4
    assert {r["node"] for r in report.passes[-1].layers if r["action"] == REWRITTEN} == {"conv1", "conv2", "fc"}
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref, got = _run(model, {"x": x}), _run(out, {"x": x})
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert rel < 0.08, rel  # measured 0.036 (8 calibration samples); mis-calibration gives tens of percent


def test_int8_reports_params_and_macs_of_unnamed_nodes():
    """Unnamed nodes get names for quantize_static; their costs were looked up under the old labels."""
    model = tiny_cnn(seed=3)
    for node in model.graph.node:
        node.name = ""
    _, report = Pipeline.parse("int8{objective=any,samples=4}", normalize=False).run(model, _ctx(model))
    rewritten = [r for r in report.passes[-1].layers if r["action"] == REWRITTEN]
    assert [r["node"] for r in rewritten] == ["Conv_0", "Conv_2", "Gemm_6"]
    assert [r["params_before"] for r in rewritten] == [8 * 27 + 8, 16 * 72 + 16, 170]
    assert all(r["macs_before"] > 0 for r in rewritten)


def _opset11(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.opset_import[0].version = 11
    return m


def test_int8_bumps_an_old_opset_for_per_channel_and_falls_back_when_it_cannot(monkeypatch):
    model = _opset11(tiny_cnn(seed=3))
    out, report = Pipeline.parse("int8{objective=any,samples=8}", normalize=False).run(model, _ctx(model))
    figures = report.passes[-1].figures
    assert figures["opset_bumped_to"] == 13 and figures["per_channel"] is True
    onnx.checker.check_model(out)

    def refuse(m, target):
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    out, report = Pipeline.parse("int8{objective=any,samples=8}", normalize=False).run(model, _ctx(model))
    figures = report.passes[-1].figures
    assert figures["per_channel"] is False and "no adapter" in figures["per_channel_disabled"]
    assert {r["node"] for r in report.passes[-1].layers if r["action"] == REWRITTEN} == {"conv1", "conv2", "fc"}
    assert out.opset_import[0].version == 11  # per-tensor QDQ where opset 11 allows it
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref, got = _run(model, {"x": x}), _run(out, {"x": x})
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < 0.08


def test_int8_objective_latency_keeps_in_float_the_layers_it_measures_slower():
    """Every selected layer is timed float vs its int8 neighbourhood; the decision follows the
    timings in the report: slower ones are skipped with the figures, faster ones quantized."""
    model = tiny_cnn(seed=3)
    out, report = Pipeline.parse("int8{samples=16}").run(model, _ctx(model))
    p = report.passes[-1]
    timed = p.figures["latency"]["layers"]
    assert set(timed) == {"conv1", "conv2", "fc"}
    by_node = {r["node"]: r for r in p.layers}
    for name, t in timed.items():
        assert t["float_ms"] > 0 and t["int8_ms"] > 0 and t["source"] in ("measured", "cache")
        rec = by_node[name]
        if t["int8_ms"] >= t["float_ms"]:
            assert rec["action"] == SKIPPED and "kept in float (objective=latency)" in rec["reason"]
            assert name in p.figures["latency"]["kept_float"]
        else:
            assert rec["action"] == REWRITTEN and rec["figures"]["latency"] == t
    kept = set(p.figures["latency"]["kept_float"])
    dq_consumers = {n.name for n in out.graph.node
                    if any(i.endswith("_DequantizeLinear_Output") for i in n.input[1:2])}
    assert not (kept & dq_consumers)  # the layers kept in float really have float weights
    assert {r["node"] for r in p.layers if r["action"] == REWRITTEN} <= dq_consumers


def test_int8_objective_latency_on_a_wide_layer_quantizes_it():
    """A 256-channel 3x3 conv at 28x28 is where MLAS's int8 kernels win on x86: it is quantized
    unless the measurement says otherwise, in which case the report says so."""
    from _helpers import make_conv_model

    model = make_conv_model(cin=256, cout=256, hw=28, batch=1, seed=2)
    ctx = Context(data=random_source(model, None, samples=8, batch_size=4, seed=1))
    _, report = Pipeline.parse("int8{samples=8}").run(model, ctx)
    rec = report.passes[-1].layers[0]
    t = report.passes[-1].figures["latency"]["layers"]["conv"]
    assert (rec["action"] == REWRITTEN) == (t["int8_ms"] < t["float_ms"])
