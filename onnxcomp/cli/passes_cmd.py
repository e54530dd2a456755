"""`onnxcomp passes`: every registered pass with its options, defaults and help."""

from __future__ import annotations

import argparse
import dataclasses

from onnxcomp.cli.common import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="list the passes and their options")
    p.add_argument("--json", action="store_true", help="machine-readable listing")
    p.set_defaults(func=run)


def describe_passes() -> list[dict]:
    from onnxcomp.passes.base import PassConfig, registered_passes

    common = {f.name for f in dataclasses.fields(PassConfig)}
    out = []
    for name, cls in registered_passes().items():
        opts = []
        for f in dataclasses.fields(cls.Config):
            opts.append({
                "name": f.name,
                "default": f.default,
                "help": f.metadata.get("help", ""),
                "choices": list(f.metadata.get("choices", ())),
                "common": f.name in common,
            })
        out.append({"name": name, "summary": cls.summary, "ops": list(cls.default_ops),
                    "needs_data": cls.needs_data, "options": opts})
    return out


def run(args: argparse.Namespace) -> int:
    info = describe_passes()
    if args.json:
        print_json(info)
        return 0
    for p in info:
        needs = "  [needs --data]" if p["needs_data"] else ""
        print(f"{p['name']}: {p['summary']}{needs}")
        if p["ops"]:
            print(f"  ops: {', '.join(p['ops'])}")
        for o in p["options"]:
            if o["common"]:
                continue
            choices = f" ({'|'.join(o['choices'])})" if o["choices"] else ""
            print(f"  {o['name']}={o['default']!s}{choices}  {o['help']}")
        print()
    print("every pass also takes include=REGEX, exclude=REGEX and ops=A|B to choose layers")
    return 0
