"""The search loop: ask a batch of trials, run the ones not cached, tell them, until the trial count
or the time budget is spent; then re-validate the Pareto front on every held-out sample (coarse to
fine) and pick the best feasible model.

Trial results are cached on disk by content (the job's digest: model, data, tolerance, objectives,
seed; plus the pipeline and the number of samples judged on), so an interrupted search, run again,
repeats no finished trial: it asks the same trials (same seed, same order) and finds them cached.
Failed trials are not cached (a dead worker or a full memory says nothing about the pipeline).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxcomp.search.space import Space
from onnxcomp.search.strategy import Strategy, pareto_front
from onnxcomp.search.trial import FAILED, FEASIBLE, Job, TrialResult


class TrialCache:
    """One JSON file per finished trial under `root/<job digest>/`, written atomically."""

    def __init__(self, root: Path, job_digest: str):
        self.dir = root / job_digest[:24]
        self.hits = 0

    def _path(self, pipeline: str, held_samples: int | None) -> Path:
        key = hashlib.sha256(f"{pipeline}\n{held_samples}".encode()).hexdigest()[:32]
        return self.dir / f"{key}.json"

    def get(self, number: int, pipeline: str, held_samples: int | None) -> TrialResult | None:
        p = self._path(pipeline, held_samples)
        try:
            r = TrialResult.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        self.hits += 1
        r.number = number
        return r

    def put(self, result: TrialResult, held_samples: int | None) -> None:
        from onnxcomp.errors import OnnxcompError
        from onnxcomp.model import save_text

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_text(self._path(result.pipeline, held_samples), json.dumps(result.as_dict(), sort_keys=True))
        except (OSError, OnnxcompError):
            pass  # an unwritable cache only costs a resumed search its time


@dataclass
class SearchResult:
    trials: list[TrialResult]
    front: list[TrialResult]  # re-validated on every held-out sample
    best: TrialResult | None
    objectives: tuple[str, ...]
    executor: str
    seconds: float
    cached: int
    coarse_samples: int
    full_samples: int
    notes: list[str] = field(default_factory=list)
    references: list[TrialResult] = field(default_factory=list)  # e.g. int8: judged on every held-out sample

    def as_dict(self) -> dict:
        return {"objectives": list(self.objectives), "executor": self.executor, "seconds": round(self.seconds, 2),
                "cached_trials": self.cached, "coarse_samples": self.coarse_samples, "full_samples": self.full_samples,
                "trials": [t.as_dict() for t in self.trials], "front": [t.as_dict() for t in self.front],
                "best": self.best.as_dict() if self.best else None, "notes": self.notes,
                "references": [r.as_dict() for r in self.references]}


def run_search(job: Job, space: Space, executor, *, trials: int, batch: int = 4, time_budget: float | None = None,
               coarse_samples: int | None = None, cache: TrialCache | None = None,
               on_trial: Callable[[TrialResult, list[TrialResult]], None] | None = None,
               references: Sequence[str] = ()) -> SearchResult:
    """Run the search (see the module docstring). `coarse_samples`: held-out samples each trial is
    judged on first (None: all); the front is then re-judged on all of them. `time_budget` bounds the
    whole search, front re-check included (estimated from the slowest batch's wall time); how many
    trials fit is then the machine's call, so only a search without a budget repeats exactly. `references`:
    pipelines judged on every held-out sample beside the search (e.g. "int8", what a user would try
    instead), numbered -1, -2, ..."""
    t0 = time.perf_counter()
    strategy = Strategy(space, job.objectives, seed=job.seed)
    full = int(next(iter(job.held.values())).shape[0])
    coarse = None if coarse_samples is None or coarse_samples >= full else int(coarse_samples)
    done: list[TrialResult] = []
    notes: list[str] = []
    walls: list[float] = []  # each batch's wall time, as the driver saw it
    while len(done) < trials:
        count = min(batch, trials - len(done))
        if time_budget is not None and walls:
            # the whole search keeps to the budget: a batch is asked only if the slowest batch so
            # far, and as long again for re-judging the front and the references, still fit
            slowest = max(walls)
            if time.perf_counter() - t0 + 2 * slowest > time_budget:
                notes.append(f"time budget of {time_budget:g} s: stopped asking after {len(done)} trials "
                             f"(slowest batch {slowest:.0f} s)")
                break
        asked = strategy.ask(count)
        t_batch = time.perf_counter()
        results = _run_cached(executor, [(n, p) for n, _, p in asked], coarse, cache)
        walls.append(time.perf_counter() - t_batch)
        strategy.tell(results)
        for r in results:
            done.append(r)
            if on_trial is not None:
                on_trial(r, done)
    # coarse to fine: the front's members judged again on every held-out sample, until the front
    # holds only members that passed there (one that fails can uncover others it dominated)
    front = pareto_front(done, job.objectives)
    refined: set[int] = set()
    while coarse is not None and any(r.number not in refined for r in front):
        todo = [r for r in front if r.number not in refined]
        fine = {f.number: f for f in _run_cached(executor, [(r.number, r.pipeline) for r in todo], None, cache)}
        for r in todo:
            f = fine[r.number]
            refined.add(r.number)
            r.figures["coarse"] = {"status": r.status, "samples": r.samples}
            if f.status != FEASIBLE:
                r.status = f.status
                r.reason = f"on all {full} held-out samples: {f.reason}"
            r.figures.update(f.figures)
            r.samples = f.samples
        front = pareto_front(done, job.objectives)
    best = front[0] if front else None
    refs = _run_cached(executor, [(-1 - k, p) for k, p in enumerate(references)], None, cache) if references else []
    cached = cache.hits if cache is not None else 0
    return SearchResult(done, front, best, job.objectives, executor.name, time.perf_counter() - t0, cached,
                        coarse if coarse is not None else full, full, notes, list(refs))


def _run_cached(executor, trials: Sequence[tuple[int, str]], held: int | None, cache: TrialCache | None
                ) -> list[TrialResult]:
    out: dict[int, TrialResult] = {}
    todo = []
    for n, p in trials:
        hit = cache.get(n, p, held) if cache is not None else None
        if hit is not None:
            out[n] = hit
        else:
            todo.append((n, p))
    if todo:
        # each result is cached as soon as it is back: an interrupt loses only the unfinished trials.
        # Failed ones are not: a dead worker or a full memory says nothing about the pipeline.
        def keep(r: TrialResult) -> None:
            if cache is not None and r.status != FAILED:
                cache.put(r, held)

        for r in executor.run(todo, held, on_result=keep if cache is not None else None):
            out[r.number] = r
    return [out[n] for n, _ in trials]
