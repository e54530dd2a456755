"""The guard: after every pass that changed the model, check it against the *input* model on
held-out samples, and repair a pass that broke the tolerance by putting back its costliest layers.

Repair, for a pass that fails:
1. measure each rewritten layer's cost: its output's relative L2 error against the pass's input
   model minus the largest error among the rewritten layers upstream of it (the error it adds, not
   the error it inherits), in one run with every layer output captured;
2. bisect over "restore the m costliest layers" (the pass re-run with those layers excluded), for the
   smallest m whose model passes: log2(k) + 1 re-runs for k rewritten layers, not k;
3. when even restoring every layer fails (the pass changed something that is not a layer), drop the
   pass: the model stays as it was before it.
Every layer put back is reported with its measured cost. The pass is re-run rather than edited, so a
pass whose choices depend on each other (a MAC budget spread over layers) stays consistent.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxcomp.passes.base import REWRITTEN, Context, Pass, PassResult
from onnxcomp.tolerance import AnyTolerance


@dataclass
class LayerCost:
    """A rewritten layer's measured cost: the relative L2 error it adds at its output."""

    node: str
    cost: float | None  # None: the layer's output could not be captured (ranked last)
    rel_err: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "cost": self.cost, "rel_err": self.rel_err}


@dataclass
class Repair:
    """What the guard did to one failing pass."""

    failed: dict[str, Any]  # the first check's figures
    restored: list[LayerCost] = field(default_factory=list)
    dropped: bool = False
    probes: int = 0
    seconds: float = 0.0
    latency_ratio: float | None = None  # set when the pass was dropped for being too slow

    def as_dict(self) -> dict[str, Any]:
        out = {"failed": self.failed, "restored": [c.as_dict() for c in self.restored], "dropped": self.dropped,
               "probes": self.probes, "seconds": round(self.seconds, 3)}
        if self.latency_ratio is not None:
            out["latency_ratio"] = round(self.latency_ratio, 4)
        return out


