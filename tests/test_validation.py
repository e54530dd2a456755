"""Equivalence checks: figures, verdicts, worst output / worst layer, and the pipeline's use of them."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny_models import perturb, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import open_source, random_source
from onnxcomp.errors import BadInputError, ValidationFailed
from onnxcomp.graph import GraphEditor, GraphIndex
from onnxcomp.passes import base
from onnxcomp.passes.base import REWRITTEN, Context, LayerRecord, Pass, PassConfig, PassResult, option
from onnxcomp.pipeline import Pipeline
from onnxcomp.tolerance import EXACT, Tolerance
from onnxcomp.validation import compare


@pytest.fixture
def model():
    return tiny_cnn(spatial=(8, 8))


@pytest.fixture
def source(model):
    return random_source(model, {}, samples=12, batch_size=5, seed=1)


def _ort(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_a_model_passes_against_itself(model, source):
    check = compare(model, model, source, EXACT)
    assert check.passed and check.samples == 12
    o = check.output("logits")
    assert o.max_abs_err == 0.0 and o.violations == 0 and math.isinf(o.sqnr_db) and o.cosine_min == 1.0
    assert o.top1_agreement == 100.0 and o.shape == [12, 10]
    assert check.worst_layer is None and check.as_dict()["summary"]["passed"] is True
    assert check.describe().startswith("PASS")


def test_figures_match_a_direct_computation(model, source):
    cand = perturb(model, "w2", (3, 1, 1, 1), 0.05)
    check = compare(model, cand, source, None)
    # recomputed directly, batch by batch as compare runs them (onnxruntime's results may differ in
    # the last bits between batch sizes: the figures must match the outputs, not a re-batched run)
    batches = [f["x"] for f, _ in source.batches()]
    r = np.concatenate([_ort(model, x) for x in batches]).astype(np.float64)
    c = np.concatenate([_ort(cand, x) for x in batches]).astype(np.float64)
    d = c - r
    o = check.output("logits")
    assert o.max_abs_err == pytest.approx(np.abs(d).max(), rel=1e-9)
    assert o.mean_abs_err == pytest.approx(np.abs(d).mean(), rel=1e-9)
    assert o.sqnr_db == pytest.approx(10 * np.log10((r**2).sum() / (d**2).sum()), rel=1e-9)
    cos = (r * c).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(c, axis=1)
    assert o.cosine_min == pytest.approx(cos.min(), abs=1e-12)
    assert o.top1_agreement == pytest.approx(100 * np.mean(r.argmax(1) == c.argmax(1)))
    assert check.passed  # no tolerance: figures only


def test_one_perturbed_weight_fails_and_names_the_output(model, source):
    cand = perturb(model, "w2", (0, 0, 0, 0), 1e-2)
    check = compare(model, cand, source, EXACT)
    assert not check.passed
    assert check.worst_output == "logits"
    assert "logits" in check.describe() and check.describe().startswith("FAIL")
    assert check.output("logits").violations > 0
    assert check.as_dict()["summary"]["worst_output"] == "logits"
    # the same candidate is fine under a cosine criterion it meets
    assert compare(model, cand, source, Tolerance(min_cosine=0.99)).passed
    assert not compare(model, cand, source, Tolerance(min_cosine=1.0 - 1e-12)).passed


def test_labels_give_accuracy_and_drive_top1_drop(model, tmp_path):
    x = np.random.default_rng(3).standard_normal((20, 3, 8, 8)).astype(np.float32)
    ref_pred = _ort(model, x).argmax(1)
    labels = ref_pred.copy()
    labels[:5] = (labels[:5] + 1) % 10  # the reference is right on 15 of 20
    np.savez(tmp_path / "val.npz", x=x, labels=labels)
    src = open_source(tmp_path / "val.npz", model=model, batch_size=8)
    cand = perturb(model, "wf", (int(ref_pred[10]), 0), 50.0)  # push one class up: changes some predictions
    cand_pred = _ort(cand, x).argmax(1)
    check = compare(model, cand, src, Tolerance(max_top1_drop=100.0))
    o = check.output("logits")
    assert check.has_labels
    assert o.ref_top1_acc == pytest.approx(75.0)
    assert o.cand_top1_acc == pytest.approx(100 * np.mean(cand_pred == labels))
    assert o.ref_top5_acc >= o.ref_top1_acc
    drop = o.ref_top1_acc - o.cand_top1_acc
    assert drop > 0
    assert compare(model, cand, src, Tolerance(max_top1_drop=drop + 0.01)).passed
    failed = compare(model, cand, src, Tolerance(max_top1_drop=drop - 0.01))
    assert not failed.passed and "top-1 accuracy drop" in failed.describe()


def _rename_output(model, new):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[-1].output[0] = new
    m.graph.output[0].name = new
    return m


def test_different_outputs_are_bad_input(model, source):
    with pytest.raises(BadInputError, match="only in the reference: logits; only in the candidate: scores"):
        compare(model, _rename_output(model, "scores"), source, EXACT)
    other = tiny_cnn(spatial=(8, 8), classes=7)
    with pytest.raises(BadInputError, match=r"output 'logits' has shape \[5, 10\] in the reference but \[5, 7\]"):
        compare(model, other, source, EXACT)
    with pytest.raises(BadInputError, match="needs a classifier, sequence or dense output"):
        compare(_no_classifier(), _no_classifier(), None, Tolerance(max_top1_drop=1))
    with pytest.raises(BadInputError, match="needs a sequence or dense output"):
        compare(model, model, source, Tolerance(max_sequence_drop=1))


def _no_classifier():
    """x[N, 1, 3] -> Relu: no [N, C], [N, T, C] or [N, C, H, W] scores anywhere."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_matching_nans_are_equal_and_new_nans_fail():
    def sqrt_model(offset):
        g = helper.make_graph(
            [helper.make_node("Add", ["x", "o"], ["s"]), helper.make_node("Sqrt", ["s"], ["y"])], "sqrt",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.array(offset, np.float32), "o")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    data = {"x": np.array([[-1, 0, 1, 4], [2, -3, 9, 16]], np.float32)}
    same = compare(sqrt_model(0.0), sqrt_model(0.0), data, EXACT)
    assert same.passed and same.output("y").max_abs_err == 0.0
    worse = compare(sqrt_model(0.0), sqrt_model(-1.5), data, Tolerance(min_cosine=0.0))
    assert not worse.passed and "non-finite" in worse.describe()


