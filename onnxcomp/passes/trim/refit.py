"""`trim{refit=on|sequential}`: least-squares reconstruction of the layers that lost input channels
(the channel-pruning reconstruction of ThiNet / He et al. 2017, without back-propagation).

For each consumer layer (sink) whose input channels were trimmed, its kept weights and bias are
solved so that, from the inputs it still reads, it reproduces the original model's output of that
layer on the calibration data (minus the fixed exact border map, when there is one). `on` takes the
inputs from the original model (one run for every layer); `sequential` takes them from the trimmed
model with every earlier layer already refit (one run of each model per layer), so error that builds
up upstream is compensated where a linear map can. Every 4th calibration sample is held out and a
refit is kept only where it lowers the error there by more than the sampling noise
(onnxcomp.linalg.decompose.validated_refit); the report gives the errors before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcomp.channels import ChannelGraph, Sink
from onnxcomp.errors import BadInputError
from onnxcomp.graph import GraphEditor, GraphIndex, attr, node_label, read_conv
from onnxcomp.linalg import decompose as dec
from onnxcomp.linalg.patches import conv_patches
from onnxcomp.runtime import run_batches

HOLDOUT = 4  # every 4th sample (the 2nd, 6th, ...) checks the fit
MAX_UNKNOWNS = 4096  # per output: the normal equations are (p + 1)^2 float64


@dataclass
class _Target:
    """One sink layer to refit: where its inputs, outputs and new tensors are."""

    name: str
    sink: Sink
    kept: np.ndarray  # kept input channels (indices into the original input)
    weight: str  # initializer names in the trimmed model
    bias: str | None
    fold_map: str | None
    rows: np.ndarray | None = None  # kept output channels when the layer lost some too
    node: onnx.NodeProto | None = None  # the layer as the trimmed model has it (its alpha / beta)
    geometry: tuple = ()  # a conv's (kernel, strides, dilations, pads)
    train: dec.LeastSquares | None = None
    held: dec.LeastSquares | None = None
    held_samples: int = 0
    seen: int = 0


def refit(original: onnx.ModelProto, trimmed: onnx.ModelProto, cg: ChannelGraph, kept: dict[str, np.ndarray],
          written: dict[str, dict], data: Any, mode: str, rows: int, rng_for, max_batches: int | None
          ) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """The trimmed model with its sinks refit, and per layer the refit's figures. `kept` maps each
    trimmed sink input to its kept channels; `rng_for(name, k)` seeds batch k's row sample."""
    targets: list[_Target] = []
    figures: dict[str, dict] = {}
    index = GraphIndex(trimmed)
    now = {node_label(n): n for n in trimmed.graph.node}
    for s in cg.sinks:
        name = node_label(s.node)
        if name not in written or s.tensor not in kept:
            continue
        w = written[name]
        t = _Target(name, s, kept[s.tensor], w["weight"], w["bias"], w["map"], kept.get(s.node.output[0]))
        t.node = now.get(name)
        why = _unsupported(t, index, t.node)
        if why:
            figures[name] = {"refit": f"n/a ({why})"}
            continue
        targets.append(t)
    if not targets:
        return trimmed, figures
    current = trimmed
    if mode == "on":
        maps = _fold_maps(trimmed, targets, data)
        outs = [x for t in targets for x in (t.sink.tensor, t.sink.node.output[0])]
        _accumulate_all(original, outs, targets, maps, data, rows, rng_for, max_batches)
        ed = GraphEditor(current)
        for t in targets:
            figures[t.name] = _solve(t, index, ed)
        current = ed.apply() if ed.changed else current
        return current, figures
    for t in targets:  # sequential: graph order, each layer against what the refit model feeds it
        maps = _fold_maps(current, [t], data)
        z = _paired_batches(current, original, t, data, max_batches)
        for k, (x, y) in enumerate(z):
            _add_rows(t, x, y, maps.get(t.name), rows, rng_for(t.name, k), from_original=False)
        if t.train is None or t.train.count == 0:
            raise BadInputError("trim refit: the calibration data gave no batches")
        ed = GraphEditor(current)
        figures[t.name] = _solve(t, GraphIndex(current), ed)
        current = ed.apply() if ed.changed else current
    return current, figures


def _unsupported(t: _Target, index: GraphIndex, node: onnx.NodeProto | None) -> str:
    """Why the target cannot be refit ("" if it can); `node` is the layer in the trimmed model."""
    if node is None:
        return "the layer was renamed"
    if t.sink.kind == "conv":
        conv = read_conv(index, node) if node.op_type == "Conv" else "not a Conv"
        if isinstance(conv, str):
            return conv
        if conv.spatial_rank != 2 or conv.pads is None:
            return "refit handles 2-D convs with explicit pads"
        t.geometry = (conv.kernel, conv.strides, conv.dilations, conv.pads)
        unknowns = int(np.prod(conv.weight.shape[1:]))
    else:
        dims = index.initializers[t.weight].dims
        unknowns = int(dims[1 if _trans_b(node) else 0])
        outputs = int(dims[0 if _trans_b(node) else 1])
        if t.bias and int(np.prod(index.initializers[t.bias].dims)) not in (1, outputs):
            return "a bias that is not one value per output"
    if unknowns > MAX_UNKNOWNS:
        return f"{unknowns} unknowns per output > {MAX_UNKNOWNS}"
    return ""


