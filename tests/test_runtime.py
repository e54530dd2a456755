"""onnxruntime plumbing: sessions, intermediate capture on a copy, streaming statistics, latency."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _tiny_models import tiny_cnn

from onnxcomp import runtime
from onnxcomp.data import open_source, random_source
from onnxcomp.errors import BadInputError
from onnxcomp.runtime import ChannelStats, activation_stats, make_session, measure_latency, run_batches


@pytest.fixture
def model():
    return tiny_cnn(spatial=(8, 8))


@pytest.fixture
def source(model):
    return random_source(model, {}, samples=10, batch_size=4, seed=2)


def test_make_session_levels_and_extra_outputs_leave_the_model_untouched(model):
    before = model.SerializeToString()
    sess = make_session(model, optimize=False, extra_outputs=["c1", "r2"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "c1", "r2"]
    assert model.SerializeToString() == before
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    full = make_session(model.SerializeToString(), optimize=True, threads=1).run(None, {"x": x})[0]
    plain = sess.run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(full, plain, rtol=1e-5, atol=1e-6)


def test_big_models_go_through_external_data(model, monkeypatch):
    monkeypatch.setattr(runtime, "_SERIALIZE_LIMIT", 100)  # pretend the model passes the 2 GB limit
    before = model.SerializeToString()
    sess = make_session(model, extra_outputs=["c1"])
    x = np.ones((1, 3, 8, 8), np.float32)
    out = sess.run(None, {"x": x})
    assert out[0].shape == (1, 10) and out[1].shape == (1, 8, 8, 8)
    assert model.SerializeToString() == before


def test_run_batches_returns_intermediates_inputs_and_constants(model, source):
    got = list(run_batches(model, source, ["c1", "x", "w1", "logits"]))
    assert len(got) == 3
    feeds, values, labels = got[0]
    assert labels is None and list(values) == ["c1", "x", "w1", "logits"]
    assert values["c1"].shape == (4, 8, 8, 8)
    assert values["x"] is feeds["x"]
    w1 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(values["w1"], w1)
    # default: graph outputs
    assert list(next(iter(run_batches(model, source)))[1]) == ["logits"]
    with pytest.raises(BadInputError, match="nope"):
        list(run_batches(model, source, ["nope"]))


def test_activation_stats_match_numpy_over_all_batches(model, source):
    stats = activation_stats(model, source, ["c1", "logits"])
    c1 = np.concatenate([v["c1"] for _, v, _ in run_batches(model, source, ["c1"])]).astype(np.float64)
    s = stats["c1"]
    assert s.channels == 8 and s.count.tolist() == [10 * 64] * 8
    np.testing.assert_allclose(s.mean, c1.mean(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.var, c1.var(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(s.min, c1.min(axis=(0, 2, 3)))
    np.testing.assert_allclose(s.max, c1.max(axis=(0, 2, 3)))
    assert stats["logits"].channels == 10 and stats["logits"].count.tolist() == [10] * 10


def test_channel_stats_chunked_merge_is_exact():
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 5, 7)) * 3 + 100 for n in (1, 4, 9)]  # large mean: a naive sum would drift
    s = ChannelStats.empty(7)
    for p in parts:
        s.update(p, axis=-1, chunk_elems=8)  # channel-last, tiny chunks force many merges
    allv = np.concatenate(parts).reshape(-1, 7)
    np.testing.assert_allclose(s.mean, allv.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.var, allv.var(axis=0), rtol=1e-9)
    a, b = ChannelStats.empty(7), ChannelStats.empty(7)
    a.update(parts[0], axis=2)
    b.update(parts[2], axis=2)
    a.merge(b)
    both = np.concatenate([parts[0], parts[2]]).reshape(-1, 7)
    np.testing.assert_allclose(a.var, both.var(axis=0), rtol=1e-9)
    assert int(a.count[0]) == both.shape[0]
    with pytest.raises(ValueError, match="expected 7 channels"):
        a.update(np.zeros((2, 3)), axis=1)


def test_activation_stats_on_labelled_data(model, tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(6))
    src = open_source(tmp_path / "d.npz", model=model, batch_size=4)
    stats = activation_stats(model, src, ["r1"], axis=1)
    assert stats["r1"].min.min() >= 0.0  # after ReLU


def test_measure_latency_interleaves_and_reports_ratios(model, source):
    other = tiny_cnn(spatial=(8, 8), seed=1)
    res = measure_latency([model, other], source, threads=1, warmup=1, runs=6, rounds=2, names=["a", "b"])
    assert [r.name for r in res] == ["a", "b"]
    a, b = res
    assert a.ratio == 1.0 and a.ratio_min == 1.0 and a.ratio_max == 1.0  # the baseline, by definition
    import statistics  # the other model's figures, recomputed from its samples

    assert b.p50_ms == pytest.approx(statistics.median(b.samples_ms))
    assert b.ratio == pytest.approx(statistics.median(b.samples_ms) / statistics.median(a.samples_ms))
    round_ratios = [rb / ra for rb, ra in zip(b.round_p50_ms, a.round_p50_ms, strict=True)]
    assert b.ratio_min == pytest.approx(min(round_ratios)) and b.ratio_max == pytest.approx(max(round_ratios))
    assert b.round_p50_ms[0] == pytest.approx(statistics.median(b.samples_ms[:6]))  # round 1 = first 6 runs
    assert a.runs == b.runs == 12
    assert a.min_ms <= a.p50_ms <= a.p90_ms
    assert b.ratio_min <= b.ratio_max and len(b.round_p50_ms) == 2
    assert set(a.as_dict()) >= {"p50_ms", "p90_ms", "min_ms", "ratio", "ratio_min", "ratio_max"}
    with pytest.raises(BadInputError, match="differ from the feeds"):
        measure_latency([model], {"y": np.zeros((1, 3, 8, 8), np.float32)}, runs=1, rounds=1)


def test_sub_batches_bound_memory_without_changing_statistics(model, tmp_path):
    x = np.random.default_rng(7).standard_normal((7, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(7))
    src = open_source(tmp_path / "d.npz", model=model, batch_size=4)
    runs = list(run_batches(model, src, ["c1"], max_bytes=1))  # budget below one sample: one per run
    assert [r[1]["c1"].shape[0] for r in runs] == [1] * 7
    assert np.concatenate([r[2] for r in runs]).tolist() == list(range(7))
    np.testing.assert_array_equal(np.concatenate([r[0]["x"] for r in runs]), x)
    big = list(run_batches(model, src, ["c1"], max_bytes=10**9))
    assert [r[1]["c1"].shape[0] for r in big] == [1, 3, 3]  # a one-sample probe, then whole batches
    assert len(list(run_batches(model, src, ["c1"], max_batches=1))) == 1
    whole = activation_stats(model, src, ["c1"], max_bytes=None)["c1"]
    split = activation_stats(model, src, ["c1"], max_bytes=1)["c1"]
    np.testing.assert_allclose(split.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(split.var, whole.var, rtol=1e-10)
    assert split.count.tolist() == whole.count.tolist()
    first = activation_stats(model, src, ["c1"], max_batches=1)["c1"]
    assert int(first.count[0]) == 4 * 64


def test_onnxruntime_failures_on_the_data_are_one_line_bad_input():
    """Data a model cannot run (index out of range) used to escape as an onnxruntime error (exit 3)."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((4, 2), np.float32), "table")
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "lookup",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [table])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    bad = {"ids": np.array([1, 9])}
    with pytest.raises(BadInputError, match=r"onnxruntime failed to run it \(.*out of data bounds") as info:
        list(run_batches(m, bad))
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match=r"^lookup-model: onnxruntime failed"):
        measure_latency([m], bad, names=["lookup-model"], warmup=0, runs=1, rounds=1)
