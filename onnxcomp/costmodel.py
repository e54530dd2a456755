"""Measured per-layer latency on this machine: the cost model passes consult before they commit.

Fewer MACs is not lower latency (thin 1x1 convs are memory-bound, odd channel counts miss MLAS's
fast paths, int8 QDQ slows depthwise convs down). So a rewrite's cost is *measured*: the layer (a
`Unit`: a weighted op with the elementwise ops onnxruntime fuses into it, or any single op) is built
alone as a one-layer model with its real shapes, and timed in onnxruntime with the session settings
the user will run (`Settings`: threads, provider, optimisation level), interleaved with the
alternatives it is compared with (A B C A B C ..., no spinning threads). The layout conversions
onnxruntime wraps around a lone layer (NCHWc reorders, NHWC transposes around int8 kernels), which
inside a model consecutive layers do not pay, are timed apart and taken out (`Estimate.ms`; the
time as it ran alone is `total_ms`). Every timing is cached on
disk by the unit's signature (op types, attributes, shapes, dtypes, small constant values) in a file
per (onnxruntime version, CPU model and instruction set, settings); a file written on another
machine or version is ignored, never trusted.

When measuring is off (`CostModel(measure=False)`) or a unit cannot be built alone (a shape unknown,
a custom op without a body), an **analytic** estimate takes over: ms = c + a MACs + b bytes moved,
with coefficients fit (non-negative least squares, scipy) to the timings cached on this machine;
without any, documented defaults (the estimate says so). Every `Estimate`
says which (`source`: measured, cache, analytic) and why.

No graph edit here: units are small new models; the model a unit was cut from is only read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxcomp.errors import BadInputError, OnnxcompError, first_line
from onnxcomp.units import Unit, unit_for_nodes

CACHE_VERSION = 2  # 2: float NCHWc reorders taken out (1 read them as float64 and counted 0); I/O-bound runs
_DOUBLE_MAX_BYTES = 64 << 20  # units up to this size are also timed twice in one model (in_run_ms)
_QUADRUPLE_MAX_BYTES = 4 << 20  # ... and up to this size four times
# Default analytic coefficients (ms, ms per MMAC, ms per MB) when nothing on this machine was measured:
# ~50 GMAC/s and ~10 GB/s, a modest 2-thread AVX2 core pair; `source` says they are defaults.
_DEFAULT_COEF = (0.01, 0.02, 0.1)


# ---------------------------------------------------------------------------------------------
# settings and machine
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The onnxruntime session settings a model will run with (what timings depend on)."""

    threads: int = 2
    optimization: str = "all"  # all | extended | basic | off
    provider: str = "CPUExecutionProvider"

    def session_options(self) -> ort.SessionOptions:
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if self.optimization not in levels:
            raise BadInputError(f"optimization level {self.optimization!r}: expected one of {', '.join(levels)}")
        if self.threads < 1:
            raise BadInputError(f"threads must be at least 1, got {self.threads}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.optimization]
        so.log_severity_level = 3
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Interleaved sessions' spinning threads would steal each other's cores (see runtime.session_options).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "optimization": self.optimization, "provider": self.provider}


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "neon")


