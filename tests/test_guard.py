"""The guard: held-out checks after every pass, repair by restoring the costliest layers, task-aware
agreement for sequence outputs, recipe tolerances and user metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.data import holdout_split, open_source
from onnxcomp.errors import BadInputError, ValidationFailed
from onnxcomp.passes import base
from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassConfig,
    PassResult,
    option,
)
from onnxcomp.pipeline import Pipeline, guard_for
from onnxcomp.tolerance import GUARD_DEFAULT, KindTolerance, Tolerance, tolerance_from_mapping
from onnxcomp.validation import compare, infer_kind

T, C = 16, 6  # positions and classes of the sequence output


def seq_model(seed: int = 0) -> onnx.ModelProto:
    """x[N, 4, 1, T] -> conv1..conv4 (1x1, Relu between) -> [N, C, 1, T] -> Reshape -> Transpose ->
    y[N, T, C]: a sequence-shaped output (class scores per position), like a CTC head."""
    rng = np.random.default_rng(seed)
    chans = [4, 12, 12, 12, C]
    nodes, inits = [], []
    x = "x"
    for k in range(4):
        w = (rng.standard_normal((chans[k + 1], chans[k], 1, 1)) / np.sqrt(chans[k])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{k + 1}.weight"))
        out = f"conv{k + 1}_out"
        nodes.append(helper.make_node("Conv", [x, f"conv{k + 1}.weight"], [out], name=f"conv{k + 1}"))
        x = out
        if k < 3:
            nodes.append(helper.make_node("Relu", [x], [f"relu{k + 1}"], name=f"relu{k + 1}"))
            x = f"relu{k + 1}"
    inits.append(numpy_helper.from_array(np.asarray([0, C, T], dtype=np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", [x, "shape"], ["seq_ct"], name="reshape"))
    nodes.append(helper.make_node("Transpose", ["seq_ct"], ["y"], name="transpose", perm=[0, 2, 1]))
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 1, T])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, C])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def seq_data(n: int = 96, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 1, T)).astype(np.float32)}


@dataclass
class NoiseConfig(PassConfig):
    mild: float = option(1e-4, "relative noise added to every selected conv's weight")
    ruin: str = option("", "regex of conv names whose weight is replaced by noise")


class NoisePass(Pass):
    """Test pass: every selected Conv gets mild relative noise; `ruin` ones are replaced by noise."""

    summary = "test pass: noisy conv weights"
    Config = NoiseConfig
    default_ops = ("Conv",)
    runs = 0

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        import re

        type(self).runs += 1
        out = onnx.ModelProto()
        out.CopyFrom(model)
        inits = {t.name: t for t in out.graph.initializer}
        records = []
        for node in self.candidates(out):
            why = self.selection_reason(node)
            if why:
                records.append(LayerRecord(node.name, "Conv", SKIPPED, why))
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            rng = ctx.rng(self.name, node.name, repr(self))
            if self.config.ruin and re.fullmatch(self.config.ruin, node.name):
                w = rng.standard_normal(w.shape).astype(np.float32)
            else:
                w = (w * (1 + self.config.mild * rng.standard_normal(w.shape))).astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
            records.append(LayerRecord(node.name, "Conv", REWRITTEN, output=node.output[0]))
        return PassResult(out, records)


@pytest.fixture(autouse=True)
def noise_registered(monkeypatch):
    base.load_builtin_passes()
    monkeypatch.setattr(NoisePass, "name", "t_noise", raising=False)
    monkeypatch.setitem(base._REGISTRY, "t_noise", NoisePass)
    NoisePass.runs = 0


BREAKING = "t_noise{mild=1e-4},t_noise{mild=1e-4,ruin='conv1|conv3'}"


def test_sequence_outputs_get_per_position_and_whole_sequence_agreement():
    model = seq_model()
    cand = Pipeline.parse("t_noise{mild=0,ruin=conv4}", normalize=False).run(model, Context())[0]
    check = compare(model, cand, seq_data(), Tolerance(max_top1_drop=1.0, max_sequence_drop=2.0))
    out = check.output("y")
    assert out.kind == "sequence" and out.shape == [96, T, C]
    ref = compare(model, model, seq_data(), None).output("y")
    assert ref.top1_agreement == 100.0 and ref.sequence_agreement == 100.0
    # independent recomputation of both figures
    import onnxruntime as ort

    feeds = seq_data()
    r = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].argmax(-1)
    c = ort.InferenceSession(cand.SerializeToString()).run(None, feeds)[0].argmax(-1)
    assert out.top1_agreement == pytest.approx(100.0 * (r == c).mean())
    assert out.sequence_agreement == pytest.approx(100.0 * (r == c).all(axis=1).mean())
    assert not check.passed and any("argmax sequence" in f for f in out.failures)
    # forcing the kind: read as plain numbers, the same output has no argmax figures
    forced = compare(model, cand, seq_data(), None, task="regress").output("y")
    assert forced.kind == "regress" and forced.top1_agreement is None
    with pytest.raises(BadInputError, match="cannot be read as task classify"):
        compare(model, cand, seq_data(), None, task="classify")


def test_output_kinds_from_shapes():
    assert infer_kind([8, 10], 8) == "classify" and infer_kind([8, 10, 1, 1], 8) == "classify"
    assert infer_kind([8, 40, 6625], 8) == "sequence"
    assert infer_kind([8, 21, 64, 64], 8) == "dense"
    assert infer_kind([8, 1, 320, 320], 8) == "regress"  # a probability map
    assert infer_kind([8], 8) == "regress" and infer_kind([3, 10], 8) == "regress"


def test_holdout_split_is_disjoint_complete_and_unbiased():
    labels = np.arange(248) % 62  # round-robin classes, like models/glyph_calib.npz
    x = np.arange(248, dtype=np.float32).reshape(248, 1, 1, 1)
    source = open_source({"x": x, "labels": labels}, batch_size=8)
    fit, held = holdout_split(source)
    got = {name: np.concatenate([f["x"].ravel() for f, _ in s.batches()]) for name, s in (("fit", fit), ("held", held))}
    assert fit.num_samples == got["fit"].size and held.num_samples == got["held"].size
    assert sorted(np.concatenate([got["fit"], got["held"]]).tolist()) == list(range(248))
    assert set(got["fit"]) .isdisjoint(got["held"])
    assert 0.18 < got["held"].size / 248 < 0.32
    held_labels = np.concatenate([lab for _, lab in held.batches()])
    assert np.array_equal(held_labels, labels[got["held"].astype(int)])
    assert len(set(held_labels % 2)) == 2  # an every-4th rule would keep only odd classes
    # independent of batching
    again = holdout_split(open_source({"x": x, "labels": labels}, batch_size=5))[1]
    assert np.array_equal(np.concatenate([f["x"].ravel() for f, _ in again.batches()]), got["held"])
    # the cap
    small = holdout_split(source, cap=10)[1]
    assert small.num_samples == 10 == sum(f["x"].shape[0] for f, _ in small.batches())


def test_guard_restores_exactly_the_breaking_layers():
    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    guard, fit_ctx = guard_for(model, ctx, GUARD_DEFAULT)
    assert "held-out" in guard.source.description and fit_ctx.data is not ctx.data
    out, report = Pipeline.parse(BREAKING, normalize=False).run(model, fit_ctx, guard=guard)
    first, second = report.passes
    assert first.guard is None and first.validation["passed"] is True  # the mild pass stays whole
    assert set(second.rolled_back) == {"conv1", "conv3"}
    restored = second.guard["restored"]
    assert {r["node"] for r in restored} == {"conv1", "conv3"} and all(r["cost"] > 0 for r in restored)
    assert second.guard["probes"] <= 3  # bisection over 4 layers, not one re-run per layer
    rewritten = {r["node"] for r in second.layers if r["action"] == REWRITTEN}
    assert rewritten == {"conv2", "conv4"}
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    first_model = Pipeline.parse("t_noise{mild=1e-4}", normalize=False).run(model, fit_ctx)[0]
    for name in ("conv1.weight", "conv3.weight"):  # put back as the first pass left them
        np.testing.assert_array_equal(weights[name], numpy_helper.to_array(
            next(t for t in first_model.graph.initializer if t.name == name)))
    assert report.validation["passed"] is True and report.guard["kinds"] == {"y": "sequence"}
    # the final model holds on the held-out samples, checked independently
    assert compare(model, out, guard.source, GUARD_DEFAULT).passed


def test_unguarded_run_reports_the_breakage():
    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    with pytest.raises(ValidationFailed, match="final model broke the tolerance") as info:
        Pipeline.parse(BREAKING, normalize=False).run(model, ctx, tolerance=GUARD_DEFAULT, validate=True)
    summary = info.value.report.validation["summary"]
    assert summary["sequence_agreement"] < 50 and info.value.model is not None


def test_errors_that_build_up_across_passes_are_caught_by_the_final_check(monkeypatch):
    """Each pass is checked against the *input* model, so the second pass's budget is what the first
    left; the final check always runs."""
    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    guard, fit_ctx = guard_for(model, ctx, Tolerance(min_sqnr_db=37.0))
    out, report = Pipeline.parse("t_noise{mild=0.004},t_noise{mild=0.004}", normalize=False).run(
        model, fit_ctx, guard=guard)
    assert report.validation["passed"] is True
    assert report.passes[0].guard is None and report.passes[1].guard is not None  # alone fine, together not
    assert compare(model, out, guard.source, None).output("y").sqnr_db >= 37.0


def test_a_pass_nothing_of_which_can_stay_is_dropped():
    @dataclass
    class InputScaleConfig(PassConfig):
        pass

    class ScaleInput(Pass):
        """Rewrites no layer but ruins the model (multiplies the input by 3)."""

        Config = InputScaleConfig

        def run(self, model, ctx):
            out = onnx.ModelProto()
            out.CopyFrom(model)
            first = out.graph.node[0]
            out.graph.initializer.append(numpy_helper.from_array(np.float32(3.0), "three"))
            out.graph.node.insert(0, helper.make_node("Mul", ["x", "three"], ["x3"], name="scale"))
            first.input[0] = "x3"
            return PassResult(out, [], {"modified": True})

    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    guard, fit_ctx = guard_for(model, ctx, Tolerance(min_sqnr_db=30.0))
    out, report = Pipeline([ScaleInput()]).run(model, fit_ctx, guard=guard)
    assert report.passes[0].guard["dropped"] is True
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_guard_needs_enough_samples_to_hold_out():
    model = seq_model()
    with pytest.raises(BadInputError, match="hold out only"):
        guard_for(model, Context(data=open_source(seq_data(12), model=model)), GUARD_DEFAULT)


def test_recipe_tolerance_flat_and_per_kind(tmp_path):
    flat = tolerance_from_mapping({"max_top1_drop": 1, "min_cosine": 0.9}, "t")
    assert flat == Tolerance(max_top1_drop=1.0, min_cosine=0.9)
    per_kind = tolerance_from_mapping({"sequence": {"max_sequence_drop": 3}, "default": {"min_sqnr_db": 10}}, "t")
    assert isinstance(per_kind, KindTolerance)
    assert per_kind.for_kind("sequence").max_sequence_drop == 3 and per_kind.for_kind("regress").min_sqnr_db == 10
    for bad, msg in (({"max_top_drop": 1}, "neither a criterion"), ({"sequence": {"bogus": 1}}, "unknown criterion"),
                     ({"classify": {"max_top1_drop": -1}}, "must not be negative"), ([], "non-empty mapping")):
        with pytest.raises(BadInputError, match=msg):
            tolerance_from_mapping(bad, "t")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - t_noise\ntolerance: {sequence: {max_sequence_drop: 5}}\n")
    assert Pipeline.parse(str(recipe)).tolerance.for_kind("sequence").max_sequence_drop == 5
    default = Pipeline.parse("default")
    assert default.tolerance is not None and default.tolerance.for_kind("classify").max_top1_drop == 1.0


# -- the CLI -------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path):
    model_path = tmp_path / "seq.onnx"
    onnx.save(seq_model(), model_path)
    data = tmp_path / "d.npz"
    np.savez(data, **seq_data())
    return model_path, data


def test_cli_guard_on_by_default_with_data(files, tmp_path, capsys):
    model_path, data = files
    before = model_path.read_bytes()
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", BREAKING, "--data", data,
                                "--report", rep, "--no-normalize")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert set(report["passes"][1]["rolled_back"]) == {"conv1", "conv3"}
    assert "put back 2 layer(s)" in stdout and "y (sequence)" in stdout
    # ~25 held-out samples: one changed sequence is ~4%, so the default 2% allows none, and it says so
    assert "allows none" in err and "max_sequence_drop=2 (sequence)" in err
    assert report["validation"]["passed"] is True and model_path.read_bytes() == before
    # --no-guard: the broken model goes out, and the figures say so (no tolerance given, no verdict)
    code, stdout, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", BREAKING, "--data", data,
                                "--no-guard", "--validate", "--report", rep, "--no-normalize")
    assert code == 0 and json.loads(rep.read_text())["validation"]["summary"]["sequence_agreement"] < 50
    # --on-fail stop: exit 1, one line, nothing written
    out.unlink()
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", BREAKING, "--data", data,
                           "--on-fail", "stop", "-q", "--no-normalize")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "t_noise" in err and not out.exists()


def test_cli_without_data_says_once_that_the_guard_has_nothing_to_check(files, tmp_path, capsys):
    model_path, _ = files
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "-p", "t_noise", "-q")
    assert code == 0 and err.count("guard: no --data") == 1


def test_cli_too_few_samples_is_exit_2_before_any_pass(files, tmp_path, capsys):
    model_path, _ = files
    small = tmp_path / "small.npz"
    np.savez(small, **seq_data(12))
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", "t_noise", "--data", small, "-q")
    assert code == 2 and "hold out only" in err and len(err.strip().splitlines()) == 1
    assert NoisePass.runs == 0 and not out.exists()
    # a criterion no output can be judged by: also before any pass
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", "t_noise", "--data", files[1],
                           "--task", "regress", "--max-top1-drop", "1", "-q")
    assert code == 2 and "--max-top1-drop needs" in err and NoisePass.runs == 0 and not out.exists()


METRIC = '''
import numpy as np

def first_position(ref, cand, labels):
    """Agreement at position 0 only: what this user's task reads."""
    r, c = ref["y"].argmax(-1), cand["y"].argmax(-1)
    return 100.0 * float((r[:, 0] == c[:, 0]).mean()), True

