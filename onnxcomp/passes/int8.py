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


@dataclass
class Int8Config(PassConfig):
    per_channel: bool = option(True, "one scale per output channel for weights (needs opset >= 13; bumped if lower)")
    calibrate: str = option("minmax", "activation range estimator", choices=("minmax", "entropy", "percentile"))
    samples: int = option(64, "calibration samples taken from --data")
    activations: str = option("uint8", "activation type (uint8 is what x86 int8 kernels prefer)", choices=("uint8", "int8"))

    def validate(self) -> None:
        super().validate()
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


class Int8Pass(Pass):
    name = "int8"
    summary = "onnxruntime static int8 quantization (QDQ, per-channel weights), calibrated on --data"
    Config = Int8Config
    default_ops = _QUANTIZABLE
    needs_data = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

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
                reason = "no constant weight operand"
            (excluded if reason else selected).append(node.name)
            if reason:
                layers.append(LayerRecord(node_label(node), node.op_type, SKIPPED, reason, output=node.output[0]))
        if not selected:
            return PassResult(model, layers, figures)

        fixed = {spec.fixed_batch for spec in model_inputs(work)} - {None}
        reader = _CalibrationReader(ctx, cfg.samples, min(fixed) if fixed else None)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[cfg.calibrate]
        with tempfile.TemporaryDirectory(prefix="onnxcomp-int8-") as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            big = serialized_bytes(work) > 2**31 - 2**24  # (ByteSize() itself fails past 2 GB)
            onnx.save_model(work, str(src), save_as_external_data=big)
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
            out = onnx.load(str(dst))
        figures.update({"calibration_samples": reader.count, "per_channel": per_channel})

        costs = {c.node: c for c in layer_costs(work, ctx.input_shapes)}  # `work` carries the node names
        qindex = GraphIndex(out)
        for node in out.graph.node:
            if node.name not in selected:
                continue
            w_producer = qindex.producer.get(node.input[1]) if len(node.input) > 1 else None
            quantized = w_producer is not None and w_producer.op_type == "DequantizeLinear"
            cost = costs.get(node.name)
            params = cost.params if cost else None
            macs = cost.macs if cost else None
            if quantized:
                layers.append(LayerRecord(node.name, node.op_type, REWRITTEN, "", params, params, macs, macs,
                                          output=node.output[0], figures={"weight_bits": 8, "activation_bits": 8}))
            else:
                layers.append(LayerRecord(node.name, node.op_type, SKIPPED, "onnxruntime left it in float",
                                          params, params, macs, macs, output=node.output[0]))
        return PassResult(out, layers, figures)


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
