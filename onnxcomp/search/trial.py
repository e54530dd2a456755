"""One trial: run a pipeline on the model (calibrated on the calibration samples), judge the result
on held-out samples against the tolerance, and measure the objectives. Pure function of its inputs,
so any executor (a local process, a Ray task) gives the same result; what a trial needs from the
driver is a `Job` (model bytes, data arrays, settings), shipped once per worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OBJECTIVES = ("lzma", "file", "macs", "latency")
FEASIBLE, INFEASIBLE, FAILED = "feasible", "infeasible", "failed"
_METRICS: dict[tuple, Any] = {}  # loaded user metrics, per worker process


@dataclass
class Job:
    """Everything a worker needs, independent of the trial: the input model's bytes, calibration and
    held-out arrays (inputs by name, optional labels), the tolerance, objectives and seed."""

    model: bytes
    fit: dict[str, np.ndarray]
    held: dict[str, np.ndarray]
    tolerance: Any
    objectives: tuple[str, ...]
    seed: int = 0
    task: Any = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    latency_threads: int = 1
    # --metric: its spec (module:function or file.py:function), the file's source when it is a file
    # (shipped with the job, so a Ray node needs no copy of it), and its bound
    metric: str | None = None
    metric_source: str | None = None
    max_metric_drop: float | None = None

    def user_metric(self) -> Any:
        """The job's UserMetric (loaded once per process), or None."""
        if self.metric is None:
            return None
        key = (self.metric, self.metric_source, self.max_metric_drop)
        if key not in _METRICS:
            from onnxcomp.metrics import UserMetric

            _METRICS[key] = UserMetric(self.metric, max_drop=self.max_metric_drop, source=self.metric_source)
        return _METRICS[key]

    def digest(self) -> str:
        """Content hash of the job (model, data, tolerance, objectives, seed): part of every trial's
        cache key, so a cached result is only reused for exactly this search."""
        h = hashlib.sha256(self.model)
        for part in (self.fit, self.held):
            for k in sorted(part):
                a = np.ascontiguousarray(part[k])
                h.update(f"{k}:{a.dtype}:{a.shape}".encode())
                h.update(a.tobytes())
        tol = self.tolerance.as_dict() if self.tolerance is not None else None
        from onnxcomp import __version__

        h.update(json.dumps({"version": __version__, "tol": tol, "obj": list(self.objectives), "seed": self.seed,
                             "task": self.task,
                             "shapes": self.input_shapes, "threads": self.latency_threads,
                             "metric": [self.metric, self.metric_source, self.max_metric_drop]},
                            sort_keys=True, default=str).encode())
        return h.hexdigest()


@dataclass
class TrialResult:
    """A trial's outcome: `status` feasible | infeasible (ran, broke the tolerance) | failed (crashed),
    the objective values (smaller is better), the check's summary figures, seconds, and why."""

    number: int
    pipeline: str
    status: str
    values: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""
    samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        from onnxcomp.passes.base import _jsonable

        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        return cls(**{k: d[k] for k in ("number", "pipeline", "status", "values", "figures", "seconds", "reason",
                                        "samples") if k in d})


def subset(arrays: dict[str, np.ndarray], n: int | None) -> dict[str, np.ndarray]:
    """The first `n` samples of every array (all when n is None)."""
    return {k: v if n is None else v[:n] for k, v in arrays.items()}