def machine() -> dict[str, Any]:
    """What a timing depends on besides the layer: onnxruntime version, CPU model, instruction set."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "cpu": cpu, "arch": platform.machine(),
            "isa": [f for f in _ISA_FLAGS if f in flags], "cores": os.cpu_count()}


def cache_root() -> Path:
    root = os.environ.get("ONNXCOMP_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "onnxcomp"


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's level-3 (or higher) cache (Linux sysfs), None where none is exposed: an
    L2 taken for the last level would make nearly every model look too large for it."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text().strip())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if level < 3:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


class _Evictor:
    """Reads a buffer of twice the last-level cache (64 MB where unknown), then the unit's inputs:
    run before each timed run of a `cold` measurement, it leaves the unit's weights in memory, not
    in the cache, as in a model whose weights exceed the cache, while its input is cached, as the
    previous layer left it (zoo resnet18, 46 MB against this VM's 32 MB: a WinogradConv 1.09x faster
    than the direct conv with its weights cached was 0.97x with them cold, its pre-transformed
    weights being 4x the direct ones). An approximation: only the caches the Python thread reaches
    are emptied, and onnxruntime's other thread keeps its own L2."""

    def __init__(self) -> None:
        llc = last_level_cache_bytes() or (32 << 20)
        self.buffer = np.ones(2 * llc // 8, np.float64)

    def __call__(self, feeds: dict | None = None) -> None:
        self.buffer.sum()
        for v in (feeds or {}).values():
            np.asarray(v).sum()


# ---------------------------------------------------------------------------------------------
# estimates and the cache
# ---------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """One unit's latency: `ms` (median of interleaved runs, or the analytic figure), where it came
    from (`source`: measured | cache | analytic) and, for analytic, why."""

    ms: float
    source: str
    runs: int = 0
    spread: float = 0.0  # (p90 - p10) / p50 of the runs
    reason: str | None = None
    # Layout reorders onnxruntime put around the unit alone (not in `ms`). A model pays only the
    # ones where a blocked layer meets one that is not (`CostModel.kept_layout_conversions`).
    reorder_in_ms: float = 0.0
    reorder_out_ms: float = 0.0
    wall_ms: float | None = None  # the unit's own p50, reorders included (None: same as ms)
    # What the unit adds to a run already under way, net of layout reorders (estimate(in_run=True)):
    # per added copy, the unit repeated in one model minus once (Unit.repeated_model). None: not measured.
    in_run_ms: float | None = None

    @property
    def total_ms(self) -> float:
        """The unit's time as it ran alone, layout reorders included: compare alternatives that read
        and write the same tensors by this (their boundary reorders are the same and cancel in a
        difference; subtracting separately timed reorders can leave a tiny layer near 0)."""
        return self.ms if self.wall_ms is None else self.wall_ms

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ms": round(self.ms, 5), "source": self.source}
        if self.runs:
            out["runs"] = self.runs
            out["spread"] = round(self.spread, 4)
        if self.reason:
            out["reason"] = self.reason
        if self.reorder_in_ms or self.reorder_out_ms:
            out["reorder_ms"] = [round(self.reorder_in_ms, 5), round(self.reorder_out_ms, 5)]
        if self.in_run_ms is not None:
            out["in_run_ms"] = round(self.in_run_ms, 5)
        return out


class LatencyCache:
    """Timings of this machine and settings, one JSON file; another machine's file is ignored."""

    def __init__(self, settings: Settings, directory: Path | None = None):
        self.header = {"version": CACHE_VERSION, "machine": machine(), "settings": settings.as_dict()}
        digest = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (directory or cache_root() / "latency") / f"{digest}.json"
        self.entries: dict[str, dict] = {}
        self.ignored: str | None = None
        self._dirty: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.ignored = f"{self.path}: unreadable, ignored"
            return
        if not isinstance(doc, dict) or doc.get("header") != self.header:
            self.ignored = f"{self.path}: written by another machine, onnxruntime or settings; ignored"
            return
        entries = doc.get("entries")
        if isinstance(entries, dict):
            self.entries = {k: v for k, v in entries.items() if isinstance(v, dict) and _finite(v.get("ms"))}

    def get(self, sig: str) -> dict | None:
        return self.entries.get(sig)

    def put(self, sig: str, entry: dict) -> None:
        self.entries[sig] = entry
        self._dirty[sig] = entry

    def save(self) -> None:
        """Merge what this process measured into the file (atomic rename); an unwritable cache only
        costs the next run its time."""
        if not self._dirty:
            return
        from onnxcomp.model import save_text

        merged = {}
        try:
            doc = json.loads(self.path.read_text()) if self.path.is_file() else None
            if isinstance(doc, dict) and doc.get("header") == self.header and isinstance(doc.get("entries"), dict):
                merged.update(doc["entries"])
        except (OSError, ValueError):
            pass
        merged.update(self._dirty)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_text(self.path, json.dumps({"header": self.header, "entries": merged}, sort_keys=True) + "\n")
            self._dirty.clear()
        except (OSError, OnnxcompError):
            pass


def _cache_key(unit: Unit, cold: bool) -> str:
    return unit.signature() + ("/cold-inputs-warm" if cold else "")


def model_weights_exceed_cache(model: onnx.ModelProto) -> bool:
    """Whether `model`'s weights (initializers and Constant nodes' tensors) take more than half the
    CPU's last-level cache (32 MB assumed where unknown): then a run reads most weights from memory
    (activations and a rewrite's larger weights take the rest), and layers are best compared with
    `estimate(cold=True)`."""
    from onnxcomp.analysis import param_bits

    llc = last_level_cache_bytes() or (32 << 20)
    return param_bits(model) // 8 > llc // 2


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


# ---------------------------------------------------------------------------------------------
# the cost model
# ---------------------------------------------------------------------------------------------
class CostModel:
    """Latency of units on this machine with `settings`: measured (interleaved, cached) or analytic.

    `measure=False` never times anything per unit: estimates come from the analytic model. `cache=False`
    neither reads nor writes the disk cache. `target_ms` is the time each unit is run for per
    measurement (split over 3 rounds, at least 5 runs each).
    """

    def __init__(self, settings: Settings | None = None, *, measure: bool = True, cache: bool = True,
                 cache_dir: Path | None = None, target_ms: float = 150.0, min_runs: int = 5, max_runs: int = 2000):
        self.settings = settings or Settings()
        self.measure_enabled = measure
        self.cache = LatencyCache(self.settings, cache_dir) if cache else None
        self.target_ms = target_ms
        self.min_runs = min_runs
        self.max_runs = max_runs
        self._coef: tuple[tuple[float, float, float], str] | None = None
        self._overhead: float | None = None
        self._evictor: _Evictor | None = None  # cold timing's buffer, made once per cost model
        self.measured_units = 0
        self.cached_units = 0

    # -- public -------------------------------------------------------------------------------
    def estimate(self, units: Sequence[Unit], *, fresh: bool = False, together: bool = True,
                 net_of_layout: bool = True, in_run: bool = False, cold: bool = False) -> list[Estimate]:
        """One estimate per unit, in order. Units not cached are measured together, interleaved (so a
        layer and its alternatives see the same machine state), or one after the other with
        `together=False` (a model's many layers: interleaving dozens of them evicts each one's input
        from the cache, which in a model the previous layer has just written; measured on resnet50,
        the layers' sum came out 14% high interleaved, 3% low one by one). `fresh=True` re-measures
        cached ones too (a decision between close alternatives should not mix timings of different
        moments). `net_of_layout=False` keeps layout reorders in the time (for timing reorders themselves).
        `in_run=True` also measures `in_run_ms`, what each unit adds inside a run (twice the timing
        work): a small layer alone pays a run's start (the call, its first kernel, waking the thread
        pool) that inside a model only the first layer pays; on an AMD EPYC VM that start was 10-55 us
        a layer, far above a one-element Identity's 6 us, and depended on the layer's size and layout.
        `cold=True` times each run with the caches emptied of the unit's weights first (`_Evictor`),
        cached apart from the warm timing: for a model whose weights do not fit in the cache, where
        a rewrite that grows the weights pays for it on every run (`model_weights_exceed_cache`)."""
        out: list[Estimate | None] = [None] * len(units)
        todo: list[int] = []
        for k, u in enumerate(units):
            if u.problem:
                out[k] = self.analytic(u, reason=u.problem)
                continue
            if not self.measure_enabled:
                out[k] = self.analytic(u, reason="measuring is off")
                continue
            hit = None if (fresh or self.cache is None) else self.cache.get(_cache_key(u, cold))
            if hit is not None and in_run and _doubled(u) and not _finite(hit.get("in_run_ms")):
                hit = None  # timed before without its in-run cost: time it again, with it
            if hit is not None:
                self.cached_units += 1
                out[k] = Estimate(float(hit["ms"]), "cache", int(hit.get("runs", 0)), float(hit.get("spread", 0.0)),
                                  reorder_in_ms=float(hit.get("reorder_in_ms", 0.0)),
                                  reorder_out_ms=float(hit.get("reorder_out_ms", 0.0)),
                                  wall_ms=float(hit["wall_ms"]) if _finite(hit.get("wall_ms")) else None,
                                  in_run_ms=float(hit["in_run_ms"]) if _finite(hit.get("in_run_ms")) else None)
            else:
                todo.append(k)
        groups = [todo] if together else [[k] for k in todo]
        for group in groups:
            if group:
                for k, est in zip(group, self._measure([units[k] for k in group], net_of_layout=net_of_layout,
                                                       in_run=in_run, cold=cold), strict=True):
                    out[k] = est
        if self.cache is not None:
            self.cache.save()
        return [e for e in out if e is not None]

    def overhead_ms(self) -> float:
        """The fixed cost of one session run (a one-element Identity), subtracted per unit when unit
        times are summed into a model's (it is paid once per model run, not once per layer)."""
        x = "x"
        if self._overhead is None:  # asked once per measured batch of units: measured (or read) once
            u = unit_for_nodes("run-overhead", [helper.make_node("Identity", [x], ["y"], name="id")],
                               {x: ((1,), onnx.TensorProto.FLOAT)}, {}, ["y"], 13)
            self._overhead = self.estimate([u])[0].ms
        return self._overhead

    def analytic(self, unit: Unit, reason: str) -> Estimate:
        (c, a, b), basis = self.coefficients()
        ms = c + a * unit.macs / 1e6 + b * unit.bytes / 1e6
        return Estimate(float(ms), "analytic", reason=f"{reason}; analytic model ({basis})")

    def coefficients(self) -> tuple[tuple[float, float, float], str]:
        """(c ms, ms per MMAC, ms per MB) fit to this machine's cached timings, else defaults."""
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def time_models(self, models: Sequence[onnx.ModelProto], feeds: dict[str, np.ndarray], *,
                    min_runs: int = 15, target_ms: float = 1500.0) -> list[Estimate]:
        """Whole models timed interleaved on the same feeds, with these settings (never cached: a
        model is timed when it is judged). The guard's latency bound and `profile` use this."""
        return self.model_timer(models, feeds, min_runs=min_runs).read(target_ms)

    def model_timer(self, models: Sequence[onnx.ModelProto], feeds: dict[str, np.ndarray], *,
                    min_runs: int = 15) -> ModelTimer:
        """A `ModelTimer` for reading the same models several times (sessions built once)."""
        return ModelTimer(self, models, feeds, min_runs=min_runs)

    def paired_timings(self, base: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                       pairings: int = 3, target_ms: float = 300.0) -> list[tuple[float, float]]:
        """(base p50 ms, candidate p50 ms) of `pairings` interleaved readings (one session each),
        sorted by the candidate's time over the base's, so the middle one is the median pairing: a
        pass judging its own result against its input reads this, not one timing that may fall in a
        spell of this VM."""
        timer = self.model_timer([base, candidate], feeds)
        pairs = [(b.ms, c.ms) for b, c in (timer.read(target_ms) for _ in range(pairings))]
        return sorted(pairs, key=lambda p: p[1] / p[0])

    # -- internals ----------------------------------------------------------------------------
    def _cold_evictor(self) -> _Evictor:
        if self._evictor is None:
            self._evictor = _Evictor()
        return self._evictor

    def _fit(self) -> tuple[tuple[float, float, float], str]:
        from scipy.optimize import nnls

        rows = [e for e in (self.cache.entries.values() if self.cache else ())
                if _finite(e.get("macs")) and _finite(e.get("bytes")) and not e.get("cold")]
        if len(rows) < 8:
            return _DEFAULT_COEF, "uncalibrated defaults: nothing measured on this machine yet"
        # Relative least squares (each row divided by its time), so small layers count as much as big ones.
        t = np.array([float(e["ms"]) for e in rows])
        x = np.array([[1.0, float(e["macs"]) / 1e6, float(e["bytes"]) / 1e6] for e in rows])
        w = 1.0 / np.maximum(t, 1e-3)
        coef, _ = nnls(x * w[:, None], t * w)
        pred = x @ coef
        err = float(np.median(np.abs(pred - t) / np.maximum(t, 1e-6)))
        return (float(coef[0]), float(coef[1]), float(coef[2])), f"fit to {len(rows)} timings of this machine, median error {err:.0%}"

    def _measure(self, units: Sequence[Unit], net_of_layout: bool = True, in_run: bool = False,
                 cold: bool = False) -> list[Estimate]:
        """Time `units` together, interleaved, by wall clock. A unit alone in the blocked (NCHWc)
        layout is wrapped by onnxruntime in layout reorders (ReorderInput / ReorderOutput, up to a
        third of a 1x1 conv's time) that inside a model consecutive blocked layers do not pay; so a
        first profiled run names the reorders and their shapes, each is timed alone (cached like any
        unit) and its time net of the run overhead is taken out of `ms` and reported apart. (The
        profiler's own kernel times are not used: profiling inflates them several fold on small
        ops; a 16 KB reorder reads 22 us profiled, 1.3 us timed.)"""
        import tempfile

        results: list[Estimate | None] = [None] * len(units)
        live: list[int] = []
        sessions, feeds, names, reorders, doubled = [], [], [], [], []
        with tempfile.TemporaryDirectory(prefix="onnxcomp-latency-") as tmp:
            for k, u in enumerate(units):
                so = self.settings.session_options()
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, f"unit{k}")
                so.log_severity_level = 4  # a unit that cannot load is reported as such, not logged
                try:
                    sess = ort.InferenceSession(u.model().SerializeToString(), sess_options=so,
                                                providers=[self.settings.provider])
                    f = u.make_feeds()
                    outs = [o.name for o in sess.get_outputs()]
                    sess.run(outs, f)
                except Exception as exc:  # onnxruntime's own error types; the unit falls back to the analytic model
                    results[k] = self.analytic(u, reason=f"cannot run alone ({first_line(exc, 160)})")
                    continue
                own_transpose = any(n.op_type == "Transpose" for n in u.nodes)
                found = _profiled_layout_ops(sess.end_profiling(), transposes=not own_transpose)  # ends profiling
                pair = None
                # A large layer's run start is a small share of it (in_run_ms stays None: its time
                # alone net of the call counts); doubling it would only double the memory.
                if in_run and _doubled(u):
                    copies = _copies(u)
                    try:
                        twice = ort.InferenceSession(u.repeated_model(copies).SerializeToString(),
                                                     sess_options=self.settings.session_options(),
                                                     providers=[self.settings.provider])
                        f2 = u.repeated_feeds(copies)
                        outs2 = [o.name for o in twice.get_outputs()]
                        twice.run(outs2, f2)
                        pair = (twice, f2, outs2, copies)
                    except Exception:  # noqa: BLE001 - onnxruntime's own error types: the unit alone still counts
                        pair = None
                doubled.append(pair)
                reorders.append(found if net_of_layout else [])
                live.append(k)
                sessions.append(sess)
                feeds.append(f)
                names.append(outs)
            if live:
                n = len(sessions)
                pairs = [d for d in doubled if d is not None]
                wall = _interleave(sessions + [d[0] for d in pairs], feeds + [d[1] for d in pairs],
                                   names + [d[2] for d in pairs], target_ms=self.target_ms, min_runs=self.min_runs,
                                   max_runs=self.max_runs, between=self._cold_evictor() if cold else None)
                second = iter(wall[n:])
                copy_count = {k: d[3] for k, d in zip(live, doubled, strict=True) if d is not None}
                wall, wall2 = wall[:n], [None if d is None else next(second) for d in doubled]
                del sessions, doubled, pairs
                costs = self._reorder_costs([r for group in reorders for r in group], in_run=in_run)
                for k, w, w2, group in zip(live, wall, wall2, reorders, strict=True):
                    p50 = statistics.median(w)
                    p10, p90 = np.percentile(w, [10, 90])
                    r_in = sum(costs[r] for r in group if r[1] == "in")
                    r_out = sum(costs[r] for r in group if r[1] == "out")
                    added = None
                    if w2 is not None:  # each added copy pays its own reorders, at their in-run cost
                        r_run = sum(costs[(*r, "in_run")] for r in group)
                        added = float(max((statistics.median(w2) - p50) / (copy_count[k] - 1) - r_run, 0.0))
                    est = Estimate(float(max(p50 - r_in - r_out, 0.0)), "measured", len(w),
                                   float((p90 - p10) / p50) if p50 > 0 else 0.0, reorder_in_ms=r_in, reorder_out_ms=r_out,
                                   wall_ms=float(p50), in_run_ms=added)
                    results[k] = est
                    self.measured_units += 1
                    if self.cache is not None:
                        self.cache.put(_cache_key(units[k], cold), {
                            "ms": est.ms, "runs": est.runs, "spread": est.spread, "wall_ms": float(p50),
                            "in_run_ms": est.in_run_ms,
                            "reorder_in_ms": est.reorder_in_ms, "reorder_out_ms": est.reorder_out_ms,
                            "macs": units[k].macs, "bytes": units[k].bytes, "ops": units[k].ops,
                            **({"cold": True} if cold else {})})
                        self._coef = None
        return [r for r in results if r is not None]

    def kept_layout_conversions(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[tuple]:
        """The layout conversions onnxruntime keeps inside `model` with these settings, one entry per
        conversion of one run (as `_profiled_layout_ops`): NCHWc reorders where a blocked layer meets
        one that is not, and the transposes it inserted (nodes not in the model). Units are timed net
        of their own boundary conversions, so these are what a model pays on top of its layers
        (PP-OCR's classifier: 59 a run, around its HardSwish and squeeze-excitation ops). [] when
        the model cannot be profiled."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxcomp-layout-") as tmp:
            so = self.settings.session_options()
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "model")
            so.log_severity_level = 4
            try:
                sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                            providers=[self.settings.provider])
                sess.run(None, feeds)
            except Exception:  # noqa: BLE001 - onnxruntime's own error types: nothing known to add
                return []
            own = {n.name for n in model.graph.node if n.name}
            return _profiled_layout_ops(sess.end_profiling(), transposes=True, exclude=own)

    def layout_costs(self, layout_ops: Sequence[tuple]) -> float:
        """What `layout_ops` (as `kept_layout_conversions` gives) add to a run under way, in ms."""
        costs = self._reorder_costs(layout_ops, in_run=True)
        return float(sum(costs[(*r, "in_run")] for r in layout_ops))

    def _reorder_costs(self, layout_ops: Sequence[tuple], in_run: bool = False) -> dict:
        """Time net of the run overhead of each distinct (op, side, dtype, input shape, output shape)
        layout conversion: NCHWc reorders, and the NHWC transposes onnxruntime puts around a lone
        int8 conv (inside a run of int8 layers they fuse away, like the reorders). With `in_run`, also
        each one's in-run cost, under the key (*conversion, "in_run")."""
        distinct = list(dict.fromkeys(layout_ops))
        if not distinct:
            return {}
        units = []
        for op, _side, dtype, shape_in, shape_out in distinct:
            if op == "Transpose":
                perm = _permutation(shape_in, shape_out)
                node = helper.make_node("Transpose", ["x"], ["y"], name="transpose", perm=perm)
                units.append(unit_for_nodes(op, [node], {"x": (shape_in, dtype)}, {}, ["y"], 13))
                continue
            attrs = {"channels": int(shape_out[1])} if op == "ReorderOutput" else {}
            node = helper.make_node(op, ["x"], ["y"], name=op.lower(), domain="com.microsoft.nchwc", **attrs)
            units.append(unit_for_nodes(op, [node], {"x": (shape_in, dtype)}, {}, ["y"], 13,
                                        extra_opsets={"com.microsoft.nchwc": 1}))
        overhead = self.overhead_ms()
        times = self.estimate(units, together=False, net_of_layout=False, in_run=in_run)
        out: dict = {}
        for r, t in zip(distinct, times, strict=True):
            out[r] = max(t.ms - overhead, 0.0) if t.source != "analytic" else 0.0
            if in_run:
                out[(*r, "in_run")] = t.in_run_ms if t.in_run_ms is not None else out[r]
        return out


class ModelTimer:
    """Whole models timed interleaved on the same feeds with a cost model's settings. The sessions
    are built (and checked by one run) once, so readings spread in time against this VM's spells
    cost no model reload (vgg16: 553 MB per session)."""

    def __init__(self, cm: CostModel, models: Sequence[onnx.ModelProto], feeds: dict[str, np.ndarray], *,
                 min_runs: int = 15):
        from onnxcomp.runtime import make_session, run_session

        so = cm.settings.session_options()
        self.sessions = [make_session(m, options=so) for m in models]
        self.names = [[o.name for o in s.get_outputs()] for s in self.sessions]
        for k, s in enumerate(self.sessions):
            run_session(s, self.names[k], feeds, f"model {k}")
        self.feeds = feeds
        self.min_runs = min_runs
        self.max_runs = max(4 * cm.max_runs, min_runs)

    def read(self, target_ms: float = 1500.0) -> list[Estimate]:
        """One interleaved timing of every model (about `target_ms` each): p50 and spread per model."""
        samples = _interleave(self.sessions, [self.feeds] * len(self.sessions), self.names, target_ms=target_ms,
                              min_runs=self.min_runs, max_runs=self.max_runs)
        out = []
        for s in samples:
            p50 = statistics.median(s)
            p10, p90 = np.percentile(s, [10, 90])
            out.append(Estimate(float(p50), "measured", len(s), float((p90 - p10) / p50) if p50 > 0 else 0.0))
        return out


def _permutation(shape_in: Sequence[int], shape_out: Sequence[int]) -> list[int]:
    """A perm taking `shape_in` to `shape_out`: NCHW <-> NHWC first, else the first that fits."""
    import itertools

    rank = len(shape_in)
    preferred = ([0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]) if rank > 2 else ()
    for perm in [*preferred, *itertools.permutations(range(rank))]:
        if [shape_in[i] for i in perm] == list(shape_out):
            return list(perm)
    return list(range(rank))


_LAYOUT_OPS = ("ReorderInput", "ReorderOutput")
# onnxruntime's profile names element types by their C++ names: "float" is float32, which numpy's
# np.dtype("float") would read as float64 (a float64 NCHWc reorder cannot be built, so every float
# reorder was once timed as 0 and never taken out).
_PROFILE_TYPES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                  "MLFloat16": onnx.TensorProto.FLOAT16, "BFloat16": onnx.TensorProto.BFLOAT16,
                  "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
                  "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16,
                  "int32": onnx.TensorProto.INT32, "uint32": onnx.TensorProto.UINT32,
                  "int64": onnx.TensorProto.INT64, "uint64": onnx.TensorProto.UINT64, "bool": onnx.TensorProto.BOOL}


