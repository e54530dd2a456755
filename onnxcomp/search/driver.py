"""The search loop: probe each pass alone under the guard (the warm start's sensitivity analysis),
then ask a batch of trials, run the ones not cached, tell them, until the trial count
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
import math
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

    def _path(self, pipeline: str, held_samples: int | None, guarded: bool = False) -> Path:
        text = f"{pipeline}\n{held_samples}" + ("\nguarded" if guarded else "")
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        return self.dir / f"{key}.json"

    def get(self, number: int, pipeline: str, held_samples: int | None, guarded: bool = False) -> TrialResult | None:
        p = self._path(pipeline, held_samples, guarded)
        try:
            r = TrialResult.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        self.hits += 1
        r.number = number
        return r

    def put(self, result: TrialResult, held_samples: int | None, guarded: bool = False) -> None:
        from onnxcomp.errors import OnnxcompError
        from onnxcomp.model import save_text

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_text(self._path(result.pipeline, held_samples, guarded), json.dumps(result.as_dict(), sort_keys=True))
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
    probes: list[TrialResult] = field(default_factory=list)  # the warm start's: each pass alone, guarded
    space: Space | None = None  # the space searched (with the probes' exclude choices)

    def as_dict(self) -> dict:
        return {"objectives": list(self.objectives), "executor": self.executor, "seconds": round(self.seconds, 2),
                "cached_trials": self.cached, "coarse_samples": self.coarse_samples, "full_samples": self.full_samples,
                "trials": [t.as_dict() for t in self.trials], "front": [t.as_dict() for t in self.front],
                "best": self.best.as_dict() if self.best else None, "notes": self.notes,
                "references": [r.as_dict() for r in self.references],
                "probes": [r.as_dict() for r in self.probes],
                "space": self.space.describe() if self.space is not None else None}


PROBE_BASE = -1000  # probes are numbered -1001, -1002, ... (references -1, -2, ...; trials 0, 1, ...)


@dataclass
class Probes:
    """What the warm start's probes found: the space with each fragile layer set offered as an
    `exclude` choice, the passes usable at their strongest setting, the probes' results, notes."""

    space: Space
    strong: list[str]
    results: list[TrialResult]
    notes: list[str]


def probe_passes(job: Job, space: Space, executor, held_samples: int | None, cache: TrialCache | None = None,
                 on_probe: Callable[[TrialResult], None] | None = None) -> Probes:
    """The warm start's sensitivity analysis: every pass of the space with something to search runs
    alone at its strongest setting under the guard, on the trials' held-out samples, in one batch on
    the executor. Where it breaks the tolerance the guard measures each rewritten layer's cost and
    bisects for the fewest layers to put back (onnxcomp.guard); those layers are the pass's fragile
    ones. A pass that held with some of its layers still rewritten is `strong`; one the guard had to
    drop or put back whole, or that failed, is not (leaving layers out cannot save its strongest
    setting; its trials start mild and TPE explores from there)."""
    todo = [p for p in space.passes if p.domains or not p.required]
    pipes = [(PROBE_BASE - 1 - k, space.alone_at_strongest(p)) for k, p in enumerate(todo)]
    results = _run_cached(executor, pipes, held_samples, cache, guarded=True)
    excluded: dict[str, list[str]] = {}
    strong: list[str] = []
    notes: list[str] = []
    for p, r in zip(todo, results, strict=True):
        if on_probe is not None:
            on_probe(r)
        restored = r.figures.get("restored", {}).get(p.name, [])
        if r.status == FAILED:
            notes.append(f"warm start: {r.pipeline} failed alone ({r.reason}); its trials start mild")
        elif p.name in r.figures.get("dropped", []) or r.status != FEASIBLE:
            notes.append(f"warm start: {r.pipeline} breaks the tolerance alone even with every layer put back; "
                         "its trials start mild")
        elif restored and not r.figures.get("rewritten", {}).get(p.name):
            notes.append(f"warm start: {r.pipeline} holds alone only with every layer it rewrites put back "
                         f"({len(restored)}); its trials start mild")
        else:
            strong.append(p.name)
            if restored:
                excluded[p.name] = sorted(restored)
                notes.append(f"warm start: {r.pipeline} holds alone with {len(restored)} fragile layer(s) left out "
                             f"({', '.join(sorted(restored)[:6])}{', ...' if len(restored) > 6 else ''})")
            else:
                notes.append(f"warm start: {r.pipeline} holds alone at its strongest setting")
    return Probes(space.with_exclusions(excluded), strong, results, notes)


