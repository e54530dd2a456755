"""`int8`: onnxruntime's static int8 quantization (QDQ), calibrated on the user's data.

This is the baseline a deployment engineer would reach for first, so it is offered as a pass that
composes with the others (e.g. `tucker,int8`). onnxruntime does the real work (`quantize_static`);
this module only adapts it: a calibration reader over our DataSource, node names for selection,
an opset bump where per-channel QDQ needs opset 13, and a per-layer report.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.analysis import layer_costs
from onnxcomp.data import model_inputs
from onnxcomp.graph import GraphIndex, node_label, opset_version
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
from onnxcomp.sizes import serialized_bytes

_QUANTIZABLE = ("Conv", "Gemm", "MatMul")
# objective=latency compares layers net of layout conversions when at least this share of each
# unit's time alone is its own kernels.
_NET_SHARE = 0.25


@dataclass
class Int8Config(PassConfig):
    per_channel: bool = option(True, "one scale per output channel for weights (needs opset >= 13; bumped if lower)")
    calibrate: str = option("minmax", "activation range estimator", choices=("minmax", "entropy", "percentile"),
                            search=["minmax", "percentile"])
    samples: int = option(64, "calibration samples taken from --data")
    activations: str = option("uint8", "activation type (uint8 is what x86 int8 kernels prefer)", choices=("uint8", "int8"))
    objective: str = option("latency", "latency: a layer whose int8 kernel is measured no faster than its float "
                            "form stays float | any: quantize every selected layer", choices=("latency", "any"))

    def validate(self) -> None:
        super().validate()
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


class Int8Pass(Pass):
    name = "int8"
    summary = "onnxruntime static int8 quantization (QDQ, per-channel weights), calibrated on --data"
    Config = Int8Config
    search_fixed = {"objective": "any"}  # see TuckerPass.search_fixed
    default_ops = _QUANTIZABLE
    needs_data = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg: Int8Config = self.config
        work = onnx.ModelProto()
        work.CopyFrom(model)
        _name_unnamed_nodes(work)
        figures: dict = {}
        if cfg.per_channel and opset_version(work) < 13:
            try:
                work = onnx.version_converter.convert_version(work, 13)
                figures["opset_bumped_to"] = 13
            except Exception as exc:  # the converter lacks adapters for some old ops
                figures["per_channel_disabled"] = f"opset {opset_version(work)} model could not be converted to 13 ({exc})"
        per_channel = cfg.per_channel and opset_version(work) >= 13

        layers: list[LayerRecord] = []
        selected: list[str] = []
        excluded: list[str] = []
        index = GraphIndex(work)
        for node in self.candidates(work):
            reason = self.selection_reason(node)
            if reason is None and not any(index.is_constant(i) for i in node.input[:2]):
                producer = index.producer.get(node.input[1]) if len(node.input) > 1 else None
                if producer is not None and "/codebook_" in producer.name:
                    reason = ("weight is decoded from a codebook: int8 would re-quantize the decoded weights "
                              "and store them again (use codebook or int8 on a layer, not both)")
                else:
                    reason = "no constant weight operand"
            (excluded if reason else selected).append(node.name)
            if reason:
                layers.append(LayerRecord(node_label(node), node.op_type, SKIPPED, reason, output=node.output[0]))
        if not selected:
            return PassResult(model, layers, figures)

        fixed = {spec.fixed_batch for spec in model_inputs(work)} - {None}
        batch = min(fixed) if fixed else None
        out, count = self._quantize(work, ctx, cfg, per_channel, excluded, batch)
        slower: dict[str, dict] = {}
        if cfg.objective == "latency":
            act = np.uint8 if cfg.activations == "uint8" else np.int8
            slower, timed = _slower_in_int8(work, out, selected, ctx, batch, act)
            figures["latency"] = timed
            if slower:
                out = None  # type: ignore[assignment]  # free it first: a big model's copies add up
                out, count = self._quantize(work, ctx, cfg, per_channel, excluded + sorted(slower), batch)
        figures.update({"calibration_samples": count, "per_channel": per_channel})

        costs = {c.node: c for c in layer_costs(work, ctx.input_shapes)}  # `work` carries the node names
        qindex = GraphIndex(out)
        for node in out.graph.node:
            if node.name not in selected and node.name not in slower:
                continue
            w_producer = qindex.producer.get(node.input[1]) if len(node.input) > 1 else None
            quantized = w_producer is not None and w_producer.op_type == "DequantizeLinear"
            cost = costs.get(node.name)
            params = cost.params if cost else None
            macs = cost.macs if cost else None
            if node.name in slower:
                t = slower[node.name]
                layers.append(LayerRecord(
                    node.name, node.op_type, SKIPPED,
                    f"its int8 kernel measured {t['speedup'] or 0:.2f}x as fast as float ({t['float_ms']:.4f} -> "
                    f"{t['int8_ms']:.4f} ms, {t['source']}): kept in float (objective=latency)",
                    params, params, macs, macs, output=node.output[0], figures={"latency": t}))
            elif quantized:
                figs: dict = {"weight_bits": 8, "activation_bits": 8}
                if node.name in figures.get("latency", {}).get("layers", {}):
                    figs["latency"] = figures["latency"]["layers"][node.name]
                layers.append(LayerRecord(node.name, node.op_type, REWRITTEN, "", params, params, macs, macs,
                                          output=node.output[0], figures=figs))
            else:
                layers.append(LayerRecord(node.name, node.op_type, SKIPPED, "onnxruntime left it in float",
                                          params, params, macs, macs, output=node.output[0]))
        if not any(r.action == REWRITTEN for r in layers):  # every layer stayed float: the input, untouched
            return PassResult(model, layers, figures)
        return PassResult(out, layers, figures)


    def _quantize(self, work: onnx.ModelProto, ctx: Context, cfg: Int8Config, per_channel: bool,
                  excluded: list[str], batch: int | None) -> tuple[onnx.ModelProto, int]:
        """onnxruntime's quantize_static on `work` (excluding `excluded`); returns (model, samples fed)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        reader = _CalibrationReader(ctx, cfg.samples, batch)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[cfg.calibrate]
        with tempfile.TemporaryDirectory(prefix="onnxcomp-int8-") as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            big = serialized_bytes(work) > 2**31 - 2**24  # (ByteSize() itself fails past 2 GB)
            onnx.save_model(work, str(src), save_as_external_data=big)
            if big:  # saving moved `work`'s tensors out to the temp folder: bring them back before it goes
                onnx.external_data_helper.load_external_data_for_model(work, tmp)
            with _quiet_root_logger():  # it nags about pre-processing, which normalize already did
                quantize_static(
                    str(src), str(dst), reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(self.op_types()),
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8 if cfg.activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    use_external_data_format=big,
                    calibrate_method=method,
                    extra_options={"CalibTensorRangeSymmetric": False},
                )
            return onnx.load(str(dst)), reader.count