def _profiled_layout_ops(path: str, transposes: bool, exclude: set[str] | None = None) -> list[tuple]:
    """(op, side, element type, input shape, output shape) of every layout conversion of the first
    run in an onnxruntime profile file: NCHWc reorders, and (`transposes`: the unit has none of its
    own) the Transposes onnxruntime inserted. Kernels of nodes named in `exclude` (a model's own
    nodes) are not conversions. `side` is "in" before the unit's first other kernel, else "out".
    [] when the file says nothing."""
    try:
        with open(path, encoding="utf-8") as fh:
            events = json.load(fh)
    except (OSError, ValueError):
        return []
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if not runs:
        return []
    begin, end = runs[0]
    suffix = "_kernel_time"
    kernels = sorted(((e["ts"], str(e["name"])[: -len(suffix)], e.get("args", {})) for e in events
                      if e.get("cat") == "Node" and str(e.get("name", "")).endswith(suffix)
                      and begin <= e.get("ts", -1) <= end), key=lambda k: k[0])
    layout = set(_LAYOUT_OPS) | ({"Transpose"} if transposes else set())
    out, side = [], "in"
    for _, node, args in kernels:
        op = args.get("op_name")
        if op not in layout or node in (exclude or ()) or (exclude is not None and not node):
            side = "out"
            continue
        try:
            (key_in, dims_in), = args["input_type_shape"][0].items()
            (_, dims_out), = args["output_type_shape"][0].items()
            elem = _PROFILE_TYPES[key_in]
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        out.append((op, side, elem, tuple(int(d) for d in dims_in), tuple(int(d) for d in dims_out)))
    return out