def _trans_b(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gemm" and bool(attr(node, "transB", 0))


def _fold_maps(model: onnx.ModelProto, targets: list[_Target], data: Any) -> dict[str, np.ndarray]:
    """The constant exact-border maps (one run on the first batch; they do not depend on it)."""
    wanted = {t.name: t.fold_map for t in targets if t.fold_map}
    if not wanted:
        return {}
    for _, values, _ in run_batches(model, data, list(wanted.values()), max_batches=1, max_bytes=None):
        return {name: np.asarray(values[m], dtype=np.float64) for name, m in wanted.items()}
    raise BadInputError("trim refit: the calibration data gave no batches")


def _accumulate_all(model, outs, targets, maps, data, rows, rng_for, max_batches) -> None:
    k = -1
    for k, (_, values, _) in enumerate(run_batches(model, data, outs, max_batches=max_batches, max_bytes=None)):
        for t in targets:
            _add_rows(t, values[t.sink.tensor], values[t.sink.node.output[0]], maps.get(t.name), rows,
                      rng_for(t.name, k), from_original=True)
    if k < 0:
        raise BadInputError("trim refit: the calibration data gave no batches")


def _paired_batches(current, original, t: _Target, data, max_batches):
    """(sink input in `current`, sink output in `original`) per source batch, the same samples."""
    xs = run_batches(current, data, [t.sink.tensor], max_batches=max_batches, max_bytes=None)
    ys = run_batches(original, data, [t.sink.node.output[0]], max_batches=max_batches, max_bytes=None)
    for (_, xv, _), (_, yv, _) in zip(xs, ys, strict=True):
        yield xv[t.sink.tensor], yv[t.sink.node.output[0]]


def _add_rows(t: _Target, x: np.ndarray, y: np.ndarray, fold_map: np.ndarray | None, rows: int,
              rng: np.random.Generator, from_original: bool) -> None:
    """Add one batch's rows (every HOLDOUT-th sample to the held-out system)."""
    if from_original:
        x = x[:, t.kept]
    if t.rows is not None:  # the layer lost output channels too: fit the ones it kept
        y = y[:, t.rows]
    n = x.shape[0]
    target = y.astype(np.float64) - (fold_map if fold_map is not None else 0.0)
    if t.sink.kind == "conv":
        n_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
        total = n * ho * wo
        pick = np.sort(rng.choice(total, size=rows, replace=False)) if 0 < rows < total else np.arange(total)
        pos = np.stack(np.unravel_index(pick, (n, ho, wo)), axis=1)
        z = conv_patches(x, *t.geometry, positions=pos)
        yr = target[pos[:, 0], :, pos[:, 1], pos[:, 2]]
        sample = pos[:, 0]
    else:
        z = x.reshape(n, -1)
        yr = target.reshape(n, -1)
        sample = np.arange(n)
        n_out = yr.shape[1]
    if t.train is None:
        bias = t.bias is not None
        t.train, t.held = dec.LeastSquares(z.shape[1], n_out, bias), dec.LeastSquares(z.shape[1], n_out, bias)
    held = (t.seen + sample) % HOLDOUT == 1
    t.held_samples += int(np.sum((t.seen + np.arange(n)) % HOLDOUT == 1))
    t.seen += n
    t.train.add(z[~held], yr[~held])
    t.held.add(z[held], yr[held])


def _solve(t: _Target, index: GraphIndex, ed: GraphEditor) -> dict:
    """Solve the target's refit, write it through `ed` when it generalises; its figures."""
    assert t.train is not None and t.held is not None
    w = index.array(t.weight).astype(np.float64)
    b = index.array(t.bias).astype(np.float64) if t.bias else None
    node = t.node if t.node is not None else t.sink.node
    alpha = float(attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    if t.sink.kind == "conv":
        w_ls = w.reshape(w.shape[0], -1).T
    else:
        w_ls = (w.T if _trans_b(node) else w) * alpha
    b_ls = None
    if b is not None:
        flat = (b * beta).reshape(-1)
        b_ls = np.full(w_ls.shape[1], flat[0]) if flat.size == 1 else flat
    r = dec.validated_refit(t.train, t.held, w_ls, b_ls, held_samples=t.held_samples)
    figs = {"refit": r.reason, "refit_rows": t.train.count + t.held.count}
    if r.heldout_before is not None:
        figs["refit_heldout_error_before"] = round(float(r.heldout_before), 6)
        figs["refit_heldout_error_after"] = round(float(r.heldout_after if r.applied else r.heldout_before), 6)
    if not r.applied:
        return figs
    if t.sink.kind == "conv":
        ed.set_initializer(t.weight, r.w.T.reshape(w.shape).astype(np.float32))
    else:
        new = r.w / alpha
        ed.set_initializer(t.weight, (new.T if _trans_b(node) else new).astype(np.float32))
    if t.bias and r.b is not None:
        shape = index.array(t.bias).shape
        new_b = np.asarray(r.b) / beta
        if int(np.prod(shape)) != new_b.size:  # a broadcast (scalar) bias becomes one per output
            shape = new_b.shape
        ed.set_initializer(t.bias, new_b.reshape(shape).astype(np.float32))
    return figs