def _slower_in_int8(work: onnx.ModelProto, out: onnx.ModelProto, names: list[str], ctx: Context,
                    batch: int | None, act_dtype: type) -> tuple[dict[str, dict], dict]:
    """The quantized layers of `out` that the cost model measures no faster than their float form in
    `work`, with their timings, and a summary. Each layer's int8 unit is its core as onnxruntime
    fuses it into one int8 kernel (the input's DequantizeLinear, the weight's and bias's, the layer,
    the output's QuantizeLinear), fed quantized input, timed alone and interleaved with the float
    layer at the same shapes. The conversions at the ends of a run of int8 layers are not counted
    per layer: between two int8 layers they fuse away (counting them per layer kept every layer of
    the Tucker-compressed glyph ResNet in float, while the all-int8 model ran 1.6x faster). A layer
    whose int8 kernel alone is no faster can never pay; the rest is the guard's whole-model latency
    check, which drops the step when the conversions the remaining layers need outweigh it."""
    from onnxcomp.graph import GraphIndex
    from onnxcomp.units import UnitCutter

    fnodes = {n.name: n for n in work.graph.node}
    qindex = GraphIndex(out)
    cores = {node.name: c for node in out.graph.node
             if node.name in names and node.name in fnodes and (c := _qdq_core(node, qindex)) is not None}
    feeds = {k: v[: batch or 1] for k, v in ctx.data.first_batch()[0].items()}
    wanted = {i for name in cores for i in fnodes[name].input[:1]}
    values = _layer_inputs(work, feeds, wanted)
    info = np.iinfo(act_dtype)
    rng = np.random.default_rng(1)
    for name, (_, quantized_input) in cores.items():  # the int8 kernel reads the quantized tensor
        x = values.get(fnodes[name].input[0])
        if quantized_input and x is not None:
            values[quantized_input] = rng.integers(info.min, info.max + 1, size=x.shape).astype(act_dtype)
    cm = ctx.costs()
    slower: dict[str, dict] = {}
    timed: dict[str, dict] = {}
    untimed: dict[str, str] = {}
    float_cutter, int8_cutter = UnitCutter(work), UnitCutter(out)
    for name, (chain, _) in cores.items():
        f_unit = float_cutter.cut([fnodes[name]], values)
        q_unit = int8_cutter.cut(chain, values)
        if f_unit.problem or q_unit.problem:
            untimed[name] = f_unit.problem or q_unit.problem or ""
            continue
        f_est, q_est = cm.estimate([f_unit, q_unit])
        # Net of the layout conversions onnxruntime wraps around each alone (NCHWc reorders for the
        # float conv, NHWC transposes for the int8 one): they differ, and inside the model neither
        # is paid per layer.
        # Where the conversions are most of a unit's time alone, their separate timing is too coarse
        # to take out: then both are compared as they ran.
        net = min(f_est.ms / max(f_est.total_ms, 1e-12), q_est.ms / max(q_est.total_ms, 1e-12)) >= _NET_SHARE
        f_ms, q_ms = (f_est.ms, q_est.ms) if net else (f_est.total_ms, q_est.total_ms)
        t = {"float_ms": round(f_ms, 5), "int8_ms": round(q_ms, 5),
             "speedup": round(f_ms / q_ms, 4) if q_ms > 0 else None, "source": f_est.source,
             "net_of_layout": net}
        timed[name] = t
        if q_ms >= f_ms:
            slower[name] = t
    summary = {"layers": timed, "kept_float": sorted(slower)}
    if untimed:
        summary["untimed"] = untimed
    return slower, summary


