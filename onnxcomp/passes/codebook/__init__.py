"""`codebook`: weights shared through K centroids, stored as packed indices plus a small float
codebook (Deep k-Means, Wu et al., ICML 2018).

Per selected Conv / Gemm / MatMul weight (float32, constant, used by that node alone):

* **Clustering**: scalar weights by exact 1-D k-means (onnxcomp.linalg.kmeans: dynamic programming
  on the weighted distinct values or a fine histogram), per tensor, per output channel or per
  `group:<n>` output channels; or, `vector=row`, the kernel rows of a conv (Kw values each, the
  paper's row-stationary sharing) by weighted Lloyd from k-means++. With `--data` (`weighting=auto`)
  each weight's error is weighted by its input channel's second moment (see `allocate`).
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
from onnxcomp.passes.codebook import allocate, decode

_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class CodebookConfig(PassConfig):
    bits: int = option(0, "index bits for every layer, K = 2^bits (1..8); 0: per-layer bits meeting avg_bits")
    k: int = option(0, "centroids per codebook for every layer (2..256; overrides bits)")
    avg_bits: float = option(4.0, "with bits=0 and k=0: average index bits per weight over the rewritten layers, "
                             "spent where the measured sensitivity per byte saved is lowest")
    min_bits: int = option(2, "fewest bits a layer may get under avg_bits")
    max_bits: int = option(8, "most bits a layer may get under avg_bits")
    granularity: str = option("tensor", "one codebook per tensor | channel (output channel) | group:<n> output channels")
    vector: str = option("1", "1: scalar weights | row: conv kernel rows (Kw values) share a codebook entry",
                         choices=("1", "row"))
    init: str = option("auto", "auto (optimal for scalars, kmeans++ for rows) | optimal (exact DP) | kmeans++ | "
                       "linear | quantile (Lloyd from that seeding)", choices=("auto", *kmeans.INITS))
    weighting: str = option("auto", "auto: with --data, each weight's error weighted by its input channel's second "
                            "moment (Hessian diagonal) | hessian (needs --data) | none", choices=("auto", "hessian", "none"))
    storage: str = option("auto", "index storage: auto (UINT4/UINT2 where the opset has them, else packed, 8 bits as "
                          "uint8) | native (convert the opset to 21/25 for 4/2-bit indices) | packed | uint8",
                          choices=("auto", "native", "packed", "uint8"))
    min_params: int = option(1024, "skip weights with fewer values (the codebook would cost more than it saves)")
    samples: int = option(32, "calibration samples for the second moments and the sensitivity probes")
    probe_bits: int = option(3, "bits of the per-layer sensitivity probe under avg_bits with --data")

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
    node: onnx.NodeProto
    weight: np.ndarray
    layout: decode.Layout
    in_name: str  # the layer's input tensor (for second moments)
    in_axis: int  # its channel axis
    sens_axis: int  # the weight axis the input channel runs along
    groups_per_in: int  # conv groups (input channel of weight (o, s) is (o // (T/g)) * S/g + s)
    sens: np.ndarray | None = None  # per-weight sensitivity (same shape as weight), None: unweighted
    values: np.ndarray | None = None  # (G, L) grouped values or (R, d) rows
    weights: np.ndarray | None = None  # matching sensitivity weights
    summaries: list | None = None
    bits: int = 0
    k: int = 0
    gain: float | None = None
    figures: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_label(self.node)


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
        if cfg.bits or cfg.k:
            for p in plans:
                p.k = cfg.k or 2**cfg.bits
        else:
            self._allocate(model, plans, ctx, cfg, figures)

        opset = opset_version(model)
        out_model = model
        if cfg.storage == "native":
            need = max((decode.NATIVE_OPSET[decode.index_bits(p.k)] for p in plans
                        if decode.index_bits(p.k) in decode.NATIVE_OPSET), default=0)
            if need > opset:
                out_model, note = _converted(model, need)
                figures["opset"] = note
                opset = opset_version(out_model)
                index = GraphIndex(out_model)
                by_name = {node_label(n): n for n in out_model.graph.node}
                for p in plans:
                    p.node = by_name[p.name]
        ed = GraphEditor(out_model)
        for p in ctx.progress.iter(plans, "codebook"):
            layers.append(self._rewrite(ed, p, cfg, opset, ctx))
        figures["avg_bits_achieved"] = round(sum(p.bits * p.weight.size for p in plans) /
                                             sum(p.weight.size for p in plans), 4)
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
        return _Plan(node, w, layout, in_name, in_axis, sens_axis, groups)

    def _sensitivities(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: CodebookConfig) -> None:
        moments = allocate.input_second_moments(model, [(p.in_name, p.in_axis) for p in plans], ctx.data, cfg.samples)
        for p in plans:
            h = moments[p.in_name]
            w = p.weight
            if p.node.op_type == "Conv":
                T, s_per = w.shape[0], w.shape[1]
                g = p.groups_per_in
                chan = (np.arange(T) // max(T // g, 1))[:, None] * s_per + np.arange(s_per)[None, :]
                if chan.max() >= h.size:
                    continue  # a shape the moments do not cover: unweighted
                sens = h[chan].reshape(T, s_per, *([1] * (w.ndim - 2)))
            else:
                if h.size != w.shape[p.sens_axis]:
                    continue
                shape = [1] * w.ndim
                shape[p.sens_axis] = h.size
                sens = h.reshape(shape)
            # a small floor: a weight on a dead channel still has to land somewhere sensible
            sens = np.broadcast_to(sens + 1e-6 * max(float(h.mean()), 1e-30), w.shape)
            p.sens = np.ascontiguousarray(sens, dtype=np.float32)

    def _group(self, p: _Plan, cfg: CodebookConfig) -> None:
        """Values (and weights) in the clustering layout; scalar summaries for the DP."""
        w = p.weight
        lay = p.layout
        if lay.rows:
            p.values = w.reshape(-1, w.shape[-1])
            p.weights = None if p.sens is None else p.sens.reshape(-1, w.shape[-1]).mean(axis=1)
            return
        if lay.per_group == 0:
            p.values = w.reshape(1, -1)
            p.weights = None if p.sens is None else p.sens.reshape(1, -1)
        else:
            moved = np.moveaxis(w, lay.axis, 0).reshape(w.shape[lay.axis], -1)
            sens = None if p.sens is None else np.moveaxis(p.sens, lay.axis, 0).reshape(moved.shape)
            C, L = moved.shape
            G = -(-C // lay.per_group)
            flat = np.concatenate([moved.ravel(), np.full(lay.pad, moved.ravel()[-1], dtype=w.dtype)])
            p.values = flat.reshape(G, -1)
            if sens is not None or lay.pad:
                s = np.ones_like(moved) if sens is None else sens
                p.weights = np.concatenate([s.ravel(), np.zeros(lay.pad, dtype=w.dtype)]).reshape(G, -1)
        k_hint = cfg.k or 2 ** (cfg.bits or cfg.max_bits)
        # per-channel groups are many and small: 16 points per centroid keep the DP fast
        max_points = 4096 if p.values.shape[0] == 1 else int(np.clip(16 * k_hint, 64, 4096))
        p.summaries = kmeans.summarise(p.values, p.weights, max_points=max_points)

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
                return probe.error(_with_weight(model, p, _decoded(p, cl.centroids)))

            gains = allocate.measured_gains(probe_error, [errors[i][pb] for i in range(len(plans))])
            figures["allocation"] = (f"measured: model output error with each layer alone at {pb} bits, "
                                     f"{cfg.samples} samples")
        else:
            gains = [1.0] * len(plans)
            figures["allocation"] = "weight-error proxy (no --data: every layer's error counts the same)"
        bits, achieved = allocate.allocate_bits(errors, [p.weight.size for p in plans], gains, cfg.avg_bits)
        for p, b, g, e in zip(plans, bits, gains, errors, strict=True):
            p.k, p.gain = 2**b, g
            p.figures["predicted_error"] = round(g * e[b], 8)
        figures["avg_bits_target"] = cfg.avg_bits

    def _rewrite(self, ed: GraphEditor, p: _Plan, cfg: CodebookConfig, opset: int, ctx: Context) -> LayerRecord:
        w = p.weight
        rng = ctx.rng("codebook", p.name)
        init = self._init(cfg, p.layout.rows)
        if p.layout.rows:
            cl = kmeans.kmeans_rows(p.values, p.k, p.weights, init=init, rng=rng)
            centroids, labels = cl.centroids, cl.labels
            k, capped = cl.k, cl.capped
            p.figures["clustering"] = f"Lloyd on kernel rows from {init}"
        else:
            fit = kmeans.fit_centroids(p.summaries, p.k, init=init, rng=rng)
            centroids, labels = fit.centroids, kmeans.assign(p.values, fit.centroids)
            k, capped = fit.k, fit.capped
            p.figures["clustering"] = fit.method + (" on a histogram" if not all(sm.exact for sm in p.summaries) else "")
        bits = decode.index_bits(k)
        p.bits = bits if not p.layout.rows else bits / w.shape[-1]
        storage, why = decode.storage_for(bits, opset, cfg.storage)
        out_name = ed.unique_name(f"{p.name}/codebook_weight")
        nodes = decode.decode_nodes(ed, p.name, p.layout, labels, centroids, bits, storage, opset, out_name)
        new_node = onnx.NodeProto()
        new_node.CopyFrom(p.node)
        new_node.input[1] = out_name
        ed.replace(p.node, [*nodes, new_node])

        decoded = _decoded(p, centroids, labels)
        diff = (decoded - w).astype(np.float64)
        sens = np.ones_like(w) if p.sens is None else p.sens
        err = float(np.sum(sens * diff * diff) / max(np.sum(sens * w.astype(np.float64) ** 2), 1e-30))
        n_idx = int(labels.size)
        entropy = bitpack.entropy_bits(labels, k)
        idx_bytes = decode.storage_bytes(storage, bits, n_idx)
        book_bytes = int(centroids.size) * 4
        figs = dict(p.figures)
        figs.update({
            "bits": bits, "k": k, "granularity": cfg.granularity, "vector": cfg.vector, "storage": storage,
            "storage_reason": why, "index_bytes": idx_bytes, "codebook_bytes": book_bytes,
            "dense_bytes": int(w.size) * 4,
            # the bound a lossless coder reaches on the indices (xz on the whole file: the run's summary)
            "entropy_bits": round(entropy, 4), "entropy_bytes": int(math.ceil(entropy * n_idx / 8)) + book_bytes,
            "weight_error": round(err, 8), "bits_per_weight": round((idx_bytes + book_bytes) * 8 / w.size, 4),
        })
        if capped:
            figs["k_capped"] = f"k={p.k} capped to {k}: the layer has only {k} distinct values"
        if p.gain is not None:
            figs["gain"] = round(p.gain, 6)
        params = int(w.size)
        return LayerRecord(p.name, p.node.op_type, REWRITTEN, "", params, params, output=p.node.output[0], figures=figs)


def _decoded(p: _Plan, centroids: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The dense weight the codebook stands for, in the weight's own shape (float32)."""
    cent32 = centroids.astype(np.float32)
    if p.layout.rows:
        return cent32[labels].reshape(p.weight.shape)
    if labels is None:
        labels = kmeans.assign(p.values, centroids)
    grouped = np.take_along_axis(cent32, labels.astype(np.int64), axis=1)
    lay = p.layout
    if lay.per_group == 0:
        return grouped.reshape(p.weight.shape)
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


def _converted(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, str]:
    """`model` at `opset` (onnx's version converter), or itself with the reason it stays."""
    try:
        out = onnx.version_converter.convert_version(model, opset)
        onnx.checker.check_model(out)
        return out, f"converted from opset {opset_version(model)} to {opset} for sub-byte indices"
    except Exception as exc:  # the converter lacks adapters for some ops; the layers fall back to packed
        return model, f"opset {opset_version(model)} kept: conversion to {opset} failed ({str(exc).splitlines()[0][:120]})"
