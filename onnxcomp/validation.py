"""Equivalence checks: run a reference and a candidate model on identical inputs and judge the
difference against a Tolerance.

Both models run in onnxruntime with graph optimisations off (so the check sees the models as
written, as onnxsim does). Figures per output, accumulated batch by batch (no output is kept whole):

* max_abs_err, mean_abs_err;
* max_rel_err: max |cand - ref| / max(|ref|, 1e-6 * max|ref| of the batch) (the floor keeps zeros in
  the reference from dividing by nothing);
* cosine (per sample: the output's values for one sample, flattened; min and mean over samples);
* sqnr_db: 10 log10(sum ref^2 / sum (cand - ref)^2) (inf when identical);
* each output's kind (onnxcomp.tolerance.KINDS), inferred from its shape or forced with `task`:
  - classify ([N, C], C > 1, trailing 1-dims ignored): top-1 agreement (same argmax) and top-5
    agreement (the reference's top-1 class is in the candidate's top 5), in percent; with labels,
    the top-1 / top-5 accuracy of each model;
  - sequence ([N, T, C]) and dense ([N, C, H, W, ...]): argmax agreement per position (pixel) as
    `top1_agreement`, and `sequence_agreement`, the percent of samples whose whole argmax sequence
    (map) is unchanged;
  - regress: the figures above only;
* with a user metric (onnxcomp.metrics.UserMetric), its score on the reference's own outputs and on
  the candidate's, and the drop between them.

NaNs and infinities at the same place in both models count as equal; anywhere else they are an
infinite error and fail the check even when no tolerance is given. Input data must be finite (a
check on NaN inputs would agree vacuously). When pass LayerRecords are given, the output tensor of
every rewritten layer is captured in both models, and the layer with the largest relative L2 error
(||d|| / ||ref||) is the `worst_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import BadInputError
from onnxcomp.tolerance import ARGMAX_KINDS, KINDS, AnyTolerance, Tolerance

REL_FLOOR = 1e-6
_CHUNK = 1 << 20  # values per float64 block (a few such temporaries are alive at once)


# --------------------------------------------------------------------------------------------
# accumulating differences
# --------------------------------------------------------------------------------------------
@dataclass
class _Diff:
    """Running figures of cand - ref for one tensor."""

    elements: int = 0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_r2: float = 0.0
    sum_c2: float = 0.0
    sum_rc: float = 0.0
    sum_d2: float = 0.0
    violations: int = 0
    cos_min: float = 1.0
    cos_sum: float = 0.0
    cos_n: int = 0
    nonfinite: int = 0  # elements where exactly one side is NaN/inf, or infs differ

    def add(self, ref: np.ndarray, cand: np.ndarray, samples: int, tol: Tolerance | None) -> None:
        """Fold one batch in; `samples` is the batch's sample count (for the per-sample cosine)."""
        per_sample = ref.ndim >= 1 and ref.shape[0] == samples and samples > 0
        r2 = ref.reshape(samples, -1) if per_sample else ref.reshape(1, -1)
        c2 = cand.reshape(samples, -1) if per_sample else cand.reshape(1, -1)
        if r2.size:
            finite = r2[np.isfinite(r2)] if not np.all(np.isfinite(r2)) else r2
            peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        else:
            peak = 0.0
        floor = max(REL_FLOOR * peak, 1e-30)
        rows = r2.shape[0]
        width = max(r2.shape[1], 1)
        group = max(1, _CHUNK // width)
        for start in range(0, rows, group):
            rb = r2[start : start + group]
            cb = c2[start : start + group]
            if rb.shape[1] > _CHUNK:  # one huge sample: split its columns, cosine over the whole row
                dots = np.zeros(rb.shape[0])
                rr = np.zeros(rb.shape[0])
                cc = np.zeros(rb.shape[0])
                for col in range(0, rb.shape[1], _CHUNK):
                    d, rn, cn = self._block(rb[:, col : col + _CHUNK], cb[:, col : col + _CHUNK], floor, tol)
                    dots += d
                    rr += rn
                    cc += cn
            else:
                dots, rr, cc = self._block(rb, cb, floor, tol)
            self._cosines(dots, rr, cc)

    def _block(self, rb: np.ndarray, cb: np.ndarray, floor: float, tol: Tolerance | None):
        r = rb.astype(np.float64)
        c = cb.astype(np.float64)
        if np.isfinite(r).all() and np.isfinite(c).all():
            d = c - r
        else:
            with np.errstate(invalid="ignore"):
                same = (r == c) | (np.isnan(r) & np.isnan(c))
                self.nonfinite += int(np.count_nonzero(~same & ~(np.isfinite(r) & np.isfinite(c))))
                # matched non-finite values are equal; any other non-finite value is dropped from the
                # sums (it already fails the check through `nonfinite`)
                r = np.where(np.isfinite(r), r, 0.0)
                c = np.where(np.isfinite(c), c, 0.0)
                d = np.where(same, 0.0, c - r)
        ad = np.abs(d)
        ar = np.abs(r)
        self.elements += int(d.size)
        if d.size:
            self.sum_abs += float(ad.sum())
            self.max_abs = max(self.max_abs, float(ad.max()))
            self.max_rel = max(self.max_rel, float((ad / np.maximum(ar, floor)).max()))
        if tol is not None and tol.elementwise:
            limit = (tol.atol or 0.0) + (tol.rtol or 0.0) * ar
            self.violations += int(np.count_nonzero(ad > limit))
        del ad, ar
        self.sum_d2 += float(np.dot(d.ravel(), d.ravel()))
        del d
        rr = np.einsum("ij,ij->i", r, r)
        cc = np.einsum("ij,ij->i", c, c)
        dots = np.einsum("ij,ij->i", r, c)
        self.sum_r2 += float(rr.sum())
        self.sum_c2 += float(cc.sum())
        self.sum_rc += float(dots.sum())
        return dots, rr, cc

    def _cosines(self, dots: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> None:
        for dot, a, b in zip(dots, rr, cc, strict=True):
            cos = _cosine(float(dot), float(a), float(b))
            self.cos_min = min(self.cos_min, cos)
            self.cos_sum += cos
            self.cos_n += 1

    @property
    def sqnr_db(self) -> float:
        if self.nonfinite:
            return -math.inf
        if self.sum_d2 == 0.0:
            return math.inf
        if self.sum_r2 == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sum_r2 / self.sum_d2)

    @property
    def rel_l2(self) -> float:
        """||cand - ref|| / ||ref|| over everything seen (inf when the reference is all zeros)."""
        if self.nonfinite:
            return math.inf
        if self.sum_d2 == 0.0:
            return 0.0
        return math.sqrt(self.sum_d2 / self.sum_r2) if self.sum_r2 > 0 else math.inf

    @property
    def cosine_global(self) -> float:
        return _cosine(self.sum_rc, self.sum_r2, self.sum_c2) if not self.nonfinite else 0.0


def _cosine(dot: float, a: float, b: float) -> float:
    if a == 0.0 and b == 0.0:
        return 1.0
    if a == 0.0 or b == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a * b)))


