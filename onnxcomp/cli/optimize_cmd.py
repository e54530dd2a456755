"""`onnxcomp optimize IN -o OUT -p PIPELINE`: run passes, report per layer, optionally validate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxcomp.cli.common import (
    add_data_flags,
    add_tolerance_flags,
    human_count,
    print_json,
    table,
    tolerance_from_args,
)
from onnxcomp.errors import BadInputError, ValidationFailed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="run a compression pipeline on a model",
                       description="Run a pipeline of passes on IN and write OUT atomically (IN is never modified).")
    p.add_argument("input", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (must differ from the input)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--pipeline", default=None,
                     help="pipeline string, e.g. 'tucker{rank=evbmf},codebook{bits=4}', or a built-in recipe name")
    src.add_argument("--recipe", default=None, help="YAML/JSON recipe file or built-in recipe name")
    p.add_argument("--no-normalize", action="store_true", help="do not prepend the normalize pass")
    add_data_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (same seed, same bytes)")
    p.add_argument("--report", default=None, help="write the full per-layer report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of tables")
    p.add_argument("--validate", action="store_true", help="check the final model against the input")
    p.add_argument("--validate-each", action="store_true", help="check after every pass")
    p.add_argument("--on-fail", choices=["stop", "rollback"], default="stop",
                   help="with --validate-each: stop (exit 1) or roll back the worst layers of a failing pass")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.data beside OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_tolerance_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.model import load_model, save_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.progress import Progress
    from onnxcomp.shapes import parse_input_shapes

    if Path(args.output).exists() and Path(args.input).exists() and Path(args.output).resolve() == Path(args.input).resolve():
        raise BadInputError(f"{args.output}: refusing to overwrite the input model; choose another output path")
    spec = args.recipe or args.pipeline or "normalize"
    pipeline = Pipeline.parse(spec, normalize=not args.no_normalize)
    model = load_model(args.input)
    shapes = parse_input_shapes(args.input_shape)
    source = None
    if args.data:
        from onnxcomp.data import open_source

        source = open_source(args.data, model=model, input_shapes=shapes, batch_size=args.batch_size, limit=args.samples)
    ctx = Context(data=source, seed=args.seed, input_shapes=shapes, progress=Progress(enabled=None if not args.quiet else False))
    tolerance = tolerance_from_args(args)  # None: figures only, no verdict
    try:
        out_model, report = pipeline.run(
            model, ctx, tolerance=tolerance, validate=args.validate, validate_each=args.validate_each, on_fail=args.on_fail
        )
    except ValidationFailed as exc:
        if exc.report is not None:
            _emit(args, exc.report)
        if exc.model is not None:
            save_model(exc.model, args.output, protect=(args.input,), external_data=args.external_data or None)
        raise
    save_model(out_model, args.output, protect=(args.input,), external_data=args.external_data or None)
    _emit(args, report)
    return 0


def _emit(args: argparse.Namespace, report) -> None:
    if args.report:
        tmp = Path(args.report)
        tmp.write_text(report.to_json())
    if args.json:
        print_json(report.as_dict())
        return
    print(render_report(report))


def render_report(report) -> str:
    """Human tables: one line per pass, then before/after totals, then skipped-layer reasons."""
    lines = [f"pipeline: {report.pipeline}  (seed {report.seed}, {report.seconds:.1f}s)", ""]
    rows = []
    for p in report.passes:
        skipped = sum(1 for r in p.layers if r["action"] == "skipped")
        rows.append([p.name, p.rewritten, skipped, round(p.seconds, 2), _validation_word(p.validation)])
    lines.append(table(rows, ["pass", "rewritten", "skipped", "seconds", "check"]))
    b, a = report.before, report.after
    lines.append("")
    size_rows = []
    for key, label in (("params", "params"), ("macs", "MACs"), ("bytes", "file bytes")):
        before, after = b.get(key), a.get(key)
        ratio = (before / after) if before and after else None
        size_rows.append([label, human_count(before), human_count(after), f"{ratio:.2f}x" if ratio else "-"])
    lines.append(table(size_rows, ["", "before", "after", "reduction"]))
    reasons: dict[str, int] = {}
    for p in report.passes:
        for r in p.layers:
            if r["action"] == "skipped" and p.name != "normalize":
                key = f"{p.name}: {r['reason']}"
                reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines.append("")
        lines.append("skipped layers (reason: count):")
        lines.extend(f"  {k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if report.validation:
        lines.append("")
        lines.append(f"validation: {_validation_word(report.validation)}  {json.dumps(report.validation.get('summary', {}))}")
    return "\n".join(lines)


def _validation_word(v) -> str:
    if not v:
        return "-"
    return "pass" if v.get("passed") else "FAIL"

