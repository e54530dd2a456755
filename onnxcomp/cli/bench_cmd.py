"""`onnxcomp bench A [B ...]`: interleaved latency of models on the same input, ratios vs the first."""

from __future__ import annotations

import argparse

from onnxcomp.cli.common import add_timing_input_flags, human_count, print_json, table, timing_feeds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time models in onnxruntime (interleaved, p50/p90/min, ratio vs the first)",
        description=(
            "Time each model on the same input in onnxruntime at full optimisation with a fixed thread count. "
            "After a warm-up, every round runs the models interleaved (A B A B ...) so machine drift hits all "
            "of them; the ratio column is each model's p50 over the first model's, with its range over rounds."
        ),
    )
    p.add_argument("models", nargs="+", help=".onnx models (the first is the baseline)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model per round (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the ratio's spread is over rounds (default 3)")
    add_timing_input_flags(p, "time")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.analysis import summary
    from onnxcomp.data import model_inputs
    from onnxcomp.errors import BadInputError
    from onnxcomp.model import load_model
    from onnxcomp.progress import Progress
    from onnxcomp.runtime import measure_latency
    from onnxcomp.shapes import parse_input_shapes

    progress = Progress(enabled=None if not args.quiet else False)
    shapes = parse_input_shapes(args.input_shape)
    models = []
    for path in args.models:
        progress.message(f"loading {path}")
        models.append(load_model(path))
    first = models[0]
    feeds = timing_feeds(first, args.data, shapes, args.batch_size, args.seed)
    names0 = {s.name for s in model_inputs(first)}
    for path, m in zip(args.models[1:], models[1:], strict=True):
        if {s.name for s in model_inputs(m)} != names0:
            raise BadInputError(f"{path}: its inputs differ from {args.models[0]}'s; bench compares models with the same inputs")
    input_shapes = {k: list(v.shape) for k, v in feeds.items()}
    info = []
    for m in models:
        s = summary(m, input_shapes)
        info.append(s)
    results = measure_latency(models, feeds, threads=args.threads, warmup=args.warmup, runs=args.runs,
                              rounds=args.rounds, names=list(args.models), progress=progress)
    del models
    if args.json:
        print_json({
            "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds,
            "input_shapes": input_shapes,
            "results": [{**r.as_dict(), "params": s["params"], "macs": s["macs"], "bytes": s["bytes"]}
                        for r, s in zip(results, info, strict=True)],
        })
        return 0
    rows = []
    base_macs = info[0]["macs"]
    for r, s in zip(results, info, strict=True):
        mac_ratio = (s["macs"] / base_macs) if s["macs"] and base_macs else None
        rows.append([r.name, round(r.p50_ms, 3), round(r.p90_ms, 3), round(r.min_ms, 3), f"{r.ratio:.3f}",
                     f"{r.ratio_min:.3f}-{r.ratio_max:.3f}", human_count(s["macs"]),
                     f"{mac_ratio:.3f}" if mac_ratio is not None else "-", human_count(s["params"])])
    shape_txt = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in input_shapes.items())
    print(f"onnxruntime {_ort_version()}, {args.threads} threads, {args.warmup} warm-up + {args.rounds} rounds x "
          f"{args.runs} interleaved runs, input {shape_txt}")
    print(table(rows, ["model", "p50 ms", "p90 ms", "min ms", "p50 ratio", "ratio range", "MACs", "MAC ratio",
                       "params"]))
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