def _doubled(unit: Unit) -> bool:
    """Whether `estimate(in_run=True)` times `unit` repeated in one model (in_run_ms); larger units
    keep their time alone net of the call."""
    return unit.bytes <= _DOUBLE_MAX_BYTES


def _copies(unit: Unit) -> int:
    """How many copies of `unit` the in-run model holds. A small unit's in-run cost is a difference of
    two noisy microsecond medians; spread over 4 copies the difference is 3x the signal: on the glyph
    MobileNetV2 (34 layers of 2-10 us at 2 threads) two copies put the sum of layers anywhere in -14%
    .. +16% of the model from one profile to the next."""
    return 4 if unit.bytes <= _QUADRUPLE_MAX_BYTES else 2


def _bound_runner(session: Any, names: list[str], feeds: dict) -> Any:
    """A zero-argument call running `session` once on `feeds` through an I/O binding: inputs bound once,
    each tensor output written into a buffer allocated once (its shape from one plain run). What is
    timed is then onnxruntime's run, not Python's allocation and copy of the outputs (a 400 KB output
    freshly allocated and copied cost a 1x1 conv at 32x32 about as much as its kernel)."""
    binding = session.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
    first = session.run(names, feeds)
    keep = []
    for name, value in zip(names, first, strict=True):
        if isinstance(value, np.ndarray):
            buf = ort.OrtValue.ortvalue_from_numpy(np.empty_like(value))
            keep.append(buf)
            binding.bind_ortvalue_output(name, buf)
        else:
            binding.bind_output(name)

    def run() -> None:
        session.run_with_iobinding(binding)

    run.keep = keep  # type: ignore[attr-defined]  # the bound buffers live as long as the call
    return run