@dataclass
class _TopK:
    """Agreement and accuracy counts of a classifier-shaped output."""

    samples: int = 0
    agree1: int = 0
    agree5: int = 0
    labelled: int = 0
    ref_correct1: int = 0
    cand_correct1: int = 0
    ref_correct5: int = 0
    cand_correct5: int = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        k = min(5, r.shape[1])
        r1 = np.argmax(r, axis=1)
        c1 = np.argmax(c, axis=1)
        c_top = np.argsort(-c, axis=1, kind="stable")[:, :k]
        r_top = np.argsort(-r, axis=1, kind="stable")[:, :k]
        self.samples += r.shape[0]
        self.agree1 += int((r1 == c1).sum())
        self.agree5 += int((c_top == r1[:, None]).any(axis=1).sum())
        if labels is not None:
            lab = np.asarray(labels).reshape(-1)
            if lab.shape[0] != r.shape[0]:
                raise BadInputError(f"{lab.shape[0]} labels for a batch of {r.shape[0]} samples")
            self.labelled += int(lab.shape[0])
            self.ref_correct1 += int((r1 == lab).sum())
            self.cand_correct1 += int((c1 == lab).sum())
            self.ref_correct5 += int((r_top == lab[:, None]).any(axis=1).sum())
            self.cand_correct5 += int((c_top == lab[:, None]).any(axis=1).sum())


@dataclass
class _Argmax:
    """Argmax agreement of a sequence ([N, T, C], class axis last) or dense ([N, C, ...]) output."""

    axis: int
    positions: int = 0
    agree: int = 0
    samples: int = 0
    agree_all: int = 0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        same = np.argmax(ref, axis=self.axis) == np.argmax(cand, axis=self.axis)
        self.positions += int(same.size)
        self.agree += int(np.count_nonzero(same))
        self.samples += int(same.shape[0])
        self.agree_all += int(np.count_nonzero(same.reshape(same.shape[0], -1).all(axis=1)))


