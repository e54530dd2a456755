"""Shrink a graph by removed channel groups: producer rows, lane constants and consumer columns go,
and each removed channel's fold value is added to its consumers' outputs.

Folding into a consumer layer (the *sink*): a Conv's removed input columns W[:, R] contribute
conv(fold map, W[:, R]) to its output. Without padding and with a fold value that is uniform over
the positions, that is a per-output-channel constant and goes into the bias. Otherwise, when the
fold is a per-position map (static spatial dims), the exact map is kept as a constant subgraph
`Conv(fold map, W[:, R])` added to the output, which onnxruntime folds into one constant at load
(so the file holds only W[:, R] and the fold map, not an [O, H, W] bias map per layer). With dynamic
spatial dims the interior value goes into the bias and the report says the zero-padded border is
approximated. Gemm / MatMul consumers take fold @ W[R, :] into their bias (an Add for MatMul).
Channels whose fold is exactly 0 everywhere (a ReLU that never fired) add nothing: no bias change, no Add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxcomp.channels import ChannelGraph, Lane, Sink, kept_indices, split_sizes
from onnxcomp.graph import ConvLayer, GraphEditor, attr, make_node, node_label, opset_version, read_conv
from onnxcomp.passes.trim.locality import Locality

FOLD_BIAS = "bias"
FOLD_MAP = "exact border map (constant subgraph, folded at load)"
FOLD_INTERIOR = "bias, interior value (dynamic spatial dims: the zero-padded border is approximated)"
FOLD_INTERIOR_CHOSEN = "bias, mean value (border=interior: the zero-padded border is approximated)"
FOLD_MEAN_CHOSEN = "bias, mean value (border=interior: the per-position fold map is approximated)"
FOLD_ZERO = "none (every removed channel is exactly 0 there)"


@dataclass
class NodeEdit:
    """Everything that changes on one node: kept output rows, removed input columns, lane edits."""

    node: onnx.NodeProto
    rows: np.ndarray | None = None  # kept output channels (source or depthwise rows)
    depthwise: bool = False
    sink: Sink | None = None
    lanes: list[Lane] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    written: dict = field(default_factory=dict)  # a sink's new tensors: weight, bias, map (for a refit)


def shrink(model: onnx.ModelProto, cg: ChannelGraph, removed: dict[str, list[int]],
           localities: dict[str, Locality], exact_border: bool = True
           ) -> tuple[onnx.ModelProto, dict[str, dict], dict[str, dict]]:
    """A new model without the `removed` channels (per tracked tensor, consistent over each group)
    and the per-node figures (out/in channels trimmed, fold kind). `localities` gives the fold values
    of every sink input that loses channels. `exact_border=False` folds each channel's mean into the
    bias even where the exact map is known (faster: no Add per layer; the border is approximated).
    The third value names, per sink layer, the tensors it now reads its weight, bias and fold map
    from (`weight`, `bias`, `map`), for a refit."""
    keep = {t: kept_indices(cg.channels[t], set(r)) for t, r in removed.items() if r}
    edits: dict[int, NodeEdit] = {}

    def edit(node: onnx.NodeProto) -> NodeEdit:
        return edits.setdefault(id(node), NodeEdit(node))

    for lane in cg.lanes:
        if lane.tensor not in keep:
            continue
        e = edit(lane.node)
        if lane.kind in ("source_conv", "source_dense", "depthwise"):
            e.rows = keep[lane.tensor]
            e.depthwise = lane.kind == "depthwise"
        else:
            e.lanes.append(lane)
    for sink in cg.sinks:
        if sink.tensor in keep:
            edit(sink.node).sink = sink
    ed = GraphEditor(model)
    opset = opset_version(model)
    figures: dict[str, dict] = {}
    written: dict[str, dict] = {}
    for e in edits.values():
        node = e.node
        if node.op_type == "Conv":
            nodes = _conv(ed, cg, e, keep, removed, localities, opset, exact_border)
        elif node.op_type in ("Gemm", "MatMul") and (e.rows is not None or e.sink is not None):
            nodes = _dense(ed, cg, e, keep, removed, localities)
        else:
            nodes = _lane(ed, cg, e, keep, opset)
        ed.replace(node, nodes)
        figures[node_label(node)] = e.figures
        if e.sink is not None:
            written[node_label(node)] = e.written
    return ed.apply(), figures, written


def _new_node(node: onnx.NodeProto, inputs: list[str], **overrides) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.input[:]
    out.input.extend(inputs)
    for key, value in overrides.items():
        for i, a in enumerate(out.attribute):
            if a.name == key:
                del out.attribute[i]
                break
        if value is not None:
            out.attribute.append(helper.make_attribute(key, value))
    return out


def _sink_parts(e: NodeEdit, keep, removed, localities) -> tuple[np.ndarray, np.ndarray, Locality]:
    assert e.sink is not None
    t = e.sink.tensor
    return np.asarray(removed[t], dtype=np.int64), keep[t], localities[t]


def _conv(ed: GraphEditor, cg: ChannelGraph, e: NodeEdit, keep, removed, localities, opset: int,
          exact_border: bool) -> list[onnx.NodeProto]:
    node = e.node
    name = node_label(node)
    conv = read_conv(cg.index, node)
    assert not isinstance(conv, str)
    w = conv.weight  # sliced in float32; only the folded columns are summed in float64
    b = None if conv.bias is None else conv.bias.astype(np.float64)
    inputs = list(node.input) + [""] * (3 - len(node.input))
    w_r = fold = None
    if e.sink is not None:
        R, kept_cols, loc = _sink_parts(e, keep, removed, localities)
        w_r, w = w[:, R].astype(np.float64), w[:, kept_cols]
        fold = loc.channel_fold(R)
        e.figures["in_channels"] = conv.in_channels
        e.figures["in_channels_trimmed"] = int(R.size)
    overrides: dict = {}
    if e.rows is not None:
        e.figures["out_channels"] = conv.out_channels
        e.figures["out_channels_trimmed"] = conv.out_channels - int(e.rows.size)
        w = w[e.rows]
        b = None if b is None else b[e.rows]
        if w_r is not None:
            w_r = w_r[e.rows]
        if e.depthwise:
            overrides["group"] = int(e.rows.size)
    out_nodes: list[onnx.NodeProto] = []
    y = node.output[0]
    if w_r is not None:
        flat = _per_channel(fold)
        kind = fold_kind(conv, fold, exact_border)
        e.figures["fold"] = kind
        if kind == FOLD_MAP:
            out_nodes, y = (_fold_map(ed, conv, name, w_r, fold, _uniform(flat), opset),
                            ed.unique_name(f"{name}/trim_pre"))
        elif kind != FOLD_ZERO:  # into the bias
            c = flat.mean(axis=1)
            contrib = w_r.reshape(w_r.shape[0], w_r.shape[1], -1).sum(axis=2) @ c
            b = contrib if b is None else b + contrib
    inputs[1] = ed.add_initializer(f"{name}/trim_weight", np.asarray(w, dtype=np.float32))
    inputs[2] = "" if b is None else ed.add_initializer(f"{name}/trim_bias", b.astype(np.float32))
    if not inputs[2]:
        inputs = inputs[:2]
    e.written = {"weight": inputs[1], "bias": inputs[2] if len(inputs) > 2 else None, "map": None}
    new = _new_node(node, inputs, **overrides)
    if y != node.output[0]:
        del new.output[:]
        new.output.append(y)
        map_name = out_nodes[-1].output[0]
        e.written["map"] = map_name
        out_nodes = [*out_nodes, new, make_node("Add", [y, map_name], [node.output[0]], f"{name}/trim_fold")]
        return out_nodes
    return [new]


def fold_kind(conv: ConvLayer, fold: np.ndarray, exact_border: bool) -> str:
    """How removed input channels with fold values `fold` ([R] or [R, *spatial]) are folded into
    `conv`: FOLD_MAP (an Add of a constant map after the conv, which stops onnxruntime's fusion of the
    conv with what follows) or a bias change of one of the other kinds, or nothing (FOLD_ZERO)."""
    per_position = fold.ndim > 1
    flat = _per_channel(fold)
    uniform = _uniform(flat)
    unpadded = conv.auto_pad == "VALID" or (conv.pads is not None and not any(conv.pads))
    if not np.any(flat):  # dead channels (a ReLU that never fires): nothing to add, no map Add
        return FOLD_ZERO
    if not per_position:  # dynamic dims: one value per channel
        return FOLD_BIAS if unpadded else FOLD_INTERIOR
    if uniform and unpadded:  # the same value at every position and no border: exact in the bias
        return FOLD_BIAS
    if not exact_border:
        return FOLD_MEAN_CHOSEN if unpadded else FOLD_INTERIOR_CHOSEN
    return FOLD_MAP


def _per_channel(fold: np.ndarray) -> np.ndarray:
    """Fold values as [R, positions] (one column when the fold is one value per channel)."""
    return fold.reshape(fold.shape[0], -1) if fold.ndim > 1 else fold[:, None]


def _uniform(flat: np.ndarray) -> bool:
    """Each channel's fold the same at every position (within float round-off)."""
    return bool(np.all(np.ptp(flat, axis=1) <= 1e-7 * max(float(np.abs(flat).max()), 1e-30)))


