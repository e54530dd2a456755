"""`codebook`: weights shared through K centroids, stored as packed indices plus a small float
codebook (Deep k-Means, Wu et al., ICML 2018).

Per selected Conv / Gemm / MatMul weight (float32, constant, used by that node alone):

* **Clustering**: scalar weights by exact 1-D k-means (onnxcomp.linalg.kmeans: dynamic programming
  on the weighted distinct values or a fine histogram), per tensor, per output channel or per
  `group:<n>` output channels; or, `vector=row`, the kernel rows of a conv (Kw values each, the
  paper's row-stationary sharing) by weighted Lloyd from k-means++. With `--data` (`weighting=auto`)
  each weight's error is weighted by its input channel's second moment (see `allocate`).
* **Rounding**: with `--data` (`compensate=auto`) scalar weights are rounded onto their codebook by
  GPTQ (onnxcomp.linalg.gptq, Hessians in `hessian`): one input column at a time, each column's error
  moved onto the columns not yet rounded along the inverse of the layer's input second moment E[x x^T].
  Columns go in act order (the largest input second moment first). On the PP-OCR recognizer at 4 bits
  with channel scales it reads 94.5% of 200 rendered lines right where nearest rounding reads 12.5%
  (fp32 93%); on the glyph models it cuts the output error 3.6-5.8x at 3 bits.
  Without data every weight goes to its nearest centroid.
* **Channel scales** (`scale=channel`): one codebook per tensor on the weights divided by their
  output channel's max |w|, multiplied back in the decode (one float per channel, where per-channel
  codebooks cost K floats per channel: on PP-OCR's 1x1 convs, 4-bit per-channel codebooks made the file
  2x larger than per-tensor ones). A BN-folded layer whose channels differ in scale otherwise spends its
  centroids on the loudest channels. The clustering weights each value by its scale squared, so it
  minimises the error of the real weights.
* **Bits**: `bits=b` (K = 2^b) or `k=K` for every layer, or (the default) `avg_bits=4`: per-layer
  bits in [min_bits, max_bits] chosen where the measured sensitivity per byte saved is lowest
  (`allocate`); uniform low bits break real models (one squeeze-excitation gate at 4 bits was
  enough to break a trained recognizer, measured here), so uniform bits are not the default.
* **Graph**: the weight becomes `indices -> (unpack) -> Cast -> Gather(codebook) -> Reshape`
  (onnxcomp.passes.codebook.decode), which onnxruntime folds into a dense weight at load: the file
  shrinks, the run does not slow down. Node names: `<layer>/codebook_*`.

A layer the pass does not rewrite is left byte-identical, with the reason. K above a layer's number
of distinct values is capped (and said). Composes with `tucker` (its factors are ordinary Conv
weights, clustered like any other); `int8` after `codebook` leaves codebook layers in float (their
weights are no longer plain constants), and `codebook` after `int8` skips quantized weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcomp.errors import BadInputError
from onnxcomp.graph import GraphEditor, GraphIndex, attr, node_label, opset_version
from onnxcomp.linalg import bitpack, kmeans
from onnxcomp.model import convert_opset
from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassConfig,
    PassResult,
    option,
)
from onnxcomp.passes.codebook import allocate, decode, hessian

_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class CodebookConfig(PassConfig):
    bits: int = option(0, "index bits for every layer, K = 2^bits (1..8); 0: per-layer bits meeting avg_bits",
                       stronger="lower")
    k: int = option(0, "centroids per codebook for every layer (2..256; overrides bits)", stronger="lower")
    avg_bits: float = option(4.0, "with bits=0 and k=0: average bits per weight over the selected layers (a layer "
                             "kept float counts 32), spent where the measured sensitivity per byte saved is lowest",
                             search=[6.0, 5.0, 4.0, 3.0], stronger="lower")
    min_bits: int = option(2, "fewest bits a layer may get under avg_bits")
    max_bits: int = option(8, "most bits a layer may get under avg_bits")
    granularity: str = option("tensor", "one codebook per tensor | channel (output channel) | group:<n> output channels")
    scale: str = option("none", "none | channel: divide each output channel by its max |w| before one shared codebook "
                        "per tensor, multiply back in the decode (one float per channel)", choices=("none", "channel"))
    vector: str = option("1", "1: scalar weights | row: conv kernel rows (Kw values) share a codebook entry",
                         choices=("1", "row"))
    init: str = option("auto", "auto (optimal for scalars, kmeans++ for rows) | optimal (exact DP) | kmeans++ | "
                       "linear | quantile (Lloyd from that seeding)", choices=("auto", *kmeans.INITS))
    weighting: str = option("auto", "auto: with --data, each weight's error weighted by its input channel's second "
                            "moment (Hessian diagonal) | hessian (needs --data) | none", choices=("auto", "hessian", "none"))
    compensate: str = option("auto", "auto: gptq with --data, else none | gptq (needs --data): round each layer onto "
                             "its codebook one input column at a time, moving each column's error onto the columns not "
                             "yet rounded along the inverse input Hessian (GPTQ) | none: every weight to its nearest "
                             "centroid", choices=("auto", "gptq", "none"))
    storage: str = option("auto", "index storage: auto (UINT4/UINT2 where the opset has them, else packed, 8 bits as "
                          "uint8) | native (convert the opset to 21/25 for 4/2-bit indices) | packed | uint8",
                          choices=("auto", "native", "packed", "uint8"))
    min_params: int = option(1024, "skip weights with fewer values (the codebook would cost more than it saves)")
    samples: int = option(32, "calibration samples for the second moments and the sensitivity probes")
    probe_bits: int = option(3, "bits of the per-layer sensitivity probe under avg_bits with --data")
    keep_float: bool = option(True, "avg_bits may leave the most sensitive layers in float (counted at 32 bits)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: must be 1..8 (0: chosen per layer to meet avg_bits)")
        if self.k == 1 or not 0 <= self.k <= 256:
            raise ValueError(f"k={self.k}: must be 2..256 (one centroid would replace the layer by a constant)")
        if not 1 <= self.min_bits <= self.max_bits <= 8:
            raise ValueError(f"min_bits={self.min_bits}, max_bits={self.max_bits}: need 1 <= min_bits <= max_bits <= 8")
        if self.bits == 0 and self.k == 0:
            if self.avg_bits >= 32:
                raise ValueError(f"avg_bits={self.avg_bits:g} is not below the model's 32-bit float weights")
            if not self.min_bits <= self.avg_bits <= self.max_bits:
                raise ValueError(f"avg_bits={self.avg_bits:g}: must lie in [min_bits, max_bits] = "
                                 f"[{self.min_bits}, {self.max_bits}]")
            if self.vector == "row":
                raise ValueError("avg_bits allocates scalar codebooks: give bits= or k= with vector=row")
        parse_granularity(self.granularity)
        if self.vector == "row" and self.granularity != "tensor":
            raise ValueError("vector=row clusters rows with one codebook per tensor: use granularity=tensor")
        if self.scale == "channel" and (self.granularity != "tensor" or self.vector == "row"):
            raise ValueError("scale=channel shares one scalar codebook per tensor: use granularity=tensor and vector=1")
        if self.compensate == "gptq" and self.vector == "row":
            raise ValueError("compensate=gptq rounds scalar weights: use vector=1")
        if self.min_params < 1 or self.samples < 1:
            raise ValueError("min_params and samples must be >= 1")
        if not 1 <= self.probe_bits <= 8:
            raise ValueError("probe_bits must be in 1..8")


def parse_granularity(text: str) -> int:
    """0 per tensor, 1 per channel, n for group:<n>; ValueError naming the option otherwise."""
    if text == "tensor":
        return 0
    if text == "channel":
        return 1
    m = re.fullmatch(r"group:(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"granularity={text!r}: expected tensor, channel or group:<n> with n >= 1")


@dataclass
class _Plan:
    """One layer to rewrite. The weight is not held (a 100M-value layer would stay in memory for the
    whole pass): `weight()` reads it again, and the grouped arrays live only while a step needs them."""

    node: onnx.NodeProto
    index: GraphIndex
    shape: tuple[int, ...]
    layout: decode.Layout
    in_name: str  # the layer's input tensor (for second moments)
    in_axis: int  # its channel axis
    sens_axis: int  # the weight axis the input channel runs along
    groups_per_in: int  # conv groups (input channel of weight (o, s) is (o // (T/g)) * S/g + s)
    out_axis: int = 0  # the weight's output-channel axis
    channel_scale: np.ndarray | None = None  # scale=channel: max |w| per output channel (float32, > 0)
    moments: np.ndarray | None = None  # E[x^2] per input channel (data-aware), None: unweighted
    columns: hessian.ColumnLayout | None = None  # compensate=gptq: the weight as [G, R, D] input columns
    hessian: np.ndarray | None = None  # compensate=gptq: E[x x^T] per group [G, D, D]
    summaries: list | None = None
    bits: float = 0
    k: int = 0
    gain: float | None = None
    figures: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_label(self.node)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def weight(self) -> np.ndarray:
        return self.index.array(self.node.input[1])

    def scale_shape(self) -> list[int]:
        """The channel scale's shape broadcasting against the weight (C along the output axis)."""
        dims = [1] * len(self.shape)
        dims[self.out_axis] = self.shape[self.out_axis]
        return dims

    def sensitivity(self) -> np.ndarray | None:
        """Per-weight weights for the clustering (weight-shaped float32), from the input moments."""
        h = self.moments
        if h is None:
            return None
        shape = self.shape
        if self.node.op_type == "Conv":
            T, s_per = shape[0], shape[1]
            chan = (np.arange(T) // max(T // self.groups_per_in, 1))[:, None] * s_per + np.arange(s_per)[None, :]
            if chan.max() >= h.size:
                return None  # a shape the moments do not cover: unweighted
            sens = h[chan].reshape(T, s_per, *([1] * (len(shape) - 2)))
        else:
            if h.size != shape[self.sens_axis]:
                return None
            dims = [1] * len(shape)
            dims[self.sens_axis] = h.size
            sens = h.reshape(dims)
        # a small floor: a weight on a dead channel still has to land somewhere sensible
        return np.broadcast_to((sens + 1e-6 * max(float(h.mean()), 1e-30)).astype(np.float32), shape)

    def grouped(self, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, weights) in the clustering layout: (G, L) groups (padded, pad weight 0) or (R, d)
        kernel rows with one weight per row; of the layer's weight or of `weight` (its shape)."""
        w, sens = (self.weight() if weight is None else weight), self.sensitivity()
        if self.channel_scale is not None:
            s = self.channel_scale.reshape(self.scale_shape())
            w = w / s  # the clustered values; each counts its scale squared in the real weight's error
            sens = np.broadcast_to(s * s, self.shape) if sens is None else sens * (s * s)
        lay = self.layout
        if lay.rows:
            return w.reshape(-1, w.shape[-1]), None if sens is None else sens.reshape(-1, w.shape[-1]).mean(axis=1)
        if lay.per_group == 0:
            return w.reshape(1, -1), None if sens is None else np.ascontiguousarray(sens).reshape(1, -1)
        moved = np.moveaxis(w, lay.axis, 0).reshape(w.shape[lay.axis], -1)
        G = -(-moved.shape[0] // lay.per_group)
        values = np.concatenate([moved.ravel(), np.full(lay.pad, moved.ravel()[-1], dtype=w.dtype)]).reshape(G, -1)
        if sens is None and not lay.pad:
            return values, None
        s = np.ones(moved.shape, np.float32) if sens is None else np.moveaxis(sens, lay.axis, 0).reshape(moved.shape)
        return values, np.concatenate([s.ravel(), np.zeros(lay.pad, dtype=np.float32)]).reshape(G, -1)


class CodebookPass(Pass):
    name = "codebook"
    summary = "k-means weight sharing (Deep k-Means): packed indices + codebook, mixed bits by measured sensitivity"
    Config = CodebookConfig
    default_ops = _OPS

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg: CodebookConfig = self.config  # type: ignore[assignment]
        weighted = cfg.weighting == "hessian" or (cfg.weighting == "auto" and ctx.data is not None)
        if cfg.weighting == "hessian" and ctx.data is None:
            raise BadInputError("codebook weighting=hessian needs calibration data: give --data")
        if cfg.compensate == "gptq" and ctx.data is None:
            raise BadInputError("codebook compensate=gptq needs calibration data: give --data")
        compensate = cfg.compensate == "gptq" or (cfg.compensate == "auto" and ctx.data is not None and cfg.vector == "1")
        index = GraphIndex(model)
        layers: list[LayerRecord] = []
        plans: list[_Plan] = []
        for node in self.candidates(model):
            plan = self._plan(index, node, cfg)
            if isinstance(plan, str):
                layers.append(LayerRecord(node_label(node), node.op_type, SKIPPED, plan,
                                          output=node.output[0] if node.output else ""))
            else:
                plans.append(plan)
        figures: dict = {"layers_considered": len(layers) + len(plans)}
        if not plans:
            return PassResult(model, layers, figures)
        if weighted:
            self._sensitivities(model, plans, ctx, cfg)
        figures["weighting"] = "hessian diagonal on the calibration data" if weighted else "none (plain k-means)"
        for p in plans:
            self._group(p, cfg)
        if compensate:  # before the allocation: its probes round as the rewrite will
            self._hessians(model, plans, ctx, cfg, figures)
        if cfg.bits or cfg.k:
            for p in plans:
                p.k = cfg.k or 2**cfg.bits
        else:
            self._allocate(model, plans, ctx, cfg, figures)
        opset = opset_version(model)
        out_model = model
        if cfg.storage == "native":
            need = max((decode.NATIVE_OPSET[decode.index_bits(p.k)] for p in plans
                        if p.k and decode.index_bits(p.k) in decode.NATIVE_OPSET), default=0)
            if need > opset:
                converted, note = convert_opset(model, need, "sub-byte indices")
                by_name = {node_label(n): n for n in converted.graph.node}
                if converted is not model and all(p.name in by_name for p in plans):
                    out_model, opset = converted, opset_version(converted)
                    for p in plans:  # the weights are the same tensors; the nodes are the converted ones
                        p.node = by_name[p.name]
                elif converted is not model:
                    note = f"opset {opset} kept: the converter renamed layers"
                figures["opset"] = note
        ed = GraphEditor(out_model)
        for p in plans:
            if p.k == 0:  # avg_bits left it in float
                p.bits = allocate.FLOAT_BITS
                layers.append(LayerRecord(
                    p.name, p.node.op_type, SKIPPED,
                    f"kept in float by avg_bits={cfg.avg_bits:g}: its measured damage per byte saved was among the "
                    f"highest (gain {p.gain:.3g})", p.size, p.size, output=p.node.output[0], figures=dict(p.figures)))
        for p in ctx.progress.iter([p for p in plans if p.k], "codebook"):
            layers.append(self._rewrite(ed, p, cfg, opset, ctx))
        figures["avg_bits_achieved"] = round(sum(p.bits * p.size for p in plans) / sum(p.size for p in plans), 4)
        if not ed.changed:
            return PassResult(model, layers, figures)
        new = ed.apply()
        if any(r.figures.get("storage") in ("uint4", "uint2") for r in layers):
            new.ir_version = max(new.ir_version, decode.min_ir_version(opset))
        return PassResult(new, layers, figures)

    # -- per layer ----------------------------------------------------------------------------------
    def _plan(self, index: GraphIndex, node: onnx.NodeProto, cfg: CodebookConfig) -> _Plan | str:
        reason = self.selection_reason(node)
        if reason:
            return reason
        if len(node.input) < 2:
            return "no weight input"
        wname = node.input[1]
        if not index.is_constant(wname):
            producer = index.producer.get(wname)
            if producer is not None and "/codebook_" in producer.name:
                return "weight already comes from a codebook"
            if producer is not None and producer.op_type == "DequantizeLinear":
                return "weight is int8-quantized (DequantizeLinear): codebook on top of int8 is not supported"
            if node.op_type == "MatMul" and index.is_constant(node.input[0]):
                return "the constant operand is the left one (W @ x): only x @ W is handled"
            return "weight is not a constant initializer (run normalize first for Constant-node weights)"
        if len(index.consumers.get(wname, [])) > 1:
            return f"weight {wname} is shared by {len(index.consumers[wname])} nodes"
        if wname in index.graph_inputs:
            return "weight is also a graph input (it can be overridden at run time)"
        t = index.initializers[wname]
        if t.data_type != onnx.TensorProto.FLOAT:
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            return f"weight dtype {dt} is not float32 (not cast)"
        w = index.array(wname)
        if w.size < cfg.min_params:
            return f"{w.size} weights < min_params={cfg.min_params}: the codebook would cost more than it saves"
        if not np.all(np.isfinite(w)):
            return "weight holds NaN or inf values"
        if float(w.min()) == float(w.max()):
            return "all weights are equal: nothing to share"
        in_name = node.input[0]
        if node.op_type == "Conv":
            out_axis, in_axis, sens_axis, groups = 0, 1, 1, int(attr(node, "group", 1))
        elif node.op_type == "Gemm":
            trans_b = bool(attr(node, "transB", 0))
            out_axis, sens_axis = (0, 1) if trans_b else (1, 0)
            in_axis, groups = (0 if attr(node, "transA", 0) else 1), 1
            if w.ndim != 2:
                return f"Gemm weight of rank {w.ndim}"
        else:
            if w.ndim < 2:
                return "MatMul weight of rank 1"
            out_axis, sens_axis, in_axis, groups = w.ndim - 1, w.ndim - 2, -1, 1
        rows = cfg.vector == "row"
        if rows and (node.op_type != "Conv" or w.ndim < 3 or w.shape[-1] < 2):
            return "vector=row needs a conv kernel with rows of 2 or more (Kw >= 2); use vector=1 for this layer"
        per = parse_granularity(cfg.granularity)
        C = w.shape[out_axis]
        pad = 0 if per == 0 else (-C % per) * (w.size // C)
        layout = decode.Layout(tuple(w.shape), out_axis if per else 0, per, pad, rows)
        plan = _Plan(node, index, tuple(w.shape), layout, in_name, in_axis, sens_axis, groups, out_axis)
        if cfg.scale == "channel":
            peak = np.abs(np.moveaxis(w, out_axis, 0).reshape(C, -1)).max(axis=1)
            plan.channel_scale = np.where(peak > 0, peak, 1.0).astype(np.float32)  # an all-zero channel stays 0
        return plan

    def _sensitivities(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: CodebookConfig) -> None:
        moments = allocate.input_second_moments(model, [(p.in_name, p.in_axis) for p in plans], ctx.data, cfg.samples)
        for p in plans:
            p.moments = moments.get(p.in_name)

    def _hessians(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: CodebookConfig,
                  figures: dict) -> None:
        layouts = {}
        for p in plans:
            lay = hessian.column_layout(p.index, p.node, p.shape)
            if isinstance(lay, str):
                p.figures["compensation"] = f"none: {lay}"
            else:
                layouts[p.name] = (p.in_name, lay)
        h = hessian.input_hessians(model, layouts, ctx.data, cfg.samples, ctx.rng("codebook", "hessian"))
        for p in plans:
            if p.name in h:
                p.columns, p.hessian = layouts[p.name][1], h[p.name]
        figures["compensation"] = (f"gptq: {len(h)} of {len(plans)} layers rounded column by column on the input "
                                   f"Hessian of {cfg.samples} samples")

    def _compensated(self, p: _Plan, centroids: np.ndarray, record: bool = True) -> np.ndarray:
        """The layer's weight rounded onto its codebook(s) by GPTQ (each entry a centroid, times the
        channel scale under scale=channel), in the weight's shape; `record`: both output errors
        (on the calibration Hessian) go in the layer's figures."""
        from onnxcomp.linalg.gptq import compensated_rounding, output_error

        lay = p.columns
        w = lay.matrix(p.weight().astype(np.float64))
        out_ch = lay.output_channel()
        book = out_ch // p.layout.per_group if p.layout.per_group else np.zeros_like(out_ch)
        cents = np.sort(np.asarray(centroids, np.float64), axis=1)[book]  # [G, R, K]
        mids = 0.5 * (cents[..., 1:] + cents[..., :-1])
        scale = (np.ones(out_ch.shape) if p.channel_scale is None
                 else p.channel_scale.astype(np.float64)[out_ch])[..., None]  # [G, R, 1]

        def nearest(v: np.ndarray) -> np.ndarray:
            u = v / scale
            idx = (u[..., None] > mids[:, :, None, :]).sum(axis=-1)
            return np.take_along_axis(cents, idx.reshape(*idx.shape[:2], -1), axis=2).reshape(u.shape) * scale

        q = compensated_rounding(w, p.hessian, nearest)
        if record:
            p.figures["output_error_nearest"] = round(output_error(w, nearest(w), p.hessian), 8)
            p.figures["output_error_compensated"] = round(output_error(w, q, p.hessian), 8)
        return lay.weight(q).astype(np.float32)

    def _group(self, p: _Plan, cfg: CodebookConfig) -> None:
        """The scalar summaries the DP runs on (small: kept for every layer; the weight is not)."""
        if p.layout.rows:
            return
        values, weights = p.grouped()
        k_hint = cfg.k or 2 ** (cfg.bits or cfg.max_bits)
        # per-channel groups are many and small: 16 points per centroid keep the DP fast
        max_points = 4096 if values.shape[0] == 1 else int(np.clip(16 * k_hint, 64, 4096))
        p.summaries = kmeans.summarise(values, weights, max_points=max_points)

    def _init(self, cfg: CodebookConfig, rows: bool) -> str:
        if cfg.init == "auto":
            return "kmeans++" if rows else "optimal"
        return cfg.init

    def _allocate(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: CodebookConfig,
                  figures: dict) -> None:
        choices = range(cfg.min_bits, cfg.max_bits + 1)
        # every layer's groups in one DP per bit width (the DP is vectorised across groups)
        owner = np.concatenate([np.full(len(p.summaries), i) for i, p in enumerate(plans)])
        every = [sm for p in plans for sm in p.summaries]
        scale = np.maximum(np.bincount(owner, weights=kmeans.total_weight(every), minlength=len(plans)), 1e-30)
        errors: list[dict[int, float]] = [{} for _ in plans]
        for b in ctx.progress.iter(list(choices), "codebook errors per bit width"):
            fit = kmeans.fit_centroids(every, 2**b, init=self._init(cfg, False), rng=ctx.rng("codebook", str(b)),
                                       dp_points=max(256, 4 * 2**b) if b >= 6 else None)  # estimates
            per_layer = np.bincount(owner, weights=fit.sse, minlength=len(plans)) / scale
            for i in range(len(plans)):
                errors[i][b] = float(per_layer[i])
        if ctx.data is not None:
            from onnxcomp.sensitivity import OutputErrorProbe

            probe = OutputErrorProbe(model, ctx.data, max_samples=cfg.samples)
            pb = min(max(cfg.probe_bits, cfg.min_bits), cfg.max_bits)

            def probe_error(i: int) -> float:
                p = plans[i]
                cl = kmeans.fit_centroids(p.summaries, 2**pb, init=self._init(cfg, False), rng=ctx.rng("codebook", p.name))
                if p.hessian is not None:  # rounded as the rewrite will round it
                    return probe.error(_with_weight(model, p, self._compensated(p, cl.centroids, record=False)))
                values, _ = p.grouped()
                return probe.error(_with_weight(model, p, _decoded(p, cl.centroids, kmeans.assign(values, cl.centroids))))

            gains = allocate.measured_gains(probe_error, [errors[i][pb] for i in range(len(plans))])
            how = " (gptq rounding)" if any(p.hessian is not None for p in plans) else ""
            figures["allocation"] = (f"measured: model output error with each layer alone at {pb} bits{how}, "
                                     f"{cfg.samples} samples")
        else:
            gains = [1.0] * len(plans)
            figures["allocation"] = "weight-error proxy (no --data: every layer's error counts the same)"
        if cfg.keep_float:
            for e in errors:
                e[allocate.FLOAT_BITS] = 0.0
        bits, achieved = allocate.allocate_bits(errors, [p.size for p in plans], gains, cfg.avg_bits)
        for p, b, g, e in zip(plans, bits, gains, errors, strict=True):
            p.k, p.gain = (0 if b == allocate.FLOAT_BITS else 2**b), g
            p.figures["predicted_error"] = round(g * e[b], 8)
        figures["avg_bits_target"] = cfg.avg_bits

    def _rewrite(self, ed: GraphEditor, p: _Plan, cfg: CodebookConfig, opset: int, ctx: Context) -> LayerRecord:
        rng = ctx.rng("codebook", p.name)
        init = self._init(cfg, p.layout.rows)
        values, weights = p.grouped()
        if p.layout.rows:
            cl = kmeans.kmeans_rows(values, p.k, weights, init=init, rng=rng)
            centroids, labels = cl.centroids, cl.labels
            k, capped = cl.k, cl.capped
            counts = np.bincount(labels, minlength=k)
            p.figures["clustering"] = f"Lloyd on kernel rows from {init}"
        else:
            fit = kmeans.fit_centroids(p.summaries, p.k, init=init, rng=rng)
            # a histogram-summarised (big) tensor is labelled in float32: no float64 copy of it
            exact = all(sm.exact for sm in p.summaries)
            rounded = values if p.hessian is None else p.grouped(self._compensated(p, fit.centroids))[0]
            p.hessian = None  # the layer's last use of it: the Hessians still held shrink as layers are written
            labels, counts = kmeans.assign_counted(rounded, fit.centroids, exact=exact)
            del rounded
            centroids, k, capped = fit.centroids, fit.k, fit.capped
            p.figures["clustering"] = fit.method + (" on a histogram" if not all(sm.exact for sm in p.summaries) else "")
        bits = decode.index_bits(k)
        p.bits = bits if not p.layout.rows else bits / p.shape[-1]
        storage, why = decode.storage_for(bits, opset, cfg.storage)
        out_name = ed.unique_name(f"{p.name}/codebook_weight")
        scale_name = None
        if p.channel_scale is not None:
            scale_name = ed.add_initializer(f"{p.name}/codebook_scale", p.channel_scale.reshape(p.scale_shape()))
        nodes = decode.decode_nodes(ed, p.name, p.layout, labels, centroids, bits, storage, opset, out_name,
                                    scale=scale_name)
        new_node = onnx.NodeProto()
        new_node.CopyFrom(p.node)
        new_node.input[1] = out_name
        ed.replace(p.node, [*nodes, new_node])

        err = _weighted_error(values, weights, centroids, labels)
        del values, weights
        n_idx = int(labels.size)
        entropy = bitpack.entropy_of_counts(counts.sum(axis=0) if counts.ndim == 2 else counts)
        idx_bytes = decode.storage_bytes(storage, bits, n_idx)
        book_bytes = int(centroids.size) * 4 + (0 if p.channel_scale is None else p.channel_scale.size * 4)
        figs = dict(p.figures)
        figs.update({
            "bits": bits, "k": k, "granularity": cfg.granularity, "scale": cfg.scale, "vector": cfg.vector, "storage": storage,
            "storage_reason": why, "index_bytes": idx_bytes, "codebook_bytes": book_bytes,
            "dense_bytes": p.size * 4,
            # the bound a lossless coder reaches on the indices (xz on the whole file: the run's summary)
            "entropy_bits": round(entropy, 4), "entropy_bytes": int(math.ceil(entropy * n_idx / 8)) + book_bytes,
            "weight_error": round(err, 8), "bits_per_weight": round((idx_bytes + book_bytes) * 8 / p.size, 4),
        })
        if capped:
            figs["k_capped"] = f"k={p.k} capped to {k}: the layer has only {k} distinct values"
        if p.gain is not None:
            figs["gain"] = round(p.gain, 6)
        return LayerRecord(p.name, p.node.op_type, REWRITTEN, "", p.size, p.size, output=p.node.output[0], figures=figs)


_CHUNK = 1 << 22


def _weighted_error(values: np.ndarray, weights: np.ndarray | None, centroids: np.ndarray, labels: np.ndarray) -> float:
    """sum w (x - c)^2 / sum w x^2 over the clustering layout, in float64 chunks (no weight-sized
    float64 temporaries: VGG-16's fc6 alone has 103M weights). Padding has weight 0."""
    cent32 = centroids.astype(np.float32)
    num = den = 0.0
    if labels.ndim == 1:  # rows
        for a in range(0, values.shape[0], _CHUNK // max(values.shape[1], 1)):
            b = a + _CHUNK // max(values.shape[1], 1)
            x = values[a:b].astype(np.float64)
            d = x - cent32[labels[a:b]]
            w = 1.0 if weights is None else weights[a:b, None].astype(np.float64)
            num += float(np.sum(w * d * d))
            den += float(np.sum(w * x * x))
        return num / max(den, 1e-30)
    for g in range(values.shape[0]):
        for a in range(0, values.shape[1], _CHUNK):
            x = values[g, a : a + _CHUNK].astype(np.float64)
            d = x - cent32[g][labels[g, a : a + _CHUNK]]
            w = 1.0 if weights is None else weights[g, a : a + _CHUNK].astype(np.float64)
            num += float(np.sum(w * d * d))
            den += float(np.sum(w * x * x))
    return num / max(den, 1e-30)


def _decoded(p: _Plan, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The dense weight the codebook stands for, in the weight's own shape (float32)."""
    cent32 = centroids.astype(np.float32)
    if p.layout.rows:
        return cent32[labels].reshape(p.shape)
    grouped = np.take_along_axis(cent32, labels.astype(np.int64), axis=1)
    lay = p.layout
    if lay.per_group == 0:
        dense = grouped.reshape(p.shape)
        return dense if p.channel_scale is None else dense * p.channel_scale.reshape(p.scale_shape())
    flat = grouped.ravel()[: math.prod(lay.moved_shape)]
    return np.moveaxis(flat.reshape(lay.moved_shape), 0, lay.axis)


def _with_weight(model: onnx.ModelProto, p: _Plan, weight: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` with layer p's weight initializer replaced by `weight` (a probe)."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == p.node.input[1]:
            t.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), t.name))
            break
    return out