def infer_kind(shape: Sequence[int], samples: int) -> str:
    """The output kind a shape suggests (see onnxcomp.tolerance.KINDS); `samples` is the batch's N."""
    dims = list(shape)
    if len(dims) < 2 or dims[0] != samples:
        return "regress"
    if dims[1] > 1 and all(d == 1 for d in dims[2:]):
        return "classify"
    if len(dims) == 3 and dims[1] > 1 and dims[2] > 1:
        return "sequence"
    if len(dims) >= 4 and 1 < dims[1] <= 1000:
        return "dense"
    return "regress"


def _kind_fits(kind: str, shape: Sequence[int], samples: int) -> str | None:
    """None when an output of `shape` can be read as `kind`, else why not."""
    dims = list(shape)
    if kind == "regress":
        return None
    if len(dims) < 2 or dims[0] != samples:
        return f"needs a leading sample axis, the output is shaped {dims}"
    if kind == "classify" and (dims[1] < 2 or any(d != 1 for d in dims[2:])):
        return f"needs [N, C] scores with C > 1, the output is shaped {dims}"
    if kind == "sequence" and (len(dims) != 3 or dims[2] < 2):
        return f"needs [N, T, C] with C > 1, the output is shaped {dims}"
    if kind == "dense" and (len(dims) < 3 or dims[1] < 2):
        return f"needs [N, C, ...] with C > 1, the output is shaped {dims}"
    return None


def _resolve_task(task: str | dict[str, str] | None, name: str) -> str | None:
    if task is None:
        return None
    if isinstance(task, str):
        return task
    return task.get(name) or task.get("")


def _classifier_view(x: np.ndarray, samples: int) -> np.ndarray | None:
    """(N, C) view of an output shaped [N, C] (trailing 1-dims allowed) with C > 1, else None."""
    if x.ndim < 2 or x.shape[0] != samples or any(d != 1 for d in x.shape[2:]) or x.shape[1] <= 1:
        return None
    return x.reshape(x.shape[0], x.shape[1])


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class OutputCheck:
    """Figures for one model output (percentages are 0-100; accuracies only with labels)."""

    name: str
    shape: list[int]
    elements: int
    kind: str
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    cosine_min: float
    cosine_mean: float
    sqnr_db: float
    violations: int | None = None
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    ref_top1_acc: float | None = None
    cand_top1_acc: float | None = None
    ref_top5_acc: float | None = None
    cand_top5_acc: float | None = None
    sequence_agreement: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def top1_drop(self) -> float | None:
        """Accuracy drop in points with labels, else top-1 disagreement in percent."""
        if self.ref_top1_acc is not None and self.cand_top1_acc is not None:
            return self.ref_top1_acc - self.cand_top1_acc
        if self.top1_agreement is not None:
            return 100.0 - self.top1_agreement
        return None

    @property
    def sequence_drop(self) -> float | None:
        """Percent of samples whose argmax sequence (map) changed (sequence / dense outputs)."""
        return None if self.sequence_agreement is None else 100.0 - self.sequence_agreement

    def brief(self) -> str:
        parts = [f"{self.kind}", f"max_abs_err {self.max_abs_err:.3g}", f"cosine {self.cosine_min:.6f}",
                 f"SQNR {_db(self.sqnr_db)}"]
        if self.top1_agreement is not None:
            what = "top-1" if self.kind == "classify" else "per-position argmax"
            parts.append(f"{what} agreement {self.top1_agreement:.2f}%")
        if self.sequence_agreement is not None:
            parts.append(f"whole sequences unchanged {self.sequence_agreement:.2f}%")
        if self.ref_top1_acc is not None:
            parts.append(f"top-1 acc {self.ref_top1_acc:.2f}% -> {self.cand_top1_acc:.2f}%")
        return ", ".join(parts)


@dataclass
class LayerCheck:
    """Error at the output tensor of one rewritten layer (relative L2 = ||d|| / ||ref||)."""

    node: str
    output: str
    rel_err: float
    max_abs_err: float
    cosine: float
    sqnr_db: float