def _fold_map(ed: GraphEditor, conv, name: str, w_r: np.ndarray, fold: np.ndarray, uniform: bool,
              opset: int) -> list[onnx.NodeProto]:
    """Nodes computing conv(fold map, W[:, R]) from constants alone: [1, O, Ho, Wo] (the last node's
    output). A map uniform per channel is stored as one value per channel and expanded."""
    nodes: list[onnx.NodeProto] = []
    spatial = fold.shape[1:]
    if uniform and opset >= 8:
        small = fold.reshape(fold.shape[0], -1).mean(axis=1).reshape(1, -1, *([1] * len(spatial)))
        m_small = ed.add_initializer(f"{name}/trim_fold_value", small.astype(np.float32))
        shape = ed.add_initializer(f"{name}/trim_fold_shape", np.array([1, fold.shape[0], *spatial], dtype=np.int64))
        m = ed.unique_name(f"{name}/trim_fold_input")
        nodes.append(make_node("Expand", [m_small, shape], [m], f"{name}/trim_fold_expand"))
    else:
        m = ed.add_initializer(f"{name}/trim_fold_input", fold[None].astype(np.float32))
    wr = ed.add_initializer(f"{name}/trim_fold_weight", w_r.astype(np.float32))
    out = ed.unique_name(f"{name}/trim_fold_map")
    nodes.append(make_node("Conv", [m, wr], [out], f"{name}/trim_fold_conv", **conv.geometry_attributes()))
    return nodes


