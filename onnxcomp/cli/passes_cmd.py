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
    """Every registered pass: name, summary, default op types, needs_data, and its options (name,
    type, default, help, choices, common = shared by every pass). Plain JSON types only."""
    import typing

    from onnxcomp.passes.base import PassConfig, _jsonable, registered_passes

    common = {f.name for f in dataclasses.fields(PassConfig)}
    out = []
    for name, cls in registered_passes().items():
        opts = []
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            opts.append({
                "name": f.name,
                "type": _type_name(hints.get(f.name)),
                "default": _jsonable(default),
                "help": f.metadata.get("help", ""),
                "choices": list(f.metadata.get("choices", ())),
                "common": f.name in common,
                "search": _jsonable(f.metadata.get("search")),
                "stronger": f.metadata.get("stronger"),
            })
        out.append({"name": name, "summary": cls.summary, "ops": list(cls.default_ops),
                    "needs_data": cls.needs_data, "options": opts})
    return out


def _type_name(t) -> str:
    if t is None:
        return "?"
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


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
            searched = f"  [searched: {o['search']}]" if o["search"] is not None else ""
            if o["stronger"]:
                searched += f"  [{o['stronger']} compresses more]"
            print(f"  {o['name']}={o['default']!s} ({o['type']}){choices}  {o['help']}{searched}")
        print()
    print("every pass also takes include=REGEX, exclude=REGEX and ops=A|B to choose layers")
    print("`onnxcomp search` without --space searches the [searched] options; each such pass is optional in a "
          "trial, in the order trim, tucker, winograd, codebook, int8, uquant; its warm start probes each pass "
          "at its strongest setting under the guard")
    return 0
