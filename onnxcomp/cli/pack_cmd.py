"""`onnxcomp pack IN -o OUT.onnxc`: universally quantized weights as lossless-coded codes."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from onnxcomp.container import CODERS

    p = sub.add_parser(
        "pack", help="store a model's uquant weights as lossless-coded integer codes (.onnxc)",
        description="Store every weight that the uquant pass quantized as its integer codes (and a zero mask), "
                    "the rest of the model as it is, coded by lzma or zstd. `onnxcomp unpack` restores the "
                    "exact model bytes. Weights uquant did not touch are stored as they are (and coded).")
    p.add_argument("model", help="input .onnx (typically written by `optimize -p ...,uquant{...}`)")
    p.add_argument("-o", "--output", required=True, help="output .onnxc path")
    p.add_argument("--coder", choices=CODERS, default="lzma", help="lossless coder (default lzma; zstd needs zstandard)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from onnxcomp.cli.common import human_count, print_json, table
    from onnxcomp.container import pack
    from onnxcomp.model import check_output_path, load_model, save_bytes

    check_output_path(args.output, protect=(args.model,))
    model = load_model(args.model)
    blob, stats = pack(model, args.coder)
    save_bytes(args.output, blob, protect=(args.model,))
    file_bytes = os.path.getsize(args.model)
    doc = {"input": args.model, "output": args.output, "coder": args.coder, "input_file_bytes": file_bytes,
           "packed_bytes": stats.packed_bytes, "ratio": round(file_bytes / max(stats.packed_bytes, 1), 3),
           "coded_tensors": stats.coded_tensors, "raw_tensors": stats.raw_tensors,
           "codes_entropy_bytes": stats.entropy_bytes}
    if args.json:
        print_json(doc)
        return 0
    rows = [["input file", f"{human_count(file_bytes)}B"], ["packed", f"{human_count(stats.packed_bytes)}B"],
            ["ratio", f"{doc['ratio']:.2f}x"], ["tensors as codes", str(stats.coded_tensors)],
            ["entropy bound of the codes", f"{human_count(stats.entropy_bytes)}B"]]
    print(table(rows, ["", args.coder]))
    for name, why in stats.raw_tensors.items():
        print(f"stored as is: {name}: {why}")
    if not stats.coded_tensors:
        print("no uquant weights in this model: everything is stored as it is (run the uquant pass first)")
    return 0