def run_trial(job: Job, number: int, pipeline: str, held_samples: int | None = None, *,
              guarded: bool = False) -> TrialResult:
    """Run one trial; never raises for a pipeline that fails (status failed, with the reason). The
    output model's SHA-256 is in `figures["model_sha256"]`, so the driver can make it again and check.

    `guarded`: run the pipeline under the guard on the same held-out samples (onnxcomp.guard: a pass
    that breaks the tolerance gets its costliest layers put back); `figures["restored"]` then lists,
    per pass, the layers it put back, `figures["rewritten"]` how many stayed rewritten, and
    `figures["dropped"]` the passes it dropped whole. The
    search's warm start uses this as its sensitivity analysis."""
    import onnx

    from onnxcomp.data import open_source
    from onnxcomp.errors import first_line
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.validation import compare

    t0 = time.perf_counter()
    model = onnx.load_from_string(job.model)
    held = subset(job.held, held_samples)
    samples = int(next(iter(held.values())).shape[0])
    restored: dict[str, list[str]] = {}
    rewritten: dict[str, int] = {}
    dropped: list[str] = []
    try:
        fit_source = open_source(dict(job.fit), model=model, input_shapes=job.input_shapes)
        held_source = open_source(dict(held), model=model, input_shapes=job.input_shapes)
        from onnxcomp.costmodel import CostModel

        # a private, uncached cost model: timings taken beside other trials must not reach the
        # machine's latency cache, which later `optimize` runs trust
        ctx = Context(data=fit_source, seed=job.seed, input_shapes=dict(job.input_shapes),
                      cost_model=CostModel(cache=False, target_ms=60.0))
        metric = job.user_metric()
        guard = None
        if guarded:
            from onnxcomp.guard import Guard

            guard = Guard(model, held_source, job.tolerance, on_fail="repair", task=job.task, metric=metric)
        out, report = Pipeline.parse(pipeline).run(model, ctx, guard=guard)
        for p in report.passes if guarded else []:
            if p.guard and p.guard.get("dropped"):
                dropped.append(p.name)
            elif p.rolled_back:
                restored[p.name] = list(p.rolled_back)
            rewritten[p.name] = p.rewritten
        check = compare(model, out, held_source, job.tolerance, task=job.task, metric=metric)
    except Exception as exc:  # a trial that crashes is a result (failed), not the end of the search
        return TrialResult(number, pipeline, FAILED, seconds=time.perf_counter() - t0,
                           reason=f"{type(exc).__name__}: {first_line(exc, 200)}", samples=samples)
    from onnxcomp.model import model_bytes

    values = objective_values(model, out, job)
    status = FEASIBLE if check.passed else INFEASIBLE
    figures = _figures(check.summary())
    figures["model_sha256"] = hashlib.sha256(model_bytes(out)).hexdigest()
    if guarded:
        figures["restored"], figures["dropped"], figures["rewritten"] = restored, dropped, rewritten
    return TrialResult(number, pipeline, status, values, figures, time.perf_counter() - t0,
                       "" if check.passed else check.describe(), samples)


def objective_values(model, out, job: Job) -> dict[str, float]:
    """Each objective as a ratio to the input model (smaller is better): lzma bytes, file bytes,
    MACs, and measured latency (p50 interleaved with the input, `latency_threads` threads)."""
    from onnxcomp.analysis import total_macs
    from onnxcomp.sizes import lzma_bytes, serialized_bytes

    vals: dict[str, float] = {}
    for name in job.objectives:
        if name == "lzma":
            vals[name] = lzma_bytes(out) / max(lzma_bytes(model), 1)
        elif name == "file":
            vals[name] = serialized_bytes(out) / max(serialized_bytes(model), 1)
        elif name == "macs":
            a, b = total_macs(out, job.input_shapes), total_macs(model, job.input_shapes)
            vals[name] = (a / b) if a is not None and b else 1.0
        elif name == "latency":
            from onnxcomp.costmodel import CostModel, Settings
            from onnxcomp.data import LABELS_KEY

            feeds = {k: v[:1] for k, v in job.held.items() if k != LABELS_KEY}
            est = CostModel(Settings(threads=job.latency_threads), cache=False).time_models(
                [model, out], feeds, min_runs=10, target_ms=600.0)
            vals[name] = est[1].ms / max(est[0].ms, 1e-9)
    return {k: float(v) for k, v in vals.items()}


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("min_cosine", "min_sqnr_db", "top1_agreement", "ref_top1_acc", "cand_top1_acc", "position_agreement",
            "sequence_agreement", "metric")
    return {k: summary[k] for k in keep if summary.get(k) is not None}