@dataclass
class Check:
    """The verdict of one comparison and every figure behind it."""

    tolerance: AnyTolerance | None
    samples: int
    data: str
    has_labels: bool
    outputs: list[OutputCheck]
    layers: list[LayerCheck] = field(default_factory=list)
    layers_not_found: list[str] = field(default_factory=list)
    metric: dict[str, Any] | None = None  # a user metric's scores (onnxcomp.metrics.MetricScore.as_dict)

    @property
    def passed(self) -> bool:
        """True when every output has finite values wherever the reference does and meets every
        criterion of the tolerance (without a tolerance, only the first condition applies), and a
        user metric that drives the verdict holds its bound."""
        return all(o.passed for o in self.outputs) and (self.metric is None or self.metric.get("passed", True))

    @property
    def worst_output(self) -> str | None:
        """The failing output with the lowest SQNR (or, if all pass, the lowest-SQNR output)."""
        pool = [o for o in self.outputs if not o.passed] or self.outputs
        if not pool:
            return None
        return min(pool, key=lambda o: (o.sqnr_db, -o.max_abs_err)).name

    @property
    def worst_layer(self) -> str | None:
        """Node name of the captured rewritten layer with the largest relative error (None without layers)."""
        if not self.layers:
            return None
        return max(self.layers, key=lambda layer: (layer.rel_err, layer.max_abs_err)).node

    def output(self, name: str) -> OutputCheck:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def describe(self) -> str:
        """One line: verdict, the worst output's figures, why it failed, and on what data."""
        verdict = "PASS" if self.passed else "FAIL"
        worst = self.worst_output
        text = verdict
        if self.metric is not None:
            m = self.metric
            text += (f": metric {m['name']} {_num(m['reference'])} -> {_num(m['candidate'])}"
                     f" (drop {_num(m['drop'])}" + (f", max {m['max_drop']:g})" if m.get("max_drop") is not None else ")"))
            if not m.get("passed", True):
                return f"{text}; {self.samples} samples of {self.data}"
        if worst is not None:
            o = self.output(worst)
            text += f"{';' if self.metric is not None else ':'} output '{o.name}' {o.brief()}"
            if o.failures:
                text += f" [{'; '.join(o.failures)}]"
            others = [x.name for x in self.outputs if not x.passed and x.name != worst]
            if others:
                text += f"; also failing: {', '.join(others)}"
        tol = self.tolerance.describe() if self.tolerance is not None else "none (figures only)"
        return f"{text}; {self.samples} samples of {self.data}; tolerance {tol}"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "passed": self.passed,
            "worst_output": self.worst_output,
            "worst_layer": self.worst_layer,
            "max_abs_err": max((o.max_abs_err for o in self.outputs), default=None),
            "min_cosine": min((o.cosine_min for o in self.outputs), default=None),
            "min_sqnr_db": min((o.sqnr_db for o in self.outputs), default=None),
        }
        out["kinds"] = {o.name: o.kind for o in self.outputs}
        cls = [o for o in self.outputs if o.top1_agreement is not None and o.kind == "classify"]
        if cls:
            out["top1_agreement"] = min(o.top1_agreement for o in cls)
            out["top5_agreement"] = min(o.top5_agreement for o in cls)
            if self.has_labels:
                out["ref_top1_acc"] = cls[0].ref_top1_acc
                out["cand_top1_acc"] = cls[0].cand_top1_acc
        seq = [o for o in self.outputs if o.sequence_agreement is not None]
        if seq:
            out["position_agreement"] = min(o.top1_agreement for o in seq)
            out["sequence_agreement"] = min(o.sequence_agreement for o in seq)
        if self.metric is not None:
            out["metric"] = self.metric
        out["samples"] = self.samples
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (inf/NaN become strings), with a "summary" key for reports."""
        from onnxcomp.passes.base import _jsonable

        return _jsonable({
            "passed": self.passed,
            "summary": self.summary(),
            "describe": self.describe(),
            "tolerance": self.tolerance.as_dict() if self.tolerance is not None else None,
            "samples": self.samples,
            "data": self.data,
            "outputs": [asdict(o) for o in self.outputs],
            "layers": [asdict(layer) for layer in self.layers],
            "layers_not_found": self.layers_not_found,
            "worst_output": self.worst_output,
            "worst_layer": self.worst_layer,
        })


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, (int, float)) else str(v)


def _db(v: float) -> str:
    if math.isinf(v):
        return "inf dB" if v > 0 else "-inf dB"
    return f"{v:.1f} dB"


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
RANDOM_SAMPLES = 8
CAPTURE_BUDGET = 256 * 2**20  # bytes of captured layer activations (both models) per run
REF_CACHE_BYTES = 1 << 30  # reference outputs kept between checks (onnxcomp.guard)


def _field(record: Any, key: str, default: Any = "") -> Any:
    if isinstance(record, dict):
        return record.get(key, default)
    return getattr(record, key, default)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The leading dim the model's inputs fix (None when it is free in every input)."""
    from onnxcomp.data import model_inputs

    fixed = {s.fixed_batch for s in model_inputs(model) if s.fixed_batch is not None}
    return min(fixed) if fixed else None


