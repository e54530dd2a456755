"""`onnxcomp sensitivity IN -p "PASS{...}" --data D`: the damage each layer's rewrite does alone."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from onnxcomp.cli.common import add_data_flags, human_count, print_json, table, task_from_args
from onnxcomp.errors import BadInputError

if TYPE_CHECKING:
    from onnxcomp.sensitivity import Sensitivity


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity", help="per-layer output error and task agreement when only that layer is rewritten",
        description="For every layer PASS would rewrite, rewrite only that layer and measure the model output "
                    "against the input model (on held-out samples when the data has 32 or more; the pass "
                    "calibrates on the rest). Cached on disk by model, pass config and data.")
    p.add_argument("input", help="input .onnx model")
    p.add_argument("-p", "--pipeline", required=True, help="one pass with its options, e.g. 'tucker{rank=0.5}'")
    p.add_argument("--no-normalize", action="store_true", help="do not run normalize first")
    add_data_flags(p)
    p.add_argument("--task", action="append", default=None, metavar="KIND|OUTPUT=KIND",
                   help="read outputs as classify, sequence, dense or regress (default: inferred from shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a bar chart of the per-layer error")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.data import holdout_split, open_source
    from onnxcomp.model import check_output_path, load_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import MIN_HELD_OUT, Pipeline
    from onnxcomp.progress import Progress
    from onnxcomp.sensitivity import analyse
    from onnxcomp.shapes import parse_input_shapes, shapes_from_data

    if args.plot:
        check_output_path(args.plot, protect=(args.input,))
    task = task_from_args(args)
    pipe = Pipeline.parse(args.pipeline, normalize=False)
    passes = [p for p in pipe.passes if p.name != "normalize"]
    if len(passes) != 1:
        raise BadInputError(f"sensitivity takes one pass (got {len(passes)}: {pipe}); run it per pass")
    model = load_model(args.input)
    shapes = parse_input_shapes(args.input_shape)
    if not args.data:
        raise BadInputError("sensitivity needs --data (the damage is measured on real inputs)")
    source = open_source(args.data, model=model, input_shapes=shapes, batch_size=args.batch_size, limit=args.samples)
    shapes = shapes_from_data(model, source, shapes)  # MACs saved at the size the data has
    progress = Progress(enabled=None if not args.quiet else False)
    ctx = Context(data=source, seed=args.seed, input_shapes=shapes, progress=progress)
    if not args.no_normalize:
        model = Pipeline.parse("normalize").run(model, ctx)[0]
    fit, held = holdout_split(source)
    n_held = held.num_samples or 0
    measure = held if n_held >= MIN_HELD_OUT else source
    if measure is source:
        print(f"sensitivity: {source.num_samples} samples are too few to hold {MIN_HELD_OUT} out; calibrating and "
              "measuring on the same samples", file=sys.stderr)
    else:
        ctx.data = fit
    result = analyse(model, passes[0], ctx, measure, task=task, use_cache=not args.no_cache)
    if args.plot:
        write_plot(result, args.plot)
    if args.json:
        print_json(result.as_dict())
    else:
        print(render(result))
    return 0


def render(r: Sensitivity) -> str:
    rows = []
    for s in r.layers:
        rows.append([s.node, s.op, human_count(s.macs_saved), f"{s.rel_l2:.3g}", _db(s.sqnr_db), f"{s.cosine:.4f}",
                     _pct(s.agreement), _pct(s.sequence_agreement),
                     "-" if s.per_mac is None else f"{s.per_mac:.3g}"])
    kinds = ", ".join(f"{k} ({v})" for k, v in r.kinds.items())
    head = (f"{r.pipeline}: {len(r.layers)} layers measured alone on {r.samples} samples of {r.data}; outputs {kinds}; "
            f"{r.seconds:.1f}s" + (" (cached)" if r.cached else ""))
    lines = [head, "", table(rows, ["layer", "op", "MACs saved", "rel L2", "SQNR", "min cos", "agree %",
                                    "seq agree %", "err / M MACs"])]
    if r.skipped:
        reasons: dict[str, int] = {}
        for item in r.skipped:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines += ["", "not candidates (reason: count):"] + [f"  {k}: {v}" for k, v in reasons.items()]
    return "\n".join(lines)


def write_plot(r: Sensitivity, path: str) -> None:
    """A horizontal bar chart: relative L2 output error per layer (log scale), agreement in the labels."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxcomp.model import save_bytes

    names = [s.node for s in r.layers]
    errs = [max(s.rel_l2, 1e-9) if math.isfinite(s.rel_l2) else 1e3 for s in r.layers]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(names) + 1)))
    ax.barh(range(len(names)), errs, color="#4878a8")
    labels = [f"{n}  ({s.agreement:.1f}%)" if s.agreement is not None else n for n, s in zip(names, r.layers, strict=True)]
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("relative L2 error of the model output, only this layer rewritten")
    ax.set_title(f"{r.pipeline} on {r.samples} samples", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    save_bytes(path, buf.getvalue())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _db(v: float) -> str:
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.1f}"