def test_context_gives_random_data_from_its_shapes_and_seed():
    sym = tiny_cnn(spatial=("H", "W"))
    with pytest.raises(BadInputError, match="dim 2 'H' is symbolic"):
        compare(sym, sym, Context(), EXACT)
    check = compare(sym, sym, Context(input_shapes={"x": [1, 3, 6, 6]}, seed=4), EXACT)
    assert check.passed and check.samples == 8 and "seed 4" in check.data


def test_worst_layer_is_the_rewritten_layer_with_the_largest_error(model, source):
    cand = perturb(model, "w2", (1, 2, 0, 0), 0.5)  # only conv2 changes; conv1's output is exact
    layers = [
        LayerRecord("conv1", "Conv", REWRITTEN, output="c1"),
        LayerRecord("conv2", "Conv", REWRITTEN, output="c2"),
        LayerRecord("fc", "Gemm", "skipped", output="logits"),
        {"node": "gone", "op": "Conv", "action": REWRITTEN, "output": "not_there"},
    ]
    check = compare(model, cand, source, EXACT, layers=layers)
    assert not check.passed
    assert check.worst_layer == "conv2"
    by_node = {lc.node: lc for lc in check.layers}
    assert by_node["conv1"].rel_err == 0.0 and by_node["conv2"].rel_err > 0
    assert check.layers_not_found == ["gone"]
    assert check.as_dict()["summary"]["worst_layer"] == "conv2"


