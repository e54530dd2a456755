"""`onnxcomp inspect MODEL`: per-layer params and MACs, totals and sizes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from onnxcomp.cli.common import human_count, print_json, table

if TYPE_CHECKING:
    from onnxcomp.analysis import Inspection


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-layer table of params and MACs, with totals and sizes",
        description=(
            "List every layer (Conv, ConvTranspose, Gemm, MatMul with a constant operand, codebook/quantized "
            "weights, model-local function calls such as Winograd convolutions) with kernel, channels, groups, "
            "stride, params and MACs at the given input shape, then totals: params, parameter bits, MACs, "
            "bytes on disk and (with --lzma) bytes after xz compression."
        ),
    )
    p.add_argument("model", help=".onnx model")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="concrete input shape for MACs (a symbolic leading dim defaults to 1)")
    p.add_argument("--lzma", action="store_true", help="also report the xz-compressed size (slow on big models)")
    p.add_argument("--lzma-preset", type=int, default=None, choices=range(10), metavar="0-9",
                   help="xz preset for --lzma (default 6; 0 is several times faster)")
    p.add_argument("--json", action="store_true", help="print the inspection as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp import sizes
    from onnxcomp.analysis import inspect
    from onnxcomp.model import load_model
    from onnxcomp.shapes import parse_input_shapes

    model = load_model(args.model)
    shapes = parse_input_shapes(args.input_shape)
    result = inspect(model, shapes, path=args.model)
    if args.lzma or args.lzma_preset is not None:
        print("compressing with xz ...", file=sys.stderr)
        preset = args.lzma_preset if args.lzma_preset is not None else sizes.LZMA_PRESET
        result.lzma_bytes = sizes.lzma_bytes(args.model, preset=preset)
    if args.json:
        print_json(result.as_dict())
        return 0
    print(render(result))
    return 0


def render(result: Inspection) -> str:
    """The per-layer table, then the totals table."""
    total = result.macs or 0
    rows = []
    for layer in result.layers:
        share = f"{100.0 * layer.macs / total:.2f}%" if total and layer.macs is not None else None
        op = layer.op if layer.kind in ("dense", "function") else f"{layer.op} ({layer.kind})"
        rows.append([
            layer.node,
            op,
            "x".join(map(str, layer.kernel)) or None,
            layer.in_channels,
            layer.out_channels,
            layer.groups,
            "x".join(map(str, layer.strides)) or None,
            layer.params,
            layer.macs,
            share,
        ])
    lines = [table(rows, ["node", "op", "kernel", "in", "out", "groups", "stride", "params", "MACs", "share"])]
    layer_params = sum(layer.params for layer in result.layers)
    lines.append("")
    incomplete = "" if result.macs_complete else "\n(some layers' MACs are unknown: give --input-shape for symbolic dims)"
    totals = [
        ["layers", f"{len(result.layers)}"],
        ["MACs", f"{human_count(result.macs)} ({result.macs:,})" if result.macs is not None else "-"],
        ["params (all initializers)", f"{human_count(result.params)} ({result.params:,})"],
        ["params in layers", f"{human_count(layer_params)} ({layer_params:,})"],
        ["parameter storage", f"{result.param_bits / 8 / 2**20:.2f} MiB ({result.param_bits:,} bits)"],
        ["nodes", f"{result.nodes}"],
    ]
    if result.file_bytes is not None:
        totals.append(["bytes on disk", f"{result.file_bytes:,}"])
    if result.lzma_bytes is not None:
        ratio = (result.file_bytes / result.lzma_bytes) if result.file_bytes else None
        totals.append(["bytes after xz", f"{result.lzma_bytes:,}" + (f" ({ratio:.2f}x smaller)" if ratio else "")])
    if result.codebooks:
        stored = sum(c.index_bytes + c.codebook_bytes for c in result.codebooks)
        bound = sum(c.entropy_bytes for c in result.codebooks)
        totals.append(["codebook weights", f"{len(result.codebooks)} layers, {stored:,} bytes stored, "
                                           f"{bound:,} at the entropy bound of their indices"])
    lines.append(table(totals, ["total", "value"]) + incomplete)
    if result.codebooks:
        rows = [[c.node, c.bits, c.storage, c.indices, c.index_bytes, c.codebook_bytes, f"{c.entropy_bits:.3f}",
                 c.entropy_bytes] for c in result.codebooks]
        lines += ["", table(rows, ["codebook layer", "bits", "storage", "indices", "index bytes", "codebook bytes",
                                   "entropy bits/index", "entropy bound bytes"])]
    return "\n".join(lines)
