"""Flags shared by several verbs, and small output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from onnxcomp.tolerance import Tolerance


def add_tolerance_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tolerance (any combination; all given must hold)")
    g.add_argument("--rtol", type=float, default=None, help="elementwise relative tolerance (e.g. 1e-4)")
    g.add_argument("--atol", type=float, default=None, help="elementwise absolute tolerance (e.g. 1e-5)")
    g.add_argument("--min-cosine", type=float, default=None, help="minimum cosine similarity per output")
    g.add_argument("--min-sqnr", type=float, default=None, metavar="DB", help="minimum SQNR per output, in dB")
    g.add_argument("--max-top1-drop", type=float, default=None,
                   help="max top-1 accuracy drop / disagreement in points (classifiers); argmax disagreement "
                        "per position (sequence / dense outputs)")
    g.add_argument("--max-sequence-drop", type=float, default=None, metavar="PCT",
                   help="max percent of samples whose whole argmax sequence (map) changes (sequence / dense outputs)")
    g.add_argument("--task", default=None, metavar="KIND|OUTPUT=KIND",
                   help="read outputs as classify, sequence, dense or regress instead of inferring it from "
                        "their shapes (repeat OUTPUT=KIND per output)", action="append")
    g.add_argument("--metric", default=None, metavar="MODULE:FUNCTION",
                   help="a user metric fn(reference, candidate, labels) -> (score, higher_is_better), "
                        "reported on every check (module on sys.path or path/to/file.py)")
    g.add_argument("--max-metric-drop", type=float, default=None,
                   help="with --metric: the verdict also needs the metric to drop by at most this")


def tolerance_from_args(args: argparse.Namespace, default: Tolerance | None = None) -> Tolerance | None:
    tol = Tolerance(rtol=args.rtol, atol=args.atol, min_cosine=args.min_cosine, min_sqnr_db=args.min_sqnr,
                    max_top1_drop=args.max_top1_drop, max_sequence_drop=args.max_sequence_drop)
    if tol.rtol is not None and tol.atol is None:
        tol = dataclasses.replace(tol, atol=0.0)
    if tol.atol is not None and tol.rtol is None:
        tol = dataclasses.replace(tol, rtol=0.0)
    return tol if tol.is_set else default


def task_from_args(args: argparse.Namespace) -> str | dict[str, str] | None:
    """`--task KIND` (every output) and/or `--task OUTPUT=KIND` -> what validation.compare takes."""
    from onnxcomp.errors import BadInputError
    from onnxcomp.tolerance import KINDS

    given = args.task or []
    if not given:
        return None
    out: dict[str, str] = {}
    for item in given:
        name, sep, kind = item.rpartition("=")
        if kind not in KINDS:
            raise BadInputError(f"--task {item}: the kind must be one of {', '.join(KINDS)}")
        out[name if sep else ""] = kind
    return out[""] if set(out) == {""} else out


def metric_from_args(args: argparse.Namespace):
    """The loaded --metric (onnxcomp.metrics.UserMetric) or None; exit 2 before any work when it
    cannot be imported."""
    from onnxcomp.errors import BadInputError

    if args.metric is None:
        if args.max_metric_drop is not None:
            raise BadInputError("--max-metric-drop needs --metric")
        return None
    from onnxcomp.metrics import UserMetric

    return UserMetric(args.metric, max_drop=args.max_metric_drop)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="calibration/validation data: .npz, folder of .npy, or image folder (see README)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="concrete shape for an input with symbolic dims (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch when streaming data")
    p.add_argument("--samples", type=int, default=None, help="random-data samples / cap on data samples")


def add_timing_input_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--input-shape, --data, --batch-size, --seed: what a model is timed on (see timing_feeds)."""
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="input shape (its leading dim is the batch; default batch 1)")
    p.add_argument("--data", default=None, help=f"{what} on the first batch of this data instead of random input")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: --input-shape's, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")


def timing_feeds(model, data: str | None, input_shapes: dict[str, list[int]], batch: int | None, seed: int = 0):
    """The feeds a model is timed on: the first batch of `data`, else random input at `input_shapes`;
    the batch is `batch`, else --input-shape's leading dim, else 1."""
    from onnxcomp.data import open_source, random_source

    if batch is None:
        leading = [s[0] for s in input_shapes.values() if s]
        batch = leading[0] if leading else 1
    if data:
        source = open_source(data, model=model, input_shapes=input_shapes, batch_size=batch)
    else:
        source = random_source(model, input_shapes, samples=batch, batch_size=batch, seed=seed)
    return source.first_batch()[0]


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(headers))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_count(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
