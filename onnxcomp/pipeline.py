"""Pipelines: parse `normalize,tucker{rank=evbmf},codebook{bits=4}` or a YAML/JSON recipe, run the
passes in order, optionally validate after each pass (stop or roll back layers), and build a report."""

from __future__ import annotations

import difflib
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from onnxcomp.errors import BadInputError, PipelineSyntaxError, ValidationFailed, first_line
from onnxcomp.guard import Guard, LayerCost, Repair, measured_costs
from onnxcomp.model import runtime_compatible
from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassResult,
    _jsonable,
    get_pass,
)
from onnxcomp.tolerance import AnyTolerance, tolerance_from_mapping

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _syntax_error(text: str, pos: int, message: str) -> PipelineSyntaxError:
    return PipelineSyntaxError(f"pipeline {text!r}, column {pos + 1}: {message}")


def parse_pipeline_string(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split a pipeline string into (pass name, raw options). Values may be quoted with ' or "
    (needed when they contain `,`, `{` or `}`, e.g. a regex `include="conv[0-9]{2}"`)."""
    items: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j].isspace():
            j += 1
        return j

    i = skip_ws(i)
    if i >= n:
        raise _syntax_error(text, 0, "empty pipeline")
    while i < n:
        i = skip_ws(i)
        m = _NAME.match(text, i)
        if not m:
            raise _syntax_error(text, i, f"expected a pass name, found {text[i:i + 10]!r}")
        name, i = m.group(0), m.end()
        try:
            cls = get_pass(name)
        except PipelineSyntaxError as exc:
            raise _syntax_error(text, m.start(), str(exc)) from None
        opts: dict[str, str] = {}
        i = skip_ws(i)
        if i < n and text[i] == "{":
            i = skip_ws(i + 1)
            while i < n and text[i] != "}":
                km = _NAME.match(text, i)
                if not km:
                    raise _syntax_error(text, i, f"expected an option name in '{name}{{...}}'")
                key, i = km.group(0), skip_ws(km.end())
                if i >= n or text[i] != "=":
                    raise _syntax_error(text, i, f"expected '=' after option '{key}'")
                i = skip_ws(i + 1)
                value_start = i
                if i < n and text[i] in "'\"":
                    quote = text[i]
                    end = text.find(quote, i + 1)
                    if end < 0:
                        raise _syntax_error(text, i, "unterminated quoted value")
                    value, i = text[i + 1 : end], end + 1
                else:
                    start = i
                    while i < n and text[i] not in ",}":
                        i += 1
                    value = text[start:i].strip()
                    if not value:
                        raise _syntax_error(text, start, f"option '{key}' has no value")
                if key in opts:
                    raise _syntax_error(text, km.start(), f"option '{key}' given twice")
                if key not in {f.name for f in cls.Config.fields()}:
                    at = km.start()
                else:
                    at = value_start
                try:  # check the option here, where its column is known
                    cls.Config.coerce_option(key, value, name)
                except PipelineSyntaxError as exc:
                    raise _syntax_error(text, at, str(exc)) from None
                opts[key] = value
                i = skip_ws(i)
                if i < n and text[i] == ",":
                    i = skip_ws(i + 1)
            if i >= n:
                raise _syntax_error(text, n - 1, f"missing '}}' after the options of '{name}'")
            i += 1
        items.append((name, opts))
        i = skip_ws(i)
        if i < n:
            if text[i] != ",":
                raise _syntax_error(text, i, f"expected ',' between passes, found {text[i]!r}")
            i = skip_ws(i + 1)
            if i >= n:
                raise _syntax_error(text, i - 1, "trailing ','")
    return items


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped in onnxcomp/recipes/*.yaml, by name."""
    root = resources.files("onnxcomp") / "recipes"
    out: dict[str, Path] = {}
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.endswith((".yaml", ".yml", ".json")):
                out[entry.name.rsplit(".", 1)[0]] = Path(str(entry))
    return out


def _read_recipe(path_or_name: str | Path) -> tuple[Path, Any]:
    """(path, parsed document) of a recipe file or built-in recipe name."""
    recipes = builtin_recipes()
    path = recipes.get(str(path_or_name), Path(path_or_name))
    if not path.exists():
        close = difflib.get_close_matches(str(path_or_name), recipes, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise BadInputError(f"recipe {path_or_name}: no such file or built-in recipe{hint}")
    if not path.is_file():
        raise BadInputError(f"recipe {path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"recipe {path}: cannot read ({first_line(exc)})") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:
        raise PipelineSyntaxError(f"recipe {path}: cannot parse ({first_line(exc)})") from None
    return path, doc


def load_recipe_tolerance(path_or_name: str | Path) -> AnyTolerance | None:
    """The recipe's `tolerance:` (criteria, or criteria per output kind; see onnxcomp.tolerance), or None."""
    path, doc = _read_recipe(path_or_name)
    if not isinstance(doc, dict) or doc.get("tolerance") is None:
        return None
    return tolerance_from_mapping(doc["tolerance"], f"recipe {path}: tolerance")


def load_recipe_latency(path_or_name: str | Path) -> float | None:
    """The recipe's `latency: {max_ratio: R}`: the result may take at most R times the input's
    onnxruntime latency (1.0: no slower), or None."""
    path, doc = _read_recipe(path_or_name)
    if not isinstance(doc, dict) or doc.get("latency") is None:
        return None
    lat = doc["latency"]
    if not isinstance(lat, dict) or set(lat) != {"max_ratio"}:
        raise BadInputError(f"recipe {path}: latency: expected {{max_ratio: <number>}}")
    try:
        value = float(lat["max_ratio"])
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise BadInputError(f"recipe {path}: latency.max_ratio must be a positive number, got {lat['max_ratio']!r}")
    return value


def load_recipe(path_or_name: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """A recipe file (YAML or JSON) or a built-in recipe name -> [(pass name, options)].

    Format: `pipeline:` a list whose items are a pass name, or a one-key mapping name -> options,
    or a string in pipeline syntax; optionally `tolerance:` (see `load_recipe_tolerance`).
    """
    path, doc = _read_recipe(path_or_name)
    steps = doc.get("pipeline") if isinstance(doc, dict) else doc
    if not isinstance(steps, list) or not steps:
        raise PipelineSyntaxError(f"recipe {path}: expected a non-empty list under 'pipeline'")
    out: list[tuple[str, dict[str, Any]]] = []
    for k, step in enumerate(steps):
        if isinstance(step, str):
            out.extend(parse_pipeline_string(step))
        elif isinstance(step, dict) and len(step) == 1:
            (name, opts), = step.items()
            get_pass(name)
            if opts is not None and not isinstance(opts, dict):
                raise PipelineSyntaxError(f"recipe {path}: step {k + 1} ({name}): options must be a mapping")
            out.append((name, dict(opts or {})))
        else:
            raise PipelineSyntaxError(f"recipe {path}: step {k + 1} must be a pass name or {{name: {{options}}}}")
    return out


@dataclass
class PassReport:
    name: str
    config: dict[str, Any]
    seconds: float
    layers: list[dict[str, Any]]
    figures: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    rolled_back: list[str] = field(default_factory=list)
    guard: dict[str, Any] | None = None  # the guard's repair (onnxcomp.guard.Repair.as_dict), if any

    @property
    def rewritten(self) -> int:
        return sum(1 for r in self.layers if r["action"] == REWRITTEN)


@dataclass
class Report:
    """Everything a run did: per pass, per layer, plus before/after summaries and validation."""

    pipeline: str
    seed: int
    passes: list[PassReport] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    seconds: float = 0.0
    guard: dict[str, Any] | None = None  # tolerance, data, samples, output kinds, seconds

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "pipeline": self.pipeline,
                "seed": self.seed,
                "seconds": round(self.seconds, 3),
                "before": self.before,
                "after": self.after,
                "validation": self.validation,
                "guard": self.guard,
                "passes": [
                    {
                        "name": p.name,
                        "config": p.config,
                        "seconds": round(p.seconds, 3),
                        "rewritten": p.rewritten,
                        "figures": p.figures,
                        "validation": p.validation,
                        "rolled_back": p.rolled_back,
                        "guard": p.guard,
                        "layers": p.layers,
                    }
                    for p in self.passes
                ],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False)


class OwnedModel:
    """A model handed over to `Pipeline.run` to own: once a pass has made a new model the input is
    let go, so a pipeline on a large model does not hold the input beside every pass's output.
    It is only freed if the caller keeps no other reference to it (`owned = OwnedModel(model); del
    model`). Not with a guard or validation, which compare against the input."""

    def __init__(self, model: onnx.ModelProto):
        self._model: onnx.ModelProto | None = model

    def take(self) -> onnx.ModelProto:
        model, self._model = self._model, None
        if model is None:
            raise RuntimeError("OwnedModel taken twice")
        return model


class Pipeline:
    """An ordered list of configured passes."""

    def __init__(self, passes: list[Pass], tolerance: AnyTolerance | None = None):
        self.passes = list(passes)
        self.tolerance = tolerance  # what the recipe says the result must hold (None: not stated)
        self.max_latency_ratio: float | None = None  # the recipe's latency bound (None: not stated)

    def __str__(self) -> str:
        return ",".join(repr(p) for p in self.passes)

    @classmethod
    def from_steps(cls, steps: list[tuple[str, dict[str, Any]]], normalize: bool = True) -> Pipeline:
        passes = [get_pass(name)(**opts) for name, opts in steps]
        if normalize and (not passes or passes[0].name != "normalize"):
            passes.insert(0, get_pass("normalize")())
        return cls(passes)

    @classmethod
    def parse(cls, spec: str | list | Pipeline, normalize: bool = True) -> Pipeline:
        """From a pipeline string, a built-in recipe name, a recipe path, or a list whose items are
        Pass objects, pass strings (`"tucker{rank=4}"`) or (name, options) pairs."""
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, list):
            passes: list[Pass] = []
            for k, item in enumerate(spec):
                if isinstance(item, Pass):
                    passes.append(item)
                elif isinstance(item, str):
                    passes.extend(get_pass(name)(**opts) for name, opts in parse_pipeline_string(item))
                elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                    name, opts = item
                    passes.append(get_pass(name)(**dict(opts or {})))
                else:
                    raise PipelineSyntaxError(
                        f"pipeline step {k + 1}: expected a Pass, a pass string or (name, options), got {item!r}"
                    )
            if normalize and (not passes or passes[0].name != "normalize"):
                passes.insert(0, get_pass("normalize")())
            return cls(passes)
        text = str(spec).strip()
        if text in builtin_recipes() or text.endswith((".yaml", ".yml", ".json")):
            pipe = cls.from_steps(load_recipe(text), normalize)
            pipe.tolerance = load_recipe_tolerance(text)
            pipe.max_latency_ratio = load_recipe_latency(text)
            return pipe
        return cls.from_steps(parse_pipeline_string(text), normalize)

    def run(
        self,
        model: onnx.ModelProto | OwnedModel,
        ctx: Context | None = None,
        *,
        tolerance: AnyTolerance | None = None,
        validate: bool = False,
        validate_each: bool = False,
        on_fail: str = "stop",
        max_rollbacks: int | None = None,
        guard: Guard | None = None,
        layer_errors: bool = False,
    ) -> tuple[onnx.ModelProto, Report]:
        """Run every pass.

        With a `guard` (onnxcomp.guard.Guard, whose reference is `model`), every pass that changed
        the model is checked against `model` on the guard's data; a failing pass is repaired (or,
        with the guard's on_fail="stop", stops the run with ValidationFailed) and the final model is
        checked too. `validate_each` builds such a guard from `ctx` (held-out samples of its data,
        else random inputs; on_fail "rollback"/"repair" repairs, "stop" stops, at most
        `max_rollbacks` layers put back per pass). With `validate` alone, the final model is checked
        against the input on `ctx`'s data. ValidationFailed carries the report (and the final model
        when only the final check failed). `layer_errors`: the guard's final check also measures every
        rewritten layer's output error (the HTML report charts them; the passes' own checks do only
        when they repair).
        """
        from onnxcomp import analysis, validation

        ctx = ctx or Context()
        owned = isinstance(model, OwnedModel)
        if owned:
            if guard is not None or validate or validate_each:
                raise ValueError("an OwnedModel input is let go during the run: no guard or validation against it")
            model = model.take()
        if guard is None and validate_each:
            guard, ctx = guard_for(model, ctx, tolerance, on_fail="repair" if on_fail in ("rollback", "repair") else "stop",
                                   max_restore=max_rollbacks)
        report = Report(pipeline=str(self), seed=ctx.seed)
        t_start = time.perf_counter()
        report.before = analysis.summary(model, ctx.input_shapes)
        original = model
        current = model
        if guard is not None:
            pre = guard.preflight()
            report.guard = {"tolerance": _tolerance_dict(guard.tolerance), "data": pre.data, "samples": pre.samples,
                            "kinds": pre.summary()["kinds"]}
        rewritten: list = []  # every pass's rewritten LayerRecords, for the final check's worst layer
        for p in self.passes:
            t0 = time.perf_counter()
            if p.needs_data and ctx.data is None:
                raise BadInputError(f"pass '{p.name}' needs calibration data: give --data")
            result = p.run(current, ctx)
            check_dict = None
            repair = None
            if guard is not None and p.name != "normalize" and result.modified:
                check = guard.check(result.model)
                if not check.passed and guard.on_fail == "repair":
                    p, repaired, check, repair = guard.repair(p, current, ctx, result, check)
                    if repaired is None:  # nothing of the pass can stay: the model stays as it was
                        result = PassResult(model=current, layers=[_restored(r) for r in result.layers],
                                            figures={"dropped_by_guard": True})
                    else:
                        result = _mark_restored(repaired, repair, first_run=result, exclude=p.config.exclude)
                check_dict = check.as_dict()
                if check.passed and guard.max_latency_ratio is not None and result.modified:
                    ratio = guard.latency_ratio(result.model)
                    check_dict["latency_ratio"] = ratio
                    if ratio > guard.max_latency_ratio:  # slower than the recipe allows: the pass goes
                        repair = repair or Repair(failed=check.as_dict())
                        repair.dropped, repair.latency_ratio = True, ratio
                        repair.restored = [LayerCost(r.node, None, None) for r in result.layers if r.action == REWRITTEN]
                        result = PassResult(model=current, layers=[_restored(r, f"{ratio:.2f}x the input's latency > "
                                                                      f"{guard.max_latency_ratio:g}") for r in result.layers],
                                            figures={"dropped_by_guard": True})
                if not check.passed:
                    # the same verdict with every rewritten layer's error, for the report
                    check_dict = guard.check(result.model, layers=result.layers).as_dict()
                    costs = guard.layer_costs(current, result)
                    check_dict["layer_costs"] = [c.as_dict() for c in costs]
                    report.passes.append(self._pass_report(p, result, t0, check_dict, repair))
                    report.seconds = time.perf_counter() - t_start
                    where = f"; worst layer {costs[0].node}" if costs else ""
                    raise ValidationFailed(f"pass '{p.name}' broke the tolerance ({check.describe()}){where}", report)
            report.passes.append(self._pass_report(p, result, t0, check_dict, repair))
            rewritten.extend(r for r in result.layers if r.action == REWRITTEN and r.output)
            current = result.model
            if owned and current is not original:  # the input is ours: let it go
                original = model = None  # type: ignore[assignment]
        if current is original and not owned:  # no pass made a new model: never stamp the caller's
            current = onnx.ModelProto()
            current.CopyFrom(original)
        runtime_compatible(current)
        _set_metadata(current, "onnxcomp.pipeline", str(self))
        if guard is not None or validate:
            if guard is not None:  # always: errors that build up across passes, each within tolerance
                # layer_errors: every rewritten layer's error in the final check (for a report's chart)
                check = guard.check(current, layers=rewritten or None) if layer_errors else guard.check(current)
                if guard.max_latency_ratio is not None:
                    report.guard["latency_ratio"] = round(guard.latency_ratio(current), 4)
                    report.guard["max_latency_ratio"] = guard.max_latency_ratio
                report.guard["seconds"] = round(guard.seconds, 3)
            else:
                check = validation.compare(original, current, ctx, tolerance, layers=rewritten or None)
            report.validation = check.as_dict()
            report.after = analysis.summary(current, ctx.input_shapes)
            report.seconds = time.perf_counter() - t_start
            if not check.passed:
                culprit = culprit_layer(check, original) if guard is None and rewritten else None
                where = f"; worst layer {culprit}" if culprit else ""
                raise ValidationFailed(f"final model broke the tolerance ({check.describe()}){where}", report, current)
        report.after = analysis.summary(current, ctx.input_shapes)
        report.seconds = time.perf_counter() - t_start
        return current, report

    @staticmethod
    def _pass_report(p: Pass, result, t0: float, validation_dict, repair) -> PassReport:
        return PassReport(
            name=p.name,
            config=p.config.as_dict(),
            seconds=time.perf_counter() - t0,
            layers=[r.as_dict() for r in result.layers],
            figures=dict(result.figures),
            validation=validation_dict,
            rolled_back=[c.node for c in repair.restored] if repair is not None else [],
            guard=repair.as_dict() if repair is not None else None,
        )


def culprit_layer(check: Any, ref: onnx.ModelProto) -> str | None:
    """The rewritten layer most likely to have caused a failed check: the largest error *increment*
    (onnxcomp.guard.measured_costs), since a layer's error includes what it inherits from rewritten
    layers upstream. Falls back to `check.worst_layer`."""
    costs = measured_costs(check, ref)
    if not costs:
        return getattr(check, "worst_layer", None)
    return max(costs, key=lambda c: (c.cost, c.rel_err)).node


def guard_for(model: onnx.ModelProto, ctx: Context, tolerance: AnyTolerance | None, **options: Any
              ) -> tuple[Guard, Context]:
    """A guard for `model` and the context the passes should then see: with data, the guard checks
    on held-out samples (onnxcomp.data.holdout_split) and the passes calibrate on the rest; without,
    the guard checks on random inputs from the context's shapes and seed. BadInputError when the data
    is too small to hold any samples out."""
    import dataclasses

    from onnxcomp.data import holdout_split
    from onnxcomp.validation import resolve_source

    if ctx.data is None:
        return Guard(model, resolve_source(model, ctx), tolerance, cost_model=ctx.costs(), **options), ctx
    source = resolve_source(model, ctx)
    fit, held = holdout_split(source)
    n_held = held.num_samples if held.num_samples is not None else sum(
        int(next(iter(f.values())).shape[0]) for f, _ in held.batches())
    if n_held < MIN_HELD_OUT:
        total = source.num_samples if source.num_samples is not None else "too few"
        raise BadInputError(f"{source.description}: {total} samples hold out only {n_held} for the guard "
                            f"(it needs {MIN_HELD_OUT}, so about {4 * MIN_HELD_OUT} samples); give more data or --no-guard")
    return Guard(model, held, tolerance, cost_model=ctx.costs(), **options), dataclasses.replace(ctx, data=fit, held_data=held)


MIN_HELD_OUT = 8


def _restored(record: LayerRecord, why: str = "the whole pass broke the tolerance") -> LayerRecord:
    """A rewritten layer's record after the guard dropped its whole pass."""
    import dataclasses

    if record.action != REWRITTEN:
        return record
    return dataclasses.replace(record, action=SKIPPED, reason=f"restored by the guard ({why})",
                               params_after=record.params_before, macs_after=record.macs_before, figures={})


def _mark_restored(result: PassResult, repair: Any, first_run: PassResult, exclude: str | None = None) -> PassResult:
    """The layers the guard put back say so, the layers the pass skipped on its own keep their
    first run's reason, and a layer left out because it is tied to a put-back one (trimming's
    channel groups) names that layer as put back: none names the exclude regex (`exclude`) the
    guard re-ran the pass with, dozens of node names on PP-OCR det."""
    import dataclasses

    costs = {c.node: c.cost for c in repair.restored}
    before = {r.node: r for r in first_run.layers}
    widened = f"matched by exclude={exclude}" if exclude else None
    layers = []
    for r in result.layers:
        if r.action == SKIPPED and r.node not in costs and r.node in before and before[r.node].action == SKIPPED:
            r = dataclasses.replace(r, reason=before[r.node].reason)
        elif r.action == SKIPPED and r.node in costs:
            cost = costs[r.node]
            shown = f"adds {cost:+.3g} relative error at its output" if cost is not None else "cost not measurable"
            r = dataclasses.replace(r, reason=f"put back by the guard ({shown})")
        elif r.action == SKIPPED and widened and widened in r.reason:
            r = dataclasses.replace(r, reason=r.reason.replace(widened, "put back by the guard"))
        layers.append(r)
    return dataclasses.replace(result, layers=layers)


def _tolerance_dict(tol: AnyTolerance | None) -> dict | None:
    return tol.as_dict() if tol is not None else None


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set `key` in metadata_props, replacing earlier entries (onnx.checker rejects duplicate keys)."""
    keep = [(e.key, e.value) for e in model.metadata_props if e.key != key]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    model.metadata_props.add(key=key, value=value)
