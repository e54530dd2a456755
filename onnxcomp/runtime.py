"""onnxruntime plumbing: sessions, batched runs with intermediate tensors, activation statistics and
latency measurement. Reads models, never returns an edited one.

Facts this module relies on: extra graph outputs block onnxruntime's fusions, so capture sessions are
built separately from timing sessions (timing never carries extra outputs); protobuf cannot serialize
2 GB, so big models reach onnxruntime through a temporary file with external data.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.errors import BadInputError, first_line
from onnxcomp.model import as_model, runtime_compatible

# protobuf refuses to serialize 2 GiB; leave margin for the graph itself.
_SERIALIZE_LIMIT = 2**31 - 2**26
# Bytes of captured activations one run of `activation_stats` aims to hold.
CAPTURE_BUDGET = 256 * 2**20


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------
THREADS_ENV = "ONNXCOMP_THREADS"


def default_threads() -> int | None:
    """The intra-op thread count for sessions that are not given one: $ONNXCOMP_THREADS when set
    (a search's local workers set it to their share of the cores, so two workers do not both use
    every core), else None (onnxruntime's own default: one thread per core)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadInputError(f"${THREADS_ENV}={value!r}: expected a positive integer") from None
    if n < 1:
        raise BadInputError(f"${THREADS_ENV}={value!r}: expected a positive integer")
    return n


def session_options(*, optimize: bool = True, threads: int | None = None, spin: bool = True) -> ort.SessionOptions:
    """CPU session options: full graph optimisation or none, a fixed thread count when given
    (else `default_threads()`).

    `spin=False` stops the intra-op threads from busy-waiting after each parallel section. Timing
    sessions need it: when two sessions run interleaved on a 2-core machine, the previous session's
    spinning threads steal the cores from the next one (measured on the zoo's VGG-16 vs its Tucker
    version: interleaved p50 ratio 2.09 with spinning, 3.06 without, 3.1-3.2 in separate blocks).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads is None:
        threads = default_threads()
    if threads is not None:
        if threads < 1:
            raise BadInputError(f"threads must be at least 1, got {threads}")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(
    model_or_bytes: onnx.ModelProto | bytes | str | os.PathLike,
    *,
    optimize: bool = True,
    threads: int | None = None,
    extra_outputs: Sequence[str] = (),
    spin: bool = True,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model (proto, serialized bytes or path).

    `optimize=False` disables every graph optimisation (ORT_DISABLE_ALL), as equivalence checks need.
    `extra_outputs` are intermediate tensors to expose as outputs; they are added to a copy (the
    caller's model is never changed). Models too large for one protobuf go through a temporary
    file with external data. `options` (e.g. a cost model's settings) replaces the three flags.
    """
    so = options if options is not None else session_options(optimize=optimize, threads=threads, spin=spin)
    if isinstance(model_or_bytes, (bytes, bytearray)) and not extra_outputs:
        return _session(bytes(model_or_bytes), so)
    if isinstance(model_or_bytes, (str, os.PathLike)) and not extra_outputs:
        model = as_model(model_or_bytes)
    elif isinstance(model_or_bytes, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model_or_bytes))
    else:
        model = as_model(model_or_bytes)
    return _session_for_proto(model, so, list(extra_outputs))