def test_layer_capture_runs_in_sub_batches_without_changing_figures(model, source, monkeypatch):
    from onnxcomp import validation

    cand = perturb(model, "w1", (0, 0, 1, 1), 0.3)
    layers = [LayerRecord("conv1", "Conv", REWRITTEN, output="c1"), LayerRecord("conv2", "Conv", REWRITTEN, output="c2")]
    whole = compare(model, cand, source, EXACT, layers=layers)
    monkeypatch.setattr(validation, "CAPTURE_BUDGET", 1)  # one sample per run
    split = compare(model, cand, source, EXACT, layers=layers)
    assert split.samples == whole.samples == 12
    # one sample per run instead of 12: the same figures up to onnxruntime's float32 round-off between
    # batch sizes (a few ulp per value: ~1e-7 relative, so ~1e-5 of an error that is itself ~1e-2)
    for a, b in zip(whole.layers, split.layers, strict=True):
        assert a.rel_err == pytest.approx(b.rel_err, rel=1e-4)
    assert split.output("logits").cosine_min == pytest.approx(whole.output("logits").cosine_min, abs=1e-6)
    assert split.output("logits").shape == [12, 10]


# -- the pipeline's use of compare ---------------------------------------------------------------
@pytest.fixture
def bump_pass():
    """A test-only pass that scales the selected convs' weights by (1 + factor)."""

    class BumpConfig(PassConfig):
        factor: float = option(0.0, "relative weight change")

    BumpConfig = __import__("dataclasses").dataclass(BumpConfig)

    class Bump(Pass):
        name = "test_bump"
        summary = "test only"
        Config = BumpConfig
        default_ops = ("Conv",)

        def run(self, model, ctx):
            index = GraphIndex(model)
            ed = GraphEditor(model)
            records = []
            for node in self.candidates(model):
                why = self.selection_reason(node)
                if why:
                    records.append(LayerRecord(node.name, "Conv", "skipped", why, output=node.output[0]))
                    continue
                w = index.array(node.input[1]) * np.float32(1 + self.config.factor)
                new_w = ed.add_initializer(f"{node.name}/bumped", w)
                new = onnx.NodeProto()
                new.CopyFrom(node)
                new.input[1] = new_w
                ed.replace(node, [new])
                records.append(LayerRecord(node.name, "Conv", REWRITTEN, output=node.output[0]))
            return PassResult(ed.apply(), records)

    yield Bump
    base._REGISTRY.pop("test_bump", None)


def test_validate_each_stops_and_names_the_worst_layer(model, bump_pass):
    pipe = Pipeline([bump_pass(factor=0.05, include="conv2")], )
    with pytest.raises(ValidationFailed, match="pass 'test_bump' broke the tolerance.*worst layer conv2") as exc:
        pipe.run(model, Context(), tolerance=EXACT, validate_each=True)
    report = exc.value.report
    assert report.passes[-1].validation["summary"]["worst_layer"] == "conv2"
    ok, rep = Pipeline([bump_pass(factor=0.0)]).run(model, Context(), tolerance=EXACT, validate_each=True)
    assert [q.name for q in rep.passes] == ["test_bump"]
    assert rep.passes[0].validation["passed"] is True  # the check ran, and an exact rewrite passes it


def test_final_validate_names_output_and_layer(model, bump_pass):
    pipe = Pipeline([bump_pass(factor=0.05, include="conv1")])
    with pytest.raises(ValidationFailed, match=r"final model broke the tolerance \(FAIL: output 'logits'.*worst layer conv1"):
        pipe.run(model, Context(seed=1), tolerance=EXACT, validate=True)
    out, rep = pipe.run(model, Context(seed=1), tolerance=Tolerance(min_cosine=0.9), validate=True)
    assert rep.validation["passed"] and rep.validation["summary"]["min_cosine"] > 0.9


def test_normalized_copy_validates_exactly():
    from onnxcomp import optimize

    m = tiny_cnn(spatial=(8, 8))
    m.graph.node.insert(0, helper.make_node("Identity", ["w1"], ["w1_alias"], name="alias"))
    m.graph.node[1].input[1] = "w1_alias"
    out, report = optimize(m, "normalize", validate=True, tolerance=EXACT)
    assert report.validation["passed"]
    assert all(n.op_type != "Identity" for n in out.graph.node)