class Guard:
    """Checks candidates against one reference model on one data source.

    `source` is the held-out data (or random data when there is none and the user asked for checks);
    `on_fail` is "repair" or "stop"; `max_restore` caps how many layers one pass may get back (None:
    no cap); `task` and `metric` go to onnxcomp.validation.compare. The reference's outputs are
    computed once and reused by every check.
    """

    def __init__(self, reference: onnx.ModelProto, source: Any, tolerance: AnyTolerance | None, *,
                 on_fail: str = "repair", max_restore: int | None = None, task: Any = None, metric: Any = None,
                 threads: int | None = None, max_latency_ratio: float | None = None, cost_model: Any = None):
        if on_fail not in ("repair", "stop"):
            raise ValueError(f"on_fail must be 'repair' or 'stop', got {on_fail!r}")
        self.reference = reference
        self.source = source
        self.tolerance = tolerance
        self.on_fail = on_fail
        self.max_restore = max_restore
        self.task = task
        self.metric = metric
        self.threads = threads
        if max_latency_ratio is not None and not (max_latency_ratio > 0 and max_latency_ratio < float("inf")):
            from onnxcomp.errors import BadInputError

            raise BadInputError(f"max latency ratio {max_latency_ratio!r}: expected a positive number")
        self.max_latency_ratio = max_latency_ratio
        self.cost_model = cost_model  # onnxcomp.costmodel.CostModel: the passes' settings (made on first use)
        self.seconds = 0.0  # time spent checking and repairing
        self._ref_cache: dict = {}

    def preflight(self) -> Any:
        """Check the reference against itself before any pass runs: a tolerance or metric the data
        cannot check, or a task that does not fit an output, is a BadInputError now, not after an
        hour of passes. Returns the Check (its summary holds the inferred output kinds)."""
        return self.check(self.reference)

    def check(self, candidate: onnx.ModelProto, layers: Any = None, against: onnx.ModelProto | None = None) -> Any:
        """validation.compare of `candidate` against the reference (or `against`) on the guard's data."""
        from onnxcomp import validation

        t0 = time.perf_counter()
        ref = self.reference if against is None else against
        try:
            return validation.compare(ref, candidate, self.source, self.tolerance if against is None else None,
                                      layers=layers, threads=self.threads, task=self.task,
                                      metric=self.metric if against is None else None,
                                      ref_cache=self._ref_cache if against is None and not layers else None)
        finally:
            self.seconds += time.perf_counter() - t0

    def latency_ratio(self, candidate: onnx.ModelProto) -> float:
        """The candidate's onnxruntime p50 latency over the reference's, batch 1 (or the batch the
        model fixes), interleaved runs in one process, timed by the cost model with the settings the
        passes measured their layers with (onnxcomp.costmodel.CostModel.time_models)."""
        from onnxcomp.costmodel import CostModel, Settings
        from onnxcomp.validation import _fixed_batch

        t0 = time.perf_counter()
        try:
            if self.cost_model is None:
                self.cost_model = CostModel(Settings(threads=self.threads or 2))
            feeds = self.source.first_batch()[0]
            if _fixed_batch(self.reference) is None:
                feeds = {k: v[:1] for k, v in feeds.items()}
            ref, cand = self.cost_model.time_models([self.reference, candidate], feeds, target_ms=600.0)
            return cand.ms / ref.ms
        finally:
            self.seconds += time.perf_counter() - t0

    def layer_costs(self, pass_input: onnx.ModelProto, result: PassResult) -> list[LayerCost]:
        """Every rewritten layer of `result`, costliest first (see the module docstring)."""
        check = self.check(result.model, layers=result.layers, against=pass_input)
        costs = {c.node: c for c in measured_costs(check, pass_input)}
        ranked = sorted(costs.values(), key=lambda c: (-(c.cost or 0.0), -(c.rel_err or 0.0), c.node))
        unmeasured = [LayerCost(r.node, None, None) for r in result.layers
                      if r.action == REWRITTEN and r.node not in costs]
        return ranked + unmeasured

    def repair(self, p: Pass, pass_input: onnx.ModelProto, ctx: Context, result: PassResult,
               failed: Any) -> tuple[Pass, PassResult, Any, Repair]:
        """(pass as re-configured, its result, the passing check, the repair record). The result is
        `None` when the pass had to be dropped; ValidationFailed is the caller's to raise when the
        repair hit `max_restore` without passing (the returned check then fails)."""
        t0 = time.perf_counter()
        rep = Repair(failed=failed.as_dict())
        ranked = self.layer_costs(pass_input, result)
        limit = len(ranked) if self.max_restore is None else min(len(ranked), self.max_restore)
        probes: dict[int, tuple[Pass, PassResult, Any]] = {}

        def probe(m: int) -> tuple[Pass, PassResult, Any]:
            if m not in probes:
                q = with_excluded(p, [c.node for c in ranked[:m]])
                r = q.run(pass_input, ctx)
                probes[m] = (q, r, self.check(r.model))
                rep.probes += 1
            return probes[m]

        # bisection for the fewest restored layers: lo fails (0: the pass as run), hi passes (assumed
        # for `limit`, verified below)
        lo, hi = 0, limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid)[2].passed:
                hi = mid
            else:
                lo = mid
        q, r, check = probe(hi) if hi > 0 else (p, result, failed)
        if not check.passed and hi == len(ranked):
            rep.dropped = True  # nothing of the pass can stay: the verdict is the pass input's
            rep.restored = list(ranked)
            q, r, check = p, None, self.check(pass_input)
        else:
            rep.restored = list(ranked[:hi])
        rep.seconds = time.perf_counter() - t0
        return q, r, check, rep


def measured_costs(check: Any, ref: onnx.ModelProto) -> list[LayerCost]:
    """Per captured layer of `check`: relative error at its output minus the largest relative error
    among the captured layers upstream of it in `ref` (the model the check compared against)."""
    errs = {lc.output: lc for lc in getattr(check, "layers", []) if lc.rel_err == lc.rel_err}
    producer = {o: n for n in ref.graph.node for o in n.output if o}

    def upstream(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = list(producer[tensor].input) if tensor in producer else []
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in producer:
                stack.extend(producer[t].input)
        return seen

    out = []
    for lc in errs.values():
        inherited = max((errs[t].rel_err for t in upstream(lc.output) if t in errs), default=0.0)
        out.append(LayerCost(lc.node, lc.rel_err - inherited, lc.rel_err))
    return out


def exclude_regex(exclude: str | None, names: list[str]) -> str | None:
    """`exclude` (a regex or None) widened to also match each of `names` exactly."""
    if not names:
        return exclude
    extra = "|".join(f"^{re.escape(n)}$" for n in names)
    return f"(?:{exclude})|{extra}" if exclude else extra


def with_excluded(p: Pass, names: list[str]) -> Pass:
    """A copy of pass `p` whose exclude regex also matches the given node names exactly."""
    if not names:
        return p
    return type(p)(dataclasses.replace(p.config, exclude=exclude_regex(p.config.exclude, names)))
