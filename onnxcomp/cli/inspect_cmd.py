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
    p.add_argument("--energy", action="store_true",
                   help="also estimate energy per layer on a row-stationary accelerator (Eyeriss costs; see onnxcomp.energy)")
    p.add_argument("--energy-costs", metavar="FILE.json", default=None,
                   help="cost table for --energy (keys dram, buffer, array, rf, mac, word_bits, filters_per_pass, "
                        "channels_per_pass)")
    p.add_argument("--baseline", metavar="ORIGINAL.onnx", default=None,
                   help="with --energy: the uncompressed model, printed side by side")
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
    energy = None
    if args.energy or args.energy_costs or args.baseline:
        energy = _energy(args, model, shapes)
    if args.json:
        print_json({**result.as_dict(), **({"energy": energy} if energy else {})})
        return 0
    print(render(result))
    if energy:
        print("\n" + render_energy(energy))
    return 0


def _energy(args: argparse.Namespace, model, shapes) -> dict:
    from onnxcomp.energy import load_costs, model_energy
    from onnxcomp.model import load_model

    costs = load_costs(args.energy_costs)
    layers, missing = model_energy(model, shapes, costs)
    out = {"costs": costs, "layers": [e.as_dict() for e in layers], "missing": missing,
           "total": sum(e.total for e in layers)}
    if args.baseline:
        base, base_missing = model_energy(load_model(args.baseline), shapes, costs)
        out["baseline"] = {"layers": [e.as_dict() for e in base], "missing": base_missing,
                           "total": sum(e.total for e in base)}
    return out


def render_energy(energy: dict) -> str:
    """Energy per layer (share of the total, by memory level), the baseline beside it when given."""
    total = energy["total"] or 1.0
    base = {e["node"]: e for e in energy.get("baseline", {}).get("layers", [])}
    rows = []
    for e in energy["layers"]:
        parts = e["energy"]
        row = [e["node"], e["macs"], f"{e['total']:.4g}", f"{100 * e['total'] / total:.1f}%"]
        row += [f"{100 * parts[k] / e['total']:.0f}%" if e["total"] else "-" for k in ("dram", "buffer", "array", "rf", "mac")]
        if base:
            b = base.get(e["node"])
            row.append(f"{b['total'] / e['total']:.2f}x" if b and e["total"] else "-")
        rows.append(row)
    head = ["node", "MACs", "energy", "share", "DRAM", "buffer", "array", "RF", "MAC"] + (["saved"] if base else [])
    lines = [table(rows, head), ""]
    c = energy["costs"]
    lines.append(f"energy (units of one RF access; DRAM {c['dram']:g}, buffer {c['buffer']:g}, array {c['array']:g}, "
                 f"RF {c['rf']:g}, MAC {c['mac']:g}; row stationary, {c['word_bits']:g}-bit words): {energy['total']:.4g}")
    if "baseline" in energy:
        b = energy["baseline"]["total"]
        lines.append(f"baseline: {b:.4g}; compressed uses {energy['total'] / b:.3f} of it ({b / total:.2f}x less)"
                     if b else "baseline: no modelled layers")
    if energy["missing"]:
        lines.append(f"not modelled: {len(energy['missing'])} layer(s), e.g. {energy['missing'][0]}")
    return "\n".join(lines)


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