def _dense(ed: GraphEditor, cg: ChannelGraph, e: NodeEdit, keep, removed, localities) -> list[onnx.NodeProto]:
    node = e.node
    name = node_label(node)
    index = cg.index
    stored = index.array(node.input[1])  # sliced in float32; only the folded rows are summed in float64
    gemm = node.op_type == "Gemm"
    trans_b = gemm and bool(attr(node, "transB", 0))
    in_axis = 1 if trans_b else 0
    alpha = float(attr(node, "alpha", 1.0)) if gemm else 1.0
    beta = float(attr(node, "beta", 1.0)) if gemm else 1.0
    contrib = None
    if e.sink is not None:
        R, kept_cols, loc = _sink_parts(e, keep, removed, localities)
        hw = e.sink.spatial  # input rows per channel (H * W of a flattened map, else 1)
        rows_r = (R[:, None] * hw + np.arange(hw)[None, :]).ravel()
        w_r = np.take(stored, rows_r, axis=in_axis).astype(np.float64)
        fold = loc.channel_fold(R).reshape(R.size, -1)
        fold = fold if fold.shape[1] == hw else np.repeat(fold.mean(axis=1, keepdims=True), hw, axis=1)
        contrib = alpha * (fold.ravel() @ (w_r.T if trans_b else w_r)) if np.any(fold) else None
        stored = np.take(stored, (kept_cols[:, None] * hw + np.arange(hw)[None, :]).ravel(), axis=in_axis)
        e.figures["in_channels"] = int(cg.channels[e.sink.tensor])
        e.figures["in_channels_trimmed"] = int(R.size)
        e.figures["fold"] = FOLD_BIAS if contrib is not None else FOLD_ZERO
    out_features = stored.shape[1 - in_axis]
    if e.rows is not None:
        e.figures["out_channels"] = int(out_features)
        e.figures["out_channels_trimmed"] = int(out_features - e.rows.size)
        stored = np.take(stored, e.rows, axis=1 - in_axis)
        if contrib is not None:
            contrib = contrib[e.rows]
    inputs = list(node.input)
    inputs[1] = ed.add_initializer(f"{name}/trim_weight", np.asarray(stored, dtype=np.float32))
    overrides: dict = {}
    if gemm:
        c = index.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        c64 = None if c is None else c.astype(np.float64)
        if c64 is not None and e.rows is not None and c64.ndim and c64.shape[-1] == out_features:
            c64 = np.take(c64, e.rows, axis=-1)
        if contrib is not None:
            if beta == 0.0:
                c64, overrides["beta"] = contrib, 1.0
            else:
                c64 = contrib / beta if c64 is None else c64 + contrib / beta
        if c64 is not None:
            inputs = inputs[:2] + [ed.add_initializer(f"{name}/trim_bias", c64.astype(np.float32))]
        e.written = {"weight": inputs[1], "bias": inputs[2] if len(inputs) > 2 else None, "map": None}
        return [_new_node(node, inputs, **overrides)]
    new = _new_node(node, inputs)
    if contrib is None:
        e.written = {"weight": inputs[1], "bias": None, "map": None}
        return [new]
    pre = ed.unique_name(f"{name}/trim_pre")
    del new.output[:]
    new.output.append(pre)
    bias = ed.add_initializer(f"{name}/trim_bias", contrib.astype(np.float32))
    e.written = {"weight": inputs[1], "bias": bias, "map": None}
    return [new, make_node("Add", [pre, bias], [node.output[0]], f"{name}/trim_fold")]


