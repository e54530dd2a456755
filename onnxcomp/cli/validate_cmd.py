"""`onnxcomp validate REF CAND`: run both models on the same inputs and judge the difference.

Exit 0 when every tolerance criterion holds on every output, 1 when one does not (a result), 2 for
bad input (unreadable model, data that does not fit, outputs that differ in name or shape).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from onnxcomp.cli.common import (
    add_data_flags,
    add_tolerance_flags,
    metric_from_args,
    print_json,
    table,
    task_from_args,
    tolerance_from_args,
)
from onnxcomp.tolerance import EXACT

if TYPE_CHECKING:
    from onnxcomp.validation import Check


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check that a candidate model computes what the reference computes",
        description=(
            "Run REF and CAND in onnxruntime (graph optimisations off) on identical inputs and report, per "
            "output, max abs / rel / mean abs error, cosine, SQNR, top-1/top-5 agreement and, with labels, "
            f"accuracy. Without tolerance flags the check is elementwise {EXACT.describe()} (onnxsim's). "
            "Exit 0 pass, 1 fail, 2 bad input."
        ),
    )
    p.add_argument("reference", help="reference .onnx model")
    p.add_argument("candidate", help="candidate .onnx model")
    add_data_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random data when no --data is given")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_tolerance_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.data import open_source, random_source
    from onnxcomp.model import load_model
    from onnxcomp.shapes import parse_input_shapes
    from onnxcomp.validation import RANDOM_SAMPLES, batch_model, compare

    metric = metric_from_args(args)  # an unusable --metric is exit 2 before any work
    task = task_from_args(args)
    ref = load_model(args.reference)
    cand = load_model(args.candidate)
    shapes = parse_input_shapes(args.input_shape)
    fit = batch_model(ref, cand)  # batches must suit the model that fixes its batch dim, if one does
    if args.data:
        source = open_source(args.data, model=fit, input_shapes=shapes, batch_size=args.batch_size, limit=args.samples)
    else:
        n = RANDOM_SAMPLES if args.samples is None else args.samples
        source = random_source(fit, shapes, samples=n, batch_size=min(args.batch_size, max(n, 1)), seed=args.seed)
    tolerance = tolerance_from_args(args, default=EXACT)
    print(f"comparing on {source.description} ...", file=sys.stderr)
    if metric is not None and not any(getattr(args, k) is not None for k in
                                      ("rtol", "atol", "min_cosine", "min_sqnr", "max_top1_drop", "max_sequence_drop")):
        tolerance = None  # the user's metric is the criterion (plus finite outputs)
    check = compare(ref, cand, source, tolerance, threads=args.threads, task=task, metric=metric)
    if args.json:
        print_json(check.as_dict())
    else:
        print(render_check(check))
    return 0 if check.passed else 1


def render_check(check: Check) -> str:
    """A table of the per-output figures, then the verdict line."""
    rows = []
    for o in check.outputs:
        rows.append([
            o.name,
            o.kind,
            "x".join(str(d) for d in o.shape),
            o.max_abs_err,
            o.mean_abs_err,
            o.max_rel_err,
            f"{o.cosine_min:.6f}",
            _db(o.sqnr_db),
            _pct(o.top1_agreement),
            _pct(o.top5_agreement),
            _pct(o.sequence_agreement),
            _pct(o.ref_top1_acc),
            _pct(o.cand_top1_acc),
            "ok" if o.passed else "FAIL",
        ])
    headers = ["output", "kind", "shape", "max abs", "mean abs", "max rel", "min cos", "SQNR dB", "top1 agree",
               "top5 agree", "seq agree", "acc ref", "acc cand", "check"]
    lines = [table(rows, headers)]
    if check.layers:
        worst = sorted(check.layers, key=lambda x: -x.rel_err)[:5]
        lines.append("")
        lines.append(table([[x.node, x.output, x.rel_err, x.max_abs_err, _db(x.sqnr_db)] for x in worst],
                           ["layer", "tensor", "rel err", "max abs", "SQNR dB"]))
    lines.append("")
    lines.append(check.describe())
    return "\n".join(lines)


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}%"


def _db(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}"