def batch_model(ref: onnx.ModelProto, cand: onnx.ModelProto) -> onnx.ModelProto:
    """The model a data source for comparing `ref` with `cand` should be opened against: the
    candidate when it fixes a leading (batch) dim that the reference leaves free (e.g. a model
    exported at batch 1), else the reference."""
    return cand if _fixed_batch(ref) is None and _fixed_batch(cand) is not None else ref


def _check_inputs(ref: onnx.ModelProto, cand: onnx.ModelProto) -> dict[str, np.dtype]:
    """BadInputError unless both models can take the same feeds: same input names, same dtype kind,
    same rank, no dim fixed differently. Returns the candidate inputs whose dtype differs only in
    precision (e.g. float16 vs float32): the feeds are cast to it for the candidate."""
    from onnxcomp.data import model_inputs

    ref_in = {s.name: s for s in model_inputs(ref)}
    cand_in = {s.name: s for s in model_inputs(cand)}
    if set(ref_in) != set(cand_in):
        raise BadInputError(
            f"the models' inputs differ: reference {', '.join(sorted(ref_in))}; candidate {', '.join(sorted(cand_in))}"
        )
    casts: dict[str, np.dtype] = {}
    for name, r in ref_in.items():
        c = cand_in[name]
        if r.dtype != c.dtype:
            if r.dtype.kind != c.dtype.kind:
                raise BadInputError(f"input '{name}' is {r.dtype} in the reference but {c.dtype} in the candidate")
            casts[name] = c.dtype
        if r.dims is None or c.dims is None:
            continue
        if len(r.dims) != len(c.dims):
            raise BadInputError(
                f"input '{name}' has rank {len(r.dims)} in the reference but {len(c.dims)} in the candidate"
            )
        for k, (a, b) in enumerate(zip(r.dims, c.dims, strict=True)):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                raise BadInputError(f"input '{name}' dim {k} is {a} in the reference but {b} in the candidate")
    return casts


def resolve_source(model: onnx.ModelProto, ctx_or_source: Any) -> Any:
    """The DataSource to check on: a Context's data, else random data from its shapes and seed."""
    from onnxcomp.data import DataSource, open_source, random_source
    from onnxcomp.passes.base import Context

    if isinstance(ctx_or_source, Context):
        if ctx_or_source.data is not None:
            return open_source(ctx_or_source.data, model=model, input_shapes=ctx_or_source.input_shapes)
        return random_source(model, ctx_or_source.input_shapes, samples=RANDOM_SAMPLES,
                             batch_size=RANDOM_SAMPLES, seed=ctx_or_source.seed)
    if isinstance(ctx_or_source, DataSource):
        return ctx_or_source
    if ctx_or_source is None:
        return random_source(model, None, samples=RANDOM_SAMPLES, batch_size=RANDOM_SAMPLES, seed=0)
    return open_source(ctx_or_source, model=model)


