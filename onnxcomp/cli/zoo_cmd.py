"""`onnxcomp zoo NAME -o FILE`: write a reference architecture built directly in ONNX."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from onnxcomp.zoo import ZOO

    p = sub.add_parser("zoo", help="write a reference CNN (random He-initialised weights) as ONNX",
                       description="Write a torchvision-layout CNN with deterministic random weights "
                                   "(input 'input' [batch,3,224,224], output 'logits' [batch,1000]).")
    p.add_argument("name", choices=sorted(ZOO), help="architecture")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxcomp.analysis import total_macs
    from onnxcomp.cli.common import human_count
    from onnxcomp.model import save_model
    from onnxcomp.zoo import INPUT, build, trainable_params

    model = build(args.name, seed=args.seed)
    macs = total_macs(model, {INPUT: [1, 3, 224, 224]})
    save_model(model, args.output)
    print(f"{args.name}: {trainable_params(model):,} parameters, {human_count(macs)} MACs at 1x3x224x224 -> {args.output}")
    return 0
