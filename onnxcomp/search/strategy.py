"""The search strategy: Optuna's samplers through its ask/tell interface.

One objective: TPE; two: NSGA-II (a Pareto front). Both with a constraint (a trial that breaks the
tolerance is infeasible: recorded with its figures, and the sampler steers away from it) and seeded.
Trials are asked in batches of a fixed size and told in trial order once the whole batch is back, so
the same seed gives the same trials whichever executor ran them, and in whatever order they finished.
Warm start: the first trials are enqueued, not sampled (`warm_start`: from the driver's probes, each
pass at its strongest setting with the layers the guard found fragile left out; without probes, the
mildest settings), so the first batch already holds feasible points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from typing import Any

from onnxcomp.search.space import Domain, PassSpace, Space
from onnxcomp.search.trial import FAILED, FEASIBLE, TrialResult


class Strategy:
    def __init__(self, space: Space, objectives: Sequence[str], seed: int = 0, strong: Collection[str] | None = None):
        """`strong`: the passes the warm start's probes found usable at their strongest setting
        (see `warm_start`); None: no probes ran."""
        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        self.space = space
        self.objectives = tuple(objectives)

        # Optuna 5 takes constraints per trial (Trial.set_constraint); older ones through constraints_func.
        self._per_trial_constraints = hasattr(optuna.trial.Trial, "set_constraint")

        def constraints(trial: Any) -> Sequence[float]:
            return trial.user_attrs.get("constraint", (1.0,))

        extra = {} if self._per_trial_constraints else {"constraints_func": constraints}
        if len(self.objectives) == 1:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, **extra)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=8, **extra)
        self.study = optuna.create_study(directions=["minimize"] * len(self.objectives), sampler=sampler)
        self._pending: dict[int, Any] = {}
        for params in warm_start(space, strong):
            self.study.enqueue_trial(params, skip_if_exists=True)

    def ask(self, count: int) -> list[tuple[int, dict[str, Any], str]]:
        """`count` new trials: (number, params, pipeline string)."""
        out = []
        for _ in range(count):
            trial = self.study.ask()
            params = self._suggest(trial)
            self._pending[trial.number] = trial
            out.append((trial.number, params, self.space.pipeline(params)))
        return out

    def tell(self, results: Sequence[TrialResult]) -> None:
        """Report finished trials, in trial-number order (determinism)."""
        import optuna

        for r in sorted(results, key=lambda r: r.number):
            trial = self._pending.pop(r.number)
            if r.status == FAILED:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            violation = 0.0 if r.status == FEASIBLE else 1.0
            if self._per_trial_constraints:
                trial.set_constraint("tolerance", violation)
            else:
                trial.set_user_attr("constraint", (violation,))
            self.study.tell(trial, [float(r.values[o]) for o in self.objectives])

    def _suggest(self, trial: Any) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for p in self.space.passes:
            if not p.required:
                params[p.use_key] = trial.suggest_categorical(p.use_key, [True, False])
                if not params[p.use_key]:
                    continue
            for opt, dom in p.domains.items():
                params[p.key(opt)] = _suggest(trial, p.key(opt), dom)
        return params


def _suggest(trial: Any, key: str, dom: Domain) -> Any:
    if dom.choices:
        return trial.suggest_categorical(key, list(dom.choices))
    if dom.integer:
        return trial.suggest_int(key, int(dom.low), int(dom.high), step=int(dom.step or 1), log=dom.log)
    return trial.suggest_float(key, float(dom.low), float(dom.high), step=dom.step, log=dom.log and not dom.step)


def warm_start(space: Space, strong: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The enqueued first trials.

    Without probes (`strong` None): each optional pass alone at its mildest setting (the first choice
    or the low end: the least compression), then every pass together at its mildest settings.

    With the warm start's probes (onnxcomp.search.driver.probe_passes): `strong` names the passes
    that held the tolerance alone at their strongest setting, once the guard had put back their
    fragile layers (which the space then offers as an `exclude` choice). Each of those is tried
    alone at its strongest setting with those layers left out, the others alone at their mildest;
    then every pass together at its mildest, and together with the strong ones at their strongest.
    Fragile layers stay out of every warm-start trial."""
    probed = strong is not None

    def values(p: PassSpace, at_strongest: bool) -> dict[str, Any]:
        out = {}
        for o, d in p.domains.items():
            if o == "exclude" and probed:
                out[p.key(o)] = d.strongest()  # the probe's fragile layers left out
            else:
                out[p.key(o)] = d.strongest() if at_strongest else d.mildest()
        return out

    def trial(use: Collection[str], strongest: Collection[str]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for q in space.passes:
            if not q.required:
                params[q.use_key] = q.name in use
                if q.name not in use:
                    continue
            params.update(values(q, q.name in strongest))
        return params

    optional = [p.name for p in space.passes if not p.required]
    strong = set() if strong is None else set(strong)
    out = []
    required_strong = {p.name for p in space.passes if p.required and p.name in strong}
    if required_strong:  # the passes every trial has, at their strongest, the optional ones off
        out.append(trial((), required_strong))
    out += [trial({name}, {name} & strong) for name in optional]
    out.append(trial(optional, ()))
    if strong:
        out.append(trial([n for n in optional if n in strong], strong))
    seen, unique = set(), []
    for params in out:
        key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            unique.append(params)
    return unique


def pareto_front(results: Sequence[TrialResult], objectives: Sequence[str]) -> list[TrialResult]:
    """The feasible trials no other feasible trial beats on every objective, by the first objective."""
    feas = [r for r in results if r.status == FEASIBLE and all(math.isfinite(r.values.get(o, math.inf))
                                                              for o in objectives)]

    def dominates(a: TrialResult, b: TrialResult) -> bool:
        le = all(a.values[o] <= b.values[o] for o in objectives)
        return le and any(a.values[o] < b.values[o] for o in objectives)

    front = [r for r in feas if not any(dominates(o, r) for o in feas if o is not r)]
    unique: dict[tuple, TrialResult] = {}
    for r in sorted(front, key=lambda r: (tuple(r.values[o] for o in objectives), r.number)):
        unique.setdefault(tuple(r.values[o] for o in objectives), r)
    return list(unique.values())