def compare(
    ref: onnx.ModelProto | str,
    cand: onnx.ModelProto | str,
    ctx_or_source: Any,
    tolerance: AnyTolerance | None,
    layers: Sequence[Any] | None = None,
    *,
    threads: int | None = None,
    task: str | dict[str, str] | None = None,
    metric: Any = None,
    ref_cache: dict | None = None,
) -> Check:
    """Run `ref` and `cand` on identical inputs and judge every output against `tolerance`.

    `ctx_or_source` is a passes.base.Context (its data, else random data from the reference's
    inputs, its input_shapes and seed), a DataSource or anything `open_source` accepts. `layers`
    are LayerRecords (objects or their dicts); the rewritten ones' `output` tensors are compared too.
    Raise BadInputError for: different output names or shapes, inputs the two models cannot both
    take (names, dtype kinds, ranks, fixed dims), non-finite input data, and data onnxruntime
    cannot run. A candidate that fixes a batch dim the reference leaves free runs in chunks of it;
    one whose inputs differ only in float precision gets the feeds cast to its dtype.

    `task` forces output kinds: one kind for every output, or {output name: kind} ("" = the rest).
    `metric` is an onnxcomp.metrics.UserMetric: it sees every output of every sample (kept in memory),
    and its drop joins the verdict when it has a bound. `ref_cache` (a dict the caller keeps for one
    reference model and one data source) stores the reference's outputs so later calls skip running
    it; it is used only when no layer is captured. BadInputError when a forced kind does not fit
    an output's shape, or a flat tolerance's task criterion applies to no output.
    """
    from onnxcomp.model import as_model
    from onnxcomp.passes.base import REWRITTEN
    from onnxcomp.runtime import make_session, run_session, tensor_names

    ref_m = as_model(ref)
    cand_m = as_model(cand)
    ref_outs = [o.name for o in ref_m.graph.output]
    cand_outs = [o.name for o in cand_m.graph.output]
    if set(ref_outs) != set(cand_outs):
        only_r = sorted(set(ref_outs) - set(cand_outs))
        only_c = sorted(set(cand_outs) - set(ref_outs))
        raise BadInputError(
            f"the models' outputs differ: only in the reference: {', '.join(only_r) or '-'}; "
            f"only in the candidate: {', '.join(only_c) or '-'}"
        )
    casts = _check_inputs(ref_m, cand_m)
    source = resolve_source(batch_model(ref_m, cand_m), ctx_or_source)
    # A candidate that fixes the batch dim the reference leaves free runs in chunks of that size.
    chunk = _fixed_batch(cand_m) if _fixed_batch(ref_m) is None else None

    # layers to capture: rewritten ones whose preserved output exists in both models
    layer_nodes: dict[str, str] = {}
    not_found: list[str] = []
    if layers:
        r_names, c_names = tensor_names(ref_m), tensor_names(cand_m)
        for rec in layers:
            if _field(rec, "action") != REWRITTEN:
                continue
            out, node = _field(rec, "output"), _field(rec, "node")
            if not out:
                continue
            if out in r_names and out in c_names:
                if out not in ref_outs:
                    layer_nodes.setdefault(out, node)
            else:
                not_found.append(node)
    captured = list(layer_nodes)

    def session(what: str, m: onnx.ModelProto):
        try:
            return make_session(m, optimize=False, threads=threads, extra_outputs=captured)
        except BadInputError as exc:
            raise BadInputError(f"{what}: {exc}") from None

    use_cache = ref_cache is not None and not captured
    sess_c = session("candidate", cand_m)
    sess_r = None if use_cache and ref_cache.get("complete") else session("reference", ref_m)
    names = ref_outs + captured
    if isinstance(task, str) and task not in KINDS or isinstance(task, dict) and not set(task.values()) <= set(KINDS):
        raise BadInputError(f"task {task!r}: expected one of {', '.join(KINDS)}")
    out_diff = {n: _Diff() for n in ref_outs}
    out_top: dict[str, _TopK | None] = {}
    out_arg: dict[str, _Argmax | None] = {}
    out_kind: dict[str, str] = {}
    out_tol: dict[str, Tolerance | None] = {}
    kept: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in ref_outs} if metric else {}
    kept_labels: list[np.ndarray] = []
    out_shape: dict[str, list[int]] = {}
    layer_diff = {n: _Diff() for n in captured}
    mismatched: set[str] = set()
    samples = 0
    per_sample: dict[str, bool] = {}
    # Layer capture can hold many large activations per sample: when the batch axis is free, run
    # sub-batches sized so the captured tensors of both models stay near CAPTURE_BUDGET bytes.
    splittable = chunk is not None or (bool(captured) and _fixed_batch(ref_m) is None)
    step: int | None = chunk

    calls = [0]

    def run_once(feeds: dict[str, np.ndarray], labels: np.ndarray | None, n: int) -> int:
        key = (calls[0], n, tuple(sorted((k, v.shape) for k, v in feeds.items())))  # same data, same chunking
        calls[0] += 1
        if use_cache and key in ref_cache:
            rv = ref_cache[key]
        else:
            nonlocal sess_r
            if sess_r is None:
                sess_r = session("reference", ref_m)
            rv = run_session(sess_r, names, feeds, "reference")
            if use_cache and ref_cache.get("bytes", 0) < REF_CACHE_BYTES:
                ref_cache[key] = rv
                ref_cache["bytes"] = ref_cache.get("bytes", 0) + sum(getattr(v, "nbytes", 0) for v in rv)
        cand_feeds = {k: v.astype(casts[k]) if k in casts else v for k, v in feeds.items()}
        cv = run_session(sess_c, names, cand_feeds, "candidate")
        captured_bytes = 0
        for name, r, c in zip(names, rv, cv, strict=True):
            if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
                raise BadInputError(f"output '{name}' is not a tensor; only tensor outputs can be compared")
            if r.shape != c.shape and name not in out_diff:
                # a later pass's layer whose tensor an earlier pass reshaped (trimmed channels): not comparable
                mismatched.add(name)
                continue
            if r.shape != c.shape:
                what = "output" if name in out_diff else "layer output"
                raise BadInputError(
                    f"{what} '{name}' has shape {list(r.shape)} in the reference but {list(c.shape)} in the candidate"
                )
            if name in out_diff:
                if name not in out_shape:
                    out_shape[name] = list(r.shape)
                    per_sample[name] = r.ndim >= 1 and r.shape[0] == n
                    forced = _resolve_task(task, name)
                    if forced is not None:
                        why = _kind_fits(forced, r.shape, n)
                        if why:
                            raise BadInputError(f"output '{name}' cannot be read as task {forced}: {why}")
                    kind = forced or infer_kind(r.shape, n)
                    out_kind[name] = kind
                    out_tol[name] = tolerance.for_kind(kind) if tolerance is not None else None
                    out_top[name] = _TopK() if kind == "classify" else None
                    out_arg[name] = _Argmax(axis=2 if kind == "sequence" else 1) if kind in ("sequence", "dense") else None
                out_diff[name].add(r, c, n, out_tol[name])
                top = out_top[name]
                if top is not None:
                    rv2, cv2 = _classifier_view(r, n), _classifier_view(c, n)
                    if rv2 is not None and cv2 is not None:
                        top.add(rv2, cv2, labels)
                arg = out_arg[name]
                if arg is not None and r.ndim > arg.axis:
                    arg.add(r, c)
                if name in kept:
                    kept[name][0].append(r)
                    kept[name][1].append(c)
            else:
                layer_diff[name].add(r, c, n, None)
                captured_bytes += r.nbytes + c.nbytes
        if metric is not None and labels is not None:
            kept_labels.append(np.asarray(labels))
        return captured_bytes

    for feeds, labels in source.batches():
        _check_finite(feeds, source.description)
        first = next(iter(feeds.values()))
        n = int(first.shape[0]) if first.ndim else 1
        if chunk is not None and n % chunk:
            raise BadInputError(
                f"{source.description}: a batch of {n} samples, but the candidate fixes its batch dim to {chunk}"
            )
        if not splittable or n == 1 or n == chunk:
            run_once(feeds, labels, n)
        else:
            start = 0
            while start < n:
                k = min(step or 1, n - start)
                part = {name: v[start : start + k] for name, v in feeds.items()}
                used = run_once(part, None if labels is None else labels[start : start + k], k)
                if step is None:
                    step = max(1, int(CAPTURE_BUDGET // max(used / k, 1)))
                start += k
        samples += n
    if use_cache and sum(1 for k in ref_cache if isinstance(k, tuple)) >= calls[0]:
        ref_cache["complete"] = True
    for name, flag in per_sample.items():
        if flag:
            out_shape[name][0] = samples
    if samples == 0:
        raise BadInputError(f"{source.description}: no samples to compare on")

    outputs = [_output_check(name, out_diff[name], out_top.get(name), out_arg.get(name), out_kind.get(name, "regress"),
                             out_shape.get(name, []), out_tol.get(name)) for name in ref_outs]
    if tolerance is not None:
        check_applicable(tolerance, {o.name: o.kind for o in outputs})
    metric_score = None
    if metric is not None:
        ref_all = {k: np.concatenate(v[0]) for k, v in kept.items()}
        cand_all = {k: np.concatenate(v[1]) for k, v in kept.items()}
        labels_all = np.concatenate(kept_labels) if kept_labels else None
        metric_score = metric.score(ref_all, cand_all, labels_all).as_dict()
    layer_checks = [
        LayerCheck(layer_nodes[name], name, d.rel_l2, d.max_abs, d.cosine_global, d.sqnr_db)
        for name, d in layer_diff.items() if name not in mismatched
    ]
    not_found += [layer_nodes[name] for name in captured if name in mismatched]
    return Check(
        tolerance=tolerance,
        samples=samples,
        data=source.description,
        has_labels=bool(source.has_labels),
        outputs=outputs,
        layers=layer_checks,
        layers_not_found=not_found,
        metric=metric_score,
    )


def check_applicable(tolerance: AnyTolerance, kinds: dict[str, str]) -> None:
    """BadInputError when a flat tolerance's task criterion applies to none of the outputs (a bound
    that is never checked reads as a promise). `kinds` maps output names to their kinds."""
    needs = tolerance.needs()
    present = set(kinds.values())
    shown = ", ".join(f"{k} ({v})" for k, v in kinds.items())
    if "argmax" in needs and not present & set(ARGMAX_KINDS):
        raise BadInputError("--max-top1-drop needs a classifier, sequence or dense output "
                            f"([N, C], [N, T, C] or [N, C, H, W] scores); this model's outputs are: {shown}")
    if "sequence" in needs and not present & {"sequence", "dense"}:
        raise BadInputError(f"--max-sequence-drop needs a sequence or dense output; this model's outputs are: {shown}")


def _check_finite(feeds: dict[str, np.ndarray], where: str) -> None:
    """A check on NaN or infinite inputs proves nothing (NaN == NaN counts as agreement)."""
    for name, v in feeds.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            raise BadInputError(f"{where}: input '{name}' holds {bad} NaN or infinite values; give finite data")


def _output_check(name: str, d: _Diff, top: _TopK | None, arg: _Argmax | None, kind: str, shape: list[int],
                  tol: Tolerance | None) -> OutputCheck:
    oc = OutputCheck(
        name=name,
        shape=shape,
        elements=d.elements,
        kind=kind,
        max_abs_err=d.max_abs,
        mean_abs_err=d.sum_abs / d.elements if d.elements else 0.0,
        max_rel_err=d.max_rel,
        cosine_min=d.cos_min if d.cos_n else 1.0,
        cosine_mean=d.cos_sum / d.cos_n if d.cos_n else 1.0,
        sqnr_db=d.sqnr_db,
        violations=d.violations if tol is not None and tol.elementwise else None,
    )
    if d.nonfinite:
        oc.failures.append(f"{d.nonfinite} non-finite values where the reference differs")
    if top is not None and top.samples:
        oc.top1_agreement = 100.0 * top.agree1 / top.samples
        oc.top5_agreement = 100.0 * top.agree5 / top.samples
        if top.labelled:
            oc.ref_top1_acc = 100.0 * top.ref_correct1 / top.labelled
            oc.cand_top1_acc = 100.0 * top.cand_correct1 / top.labelled
            oc.ref_top5_acc = 100.0 * top.ref_correct5 / top.labelled
            oc.cand_top5_acc = 100.0 * top.cand_correct5 / top.labelled
    if arg is not None and arg.samples:
        oc.top1_agreement = 100.0 * arg.agree / arg.positions
        oc.sequence_agreement = 100.0 * arg.agree_all / arg.samples
    if tol is None:  # figures only; a NaN/inf where the reference is finite still fails (above)
        return oc
    if tol.elementwise and d.violations:
        oc.failures.append(
            f"{d.violations} of {d.elements} values beyond atol {tol.atol or 0:g} + rtol {tol.rtol or 0:g}*|ref| "
            f"(max abs err {d.max_abs:.3g}, max rel err {d.max_rel:.3g})"
        )
    if tol.min_cosine is not None and not (oc.cosine_min >= tol.min_cosine):
        oc.failures.append(f"cosine {oc.cosine_min:.6f} < {tol.min_cosine:g}")
    if tol.min_sqnr_db is not None and not (oc.sqnr_db >= tol.min_sqnr_db):
        oc.failures.append(f"SQNR {_db(oc.sqnr_db)} < {tol.min_sqnr_db:g} dB")
    if tol.max_top1_drop is not None and oc.top1_drop is not None and not (oc.top1_drop <= tol.max_top1_drop):
        if oc.kind != "classify":
            what = "argmax disagreement per position"
        else:
            what = "top-1 accuracy drop" if oc.ref_top1_acc is not None else "top-1 disagreement"
        oc.failures.append(f"{what} {oc.top1_drop:.2f} points > {tol.max_top1_drop:g}")
    if tol.max_sequence_drop is not None and oc.sequence_drop is not None and not (oc.sequence_drop <= tol.max_sequence_drop):
        oc.failures.append(f"{oc.sequence_drop:.2f}% of samples changed their argmax sequence > {tol.max_sequence_drop:g}")
    return oc
