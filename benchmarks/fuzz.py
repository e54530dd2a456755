"""Fuzz the CLI with random conv graphs (onnxcomp.fuzz): every pipeline of onnxcomp.fuzz.PIPELINES
on every graph, with and without data as each needs.

Per run it checks: exit 0/1/2 only, one error line and no traceback, the input file unchanged, no
output on bad input, outputs that pass onnx's checker, load in onnxruntime and keep their output
shapes, exact rewrites within rtol 1e-4 / atol 1e-5 of the input, and reported errors that an
independent recomputation confirms. Prints counts per pipeline (exit codes, layers rewritten, the
reasons layers were refused) and every problem with the graph that caused it.

    python benchmarks/fuzz.py 1000 --seed 0 [--only REGEX] [--out benchmarks/out/fuzz.md]

`--only` runs the pipelines whose spec matches REGEX (the same graphs: graph i depends on the seed only).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

from onnxcomp.fuzz import PIPELINES, fuzz

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="run only the pipelines whose spec matches this regex")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fuzz.md"))
    args = ap.parse_args()
    chosen = [p for p in PIPELINES if args.only is None or re.search(args.only, p[0])]
    if not chosen:
        ap.error(f"--only {args.only!r} matches no pipeline")
    t0 = time.perf_counter()

    def progress(i: int, n: int) -> None:
        if i % 50 == 0 or i == n:
            print(f"{i}/{n} graphs, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    results = fuzz(args.count, args.seed, pipelines=chosen, progress=progress)
    seconds = time.perf_counter() - t0
    only = f", pipelines matching `{args.only}`" if args.only else ""
    lines = [f"# Fuzz: {args.count} random graphs, seed {args.seed}{only}, {seconds:.0f}s", "",
             "| pipeline | runs | exit 0 | exit 1 | exit 2 | other | problems | layers rewritten | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    problems = []
    reasons: dict[str, Counter] = {}
    for spec, *_ in chosen:
        runs = [r for _, rs in results for r in rs if r.pipeline == spec]
        codes = Counter(r.exit_code for r in runs)
        bad = sum(len(r.problems) for r in runs)
        lines.append(f"| `{spec}` | {len(runs)} | {codes[0]} | {codes[1]} | {codes[2]} | "
                     f"{len(runs) - codes[0] - codes[1] - codes[2]} | {bad} | {sum(r.rewritten for r in runs)} | "
                     f"{sum(r.seconds for r in runs):.1f} |")
        reasons[spec] = Counter()
        for r in runs:
            reasons[spec].update(r.reasons)
    for graph, runs in results:
        for r in runs:
            problems.extend(f"- `{r.pipeline}` on {graph.description}: {p}" for p in r.problems)
    lines += ["", f"## Problems: {len(problems)}", ""] + (problems or ["none"])
    lines += ["", "## Data-exact passes on a fresh input", "",
              "Exact on the samples they calibrated on (checked above); on a fresh input a channel constant on",
              "those samples may move (the pass reports its locality on the held-out samples).", ""]
    for spec, *_ in chosen:
        offs = [r.off_data for _, rs in results for r in rs if r.pipeline == spec and r.off_data is not None]
        if offs:
            moved = [o for o in offs if o > 1e-4]
            lines.append(f"- `{spec}`: {len(moved)} of {len(offs)} outputs differ by more than 1e-4 of their max "
                         f"on a fresh input (largest {max(offs):.3g})")
    lines += ["", "## Why layers were refused (most common per pipeline)", ""]
    for spec, counter in reasons.items():
        lines.append(f"- `{spec}`: " + ("; ".join(f"{k.split(': ', 1)[-1]} ({v})" for k, v in counter.most_common(6))
                                          or "none"))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