def always_fine(ref, cand, labels):
    return {"score": 1.0, "higher_is_better": True}

def raises(ref, cand, labels):
    raise RuntimeError("boom")

def nan(ref, cand, labels):
    return float("nan"), True
'''


def test_cli_user_metric_drives_the_verdict(files, tmp_path, capsys):
    model_path, data = files
    metric = tmp_path / "my_metric.py"
    metric.write_text(METRIC)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    # a metric that sees no damage lets the breaking pass through whole: the metric is the verdict
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", BREAKING, "--data", data,
                           "--metric", f"{metric}:always_fine", "--max-metric-drop", "0", "--report", rep, "-q",
                           "--no-normalize")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["passes"][1]["rolled_back"] == [] and report["validation"]["summary"]["metric"]["drop"] == 0
    # a metric that reads the damage makes the guard repair
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", BREAKING, "--data", data,
                           "--metric", f"{metric}:first_position", "--max-metric-drop", "0", "--report", rep, "-q",
                           "--no-normalize")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["passes"][1]["rolled_back"] and report["validation"]["summary"]["metric"]["drop"] == 0
    # bad metrics: exit 2, one line, nothing written
    out.unlink()
    for spec, msg in ((f"{metric}:raises", "raised RuntimeError: boom"), (f"{metric}:nan", "non-finite"),
                      ("no_such_module_xyz:f", "cannot import"), (f"{metric}:missing", "has no attribute"),
                      ("nocolon", "expected module:function")):
        code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", "t_noise", "--data", data,
                               "--metric", spec, "-q")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (spec, err)
        assert not out.exists()


def test_reference_cache_gives_the_same_figures_and_skips_the_reference():
    model = seq_model()
    cand = Pipeline.parse("t_noise{mild=1e-2}", normalize=False).run(model, Context())[0]
    data = open_source(seq_data(40), model=model, batch_size=16)
    plain = compare(model, cand, data, GUARD_DEFAULT).as_dict()
    cache: dict = {}
    first = compare(model, cand, data, GUARD_DEFAULT, ref_cache=cache).as_dict()
    assert cache.get("complete") and sum(isinstance(k, tuple) for k in cache) == 3  # 16 + 16 + 8
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"  # were the reference run again, this would fail
    second = compare(broken, cand, data, GUARD_DEFAULT, ref_cache=cache).as_dict()
    assert plain == first == second


def test_a_pass_that_makes_the_model_slower_than_the_bound_is_dropped(monkeypatch):
    from onnxcomp.guard import Guard

    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    guard, fit_ctx = guard_for(model, ctx, GUARD_DEFAULT, max_latency_ratio=1.0)
    # measured for real once: a model against itself is about 1x
    assert 0.5 < guard.latency_ratio(model) < 2.0
    monkeypatch.setattr(Guard, "latency_ratio", lambda self, cand: 1.8)
    out, report = Pipeline.parse("t_noise{mild=1e-4}", normalize=False).run(model, fit_ctx, guard=guard)
    rep = report.passes[0].guard
    assert rep["dropped"] is True and rep["latency_ratio"] == 1.8
    assert all(r["action"] == SKIPPED and "latency" in r["reason"] for r in report.passes[0].layers)
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    assert all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(out.graph.initializer, model.graph.initializer, strict=True))
    assert report.guard["latency_ratio"] == 1.8 and report.guard["max_latency_ratio"] == 1.0
    # within the bound: kept
    monkeypatch.setattr(Guard, "latency_ratio", lambda self, cand: 0.9)
    _, report = Pipeline.parse("t_noise{mild=1e-4}", normalize=False).run(model, fit_ctx, guard=guard)
    assert report.passes[0].guard is None and report.passes[0].rewritten == 4


def test_recipe_latency_bound(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - t_noise\nlatency: {max_ratio: 1.0}\n")
    assert Pipeline.parse(str(recipe)).max_latency_ratio == 1.0
    assert Pipeline.parse("default").max_latency_ratio == 1.0
    for bad in ("latency: 1.0", "latency: {max_ratio: -1}", "latency: {max: 1}"):
        recipe.write_text(f"pipeline:\n  - t_noise\n{bad}\n")
        with pytest.raises(BadInputError, match="latency"):
            Pipeline.parse(str(recipe))


@pytest.mark.parametrize("bad", ["nan", "inf", "empty", "labels", "dtype"])
def test_cli_bad_calibration_data_is_exit_2_with_nothing_written(files, tmp_path, capsys, bad):
    model_path, _ = files
    x = seq_data(40)["x"]
    data = tmp_path / "bad.npz"
    if bad == "nan":
        x[17, 0, 0, 3] = np.nan
        np.savez(data, x=x)
    elif bad == "inf":
        x[5, 1, 0, 0] = np.inf
        np.savez(data, x=x)
    elif bad == "empty":
        np.savez(data)
    elif bad == "labels":
        np.savez(data, x=x, labels=np.arange(39))
    else:
        np.savez(data, x=x.astype(np.complex64))
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", "t_noise", "--data", data, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.npz" in err, err
    assert not out.exists() and NoisePass.runs == 0
    if bad in ("nan", "inf"):
        assert "NaN or infinite" in err and ("sample 17" in err if bad == "nan" else "sample 5" in err)


def test_cli_corrupt_image_in_a_folder_is_exit_2_naming_it(tmp_path, capsys):
    pil = pytest.importorskip("PIL.Image")
    from _tiny_models import tiny_cnn

    model_path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), model_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        pil.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    (folder / "im13.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out, "-p", "t_noise", "--data",
                           f"images:{folder}?crop=16&size=16", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "im13.png" in err and "cannot decode" in err
    assert not out.exists() and NoisePass.runs == 0


def test_repair_keeps_the_users_own_exclude():
    model = seq_model()
    ctx = Context(data=open_source(seq_data(), model=model))
    guard, fit_ctx = guard_for(model, ctx, GUARD_DEFAULT)
    _, report = Pipeline.parse("t_noise{mild=1e-4,ruin='conv1|conv3',exclude=conv4}", normalize=False).run(
        model, fit_ctx, guard=guard)
    p = report.passes[0]
    assert set(p.rolled_back) == {"conv1", "conv3"}
    reasons = {r["node"]: r["reason"] for r in p.layers if r["action"] == SKIPPED}
    assert reasons["conv4"] == "matched by exclude=conv4"  # the user's, not the guard's
    assert reasons["conv1"].startswith("put back by the guard") and reasons["conv3"].startswith("put back by the guard")
    assert {r["node"] for r in p.layers if r["action"] == REWRITTEN} == {"conv2"}
    assert p.config["exclude"].startswith("(?:conv4)|")


def test_a_layer_tied_to_a_put_back_one_names_it_not_the_guards_regex():
    """Trimming skips a layer whose channel group touches an excluded one; after a repair that reason
    quoted the guard's widened exclude regex (36 node names per line on PP-OCR det)."""
    from onnxcomp.guard import LayerCost, Repair, exclude_regex
    from onnxcomp.pipeline import _mark_restored

    widened = exclude_regex("user_re", ["conv1", "conv3"])
    first = PassResult(None, [LayerRecord(n, "Conv", REWRITTEN, "") for n in ("conv1", "conv2", "conv3")]
                       + [LayerRecord("conv4", "Conv", SKIPPED, "matched by exclude=user_re")])
    rerun = PassResult(None, [
        LayerRecord("conv1", "Conv", SKIPPED, f"matched by exclude={widened}"),
        LayerRecord("conv2", "Conv", SKIPPED, f"its output channels cannot be trimmed: touches conv3 "
                                              f"(matched by exclude={widened})"),
        LayerRecord("conv3", "Conv", SKIPPED, f"matched by exclude={widened}"),
        LayerRecord("conv4", "Conv", SKIPPED, f"matched by exclude={widened}")])
    repair = Repair(failed={}, restored=[LayerCost("conv1", 0.5, 0.5), LayerCost("conv3", None, None)])
    reasons = {r.node: r.reason for r in _mark_restored(rerun, repair, first, exclude=widened).layers}
    assert reasons == {
        "conv1": "put back by the guard (adds +0.5 relative error at its output)",
        "conv2": "its output channels cannot be trimmed: touches conv3 (put back by the guard)",
        "conv3": "put back by the guard (cost not measurable)",
        "conv4": "matched by exclude=user_re"}
