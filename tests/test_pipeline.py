"""Pipeline strings, recipes, the registry, layer selection, Context.rng, reports and rollback."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.errors import BadInputError, PipelineSyntaxError, ValidationFailed
from onnxcomp.model import model_bytes
from onnxcomp.passes import base
from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassConfig,
    PassResult,
    get_pass,
    option,
    registered_passes,
)
from onnxcomp.pipeline import Pipeline, Report, load_recipe, parse_pipeline_string
from onnxcomp.tolerance import EXACT


# -- test passes (registered per test, removed afterwards) -------------------------------------
@dataclass
class ScaleConfig(PassConfig):
    factor: float = option(2.0, "multiply each selected Conv weight by this")
    count: int = option(0, "rewrite at most this many layers (0 = all)")
    mode: str = option("plain", "plain or noisy (adds ctx.rng noise)", choices=("plain", "noisy"))
    verbose: bool = option(False, "a bool option")


class ScalePass(Pass):
    """Scales Conv weights; reports every candidate (rewritten, or skipped with the reason)."""

    summary = "test pass: scale conv weights"
    Config = ScaleConfig
    default_ops = ("Conv",)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg: ScaleConfig = self.config  # type: ignore[assignment]
        out = onnx.ModelProto()
        out.CopyFrom(model)
        inits = {t.name: t for t in out.graph.initializer}
        records = []
        done = 0
        for node in self.candidates(out):
            why = self.selection_reason(node)
            if why is None and cfg.count and done >= cfg.count:
                why = f"count={cfg.count} reached"
            if why:
                records.append(LayerRecord(node.name, node.op_type, SKIPPED, why))
                continue
            w = numpy_helper.to_array(inits[node.input[1]]) * np.float32(cfg.factor)
            if cfg.mode == "noisy":
                w = w + ctx.rng(self.name, node.name).standard_normal(w.shape).astype(np.float32) * np.float32(1e-3)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
            records.append(LayerRecord(node.name, node.op_type, REWRITTEN, output=node.output[0],
                                       figures={"factor": np.float32(cfg.factor), "nan": np.float64("nan"),
                                                "inf": float("inf"), "arr": np.arange(2)}))
            done += 1
        return PassResult(out, records, {"scaled": done})


@dataclass
class PerturbConfig(PassConfig):
    bad: str = option("", "comma-free node name whose weight is replaced by noise (breaks tolerance)")


class PerturbPass(Pass):
    """Exact rewrite (weight * (1 + 1e-7)) of every Conv except `bad`, which is ruined."""

    summary = "test pass: perturb conv weights"
    Config = PerturbConfig
    default_ops = ("Conv",)
    runs = 0

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
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
            if node.name == self.config.bad:  # type: ignore[attr-defined]
                w = ctx.rng("ruin", node.name).standard_normal(w.shape).astype(np.float32)
            else:
                w = (w * np.float32(1 + 1e-7)).astype(np.float32)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
            records.append(LayerRecord(node.name, "Conv", REWRITTEN, output=node.output[0]))
        return PassResult(out, records)


class DataPass(Pass):
    summary = "test pass that needs calibration data"
    needs_data = True

    def run(self, model, ctx):  # pragma: no cover - never reached without data
        return PassResult(model)


TEST_PASSES = {"t_scale": ScalePass, "t_perturb": PerturbPass, "t_data": DataPass}


@pytest.fixture(autouse=True)
def test_passes(monkeypatch):
    base.load_builtin_passes()
    for name, cls in TEST_PASSES.items():
        monkeypatch.setattr(cls, "name", name, raising=False)
        monkeypatch.setitem(base._REGISTRY, name, cls)
    PerturbPass.runs = 0
    yield


@pytest.fixture
def tucker_registered(monkeypatch):
    """A pass named 'tucker' for the suggestion tests (the real one, once it exists, is used as is)."""
    if "tucker" not in registered_passes():
        class FakeTucker(Pass):
            summary = "stand-in"

        monkeypatch.setattr(FakeTucker, "name", "tucker", raising=False)
        monkeypatch.setitem(base._REGISTRY, "tucker", FakeTucker)


def tiny_model(batch: str | int = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> conv1 (+bias) -> BN -> Relu -> conv2 -> Relu -> conv3 (1x1) -> GAP -> Flatten -> y[N,4]."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("conv1.weight", 8, 3, 3, 3), init("conv1.bias", 8),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "bn.scale"),
        init("bn.bias", 8, scale=0.1), init("bn.mean", 8, scale=0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn.var"),
        init("conv2.weight", 8, 8, 3, 3, scale=0.2), init("conv3.weight", 4, 8, 1, 1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"], name="bn"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "conv3.weight"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


# -- pipeline strings ---------------------------------------------------------------------------
def test_parse_plain_and_with_options():
    assert parse_pipeline_string("normalize") == [("normalize", {})]
    assert parse_pipeline_string(" normalize , t_scale{ factor = 3 ,count=2 } ") == [
        ("normalize", {}), ("t_scale", {"factor": "3", "count": "2"})]
    assert parse_pipeline_string("t_scale{},t_scale{mode=noisy}") == [("t_scale", {}), ("t_scale", {"mode": "noisy"})]


def test_parse_quoted_values_keep_commas_braces_and_spaces():
    items = parse_pipeline_string("""t_scale{include="conv[0-9]{2}|a,b",exclude='x}y', factor=1.5}""")
    assert items == [("t_scale", {"include": "conv[0-9]{2}|a,b", "exclude": "x}y", "factor": "1.5"})]


def test_options_are_typed_and_defaults_kept():
    (p,) = Pipeline.parse("t_scale{factor=3,count=2,verbose=yes,mode=noisy}", normalize=False).passes
    cfg = p.config
    assert (cfg.factor, cfg.count, cfg.verbose, cfg.mode) == (3.0, 2, True, "noisy")
    assert isinstance(cfg.factor, float) and isinstance(cfg.count, int)
    (q,) = Pipeline.parse("t_scale", normalize=False).passes
    assert (q.config.factor, q.config.count, q.config.include) == (2.0, 0, "")


def test_pipeline_string_round_trips_through_str():
    spec = """t_scale{factor=0.5,include="layer[12]\\.conv{1,2}",exclude='a "b"',verbose=true}"""
    pipe = Pipeline.parse(spec, normalize=False)
    again = Pipeline.parse(str(pipe), normalize=False)
    assert str(again) == str(pipe)
    assert again.passes[0].config == pipe.passes[0].config


def _syntax(spec: str) -> str:
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(spec)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.usefixtures("tucker_registered")
def test_unknown_pass_suggests_the_closest_name_and_column():
    msg = _syntax("tuker")
    assert "unknown pass 'tuker'" in msg and "did you mean 'tucker'" in msg and "column 1" in msg
    msg = _syntax("normalize, tuker{rank=3}")
    assert "did you mean 'tucker'" in msg and "column 12" in msg


def test_unknown_pass_without_close_match_lists_known_passes():
    msg = _syntax("zzzzzz")
    assert "known passes:" in msg and "normalize" in msg


def test_unknown_option_suggests_the_closest_option_and_column():
    msg = _syntax("normalize,t_scale{factr=2}")
    assert "no option 'factr'" in msg and "did you mean 'factor'" in msg and "column 19" in msg


def test_bad_value_type_names_the_value_and_column():
    msg = _syntax("t_scale{count=2.5}")
    assert "t_scale.count=2.5" in msg and "expected int" in msg and "column 15" in msg
    msg = _syntax("t_scale{factor=abc}")
    assert "expected float" in msg and "column 16" in msg
    msg = _syntax("t_scale{verbose=maybe}")
    assert "expected bool" in msg
    msg = _syntax("t_scale{mode=loud}")
    assert "must be one of plain, noisy" in msg


@pytest.mark.parametrize(
    "spec, words",
    [
        ("t_scale{factor=2", ["missing '}'", "t_scale"]),
        ("normalize,", ["trailing ','", "column 10"]),
        ("normalize , ", ["trailing ','"]),
        ("", ["empty pipeline", "column 1"]),
        ("   ", ["empty pipeline"]),
        (",normalize", ["expected a pass name", "column 1"]),
        ("normalize,,t_scale", ["expected a pass name", "column 11"]),
        ("normalize t_scale", ["expected ',' between passes", "column 11"]),
        ("t_scale{factor=}", ["option 'factor' has no value", "column 16"]),
        ("t_scale{factor=2,factor=3}", ["option 'factor' given twice", "column 18"]),
        ("t_scale{=2}", ["expected an option name", "column 9"]),
        ("t_scale{factor 2}", ["expected '=' after option 'factor'"]),
        ("t_scale{include='abc}", ["unterminated quoted value", "column 17"]),
        ("t_scale{include=(}", ["invalid regex"]),
    ],
)
def test_syntax_errors_point_at_the_token(spec, words):
    msg = _syntax(spec)
    for w in words:
        assert w in msg, (w, msg)


def test_syntax_errors_are_bad_input():
    assert issubclass(PipelineSyntaxError, BadInputError)


# -- Python objects, implicit normalize ----------------------------------------------------------
def test_normalize_is_prepended_once_and_can_be_disabled():
    assert [p.name for p in Pipeline.parse("t_scale").passes] == ["normalize", "t_scale"]
    assert [p.name for p in Pipeline.parse("normalize,t_scale").passes] == ["normalize", "t_scale"]
    assert [p.name for p in Pipeline.parse("t_scale", normalize=False).passes] == ["t_scale"]
    assert [p.name for p in Pipeline.parse([ScalePass(factor=3)]).passes] == ["normalize", "t_scale"]
    assert [p.name for p in Pipeline.parse(["t_scale"], normalize=False).passes] == ["t_scale"]
    pipe = Pipeline([ScalePass(factor=3)])
    assert Pipeline.parse(pipe) is pipe


def test_pass_objects_validate_their_options():
    assert ScalePass(factor=3).config.factor == 3.0
    with pytest.raises(PipelineSyntaxError, match="did you mean 'factor'"):
        ScalePass(facto=3)
    with pytest.raises(TypeError):
        ScalePass(ScaleConfig(), factor=2)


def test_registry_lists_builtin_and_rejects_duplicates():
    passes = registered_passes()
    assert "normalize" in passes and list(passes) == sorted(passes)
    assert get_pass("t_scale") is ScalePass
    with pytest.raises(RuntimeError, match="two passes named 'normalize'"):
        class Impostor(Pass):
            name = "normalize"


# -- recipes ------------------------------------------------------------------------------------
def test_recipe_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "pipeline:\n"
        "  - normalize\n"
        "  - t_scale: {factor: 3, include: '^conv1$', verbose: true}\n"
        "  - t_scale\n"
        "  - 't_scale{factor=0.5}, t_perturb'\n"
    )
    steps = load_recipe(path)
    assert steps == [("normalize", {}), ("t_scale", {"factor": 3, "include": "^conv1$", "verbose": True}),
                     ("t_scale", {}), ("t_scale", {"factor": "0.5"}), ("t_perturb", {})]
    pipe = Pipeline.parse(str(path))
    assert [p.name for p in pipe.passes] == ["normalize", "t_scale", "t_scale", "t_scale", "t_perturb"]
    assert pipe.passes[1].config.factor == 3.0 and pipe.passes[1].config.verbose is True
    assert pipe.passes[3].config.factor == 0.5


def test_recipe_json_and_bare_list(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"pipeline": [{"t_scale": {"factor": 1.5, "count": 1}}, {"t_perturb": None}]}))
    pipe = Pipeline.parse(str(path))
    assert str(pipe) == "normalize,t_scale{factor=1.5,count=1},t_perturb"
    bare = tmp_path / "bare.yaml"
    bare.write_text("- t_scale\n")
    assert [p.name for p in Pipeline.parse(str(bare), normalize=False).passes] == ["t_scale"]


@pytest.mark.usefixtures("tucker_registered")
@pytest.mark.parametrize(
    "text, suffix, words",
    [
        ("pipeline:\n  - tuker\n", ".yaml", ["did you mean 'tucker'"]),
        ("pipeline:\n  - tuker: {}\n", ".yaml", ["did you mean 'tucker'"]),
        ("pipeline:\n  - t_scale: {factr: 2}\n", ".yaml", ["did you mean 'factor'"]),
        ("pipeline:\n  - t_scale: {count: many}\n", ".yaml", ["t_scale.count=many", "expected int"]),
        ("pipeline:\n  - t_scale: 3\n", ".yaml", ["options must be a mapping"]),
        ("pipeline:\n  - {t_scale: {}, t_perturb: {}}\n", ".yaml", ["step 1"]),
        ("pipeline: []\n", ".yaml", ["non-empty list"]),
        ("pipeline: [t_scale\n", ".yaml", ["cannot parse"]),
        ('{"pipeline": [', ".json", ["cannot parse"]),
        ("pipeline:\n  - 't_scale{factor=2'\n", ".yaml", ["missing '}'"]),
    ],
)
def test_recipe_errors(tmp_path, text, suffix, words):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(PipelineSyntaxError) as info:
        Pipeline.parse(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_recipe_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        Pipeline.parse(str(tmp_path / "nope.yaml"))


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, rewritten",
    [
        ({}, ["conv1", "conv2", "conv3"]),
        ({"include": "conv[12]"}, ["conv1", "conv2"]),
        ({"include": "^conv1$"}, ["conv1"]),
        ({"exclude": "2"}, ["conv1", "conv3"]),
        ({"include": "conv", "exclude": "conv3"}, ["conv1", "conv2"]),
        ({"ops": "Gemm"}, []),
        ({"count": 1}, ["conv1"]),
    ],
)
def test_include_exclude_select_layers(options, rewritten):
    model = tiny_model()
    result = ScalePass(**options).run(model, Context())
    assert [r.node for r in result.layers if r.action == REWRITTEN] == rewritten
    skipped = [r for r in result.layers if r.action == SKIPPED]
    assert all(r.reason for r in skipped)
    if options.get("include", "").startswith(("^", "conv[")):
        assert any(f"not matched by include={options['include']}" == r.reason for r in skipped)
    if "exclude" in options:
        assert any(f"matched by exclude={options['exclude']}" == r.reason for r in skipped)
    # the pass did not touch its input
    assert model_bytes(model) == model_bytes(tiny_model())


# -- context ------------------------------------------------------------------------------------
def test_context_rng_is_seeded_by_seed_and_salt_only():
    a = Context(seed=7)
    first = a.rng("tucker", "conv1").standard_normal(4)
    a.rng("something", "else").standard_normal(100)  # other draws in between change nothing
    assert np.array_equal(a.rng("tucker", "conv1").standard_normal(4), first)
    assert np.array_equal(Context(seed=7).rng("tucker", "conv1").standard_normal(4), first)
    assert not np.array_equal(Context(seed=8).rng("tucker", "conv1").standard_normal(4), first)
    assert not np.array_equal(a.rng("tucker", "conv2").standard_normal(4), first)


# -- runs and reports ---------------------------------------------------------------------------
def test_run_is_deterministic_and_leaves_the_input_alone():
    model = tiny_model()
    before = model_bytes(model)
    out1, _ = Pipeline.parse("t_scale{mode=noisy}").run(model, Context(seed=3))
    out2, _ = Pipeline.parse("t_scale{mode=noisy}").run(tiny_model(), Context(seed=3))
    out3, _ = Pipeline.parse("t_scale{mode=noisy}").run(tiny_model(), Context(seed=4))
    assert model_bytes(model) == before
    assert model_bytes(out1) == model_bytes(out2)
    assert model_bytes(out1) != model_bytes(out3)
    meta = {e.key: e.value for e in out1.metadata_props}
    assert meta["onnxcomp.pipeline"] == "normalize,t_scale{mode=noisy}"


def test_rerunning_on_an_output_keeps_one_metadata_entry_and_never_stamps_the_input():
    out, _ = Pipeline.parse("t_scale").run(tiny_model(), Context())
    again, _ = Pipeline.parse("t_scale{factor=3}").run(out, Context())
    keys = [e.key for e in again.metadata_props]
    assert keys.count("onnxcomp.pipeline") == 1
    onnx.checker.check_model(again)
    # a pipeline that makes no new model must still not stamp the caller's model

    class Noop(Pass):
        summary = "returns its input"

        def run(self, model, ctx):
            return PassResult(model)

    Noop.name = "t_noop"
    model = tiny_model()
    before = model_bytes(model)
    result, _ = Pipeline([Noop()]).run(model, Context())
    assert model_bytes(model) == before and result is not model


def test_python_optimize_entry_point():
    model = tiny_model()
    before = model_bytes(model)
    out, report = onnxcomp.optimize(model, "t_scale{include=conv1}", seed=1)
    assert isinstance(report, Report) and model_bytes(model) == before
    assert [p.name for p in report.passes] == ["normalize", "t_scale"]
    assert report.passes[1].rewritten == 1


def test_pass_needing_data_without_data_is_bad_input():
    with pytest.raises(BadInputError, match="needs calibration data"):
        Pipeline.parse("t_data").run(tiny_model(), Context())


def test_normalize_runs_first_and_folds_the_batchnorm():
    out, report = Pipeline.parse("t_scale{factor=1}").run(tiny_model(), Context())
    assert [n.op_type for n in out.graph.node].count("BatchNormalization") == 0
    assert report.passes[0].name == "normalize" and report.passes[0].figures["bn_folded"] == 1
    out_nn, report_nn = Pipeline.parse("t_scale{factor=1}", normalize=False).run(tiny_model(), Context())
    assert [p.name for p in report_nn.passes] == ["t_scale"]
    assert any(n.op_type == "BatchNormalization" for n in out_nn.graph.node)


def test_report_json_round_trip():
    _, report = Pipeline.parse("t_scale{include=conv1}").run(tiny_model(), Context(seed=5))
    d = report.as_dict()
    text = report.to_json()
    json.dumps(d, allow_nan=False)  # strict JSON: NaN / inf are strings, numpy types are gone
    assert json.loads(text) == d
    assert d["pipeline"] == "normalize,t_scale{include=conv1}" and d["seed"] == 5
    assert [p["name"] for p in d["passes"]] == ["normalize", "t_scale"]
    scale = d["passes"][1]
    assert scale["rewritten"] == 1 and scale["figures"] == {"scaled": 1}
    assert scale["config"]["include"] == "conv1" and scale["config"]["factor"] == 2.0
    layers = {r["node"]: r for r in scale["layers"]}
    assert layers["conv1"]["action"] == REWRITTEN
    assert layers["conv1"]["figures"] == {"factor": 2.0, "nan": "nan", "inf": "inf", "arr": [0, 1]}
    assert layers["conv2"]["action"] == SKIPPED and layers["conv2"]["reason"] == "not matched by include=conv1"
    for key in ("params", "macs", "bytes", "nodes"):
        assert key in d["before"] and key in d["after"]
    assert d["before"]["params"] == 8 * 3 * 9 + 8 + 4 * 8 + 8 * 8 * 9 + 4 * 8  # incl. BN's 4 x 8
    assert d["after"]["params"] == 8 * 3 * 9 + 8 + 8 * 8 * 9 + 4 * 8  # BN folded into conv1


# -- validation and rollback --------------------------------------------------------------------
def test_validate_each_stops_on_the_broken_layer():
    pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    with pytest.raises(ValidationFailed) as info:
        Pipeline.parse("t_perturb{bad=conv3}").run(tiny_model(), Context(), tolerance=EXACT, validate_each=True)
    assert "t_perturb" in str(info.value) and "conv3" in str(info.value)
    report = info.value.report
    assert report is not None and report.passes[-1].name == "t_perturb"
    assert report.passes[-1].validation["passed"] is False


@pytest.mark.parametrize("bad", ["conv3", "conv2"])
def test_rollback_undoes_only_the_layer_that_broke_the_tolerance(bad):
    pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    model = tiny_model()
    out, report = Pipeline.parse(f"t_perturb{{bad={bad}}}").run(
        model, Context(), tolerance=EXACT, validate_each=True, on_fail="rollback")
    last = report.passes[-1]
    assert last.rolled_back == [bad]
    assert last.validation["passed"] is True
    assert {r["node"] for r in last.layers if r["action"] == REWRITTEN} == {"conv1", "conv2", "conv3"} - {bad}
    skipped = {r["node"]: r["reason"] for r in last.layers if r["action"] == SKIPPED}
    assert list(skipped) == [bad]
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(weights[f"{bad}.weight"], original[f"{bad}.weight"])
    # the final model passes the same check end to end
    from onnxcomp import validation

    assert validation.compare(model, out, Context(), EXACT).passed


def test_rollback_gives_up_after_max_rollbacks():
    pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    with pytest.raises(ValidationFailed):
        Pipeline.parse("t_perturb{bad=conv3}").run(tiny_model(), Context(), tolerance=EXACT, validate_each=True,
                                                    on_fail="rollback", max_rollbacks=0)


def test_final_validate_reports_and_raises_with_the_model():
    pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    out, report = Pipeline.parse("t_perturb").run(tiny_model(), Context(), tolerance=EXACT, validate=True)
    assert report.validation["passed"] is True
    with pytest.raises(ValidationFailed) as info:
        Pipeline.parse("t_perturb{bad=conv1}").run(tiny_model(), Context(), tolerance=EXACT, validate=True)
    assert info.value.model is not None and info.value.report.validation["passed"] is False


@pytest.mark.parametrize(
    "errors, culprit",
    [
        ({"conv1": 1e-7, "conv2": 1.0, "conv3": 1.3}, "conv2"),  # downstream amplification is not blamed
        ({"conv1": 1e-7, "conv2": 0.2, "conv3": 1.0}, "conv3"),  # conv3's own error dominates
        ({"conv1": 0.9, "conv2": 1.0, "conv3": 1.2}, "conv1"),  # the first lossy layer adds the most
        ({"conv2": 1.0}, "conv2"),
        ({"conv1": 0.3, "conv2": 0.35, "conv3": 0.9}, "conv3"),  # a chain of lossy rewrites: not the first
    ],
)
def test_culprit_layer_blames_the_largest_error_increment(errors, culprit):
    validation = pytest.importorskip("onnxcomp.validation", reason="onnxcomp.validation not written yet")
    from onnxcomp.pipeline import culprit_layer

    outputs = {"conv1": "c1", "conv2": "c2", "conv3": "c3"}
    layers = [validation.LayerCheck(n, outputs[n], e, e, 1.0, 0.0) for n, e in errors.items()]
    check = validation.Check(tolerance=EXACT, samples=1, data="x", has_labels=False, outputs=[], layers=layers)
    assert culprit_layer(check, tiny_model()) == culprit
    empty = validation.Check(tolerance=EXACT, samples=1, data="x", has_labels=False, outputs=[])
    assert culprit_layer(empty, tiny_model()) is None


# -- regressions ----------------------------------------------------------------------------------
def test_list_pipelines_take_pass_strings_and_name_option_pairs():
    """The docstring promised steps in a list; a (name, options) pair used to fail as an unknown pass."""
    pipe = Pipeline.parse([("t_scale", {"factor": 3}), "t_scale{count=1},t_perturb", ScalePass(factor=0.5)],
                          normalize=False)
    assert str(pipe) == "t_scale{factor=3.0},t_scale{count=1},t_perturb,t_scale{factor=0.5}"
    with pytest.raises(PipelineSyntaxError, match="step 1"):
        Pipeline.parse([42])


def test_a_recipe_path_that_is_a_folder_is_bad_input(tmp_path):
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    with pytest.raises(BadInputError, match="not a file"):
        Pipeline.parse(str(folder))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00pipeline")
    with pytest.raises(BadInputError, match="cannot read"):
        Pipeline.parse(str(binary))


def test_the_returned_model_loads_in_the_installed_onnxruntime(monkeypatch):
    """Only `save_model` clamped the IR version; the Python API returned whatever the last pass made."""
    import onnxcomp.model as model_mod

    monkeypatch.setattr(model_mod, "max_runtime_ir_version", lambda: 8)
    high = tiny_model()
    high.ir_version = 10
    out, _ = Pipeline.parse("t_scale", normalize=False).run(high, Context())
    assert out.ir_version == 8 and high.ir_version == 10


def test_optional_options_are_typed():
    """`X | None` options were left as raw strings ('3', 'none'): the union check never matched."""

    @dataclass
    class OptConfig(PassConfig):
        limit: int | None = option(None, "an optional int")
        ratio: float | None = option(0.5, "an optional float")

    assert OptConfig.coerce_option("limit", "3", "t") == 3
    assert OptConfig.coerce_option("limit", "none", "t") is None
    assert OptConfig.coerce_option("ratio", "0.25", "t") == 0.25
    with pytest.raises(PipelineSyntaxError, match="t.limit=many: expected int"):
        OptConfig.coerce_option("limit", "many", "t")
