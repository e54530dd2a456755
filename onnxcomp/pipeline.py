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
from onnxcomp.model import runtime_compatible
from onnxcomp.passes.base import REWRITTEN, Context, Pass, _jsonable, get_pass
from onnxcomp.tolerance import Tolerance

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


def load_recipe(path_or_name: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """A recipe file (YAML or JSON) or a built-in recipe name -> [(pass name, options)].

    Format: `pipeline:` a list whose items are a pass name, or a one-key mapping name -> options,
    or a string in pipeline syntax.
    """
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

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "pipeline": self.pipeline,
                "seed": self.seed,
                "seconds": round(self.seconds, 3),
                "before": self.before,
                "after": self.after,
                "validation": self.validation,
                "passes": [
                    {
                        "name": p.name,
                        "config": p.config,
                        "seconds": round(p.seconds, 3),
                        "rewritten": p.rewritten,
                        "figures": p.figures,
                        "validation": p.validation,
                        "rolled_back": p.rolled_back,
                        "layers": p.layers,
                    }
                    for p in self.passes
                ],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False)


class Pipeline:
    """An ordered list of configured passes."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

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
            return cls.from_steps(load_recipe(text), normalize)
        return cls.from_steps(parse_pipeline_string(text), normalize)

    def run(
        self,
        model: onnx.ModelProto,
        ctx: Context | None = None,
        *,
        tolerance: Tolerance | None = None,
        validate: bool = False,
        validate_each: bool = False,
        on_fail: str = "stop",
        max_rollbacks: int = 8,
    ) -> tuple[onnx.ModelProto, Report]:
        """Run every pass. With `validate`, the final model is checked against the input; with
        `validate_each`, every pass is, and a pass that breaks `tolerance` either stops the run
        (ValidationFailed, naming the worst layer) or, with on_fail="rollback", is re-run without
        its worst layers until it passes."""
        from onnxcomp import analysis, validation

        ctx = ctx or Context()
        report = Report(pipeline=str(self), seed=ctx.seed)
        t_start = time.perf_counter()
        report.before = analysis.summary(model, ctx.input_shapes)
        original = model
        current = model
        rewritten: list = []  # every pass's rewritten LayerRecords, for the final check's worst layer
        for p in self.passes:
            t0 = time.perf_counter()
            if p.needs_data and ctx.data is None:
                raise BadInputError(f"pass '{p.name}' needs calibration data: give --data")
            result = p.run(current, ctx)
            prev_report = None
            rolled_back: list[str] = []
            if validate_each and p.name != "normalize" and result.modified:
                configured = p  # rollbacks add to the user's own exclude, not to the previous retry's
                check = validation.compare(current, result.model, ctx, tolerance, layers=result.layers)
                while not check.passed and on_fail == "rollback" and len(rolled_back) < max_rollbacks:
                    worst = culprit_layer(check, current)
                    if worst is None:
                        break
                    rolled_back.append(worst)
                    p = _with_excluded(configured, rolled_back)
                    result = p.run(current, ctx)
                    check = validation.compare(current, result.model, ctx, tolerance, layers=result.layers)
                prev_report = check.as_dict()
                if not check.passed:
                    report.passes.append(self._pass_report(p, result, t0, prev_report, rolled_back))
                    report.seconds = time.perf_counter() - t_start
                    culprit = culprit_layer(check, current)
                    where = f"; worst layer {culprit}" if culprit else ""
                    raise ValidationFailed(f"pass '{p.name}' broke the tolerance ({check.describe()}){where}", report)
            report.passes.append(self._pass_report(p, result, t0, prev_report, rolled_back))
            rewritten.extend(r for r in result.layers if r.action == REWRITTEN and r.output)
            current = result.model
        if current is original:  # no pass made a new model: never stamp the caller's
            current = onnx.ModelProto()
            current.CopyFrom(original)
        runtime_compatible(current)
        _set_metadata(current, "onnxcomp.pipeline", str(self))
        if validate:
            check = validation.compare(original, current, ctx, tolerance, layers=rewritten or None)
            report.validation = check.as_dict()
            report.after = analysis.summary(current, ctx.input_shapes)
            report.seconds = time.perf_counter() - t_start
            if not check.passed:
                culprit = culprit_layer(check, original)
                where = f"; worst layer {culprit}" if culprit else ""
                raise ValidationFailed(f"final model broke the tolerance ({check.describe()}){where}", report, current)
        report.after = analysis.summary(current, ctx.input_shapes)
        report.seconds = time.perf_counter() - t_start
        return current, report

    @staticmethod
    def _pass_report(p: Pass, result, t0: float, validation_dict, rolled_back) -> PassReport:
        return PassReport(
            name=p.name,
            config=p.config.as_dict(),
            seconds=time.perf_counter() - t0,
            layers=[r.as_dict() for r in result.layers],
            figures=dict(result.figures),
            validation=validation_dict,
            rolled_back=list(rolled_back),
        )


def culprit_layer(check: Any, ref: onnx.ModelProto) -> str | None:
    """The rewritten layer most likely to have caused a failed check.

    A layer's measured error includes the error of every rewritten layer upstream of it, so the
    layer with the largest error is often an innocent one downstream of the culprit, and the first
    layer of a chain of equally lossy rewrites is not the culprit either. Blame goes to the largest
    *increment*: a layer's relative error minus the largest relative error among the rewritten
    layers upstream of it (in `ref`, the pass's input). Falls back to `check.worst_layer`.
    """
    errs = {lc.output: lc for lc in getattr(check, "layers", []) if lc.rel_err == lc.rel_err}
    if not errs:
        return getattr(check, "worst_layer", None)
    producer = {o: n for n in ref.graph.node for o in n.output if o}

    def upstream(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = list(producer[tensor].input) if tensor in producer else []
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in producer:
                stack.extend(producer[t].input)
        return seen

    def increment(lc: Any) -> float:
        inherited = max((errs[t].rel_err for t in upstream(lc.output) if t in errs), default=0.0)
        return lc.rel_err - inherited

    return max(errs.values(), key=lambda lc: (increment(lc), lc.rel_err, lc.max_abs_err)).node


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set `key` in metadata_props, replacing earlier entries (onnx.checker rejects duplicate keys)."""
    keep = [(e.key, e.value) for e in model.metadata_props if e.key != key]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    model.metadata_props.add(key=key, value=value)


def _with_excluded(p: Pass, names: list[str]) -> Pass:
    """A copy of pass `p` whose exclude regex also matches the given node names exactly."""
    import dataclasses

    extra = "|".join(f"^{re.escape(n)}$" for n in names)
    exclude = f"(?:{p.config.exclude})|{extra}" if p.config.exclude else extra
    return type(p)(dataclasses.replace(p.config, exclude=exclude))