def _session(payload: bytes | str, so: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(payload, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInputError(f"onnxruntime cannot load the model: {first_line(exc, 300)}") from None


def _session_for_proto(model: onnx.ModelProto, so: ort.SessionOptions, extra: list[str]) -> ort.InferenceSession:
    """Serialize `model` with `extra` outputs appended and the IR version clamped, without copying
    the (possibly huge) weights: the proto is patched, serialized, and restored in `finally`."""
    have = {o.name for o in model.graph.output}
    added = [name for name in dict.fromkeys(extra) if name not in have]
    old_ir = model.ir_version
    n_out = len(model.graph.output)
    try:
        for name in added:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        runtime_compatible(model)  # undone in `finally`, with the extra outputs
        from onnxcomp.model import _payload_bytes

        # ByteSize() itself fails past 2 GB: ask it only when the tensor payloads are well below
        if _payload_bytes(model) < _SERIALIZE_LIMIT and model.ByteSize() < _SERIALIZE_LIMIT:
            payload = model.SerializeToString()
            return _session(payload, so)
        with tempfile.TemporaryDirectory(prefix="onnxcomp-") as tmp:
            work = onnx.ModelProto()
            work.CopyFrom(model)
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(work, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            del work
            return _session(path, so)
    finally:
        del model.graph.output[n_out:]
        model.ir_version = old_ir


def run_session(sess: ort.InferenceSession, names: Sequence[str] | None, feeds: dict[str, np.ndarray],
                what: str = "the model") -> list:
    """`sess.run(names, feeds)`, with an onnxruntime failure (data the model cannot take, such as an
    index out of range or a wrong dim, or a model it cannot execute) raised as a one-line
    BadInputError that names `what`."""
    try:
        return sess.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidArgument / RuntimeException types
        raise BadInputError(f"{what}: onnxruntime failed to run it ({first_line(exc, 300)})") from None


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor a run can produce or read: graph inputs, initializers and node outputs."""
    names = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


# --------------------------------------------------------------------------------------------
# batched runs
# --------------------------------------------------------------------------------------------
def run_batches(
    model: onnx.ModelProto,
    source: Any,
    outputs: Sequence[str] | None = None,
    *,
    optimize: bool = False,
    threads: int | None = None,
    max_batches: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]]:
    """Run `model` on every batch of `source` (a DataSource or anything `open_source` takes).

    Yields (feeds, {name: array}, labels). `outputs=None` gives the graph outputs; otherwise exactly
    the named tensors, which may be intermediate tensors (exposed on a copy of the model), graph
    inputs (the feed) or initializers (the constant). One session serves every batch.
    `max_batches` stops after that many source batches. `max_bytes` bounds the returned tensors per
    run: when the model's batch dim is free, each source batch is run in sub-batches sized (after a
    one-sample probe) so the requested tensors stay near that many bytes; each sub-batch is yielded.
    """
    from onnxcomp.data import model_inputs, open_source

    model = as_model(model)
    src = open_source(source, model=model)
    graph_outputs = [o.name for o in model.graph.output]
    wanted = list(graph_outputs if outputs is None else outputs)
    known = tensor_names(model)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise BadInputError(f"tensor(s) {', '.join(unknown[:5])} not found in the model")
    inputs = {i.name for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    fed = [n for n in wanted if n in inputs and n not in inits]
    const = {n: onnx.numpy_helper.to_array(inits[n]) for n in wanted if n in inits}
    run_names = [n for n in dict.fromkeys(wanted) if n not in fed and n not in const]
    sess = make_session(model, optimize=optimize, threads=threads,
                        extra_outputs=[n for n in run_names if n not in graph_outputs])
    splittable = max_bytes is not None and all(s.fixed_batch is None for s in model_inputs(model))
    step: int | None = None

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = run_session(sess, run_names, feeds) if run_names else []
        result = dict(zip(run_names, values, strict=True))
        for n in fed:
            result[n] = feeds[n]
        result.update(const)
        return {n: result[n] for n in wanted}

    for k, (feeds, labels) in enumerate(src.batches()):
        if max_batches is not None and k >= max_batches:
            return
        first = next(iter(feeds.values()))
        n = int(first.shape[0]) if first.ndim else 1
        if not splittable or n == 1 or (step is not None and step >= n):
            yield feeds, run(feeds), labels
            continue
        start = 0
        while start < n:
            size = min(step or 1, n - start)
            part = {name: v[start : start + size] for name, v in feeds.items()}
            values = run(part)
            if step is None:
                used = sum(v.nbytes for v in values.values() if isinstance(v, np.ndarray))
                step = max(1, int(max_bytes // max(used / size, 1)))  # type: ignore[operator]
            yield part, values, None if labels is None else labels[start : start + size]
            del values
            start += size


# --------------------------------------------------------------------------------------------
# activation statistics
# --------------------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Running per-channel statistics (float64) of one tensor: count, mean, var (population), min, max.

    Batches are merged with Chan et al.'s parallel formula, so the result equals a single pass over
    all values without keeping them.
    """

    count: np.ndarray  # values seen per channel
    mean: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the mean
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(np.zeros(channels, np.int64), np.zeros(channels), np.zeros(channels),
                   np.full(channels, np.inf), np.full(channels, -np.inf))

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        return np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def update(self, x: np.ndarray, axis: int = 1, chunk_elems: int = 1 << 22) -> None:
        """Merge the values of `x` (channel axis `axis`). The array is reduced a few samples at a
        time so the float64 temporaries stay near `chunk_elems` values whatever the batch size."""
        x = np.asarray(x)
        ax = axis % x.ndim
        c = x.shape[ax]
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        if ax != 0:
            per_sample = max(1, x.size // max(x.shape[0], 1))
            group = max(1, chunk_elems // per_sample)
            if group < x.shape[0]:
                for start in range(0, x.shape[0], group):
                    self._update_block(x[start : start + group], ax, chunk_elems)
                return
        self._update_block(x, ax, chunk_elems)

    def _update_block(self, x: np.ndarray, ax: int, chunk_elems: int) -> None:
        c = x.shape[ax]
        flat = np.moveaxis(x, ax, 0).reshape(c, -1)
        step = max(1, chunk_elems // max(c, 1))
        for start in range(0, flat.shape[1], step):
            block = flat[:, start : start + step]
            n = block.shape[1]
            if n == 0:
                continue
            b64 = block.astype(np.float64)
            b_mean = b64.mean(axis=1)
            b_m2 = ((b64 - b_mean[:, None]) ** 2).sum(axis=1)
            self.merge_moments(n, b_mean, b_m2, block.min(axis=1), block.max(axis=1))

    def merge_moments(self, n: int | np.ndarray, mean: np.ndarray, m2: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        na = self.count.astype(np.float64)
        nb = np.asarray(n, dtype=np.float64) * np.ones_like(na)
        tot = na + nb
        delta = mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean = np.where(tot > 0, self.mean + delta * (nb / np.where(tot > 0, tot, 1)), self.mean)
            self.m2 = self.m2 + m2 + delta**2 * (na * nb / np.where(tot > 0, tot, 1))
        self.count = self.count + np.asarray(n, dtype=np.int64)
        self.min = np.minimum(self.min, np.asarray(lo, dtype=np.float64))
        self.max = np.maximum(self.max, np.asarray(hi, dtype=np.float64))

    def merge(self, other: ChannelStats) -> None:
        """Fold another tensor's statistics (same channels) into this one."""
        self.merge_moments(other.count, other.mean, other.m2, other.min, other.max)

    def as_dict(self) -> dict[str, list]:
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "var": self.var.tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}


def activation_stats(
    model: onnx.ModelProto,
    source: Any,
    tensors: Sequence[str],
    axis: int = 1,
    *,
    optimize: bool = False,
    threads: int | None = None,
    max_batches: int | None = None,
    max_bytes: int | None = CAPTURE_BUDGET,
) -> dict[str, ChannelStats]:
    """Per-channel running statistics of `tensors` over every batch of `source`, in one pass.

    `axis` is the channel axis (1 for NCHW / [N, C] tensors; negative counts from the end). Only one
    run's activations are alive at a time, and a run holds about `max_bytes` of them (batches are
    split when the model's batch dim allows it; None: whole batches). `max_batches` caps the source
    batches used (e.g. a Context's calibration_batches).
    """
    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    stats: dict[str, ChannelStats] = {}
    for _, values, _ in run_batches(model, source, names, optimize=optimize, threads=threads,
                                    max_batches=max_batches, max_bytes=max_bytes):
        for name in names:
            x = values[name]
            if x.ndim == 0:
                raise BadInputError(f"tensor '{name}' is a scalar; it has no channel axis")
            ax = axis if axis >= 0 else x.ndim + axis
            if not 0 <= ax < x.ndim:
                raise BadInputError(f"tensor '{name}' has rank {x.ndim}; channel axis {axis} is out of range")
            if name not in stats:
                stats[name] = ChannelStats.empty(x.shape[ax])
            stats[name].update(x, ax)
        del values
    if not stats:
        raise BadInputError("activation statistics: the data source yielded no samples")
    return stats


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
@dataclass
class LatencyResult:
    """Timings of one model (milliseconds). `ratio` is this model's p50 over the first model's p50
    (all rounds pooled); `ratio_min` / `ratio_max` are the extremes of the per-round ratios."""

    name: str
    p50_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    ratio: float
    ratio_min: float
    ratio_max: float
    round_p50_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4),
            "min_ms": round(self.min_ms, 4), "mean_ms": round(self.mean_ms, 4), "runs": self.runs,
            "ratio": round(self.ratio, 4), "ratio_min": round(self.ratio_min, 4),
            "ratio_max": round(self.ratio_max, 4), "round_p50_ms": [round(v, 4) for v in self.round_p50_ms],
        }


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure_latency(
    models: Sequence[Any],
    feeds: Any,
    *,
    threads: int = 2,
    warmup: int = 5,
    runs: int = 20,
    rounds: int = 3,
    names: Sequence[str] | None = None,
    progress: Any = None,
) -> list[LatencyResult]:
    """Time each model on the same `feeds` (a dict of arrays, or a DataSource: its first batch).

    Sessions run at full optimisation with `threads` intra-op threads and no extra outputs. After
    one untimed check run and `warmup` runs of each, `rounds` rounds of `runs` iterations follow;
    each iteration runs every model once, interleaved (A B A B ...), starting from a different model
    each iteration so that neither order nor machine drift favours one. Results are in the order of
    `models`.
    """
    if not models:
        raise BadInputError("no models to time")
    if runs < 1 or rounds < 1 or warmup < 0:
        raise BadInputError("runs and rounds must be at least 1, warmup at least 0")
    from onnxcomp.data import DataSource

    if isinstance(feeds, DataSource):
        feeds = feeds.first_batch()[0]
    labels = list(names) if names is not None else [_model_name(m, k) for k, m in enumerate(models)]
    sessions = []
    for k, m in enumerate(models):
        if progress is not None:
            progress.message(f"session for {labels[k]}")
        # No spinning: interleaved sessions' idle spinning threads would steal each other's cores.
        sessions.append(make_session(m, optimize=True, threads=threads, spin=False))
    for k, sess in enumerate(sessions):
        want = {i.name for i in sess.get_inputs()}
        if set(feeds) != want:
            raise BadInputError(
                f"{labels[k]}: inputs {sorted(want)} differ from the feeds {sorted(feeds)}; time models with the same inputs"
            )
    out_names = [[o.name for o in s.get_outputs()] for s in sessions]
    n = len(sessions)
    for k in range(n):  # one untimed run each: a model that cannot run these feeds fails here, in one line
        run_session(sessions[k], out_names[k], feeds, labels[k])
    if progress is not None:
        progress.message(f"warm-up: {warmup} runs each")
    for _ in range(warmup):
        for k in range(n):
            sessions[k].run(out_names[k], feeds)
    samples: list[list[float]] = [[] for _ in range(n)]
    per_round: list[list[float]] = [[] for _ in range(n)]
    clock = time.perf_counter
    for r in range(rounds):
        if progress is not None:
            progress.message(f"round {r + 1}/{rounds}: {runs} interleaved runs each")
        this_round: list[list[float]] = [[] for _ in range(n)]
        for it in range(runs):
            for j in range(n):
                k = (it + j) % n
                t0 = clock()
                sessions[k].run(out_names[k], feeds)
                this_round[k].append((clock() - t0) * 1e3)
        for k in range(n):
            samples[k].extend(this_round[k])
            per_round[k].append(statistics.median(this_round[k]))
    results = []
    base_p50 = statistics.median(samples[0])
    for k in range(n):
        ratios = [per_round[k][r] / per_round[0][r] for r in range(rounds)]
        results.append(LatencyResult(
            name=labels[k],
            p50_ms=statistics.median(samples[k]),
            p90_ms=_percentile(samples[k], 90),
            min_ms=min(samples[k]),
            mean_ms=statistics.fmean(samples[k]),
            runs=len(samples[k]),
            ratio=statistics.median(samples[k]) / base_p50,
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            round_p50_ms=per_round[k],
            samples_ms=samples[k],
        ))
    return results


def _model_name(m: Any, k: int) -> str:
    if isinstance(m, (str, os.PathLike)):
        return os.fspath(m)
    if isinstance(m, onnx.ModelProto) and m.graph.name:
        return f"{k}:{m.graph.name}"
    return f"model{k}"
