"""`onnxcomp zoo NAME -o FILE`: write a reference architecture built directly in ONNX."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from onnxcomp.zoo import ZOO

    p = sub.add_parser("zoo", help="write a reference CNN (random He-initialised weights) as ONNX")
    p.add_argument("name", choices=sorted(ZOO), help="architecture")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.analysis import count_params
    from onnxcomp.model import save_model
    from onnxcomp.zoo import build

    model = build(args.name, seed=args.seed)
    save_model(model, args.output)
    print(f"{args.name}: {count_params(model):,} parameters -> {args.output}")
    return 0