def _layer_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """Values for the layers' inputs `names`: random normal at the shapes inference gives with these
    feeds (the time of a conv does not depend on its input's values, and no run of a possibly huge
    model is needed), else, for the tensors whose shape stays unknown, one real run's values."""
    from onnxcomp.profile import capture_values
    from onnxcomp.shapes import static_shapes

    shapes = static_shapes(model, {k: list(v.shape) for k, v in feeds.items()})
    rng = np.random.default_rng(0)
    values = {k: v for k, v in feeds.items() if k in names}
    missing = []
    for name in sorted(names - set(values)):
        shape = shapes.get(name)
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            values[name] = rng.standard_normal(tuple(shape)).astype(np.float32)
        else:
            missing.append(name)
    if missing:
        captured = capture_values(model, feeds, missing)
        values.update({k: captured[k] for k in missing if k in captured})
    return values


def _qdq_core(node: onnx.NodeProto, index) -> tuple[list[onnx.NodeProto], str | None] | None:
    """([input DQ, node, output Q], the quantized tensor the input DQ reads) for a quantized node
    (absent ends left out), or None when its weight is not dequantized (not quantized)."""
    w_dq = index.producer.get(node.input[1]) if len(node.input) > 1 else None
    if w_dq is None or w_dq.op_type != "DequantizeLinear":
        return None
    chain: list[onnx.NodeProto] = []
    quantized_input = None
    x_dq = index.producer.get(node.input[0])
    if x_dq is not None and x_dq.op_type == "DequantizeLinear":
        chain.append(x_dq)
        quantized_input = x_dq.input[0]
    chain.append(node)
    users = index.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        chain.append(users[0])
    return chain, quantized_input


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer warns through the root logger; keep stderr for our own progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over a DataSource, capped at `limit` samples.

    A model whose batch dim is free is fed one sample at a time; one that fixes it to B (the data
    source then yields batches of exactly B) is fed whole batches, as it cannot take anything else.
    `count` is the number of samples fed.
    """

    def __init__(self, ctx: Context, limit: int, fixed_batch: int | None = None):
        self._iter = self._feeds(ctx, limit, fixed_batch)
        self.count = 0

    def _feeds(self, ctx: Context, limit: int, fixed_batch: int | None) -> Iterator[dict[str, np.ndarray]]:
        for feeds, _labels in ctx.data.batches():
            n = len(next(iter(feeds.values())))
            if fixed_batch is not None:
                if self.count >= limit:
                    return
                self.count += n
                yield feeds
                continue
            for i in range(n):
                if self.count >= limit:
                    return
                self.count += 1
                yield {k: v[i : i + 1] for k, v in feeds.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:  # part of the protocol; a single pass is all quantize_static needs
        pass


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a stable name (quantize_static selects and excludes by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            taken.add(name)
