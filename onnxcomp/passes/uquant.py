"""`uquant`: universal quantization of weights (dithered uniform quantization, Choi et al. 2018).

Each selected weight (Conv, Gemm and MatMul weights, WinogradConv's pre-transformed U) is replaced by
its dithered uniform quantization (`onnxcomp.linalg.uquant`): still float32 in the .onnx (it runs
unchanged at the original speed), but every value is one of step * n - u, so `onnxcomp pack` stores
the integer codes n, losslessly coded, and `onnxcomp unpack` restores the exact bits from the codes,
the step and the dither seed. The steps and the seed are recorded in the model's metadata
(`onnxcomp.uquant`). Exact zeros stay zero (pruned weights stay pruned, and cost a bit in the mask).

`bits=<b>`: per tensor, a step spreading 2^b levels over the weights' range; `step=<s>`: one step for
every tensor (a uniform error budget).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcomp.graph import GraphEditor, GraphIndex, node_label
from onnxcomp.linalg import uquant as uq
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

METADATA_KEY = "onnxcomp.uquant"
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "WinogradConv": 1}
_MAX_LEVELS = 2**22  # float32 holds step * n - u exactly enough to give n back below this


@dataclass
class UquantConfig(PassConfig):
    bits: int = option(8, "per tensor, a step spreading 2^bits levels over the weights' range (ignored with step)",
                       stronger="lower")
    step: float = option(0.0, "one quantization step for every tensor (0: from bits)", stronger="higher")
    seed: int = option(0, "dither seed (shared with the decoder through the model's metadata)")
    min_params: int = option(1024, "leave weights with fewer elements alone")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits}: must be in 1..16")
        if not (self.step >= 0 and math.isfinite(self.step)):
            raise ValueError(f"step={self.step}: must be a finite number >= 0")
        if self.min_params < 1:
            raise ValueError(f"min_params={self.min_params}: must be >= 1")


class UquantPass(Pass):
    name = "uquant"
    summary = "universal (dithered uniform) quantization of weights, for `onnxcomp pack`"
    Config = UquantConfig
    default_ops = tuple(_WEIGHT_INPUT)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Quantize weight by weight: a weight several layers read is quantized only when every one
        of its readers is selected and usable (then each gets a REWRITTEN record), else each reader is
        skipped with the reason; a skipped layer is left byte-identical."""
        cfg: UquantConfig = self.config
        index = GraphIndex(model)
        editor = GraphEditor(model)
        records: dict[int, LayerRecord] = {}
        steps: dict[str, float] = {}
        candidates = self.candidates(model)
        by_weight: dict[str, list[onnx.NodeProto]] = {}
        for node in candidates:
            reason = self.selection_reason(node) or self._unusable(index, node, cfg)
            if reason:
                records[id(node)] = LayerRecord(node_label(node), node.op_type, SKIPPED, reason, output=node.output[0])
            else:
                by_weight.setdefault(node.input[_WEIGHT_INPUT[node.op_type]], []).append(node)
        for name, readers in by_weight.items():
            others = [u for u in index.consumers.get(name, []) if all(u is not r for r in readers)]
            w = index.array(name)
            step = cfg.step or uq.step_for_bits(w, cfg.bits)
            reason = None
            if others:
                reason = (f"its weight '{name}' is also read by {node_label(others[0])}, which is not quantized with it "
                          "(not selected, or not a weight input)")
            elif not step > 0:
                reason = "weight has fewer than two distinct values"
            elif float(np.abs(w).max()) / step > _MAX_LEVELS:
                reason = f"step {step:g} is too fine for float32 weights up to {float(np.abs(w).max()):g} (over 2^22 levels)"
            if reason:
                for node in readers:
                    records[id(node)] = LayerRecord(node_label(node), node.op_type, SKIPPED, reason, output=node.output[0])
                continue
            q, codes = uq.quantize(w, step, cfg.seed, name)
            editor.set_initializer(name, q)
            steps[name] = float(step)
            err = float(np.linalg.norm(q.astype(np.float64) - w) / max(float(np.linalg.norm(w)), 1e-30))
            values, counts = np.unique(codes, return_counts=True)
            p = counts / max(codes.size, 1)
            figures = {"step": step, "levels": int(values.size), "error": round(err, 6),
                       "code_entropy_bits": round(float(-(p * np.log2(p)).sum()), 4),
                       "zeros": round(1.0 - codes.size / max(w.size, 1), 4)}
            if len(readers) > 1:
                figures["shared_by"] = [node_label(n) for n in readers]
            for node in readers:
                records[id(node)] = LayerRecord(node_label(node), node.op_type, REWRITTEN, params_before=int(w.size),
                                                params_after=int(w.size), output=node.output[0], figures=dict(figures))
        ordered = [records[id(n)] for n in candidates]
        if not steps:
            return PassResult(model, ordered)
        out = editor.apply()
        _record_metadata(out, cfg.seed, steps)
        return PassResult(out, ordered, {"tensors": len(steps), "seed": cfg.seed})

    def _unusable(self, index: GraphIndex, node: onnx.NodeProto, cfg: UquantConfig) -> str | None:
        if node.op_type not in _WEIGHT_INPUT:
            return f"{node.op_type} has no weight uquant knows (it quantizes {', '.join(_WEIGHT_INPUT)})"
        if node.op_type == "WinogradConv" and node.domain != "ai.onnxcomp":
            return f"{node.domain}.{node.op_type} is not onnxcomp's WinogradConv"
        k = _WEIGHT_INPUT[node.op_type]
        if len(node.input) <= k or not index.is_constant(node.input[k]):
            return "weight is not a constant initializer"
        name = node.input[k]
        t = index.initializers[name]
        if t.data_type != onnx.TensorProto.FLOAT:
            return f"weight is {onnx.TensorProto.DataType.Name(t.data_type).lower()}, not float32"
        if math.prod(t.dims) < cfg.min_params:
            return f"{math.prod(t.dims)} weights, fewer than min_params={cfg.min_params}"
        return None


def _record_metadata(model: onnx.ModelProto, seed: int, steps: dict[str, float]) -> None:
    """Merge this run's steps into the model's uquant metadata (one seed per model: a second run with
    another seed re-keys only the tensors it quantized, so each tensor keeps its own seed)."""
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    doc = {"version": 1, "tensors": {}}
    if entry is not None:
        try:
            old = json.loads(entry.value)
            if isinstance(old, dict) and isinstance(old.get("tensors"), dict):
                doc["tensors"].update(old["tensors"])
        except ValueError:
            pass
    doc["tensors"].update({name: {"step": step, "seed": int(seed)} for name, step in steps.items()})
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
    entry.value = json.dumps(doc, sort_keys=True)


def recorded_steps(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """{tensor name: (step, seed)} from the model's uquant metadata ({} when absent or unreadable)."""
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        return {}
    try:
        doc = json.loads(entry.value)
        return {str(k): (float(v["step"]), int(v["seed"])) for k, v in doc["tensors"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
