"""`onnxcomp profile IN`: per-layer latency from the cost model, and the whole model measured."""

from __future__ import annotations

import argparse

from onnxcomp.cli.common import add_timing_input_flags, human_count, print_json, table, timing_feeds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="per-layer measured latency, MACs, GFLOP/s and bytes; predicted vs measured whole-model time",
        description=(
            "Cut the model into layers (a weighted op with the ops onnxruntime fuses into it, or one op), time "
            "each alone in onnxruntime with its real inputs and the given session settings (interleaved, "
            "cached on disk per machine and onnxruntime version), and compare the sum with the whole model "
            "timed the same way. --no-measure uses the analytic model (MACs and bytes fit to this machine)."
        ),
    )
    p.add_argument("model", help="input .onnx")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--optimization", default="all", choices=("all", "extended", "basic", "off"),
                   help="onnxruntime graph optimisation level (default all)")
    p.add_argument("--no-measure", action="store_true", help="estimate layers analytically instead of timing them")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the latency cache")
    p.add_argument("--top", type=int, default=30, help="rows of the table (slowest first; default 30, 0 = all)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of the slowest layers")
    add_timing_input_flags(p, "profile")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onnxcomp.costmodel import CostModel, Settings
    from onnxcomp.model import load_model
    from onnxcomp.profile import plot, profile
    from onnxcomp.progress import Progress
    from onnxcomp.shapes import parse_input_shapes

    progress = Progress(enabled=None if not args.quiet else False)
    if args.plot:
        from onnxcomp.model import check_output_path

        check_output_path(args.plot, protect=(args.model,))
    shapes = parse_input_shapes(args.input_shape)
    model = load_model(args.model)
    feeds = timing_feeds(model, args.data, shapes, args.batch_size, args.seed)
    cm = CostModel(Settings(threads=args.threads, optimization=args.optimization), measure=not args.no_measure,
                   cache=not args.no_cache)
    prof = profile(model, feeds, cm, progress=progress)
    if args.plot:
        plot(prof, args.plot, title=Path(args.model).name)
    if args.json:
        print_json(prof.as_dict())
        return 0
    rows = sorted(prof.layers, key=lambda layer: layer.net_ms, reverse=True)
    total = sum(layer.net_ms for layer in prof.layers) or 1.0
    shown = rows if args.top == 0 else rows[: args.top]
    body = []
    for layer in shown:
        g = layer.gflops
        body.append([layer.name, layer.ops, round(layer.net_ms, 4), f"{layer.net_ms / total:.1%}",
                     human_count(layer.macs or None), "-" if g is None else round(g, 1), human_count(layer.bytes),
                     layer.estimate.source])
    shape_txt = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in prof.feeds.items())
    m = prof.machine
    print(f"{m['cpu']} ({', '.join(m['isa'][-4:]) or m['arch']}), onnxruntime {m['onnxruntime']}, "
          f"{args.threads} threads, optimization {args.optimization}, input {shape_txt}")
    print(table(body, ["layer", "ops", "ms", "share", "MACs", "GFLOP/s", "bytes", "source"]))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more layers ({sum(r.net_ms for r in rows[len(shown):]):.3f} ms)")
    print(f"predicted {prof.predicted_ms:.3f} ms (what each of {len(rows)} layers adds to a run under way, plus "
          f"{prof.overhead_ms:.4f} ms for the session call and {prof.layout_ms:.4f} ms for the {prof.layout_ops} "
          f"layout conversions onnxruntime keeps) vs measured {prof.measured.ms:.3f} ms: {prof.error:+.1%} "
          f"(the faster of {' and '.join(f'{r:.3f}' for r in prof.readings)} ms, timed before and after the layers)")
    print(f"layers measured {prof.units_measured}, from the cache {prof.units_cached}, analytic {prof.units_analytic}; "
          f"{prof.seconds:.1f} s")
    for note in prof.notes:
        print(f"note: {note}")
    return 0