def run_search(job: Job, space: Space, executor, *, trials: int, batch: int = 4, time_budget: float | None = None,
               coarse_samples: int | None = None, cache: TrialCache | None = None,
               on_trial: Callable[[TrialResult, list[TrialResult]], None] | None = None,
               references: Sequence[str] = (), probe: bool = True,
               on_probe: Callable[[TrialResult], None] | None = None) -> SearchResult:
    """Run the search (see the module docstring). `coarse_samples`: held-out samples each trial is
    judged on first (None: all); the front is then re-judged on all of them. `time_budget` bounds the
    whole search, front re-check included (estimated from the slowest batch's wall time); how many
    trials fit is then the machine's call, so only a search without a budget repeats exactly. `references`:
    pipelines judged on every held-out sample beside the search (e.g. "int8", what a user would try
    instead), numbered -1, -2, ... `probe`: warm-start from `probe_passes` (its time counts in the
    budget); otherwise from the mildest settings."""
    t0 = time.perf_counter()
    full = int(next(iter(job.held.values())).shape[0])
    coarse = None if coarse_samples is None or coarse_samples >= full else int(coarse_samples)
    done: list[TrialResult] = []
    notes: list[str] = []
    probes = probe_passes(job, space, executor, coarse, cache, on_probe) if probe else None
    if probes is not None:
        space = probes.space
        notes += probes.notes
    strategy = Strategy(space, job.objectives, seed=job.seed, strong=probes.strong if probes is not None else None)
    walls: list[float] = []  # each batch's wall time, as the driver saw it
    refine_walls: list[float] = [0.0]  # each re-judging round's (under a budget, one per batch)
    width = max(1, int(getattr(executor, "workers", 1)))
    refined: set[int] = set()
    while len(done) < trials:
        count = min(batch, trials - len(done))
        if time_budget is not None and walls:
            # the whole search keeps to the budget: a batch is asked only if the slowest batch so
            # far, its re-judging round, and one more round for the front's last members and the
            # references still fit (without re-judging rounds to go by, as long again as a batch)
            slowest = max(walls)
            reserve = 2 * max(refine_walls) if coarse is not None else slowest
            if time.perf_counter() - t0 + slowest + reserve > time_budget:
                notes.append(f"time budget of {time_budget:g} s: stopped asking after {len(done)} trials "
                             f"(slowest batch {slowest:.0f} s)")
                break
        asked = strategy.ask(count)
        t_batch = time.perf_counter()
        results = _run_cached(executor, [(n, p) for n, _, p in asked], coarse, cache)
        strategy.tell(results)
        for r in results:
            done.append(r)
            if on_trial is not None:
                on_trial(r, done)
        if time_budget is not None and coarse is not None:
            # Under a budget the front is re-judged as the search goes (one round per batch), so
            # that when time runs out a re-judged trial is at hand: on glyph_resnet most trials
            # that held on the coarse subset failed on every sample, and re-judging them all at
            # the end overran a 540 s budget by 266 s.
            t_round = time.perf_counter()
            _refine_round(job, done, refined, executor, width, full, cache)
            refine_walls.append(time.perf_counter() - t_round)
        walls.append(t_round - t_batch if time_budget is not None and coarse is not None
                     else time.perf_counter() - t_batch)
    # coarse to fine: the front's members judged again on every held-out sample, until the front
    # holds only members that passed there (one that fails can uncover others it dominated). Each
    # round fills the executor's width with the next-best feasible trials by the first objective
    # (the ones a failure would uncover), so a one-objective front, a single trial, does not cost
    # a round per candidate. Past the time budget, only trials already re-judged can be the front,
    # unless none of them held: then re-judging goes on until one does (or none is left), since a
    # search that found feasible trials and writes nothing is worth less than a late answer.
    front = pareto_front(done, job.objectives)
    overrun = False
    while coarse is not None and any(r.number not in refined for r in front):
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            settled = pareto_front([r for r in done if r.number in refined], job.objectives)
            if settled:
                front = settled
                notes.append(f"time budget of {time_budget:g} s: the front holds only the {len(refined)} trial(s) "
                             f"re-judged on all {full} held-out samples")
                break
            if not overrun:
                overrun = True
                notes.append(f"time budget of {time_budget:g} s exceeded: none of the {len(refined)} trial(s) "
                             f"re-judged so far held on all {full} held-out samples, so re-judging went on")
        _refine_round(job, done, refined, executor, width, full, cache)
        front = pareto_front(done, job.objectives)
    best = front[0] if front else None
    refs = _run_cached(executor, [(-1 - k, p) for k, p in enumerate(references)], None, cache) if references else []
    cached = cache.hits if cache is not None else 0
    return SearchResult(done, front, best, job.objectives, executor.name, time.perf_counter() - t0, cached,
                        coarse if coarse is not None else full, full, notes, list(refs),
                        probes.results if probes is not None else [], space)


def _refine_round(job: Job, done: list[TrialResult], refined: set[int], executor, width: int, full: int,
                  cache: TrialCache | None) -> None:
    """Re-judge on every held-out sample the front's members not yet re-judged, plus the next-best
    feasible trials by the first objective up to the executor's width; a trial that fails there
    takes that status (its coarse verdict kept in its figures). Adds the trials to `refined`."""
    first = job.objectives[0]
    todo = [r for r in pareto_front(done, job.objectives) if r.number not in refined]
    if not todo:
        return
    queued = {r.number for r in todo}
    nxt = sorted((r for r in done if r.status == FEASIBLE and r.number not in refined | queued
                  and math.isfinite(r.values.get(first, math.inf))), key=lambda r: (r.values[first], r.number))
    todo += nxt[:max(0, width - len(todo))]
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


def _run_cached(executor, trials: Sequence[tuple[int, str]], held: int | None, cache: TrialCache | None,
                guarded: bool = False) -> list[TrialResult]:
    out: dict[int, TrialResult] = {}
    todo = []
    for n, p in trials:
        hit = cache.get(n, p, held, guarded) if cache is not None else None
        if hit is not None:
            out[n] = hit
        else:
            todo.append((n, p))
    if todo:
        # each result is cached as soon as it is back: an interrupt loses only the unfinished trials.
        # Failed ones are not: a dead worker or a full memory says nothing about the pipeline.
        def keep(r: TrialResult) -> None:
            if cache is not None and r.status != FAILED:
                cache.put(r, held, guarded)

        kwargs = {"guarded": True} if guarded else {}
        for r in executor.run(todo, held, on_result=keep if cache is not None else None, **kwargs):
            out[r.number] = r
    return [out[n] for n, _ in trials]