def _interleave(sessions: Sequence[Any], feeds: Sequence[dict], names: Sequence[list[str]], *, target_ms: float,
                min_runs: int, max_runs: int, between: Callable[[dict], Any] | None = None) -> list[list[float]]:
    """Run counts from a short probe (each unit runs about target_ms in all), then 3 rounds in which
    every unit still owed a run runs once per iteration, the start rotating; `between(feeds)`, when
    given, before every timed run, untimed."""
    clock = time.perf_counter
    n = len(sessions)
    runs = [_bound_runner(s, nm, f) for s, nm, f in zip(sessions, names, feeds, strict=True)]
    probe = []
    for k in range(n):  # warm-up and a first time per unit
        runs[k]()
        if between is not None:
            between(feeds[k])
        t0 = clock()
        runs[k]()
        probe.append(max((clock() - t0) * 1e3, 1e-3))
    want = [min(max(min_runs, math.ceil(target_ms / p)), max_runs) for p in probe]
    samples: list[list[float]] = [[] for _ in range(n)]
    rounds = 3
    for r in range(rounds):
        quota = [math.ceil(w * (r + 1) / rounds) for w in want]
        it = 0
        while True:
            owed = [k for k in range(n) if len(samples[k]) < quota[k]]
            if not owed:
                break
            for j in range(len(owed)):
                k = owed[(it + j) % len(owed)]
                if between is not None:
                    between(feeds[k])
                t0 = clock()
                runs[k]()
                samples[k].append((clock() - t0) * 1e3)
            it += 1
    return samples
