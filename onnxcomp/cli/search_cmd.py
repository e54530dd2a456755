"""`onnxcomp search IN --data D -o BEST.onnx`: the smallest (or fastest) pipeline within a tolerance."""

from __future__ import annotations

import argparse
import sys

from onnxcomp.cli.common import add_tolerance_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    from onnxcomp.search.trial import OBJECTIVES

    p = sub.add_parser(
        "search", help="search pass settings for the smallest / fastest model within a tolerance (Optuna, local pool or Ray)",
        description="Each trial runs a pipeline drawn from the search space (default: every pass's searchable "
                    "options, see `onnxcomp passes`), calibrated on the data's calibration part, and is judged on "
                    "held-out samples against the tolerance (default: the guard's). Trials that break it are "
                    "recorded as infeasible, trials that crash as failed. The Pareto front is re-judged on every "
                    "held-out sample and printed; the best feasible model is written with its pipeline in its metadata.")
    p.add_argument("model", help="input .onnx")
    p.add_argument("--data", required=True, help="calibration + held-out data (.npz, folder; see README)")
    p.add_argument("-o", "--output", default=None, help="write the best feasible model here")
    p.add_argument("--objective", action="append", choices=OBJECTIVES, default=None,
                   help="what to minimise, as a ratio to the input (repeat for two: a Pareto front; default lzma)")
    p.add_argument("--trials", type=int, default=24, help="trials to run (default 24)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="the whole search within about S seconds: no batch is asked that would not leave time to "
                        "re-judge the front")
    p.add_argument("--seed", type=int, default=0, help="sampler and pass seed (same seed, same trials)")
    p.add_argument("--space", default=None, metavar="SPACE.yaml", help="the search space (default: from the passes' options)")
    p.add_argument("--workers", type=int, default=None, help="trials at once (default: the core count)")
    p.add_argument("--batch", type=int, default=4, help="trials asked per round; the same batch gives the same "
                                                        "trials whatever the executor (default 4)")
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run trials as Ray tasks: 'auto' (the running cluster), 'local' (start one here) or an address")
    p.add_argument("--coarse", type=int, default=None, metavar="N",
                   help="held-out samples each trial is judged on first (default a quarter, at least 32); the "
                        "front is re-judged on all of them")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="concrete shape for an input with symbolic dims (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch when reading data")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the trial cache")
    p.add_argument("--warm-start", choices=("probe", "mild"), default="probe",
                   help="probe (default): first run each pass alone at its strongest setting under the guard, "
                        "whose per-layer repair finds the layers it cannot take; the first trials then use each "
                        "pass at its strongest with those layers left out, and leaving them out becomes a searched "
                        "choice. mild: start from the mildest settings")
    p.add_argument("--reference", action="append", default=None, metavar="PIPELINE",
                   help="pipelines judged beside the search and marked on the plot (default: int8{objective=any}; "
                        "'none' for none)")
    p.add_argument("--json", action="store_true", help="print the search as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the trials and the front as a PNG")
    p.add_argument("--report", default=None, metavar="R.html|R.json",
                   help="write the whole search as one self-contained HTML page (or JSON)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_tolerance_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from onnxcomp.cli.common import metric_from_args, print_json, task_from_args, tolerance_from_args
    from onnxcomp.costmodel import cache_root
    from onnxcomp.errors import EXIT_VALIDATION_FAILED, BadInputError
    from onnxcomp.model import check_output_path, load_model, model_bytes, save_model
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.search.driver import TrialCache, run_search
    from onnxcomp.search.executors import make_executor
    from onnxcomp.search.space import default_space, load_space
    from onnxcomp.search.trial import Job
    from onnxcomp.shapes import parse_input_shapes
    from onnxcomp.tolerance import GUARD_DEFAULT

    objectives = tuple(dict.fromkeys(args.objective or ["lzma"]))
    if len(objectives) > 2:
        raise BadInputError(f"--objective: at most two (a Pareto front), got {', '.join(objectives)}")
    if args.trials < 1:
        raise BadInputError(f"--trials {args.trials}: a search needs at least one trial")
    if args.batch < 1:
        raise BadInputError(f"--batch {args.batch}: must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise BadInputError(f"--workers {args.workers}: must be at least 1")
    if args.time_budget is not None and not args.time_budget > 0:
        raise BadInputError(f"--time-budget {args.time_budget}: must be positive")
    for path in (args.output, args.plot, args.report):
        if path:
            check_output_path(path, protect=(args.model,))
    metric = metric_from_args(args)  # an unusable --metric is exit 2 before any trial
    wants_png = bool(args.plot) or bool(args.report and args.report.endswith((".html", ".htm")))
    if wants_png:
        try:
            import matplotlib  # noqa: F401  (checked now: not after the whole search)
        except ImportError:
            raise BadInputError("--plot and an HTML --report need matplotlib: pip install 'onnxcomp[eval]'") from None
    tolerance = tolerance_from_args(args)
    if tolerance is None and (metric is None or metric.max_drop is None):
        tolerance = GUARD_DEFAULT  # a bounded --metric alone is the verdict, as in optimize
    space = load_space(args.space) if args.space else default_space(has_data=True)
    shapes = parse_input_shapes(args.input_shape)
    model = load_model(args.model)
    fit, held = _split_arrays(model, args.data, shapes, args.batch_size)
    workers = args.workers or os.cpu_count() or 1
    job = Job(model_bytes(model), fit, held, tolerance, objectives, seed=args.seed, task=task_from_args(args),
              input_shapes=shapes, latency_threads=max(1, (os.cpu_count() or 1) // workers),
              metric=args.metric, metric_source=metric.source if metric is not None else None,
              max_metric_drop=args.max_metric_drop)
    n_held = int(next(iter(held.values())).shape[0])
    coarse = args.coarse if args.coarse is not None else max(32, n_held // 4)
    cache = None if args.no_cache else TrialCache(cache_root() / "search", job.digest())
    references = [r for r in (args.reference or ["int8{objective=any}"]) if r.lower() != "none"]
    for r in references:
        Pipeline.parse(r)  # a bad reference is exit 2 before any trial
    executor = make_executor(job, workers, args.ray)  # an unreachable Ray address fails here, before any trial
    progress = _Progress(args.trials, objectives, quiet=args.quiet)
    try:
        result = run_search(job, space, executor, trials=args.trials, batch=args.batch, time_budget=args.time_budget,
                            coarse_samples=coarse, cache=cache, on_trial=progress, references=references,
                            probe=args.warm_start == "probe", on_probe=progress.probe)
    finally:
        executor.close()
    written, note = None, None
    if args.output and result.best is not None:
        best_model, note = _rebuild(model, result.best, fit, held, job)
        if best_model is not None:
            save_model(best_model, args.output, protect=(args.model,))
            written = args.output
    png = None
    if wants_png:
        from onnxcomp.search.report import front_png

        png = front_png(result, title=os.path.basename(args.model))
    if args.plot:
        from onnxcomp.model import save_bytes

        save_bytes(args.plot, png, protect=(args.model,))
    if args.report:
        import json as _json

        from onnxcomp.html_report import search_page
        from onnxcomp.model import save_text

        doc = result.as_dict()
        text = search_page(doc, png, source=args.model) if args.report.endswith((".html", ".htm")) else \
            _json.dumps(doc, indent=2) + "\n"
        save_text(args.report, text, protect=(args.model,))
    if not args.quiet:
        for line in result.notes:
            print(f"search: {line}", file=sys.stderr)
    if note:
        print(f"onnxcomp: {note}", file=sys.stderr)
    if args.json:
        doc = result.as_dict()
        doc["output"] = written
        doc["space"] = (result.space or space).describe()
        print_json(doc)
    else:
        print(_front_table(result))
        if written:
            print(f"best: trial {result.best.number}: {result.best.pipeline} -> {written}")
    if result.best is None:
        print("onnxcomp: no trial met the tolerance; nothing written", file=sys.stderr)
        return EXIT_VALIDATION_FAILED
    if args.output and written is None:
        return EXIT_VALIDATION_FAILED
    return 0


def _split_arrays(model, data: str, shapes, batch_size: int):
    """(calibration arrays, held-out arrays) of the data, split as the guard splits it."""
    import numpy as np

    from onnxcomp.data import LABELS_KEY, holdout_split, open_source
    from onnxcomp.errors import BadInputError
    from onnxcomp.pipeline import MIN_HELD_OUT

    source = open_source(data, model=model, input_shapes=shapes, batch_size=batch_size)
    parts = []
    for side in holdout_split(source):
        cols: dict[str, list] = {}
        for feeds, labels in side.batches():
            for k, v in feeds.items():
                cols.setdefault(k, []).append(v)
            if labels is not None:
                cols.setdefault(LABELS_KEY, []).append(labels)
        parts.append({k: np.concatenate(v) for k, v in cols.items()})
    fit, held = parts
    n_held = int(next(iter(held.values())).shape[0]) if held else 0
    if n_held < MIN_HELD_OUT or not fit:
        raise BadInputError(f"{source.description}: too few samples to search on ({n_held} held out; it needs "
                            f"{MIN_HELD_OUT}, so about {4 * MIN_HELD_OUT} samples)")
    return fit, held


def _rebuild(model, best, fit, held, job):
    """(the best trial's model made again from its pipeline, data and seed, or None; a note). When its
    bytes differ from what the trial judged (a pass whose choice depends on timing, in a YAML space),
    it is judged again on every held-out sample and written only if it passes."""
    import hashlib

    from onnxcomp.data import open_source
    from onnxcomp.model import model_bytes
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.validation import compare

    ctx = Context(data=open_source(dict(fit), model=model, input_shapes=job.input_shapes), seed=job.seed,
                  input_shapes=dict(job.input_shapes))
    out, _ = Pipeline.parse(best.pipeline).run(model, ctx)
    if hashlib.sha256(model_bytes(out)).hexdigest() == best.figures.get("model_sha256"):
        return out, None
    check = compare(model, out, open_source(dict(held), model=model, input_shapes=job.input_shapes), job.tolerance,
                    task=job.task, metric=job.user_metric())
    if not check.passed:
        return None, (f"trial {best.number} made again differs from the one judged (a timing-driven choice) and "
                      f"fails the tolerance: {check.describe()}; nothing written")
    return out, f"trial {best.number} made again differs from the one judged (a timing-driven choice); it passes the tolerance again"


def _accuracy(r) -> str:
    """A trial's headline quality figure: the user metric's score when there is one, else top-1
    accuracy (labels), top-1 agreement, or whole-sequence agreement."""
    m = r.figures.get("metric")
    if isinstance(m, dict) and isinstance(m.get("candidate"), (int, float)):
        return f"{m['candidate']:.4g}"
    acc = r.figures.get("cand_top1_acc", r.figures.get("top1_agreement", r.figures.get("sequence_agreement")))
    return f"{acc:.2f}%" if isinstance(acc, (int, float)) else "-"


def _front_table(result) -> str:
    from onnxcomp.cli.common import table

    rows = []
    for r in result.front:
        rows.append([r.number, *[f"{r.values[o]:.4f}" for o in result.objectives], _accuracy(r), r.pipeline])
    counts = {s: sum(1 for t in result.trials if t.status == s) for s in ("feasible", "infeasible", "failed")}
    head = (f"search: {len(result.trials)} trials ({counts['feasible']} feasible, {counts['infeasible']} infeasible, "
            f"{counts['failed']} failed; {result.cached} from the cache) on {result.executor}, {result.seconds:.0f} s; "
            f"judged on {result.coarse_samples} held-out samples, the front on {result.full_samples}")
    for r in result.references:
        rows.append([f"ref {r.status}", *[f"{r.values[o]:.4f}" if o in r.values else "-" for o in result.objectives],
                     _accuracy(r), r.pipeline])
    if not result.front:
        head += "\nno feasible trial"
    if not rows:
        return head
    quality = "metric" if any(isinstance(r.figures.get("metric"), dict) for r in result.front) else "accuracy"
    return head + "\n" + table(rows, ["trial", *[f"{o} ratio" for o in result.objectives], quality, "pipeline"])


class _Progress:
    """One line per finished trial on stderr: status, best so far, feasible count, ETA."""

    def __init__(self, total: int, objectives, quiet: bool):
        import time

        self.total, self.objectives, self.quiet, self.t0 = total, objectives, quiet, time.perf_counter()

    def probe(self, result) -> None:
        if self.quiet:
            return
        restored = sum(len(v) for v in result.figures.get("restored", {}).values())
        what = (result.reason if result.status == "failed" else
                "dropped by the guard" if result.figures.get("dropped") else
                f"{restored} layer(s) put back" if restored else "holds")
        print(f"probe {result.pipeline} under the guard: {result.status}, {what} ({result.seconds:.0f} s)",
              file=sys.stderr, flush=True)

    def __call__(self, result, done) -> None:
        import time

        if self.quiet:
            return
        feasible = [t for t in done if t.status == "feasible"]
        first = self.objectives[0]
        best = min((t.values[first] for t in feasible), default=None)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / len(done) * (self.total - len(done))
        vals = " ".join(f"{o} {result.values[o]:.3f}" for o in self.objectives if o in result.values)
        best_text = f"{best:.3f}" if best is not None else "-"
        print(f"trial {len(done)}/{self.total} #{result.number} {result.status} {vals} | best {first} {best_text}, "
              f"{len(feasible)} feasible, ETA {eta:.0f} s", file=sys.stderr, flush=True)