# -- regressions: inputs the two models or the data cannot share ---------------------------------
def _with_batch(model, batch):
    """A copy of `model` whose input and output declare a fixed leading dim `batch`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in (out.graph.input[0], out.graph.output[0]):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = batch
    return out


def test_candidate_fixing_batch_1_runs_in_chunks(model, source):
    """A candidate exported at batch 1 against a free-batch reference used to crash in onnxruntime."""
    b1 = _with_batch(model, 1)
    for data in (source, Context(), None):
        check = compare(model, b1, data, EXACT)
        assert check.passed and check.samples == (12 if data is source else 8)
        assert check.output("logits").shape == [check.samples, 10]
    bad = _with_batch(perturb(model, "w2", (0, 0, 0, 0), 1e-2), 1)
    assert not compare(model, bad, source, EXACT).passed  # chunks are really compared
    # a source whose batches are not whole multiples of the candidate's batch is one clear error
    with pytest.raises(BadInputError, match="candidate fixes its batch dim to 4"):
        compare(model, _with_batch(model, 4), random_source(model, {}, samples=6, batch_size=6), EXACT)
    with pytest.raises(BadInputError, match="dim 0 is 1 in the reference but 4 in the candidate"):
        compare(b1, _with_batch(model, 4), None, EXACT)


def test_inputs_of_another_dtype_or_rank_are_bad_input(model):
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(BadInputError, match="input 'x' is float32 in the reference but int64 in the candidate"):
        compare(model, other, None, EXACT)
    other.CopyFrom(model)
    other.graph.input[0].type.tensor_type.shape.dim.pop()
    with pytest.raises(BadInputError, match="rank 4 in the reference but 3"):
        compare(model, other, None, EXACT)


def test_a_float16_candidate_gets_its_feeds_cast():
    def relu(dtype):
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
                              "relu", [helper.make_tensor_value_info("x", dtype, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    check = compare(relu(TensorProto.FLOAT), relu(TensorProto.FLOAT16), None, Tolerance(rtol=1e-3, atol=1e-3))
    assert check.passed and 0 < check.output("y").max_abs_err < 1e-2  # fp16 rounding, compared for real


def test_data_onnxruntime_cannot_run_is_bad_input_naming_the_model():
    """An out-of-range index in the user's data used to end in an internal error (exit 3)."""
    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(6, 2), "table")
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "lookup",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [table])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    assert compare(m, m, {"ids": np.arange(6)}, EXACT).passed
    with pytest.raises(BadInputError, match=r"^reference: onnxruntime failed to run it \(.*out of data bounds"):
        compare(m, m, {"ids": np.array([0, 100])}, EXACT)


def test_non_finite_input_data_is_refused(model):
    """NaN inputs made both models output NaN, which counted as agreement: a vacuous PASS."""
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    x[2, 1, 0, 0] = np.nan
    with pytest.raises(BadInputError, match=r"input 'x' holds NaN or infinite values \(first in sample 2, 1 bad"):
        compare(model, model, {"x": x}, EXACT)


def test_new_nans_fail_even_without_a_tolerance():
    """Figures-only checks (no tolerance) used to pass a candidate that outputs NaN."""
    def log_model(offset):
        g = helper.make_graph(
            [helper.make_node("Add", ["x", "o"], ["s"]), helper.make_node("Log", ["s"], ["y"])], "log",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.array(offset, np.float32), "o")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    data = {"x": np.array([[1, 2, 3], [4, 5, 6]], np.float32)}
    assert compare(log_model(0.0), log_model(0.5), data, None).passed  # finite differences: figures only
    broken = compare(log_model(0.0), log_model(-5.0), data, None)
    assert not broken.passed and "non-finite" in broken.describe()


def test_tolerances_that_cannot_judge_are_refused(model, tmp_path, capsys):
    """`--rtol nan` made every comparison false: a model with a ruined weight passed."""
    for kwargs in ({"rtol": float("nan")}, {"atol": float("inf")}, {"rtol": -1e-4}, {"min_cosine": 1.5},
                   {"max_top1_drop": -1.0}, {"min_cosine": float("nan")}):
        with pytest.raises(BadInputError, match="tolerance"):
            Tolerance(**kwargs)
    assert Tolerance(rtol=0, atol=0, min_cosine=-1.0, max_top1_drop=0).is_set
    from onnxcomp.cli import main
    from onnxcomp.model import save_model

    ref = save_model(model, tmp_path / "ref.onnx")
    bad = save_model(perturb(model, "w2", (0, 0, 0, 0), 1.0), tmp_path / "bad.onnx")
    assert main(["validate", str(ref), str(bad), "--rtol", "nan", "--atol", "nan"]) == 2
    assert "expected a finite number" in capsys.readouterr().err
