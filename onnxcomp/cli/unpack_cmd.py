"""`onnxcomp unpack IN.onnxc -o OUT.onnx`: the exact model a pack file holds."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unpack", help="restore the exact .onnx a pack file (.onnxc) holds",
                       description="Decode a file written by `onnxcomp pack` and write the model it holds, byte for "
                                   "byte; a damaged or foreign file is refused (exit 2) and nothing is written.")
    p.add_argument("packed", help="input .onnxc")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onnxcomp.container import unpack
    from onnxcomp.errors import BadInputError
    from onnxcomp.model import check_output_path, save_bytes

    check_output_path(args.output, protect=(args.packed,))
    src = Path(args.packed)
    if not src.is_file():
        raise BadInputError(f"{src}: no such file")
    try:
        blob = src.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{src}: cannot read ({exc.strerror})") from None
    try:
        data = unpack(blob)
    except BadInputError as exc:
        raise BadInputError(f"{src}: {exc}") from None
    save_bytes(args.output, data, protect=(args.packed,))
    print(f"{src} -> {args.output} ({len(data):,} bytes)")
    return 0