def _lane(ed: GraphEditor, cg: ChannelGraph, e: NodeEdit, keep, opset: int) -> list[onnx.NodeProto]:
    node = e.node
    name = node_label(node)
    inputs = list(node.input)
    overrides: dict = {}
    for lane in e.lanes:
        kept = keep[lane.tensor]
        for ps in lane.params:
            arr = cg.index.array(inputs[ps.index])
            inputs[ps.index] = ed.add_initializer(f"{name}/trim_{ps.index}", np.take(arr, kept, axis=ps.axis))
        if lane.kind == "split":
            sizes = split_sizes(cg.index, node, cg.channels[lane.tensor])
            assert sizes is not None
            bounds = np.cumsum([0, *sizes])
            new_sizes = [int(((kept >= lo) & (kept < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            overrides["num_outputs"] = None
            if opset >= 13:
                inputs = [inputs[0], ed.add_initializer(f"{name}/trim_split", np.array(new_sizes, dtype=np.int64))]
                overrides["split"] = None
            else:
                overrides["split"] = new_sizes
        elif lane.kind == "reshape":
            target = cg.index.array(inputs[1]).copy()
            if int(target[1]) == cg.channels[lane.tensor]:
                target[1] = kept.size
                inputs[1] = ed.add_initializer(f"{name}/trim_shape", target)
    return [_new_node(node, inputs, **overrides)]
