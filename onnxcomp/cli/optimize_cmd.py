"""`onnxcomp optimize IN -o OUT -p PIPELINE`: run passes, report per layer, optionally validate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from onnxcomp.cli.common import (
    add_data_flags,
    add_tolerance_flags,
    human_count,
    metric_from_args,
    print_json,
    table,
    task_from_args,
    tolerance_from_args,
)
from onnxcomp.errors import BadInputError, ValidationFailed
from onnxcomp.tolerance import GUARD_DEFAULT

if TYPE_CHECKING:
    from onnxcomp.pipeline import Report


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
    p.add_argument("--threads", type=int, default=2,
                   help="onnxruntime intra-op threads the model will run with: the cost model times layers and "
                        "the guard times models with it (default 2)")
    p.add_argument("--no-measure", action="store_true",
                   help="passes estimate layer latency from the analytic model instead of timing layers")
    p.add_argument("--report", default=None, help="write the full per-layer report here: JSON, or one "
                                                  "self-contained HTML page when the name ends in .html")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of tables")
    p.add_argument("--validate", action="store_true",
                   help="check the final model against the input (implied by a tolerance flag; always done by the guard)")
    p.add_argument("--no-guard", action="store_true",
                   help="do not check after every pass (by default, with --data, every pass is checked against the "
                        "input model on held-out samples and repaired when it breaks the tolerance)")
    p.add_argument("--validate-each", action="store_true",
                   help="guard every pass even without --data (on random inputs; give a tolerance flag)")
    p.add_argument("--on-fail", choices=["repair", "stop", "rollback"], default=None,
                   help="when a pass breaks the tolerance: repair it by restoring its costliest layers (default; "
                        "'rollback' is the same) or stop (exit 1, nothing written)")
    p.add_argument("--max-latency-ratio", type=float, default=None, metavar="R",
                   help="guard: drop a pass that makes the model take more than R times the input's onnxruntime "
                        "latency (1.0: no slower; default: the recipe's latency bound, if any)")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.data beside OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_tolerance_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.model import check_output_path, load_model, save_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import OwnedModel, Pipeline, guard_for
    from onnxcomp.progress import Progress
    from onnxcomp.shapes import parse_input_shapes

    metric = metric_from_args(args)  # an unusable --metric is exit 2 before any work
    task = task_from_args(args)
    # Refuse unusable output paths before any work (and before the model is written).
    check_output_path(args.output, protect=(args.input,))
    if args.report:
        check_output_path(args.report, protect=(args.input,))
        if Path(args.report).resolve() == Path(args.output).resolve():
            raise BadInputError(f"{args.report}: the report and the model cannot be the same file")
    spec = args.recipe or args.pipeline or "normalize"
    pipeline = Pipeline.parse(spec, normalize=not args.no_normalize)
    model = load_model(args.input)
    shapes = parse_input_shapes(args.input_shape)
    source = None
    if args.data:
        from onnxcomp.data import open_source
        from onnxcomp.shapes import shapes_from_data

        source = open_source(args.data, model=model, input_shapes=shapes, batch_size=args.batch_size, limit=args.samples)
        shapes = shapes_from_data(model, source, shapes)  # figures at the size the data has
    from onnxcomp.costmodel import CostModel, Settings

    ctx = Context(data=source, seed=args.seed, input_shapes=shapes, progress=Progress(enabled=None if not args.quiet else False),
                  cost_model=CostModel(Settings(threads=args.threads), measure=not args.no_measure, target_ms=60.0))
    guarded = not args.no_guard and (source is not None or args.validate_each)
    if args.on_fail is not None and not guarded:
        why = "--no-guard turns the guard off" if args.no_guard else "give --data (or --validate-each for random inputs)"
        raise BadInputError(f"--on-fail {args.on_fail} needs the guard, which checks after every pass: {why}")
    tolerance = tolerance_from_args(args)  # None: figures only, no verdict
    metric_decides = metric is not None and metric.max_drop is not None
    if tolerance is None and guarded and not metric_decides:
        # the recipe's own tolerance, else the documented default (a bounded --metric is the verdict)
        tolerance = pipeline.tolerance or (GUARD_DEFAULT if source is not None else None)
    # A tolerance nobody checks would read as a promise: a tolerance flag alone checks the final model.
    validate = args.validate or tolerance is not None or metric is not None
    guard = None
    if guarded:
        bound = args.max_latency_ratio if args.max_latency_ratio is not None else pipeline.max_latency_ratio
        guard, ctx = guard_for(model, ctx, tolerance, on_fail="stop" if args.on_fail == "stop" else "repair",
                               task=task, metric=metric, max_latency_ratio=bound)
        if not args.quiet:
            print(f"guard: every pass checked against the input on {guard.source.description}; "
                  f"tolerance {tolerance.describe() if tolerance is not None else 'none (figures only)'}",
                  file=sys.stderr)
            note = resolution_note(tolerance, guard.source.num_samples)
            if note:
                print(f"guard: {note}", file=sys.stderr)
    elif not args.no_guard and any(p.name != "normalize" for p in pipeline.passes):
        print("guard: no --data, nothing to check the passes on; checks on random inputs are figures only "
              "(give --data to guard the run, --no-guard to silence this)", file=sys.stderr)
    run_input = model
    if guard is None and not validate:  # nothing compares against the input: let the pipeline free it
        run_input, model = OwnedModel(model), None
    try:
        out_model, report = pipeline.run(run_input, ctx, tolerance=tolerance, validate=validate, guard=guard,
                                         layer_errors=bool(args.report and str(args.report).endswith((".html", ".htm"))))
    except ValidationFailed as exc:
        if exc.report is not None:
            _emit(args, exc.report)
        if exc.model is not None:  # only the final check failed: written so it can be inspected
            save_model(exc.model, args.output, protect=(args.input,), external_data=args.external_data or None)
        raise
    save_model(out_model, args.output, protect=(args.input,), external_data=args.external_data or None)
    _emit(args, report)
    return 0


def resolution_note(tolerance, samples: int | None) -> str | None:
    """A warning when a per-sample bound is finer than one sample's share of the held-out set (it then
    allows no changed sample at all), or None."""
    if tolerance is None or not samples:
        return None
    step = 100.0 / samples
    bounds = []
    for kind in ("classify", "sequence", "dense"):
        t = tolerance.for_kind(kind)
        if kind == "classify" and t.max_top1_drop is not None and t.max_top1_drop < step:
            bounds.append(f"max_top1_drop={t.max_top1_drop:g} (classify)")
        if kind != "classify" and t.max_sequence_drop is not None and t.max_sequence_drop < step:
            bounds.append(f"max_sequence_drop={t.max_sequence_drop:g} ({kind})")
    if not bounds:
        return None
    return (f"with {samples} held-out samples one changed sample is {step:.3g}%, so {', '.join(sorted(set(bounds)))} "
            "allows none; give more data for a finer budget")


def _emit(args: argparse.Namespace, report: Report) -> None:
    if args.report:
        from onnxcomp.model import save_text

        if str(args.report).endswith((".html", ".htm")):
            from onnxcomp.html_report import optimize_page

            save_text(args.report, optimize_page(report.as_dict(), source=args.input), protect=(args.input,))
        else:
            save_text(args.report, report.to_json() + "\n", protect=(args.input,))
    if args.json:
        print_json(report.as_dict())
        return
    print(render_report(report))


def render_report(report: Report) -> str:
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
        unknown = (b.get(f"{key}_unknown") or 0, a.get(f"{key}_unknown") or 0)
        if any(unknown):  # a partial total is a lower bound; a ratio of two of them means nothing
            ratio = None
        shown = "-" if not ratio else (f"{ratio:.2f}x" if ratio >= 0.01 else f"{ratio:.2g}x")  # growth shows too
        cells = [human_count(v) if not n else f">= {human_count(v)}, {n} layers unknown"
                 for v, n in ((before, unknown[0]), (after, unknown[1]))]
        size_rows.append([label, *cells, shown])
    lines.append(table(size_rows, ["", "before", "after", "reduction"]))
    reasons: dict[str, int] = {}
    for p in report.passes:
        for r in p.layers:
            if r["action"] == "skipped" and p.name != "normalize":
                reason = r["reason"]
                if reason.startswith("put back by the guard"):
                    reason = "put back by the guard (costs below)"
                key = f"{p.name}: {reason}"
                reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines.append("")
        lines.append("skipped layers (reason: count):")
        lines.extend(f"  {k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    lines.extend(render_guard(report))
    if report.validation:
        lines.append("")
        lines.extend(render_validation(report.validation))
    return "\n".join(lines)


def render_guard(report: Report) -> list[str]:
    """What the guard checked on, and every layer it put back with its measured cost."""
    if not report.guard:
        return []
    g = report.guard
    kinds = ", ".join(f"{k} ({v})" for k, v in (g.get("kinds") or {}).items())
    lines = ["", f"guard: checked on {g.get('samples')} samples of {g.get('data')}; outputs {kinds}; "
                 f"{g.get('seconds', 0):.1f}s checking"]
    if g.get("latency_ratio") is not None:
        lines.append(f"  latency: {g['latency_ratio']:.2f}x the input's (bound {g['max_latency_ratio']:g}x)")
    for p in report.passes:
        if not p.guard:
            continue
        rep = p.guard
        if rep.get("dropped"):
            why = (f"{rep['latency_ratio']:.2f}x the input's latency" if rep.get("latency_ratio") is not None
                   else "no part of it held the tolerance")
            lines.append(f"  {p.name}: dropped ({why})")
            continue
        restored = rep.get("restored") or []
        shown = ", ".join(
            f"{c['node']} ({_num(c['cost'], '+.3g')})" if isinstance(c.get("cost"), (int, float)) else c["node"]
            for c in restored)
        lines.append(f"  {p.name}: put back {len(restored)} layer(s) in {rep.get('probes')} re-runs: {shown}")
    return lines


def render_validation(v: dict) -> list[str]:
    """The final check in words: verdict (or "figures only" without a tolerance) and key figures."""
    s = v.get("summary", {})
    verdict = _validation_word(v)
    figures = []
    for key, label, fmt, unit in (
        ("min_cosine", "min cosine", ".6f", ""),
        ("min_sqnr_db", "SQNR", ".1f", " dB"),
        ("max_abs_err", "max abs err", ".3g", ""),
        ("top1_agreement", "top-1 agreement", ".2f", "%"),
        ("position_agreement", "argmax agreement per position", ".2f", "%"),
        ("sequence_agreement", "whole sequences unchanged", ".2f", "%"),
    ):
        if s.get(key) is not None:
            figures.append(f"{label} {_num(s[key], fmt)}{unit}")
    if s.get("ref_top1_acc") is not None:
        figures.append(f"accuracy {_num(s['ref_top1_acc'], '.2f')}% -> {_num(s['cand_top1_acc'], '.2f')}%")
    if s.get("metric"):
        m = s["metric"]
        figures.append(f"metric {m['name']} {_num(m['reference'], '.4g')} -> {_num(m['candidate'], '.4g')}")
    lines = [f"validation: {verdict} on {v.get('samples')} samples of {v.get('data')}"]
    lines.append("  " + ", ".join(figures))
    if s.get("worst_layer"):
        lines.append(f"  largest error at layer output: {s['worst_layer']}")
    return lines


def _num(value, fmt: str) -> str:
    """Format a report number; JSON-safe reports carry inf/NaN as strings, shown as they are."""
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _validation_word(v: dict | None) -> str:
    if not v:
        return "-"
    if not v.get("passed"):
        return "FAIL"
    return "pass" if v.get("tolerance") else "figures only (no tolerance given)"

