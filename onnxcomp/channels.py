"""Coupled-channel groups of a model's graph: which channels must go together when one is removed.

The idea of Torch-Pruning's dependency graph, on ONNX. Every channel of every tracked tensor is a
*slot*; an op that maps channel i of an input to channel j of an output one-to-one couples the two
slots (activations, BN, pooling, depthwise convs, Concat/Split offsets, and elementwise ops of two
tracked tensors, e.g. a residual Add or a squeeze-excitation Mul). A *group* is a class of coupled
slots; removing a channel means removing a whole group. Tracking starts at the output rows of Conv
(group 1) and Gemm / constant-matrix MatMul layers (the *sources*, whose rows are removed) and ends at
the *sinks* (Conv with group 1, Gemm, MatMul) whose input columns are removed and whose bias takes the
removed channel's constant value. Every other consumer of a tracked tensor (Reshape to anything but
[N, C], Transpose, grouped convs, LRN, graph outputs, ...) blocks the tensor's groups, with a reason:
what is not understood is left alone, never guessed.

Channel axis: 1 (NCHW, or the features of an [N, C] tensor). This module reads the graph only; the
edits that shrink it are the trim pass's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcomp.graph import GraphIndex, attr, node_label, opset_version, read_conv, subgraph_reads
from onnxcomp.shapes import static_shapes

# Ops whose output 0 has the channels of input 0, channel by channel (side inputs are scalars or
# per-channel constants, sliced along with the channels).
ELEMENTWISE_UNARY = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Identity", "Dropout", "Erf", "Neg", "Abs", "ThresholdedRelu",
})
POOLING = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
PER_CHANNEL_PARAMS = frozenset({"BatchNormalization", "InstanceNormalization"})
SOURCES = frozenset({"Conv", "Gemm", "MatMul"})  # ops whose output rows start channels
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"})


@dataclass
class ParamSlice:
    """A constant input of a lane op that is sliced with the channels: input `index`, axis `axis`."""

    index: int
    axis: int


@dataclass
class Lane:
    """A node that shrinks with its tracked tensors. kind: "source_conv" / "source_dense" (its output
    rows go), "depthwise" (rows go with its input's channels), "split" (its sizes change), "reshape"
    (its [N, C] target changes), or "plain" (nothing to edit but its constants in `params`)."""

    node: onnx.NodeProto
    kind: str
    tensor: str  # the tracked output whose kept channels drive the edit
    params: list[ParamSlice] = field(default_factory=list)


@dataclass
class Sink:
    """A consumer whose input columns for the tracked tensor `tensor` are removed; kind "conv" or
    "dense". A dense layer reading a flattened [N, C, H, W] tensor (a VGG classifier) has `spatial`
    = H * W input rows per channel, channel-major."""

    node: onnx.NodeProto
    tensor: str
    kind: str
    spatial: int = 1


@dataclass
class ChannelGroup:
    """One class of coupled slots. `blocked` is why it cannot go (None: it can)."""

    id: int
    slots: list[tuple[str, int]]
    blocked: str | None
    tensors: frozenset[str] = frozenset()  # the tensors its slots are in

    def __post_init__(self) -> None:
        self.tensors = frozenset(t for t, _ in self.slots)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller id stays the root: deterministic


class ChannelGraph:
    """The channel-coupling analysis of `model`'s main graph (read once; query with `groups()`)."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None):
        self.model = model
        self.index = GraphIndex(model)
        self.shapes = static_shapes(model, input_shapes)
        self.channels: dict[str, int] = {}
        self.rank: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.lanes: list[Lane] = []
        self.sinks: list[Sink] = []
        self.sources: dict[str, onnx.NodeProto] = {}  # tracked tensor -> the node whose rows it is
        self.blocked: dict[str, str] = {}  # tracked tensor -> why its channels cannot go
        self._uf = _UnionFind()
        self._walk()

    # -- queries --------------------------------------------------------------------------------
    def slot(self, tensor: str, channel: int) -> int:
        return self.base[tensor] + channel

    def group_id(self, tensor: str, channel: int) -> int:
        return self._uf.find(self.slot(tensor, channel))

    def groups(self) -> list[ChannelGroup]:
        """Every group, in the order of their first slot; blocked groups carry their reason."""
        members: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for tensor, c in self.channels.items():
            for ch in range(c):
                members[self._uf.find(self.base[tensor] + ch)].append((tensor, ch))
        out = []
        for gid in sorted(members):
            slots = members[gid]
            tensors = dict.fromkeys(t for t, _ in slots)
            reason = next((f"{t}: {self.blocked[t]}" for t in tensors if t in self.blocked), None)
            if reason is None and not any(t in self.sources for t in tensors):
                reason = "no layer produces these channels as its output rows"
            if reason is None and not any(s.tensor in tensors for s in self.sinks):
                reason = "no consumer layer could take the channels' constant value"
            out.append(ChannelGroup(gid, slots, reason))
        return out

    def sink_inputs(self) -> list[str]:
        return list(dict.fromkeys(s.tensor for s in self.sinks))

    # -- building -------------------------------------------------------------------------------
    def _track(self, tensor: str, channels: int, rank: int) -> None:
        if tensor in self.channels or not tensor:
            return
        self.channels[tensor] = channels
        self.rank[tensor] = rank
        self.base[tensor] = self._uf.add(channels)

    def _couple(self, a: str, b: str, offset_a: int = 0, offset_b: int = 0, n: int | None = None) -> None:
        n = self.channels[a] if n is None else n
        for k in range(n):
            self._uf.union(self.base[a] + offset_a + k, self.base[b] + offset_b + k)

    def _lane(self, node: onnx.NodeProto, x: str, y: str, rank: int, kind: str = "plain",
              params: list[ParamSlice] | None = None) -> bool:
        """`y` carries `x`'s channels one to one (rank `rank`): track it, couple them, record the lane."""
        self._track(y, self.channels[x], rank)
        self._couple(x, y)
        self.lanes.append(Lane(node, kind, y, params or []))
        return True

    def _block(self, tensor: str, reason: str) -> None:
        if tensor in self.channels:
            self.blocked.setdefault(tensor, reason)

    def _shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def _walk(self) -> None:
        g = self.model.graph
        inner = subgraph_reads(g)
        for node in g.node:
            tracked_in = [i for i in node.input if i in self.channels]
            standard = node.domain in ("", "ai.onnx")
            handler = getattr(self, f"_on_{node.op_type}", None) if standard else None
            if standard and (node.op_type in ELEMENTWISE_UNARY or node.op_type in POOLING
                             or node.op_type in PER_CHANNEL_PARAMS):
                handler = self._on_lane
            elif standard and node.op_type in BINARY:
                handler = self._on_binary
            if not tracked_in and node.op_type not in SOURCES:
                continue  # only layers start channels; any other node matters when it reads some
            handled = handler(node, tracked_in) if handler is not None else False
            if not handled:
                for t in tracked_in:
                    self._block(t, f"consumed by {node.op_type} '{node_label(node)}', which trimming does not handle")
        for name in inner:
            self._block(name, "read inside a subgraph (If/Loop/Scan)")
        for out in g.output:
            self._block(out.name, "a graph output")

    # each handler returns True when it understood every tracked input of the node; the walk calls
    # it only for a node that reads a tracked tensor, or for a layer (which may start channels)
    def _on_Conv(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        conv = read_conv(self.index, node)
        x, y = node.input[0], node.output[0]
        if isinstance(conv, str):
            return not tracked_in
        if tracked_in and tracked_in != [x]:
            return False
        depthwise = conv.group > 1 and conv.weight.shape[1] == 1 and conv.out_channels == conv.group
        if depthwise:
            if x not in self.channels or self.channels[x] != conv.group:
                return not tracked_in
            return self._lane(node, x, y, conv.weight.ndim, kind="depthwise")
        if conv.group > 1:
            if x in self.channels:
                self._block(x, f"consumed by grouped Conv '{node_label(node)}' (group={conv.group})")
            return True
        if x in self.channels:
            self.sinks.append(Sink(node, x, "conv"))
        self._track(y, conv.out_channels, conv.weight.ndim)
        self.sources[y] = node
        self.lanes.append(Lane(node, "source_conv", y))
        return True

    def _dense(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x, y = node.input[0], node.output[0]
        features = _dense_features(self.index, node)  # from the weight's dims: no copy of a big matrix
        if features is None or tracked_in not in ([], [x]):
            return not tracked_in
        n_in, n_out = features
        if x in self.channels:
            if self.rank[x] != 2 or self.channels[x] != n_in:
                return False
            self.sinks.append(Sink(node, x, "dense"))
        y_shape = self._shape(y)
        if y_shape is not None and len(y_shape) == 2:
            self._track(y, n_out, 2)
            self.sources[y] = node
            self.lanes.append(Lane(node, "source_dense", y))
        return True

    _on_Gemm = _dense
    _on_MatMul = _dense

    def _on_lane(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x = node.input[0]
        if tracked_in != [x]:
            return False
        used_outputs = [o for o in node.output[1:] if o and self.index.consumers.get(o)]
        if used_outputs or any(o in self.index.graph_outputs for o in node.output[1:] if o):
            return False  # MaxPool indices, Dropout mask, BN training statistics
        params: list[ParamSlice] = []
        c, rank = self.channels[x], self.rank[x]
        for k, name in enumerate(node.input[1:], start=1):
            if not name:
                continue
            if node.op_type in PER_CHANNEL_PARAMS:
                arr = self.index.array(name)
                if arr is None or arr.shape != (c,):
                    return False
                params.append(ParamSlice(k, 0))
                continue
            ps = self._constant_slice(name, c, rank, k)
            if ps is False:
                return False
            if ps is not None:
                params.append(ps)
        if node.op_type.startswith("Global") and rank < 3:
            return False
        return self._lane(node, x, node.output[0], rank, params=params)

    def _constant_slice(self, name: str, c: int, rank: int, index: int) -> ParamSlice | None | bool:
        """How a constant operand broadcast against a [N, C, ...] tensor follows its channels: a
        ParamSlice, None (it broadcasts over channels), or False (it cannot be followed)."""
        arr = self.index.array(name)
        if arr is None or arr.ndim > rank:  # a higher rank would move the channel axis of the result
            return False
        axis = 1 - (rank - arr.ndim)
        if axis < 0 or arr.shape[axis] == 1:
            return None
        if arr.shape[axis] == c:
            return ParamSlice(index, axis)
        return False

    def _on_binary(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        y = node.output[0]
        c, rank = self.channels[tracked_in[0]], self.rank[tracked_in[0]]
        if any(self.channels[t] != c or self.rank[t] != rank for t in tracked_in):
            return False
        params: list[ParamSlice] = []
        for k, name in enumerate(node.input):
            if name in self.channels or not name:
                continue
            if self.index.is_constant(name):
                ps = self._constant_slice(name, c, rank, k)
                if ps is False:
                    return False
                if ps is not None:
                    params.append(ps)
                continue
            shp = self._shape(name)  # an untracked operand may only broadcast over the channels
            if shp is None or len(shp) > rank:
                return False
            axis = 1 - (rank - len(shp))
            if axis >= 0 and shp[axis] != 1:
                return False
        self._track(y, c, rank)
        for t in tracked_in:
            self._couple(t, y)
        self.lanes.append(Lane(node, "plain", y, params))
        return True

    def _on_Concat(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        ins = [i for i in node.input if i]
        if any(i not in self.channels for i in ins):
            return False
        rank = self.rank[ins[0]]
        axis = int(attr(node, "axis", 1))
        if axis % rank != 1 or any(self.rank[i] != rank for i in ins):
            return False
        y = node.output[0]
        self._track(y, sum(self.channels[i] for i in ins), rank)
        offset = 0
        for i in ins:
            self._couple(i, y, 0, offset)
            offset += self.channels[i]
        self.lanes.append(Lane(node, "plain", y))
        return True

    def _on_Split(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x = node.input[0]
        if tracked_in != [x]:
            return False
        rank, c = self.rank[x], self.channels[x]
        if int(attr(node, "axis", 0)) % rank != 1:
            return False
        sizes = split_sizes(self.index, node, c)
        if sizes is None:
            return False
        offset = 0
        for out, n in zip(node.output, sizes, strict=True):
            self._track(out, n, rank)
            self._couple(x, out, offset, 0, n)
            offset += n
        self.lanes.append(Lane(node, "split", x))
        return True

    def _on_Flatten(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x = node.input[0]
        if int(attr(node, "axis", 1)) != 1:
            return False
        if not self._unit_spatial(x):
            return self._flatten_into_dense(node, x)
        return self._lane(node, x, node.output[0], 2)

    def _flatten_into_dense(self, node: onnx.NodeProto, x: str) -> bool:
        """Flatten of a static [N, C, H, W] read only by dense layers: channel c is their input rows
        c*H*W .. (c+1)*H*W - 1, so the dense layers are the channel's sinks."""
        shp = self._shape(x)
        if shp is None or len(shp) != self.rank[x] or any(not isinstance(d, int) or d <= 0 for d in shp[1:]):
            return False
        spatial = int(np.prod(shp[2:]))
        y = node.output[0]
        readers = self.index.consumers.get(y, [])
        if not readers or y in self.index.graph_outputs:
            return False
        for reader in readers:
            features = _dense_features(self.index, reader) if reader.input[0] == y else None
            if features is None or features[0] != self.channels[x] * spatial:
                return False
        for reader in readers:
            self.sinks.append(Sink(reader, x, "dense", spatial))
        return True

    def _on_Squeeze(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x = node.input[0]
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            arr = self.index.array(node.input[1])
            axes = None if arr is None else arr.tolist()
        rank = self.rank[x]
        if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)) or not self._unit_spatial(x):
            return False
        return self._lane(node, x, node.output[0], 2)

    def _on_Reshape(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        """Reshape [N, C, 1, 1] -> [N, C] (a classifier's flatten) only; its constant target is
        rewritten with the kept channel count."""
        x = node.input[0]
        target = self.index.array(node.input[1]) if len(node.input) > 1 else None
        if tracked_in != [x] or target is None or target.ndim != 1 or target.size != 2 or not self._unit_spatial(x):
            return False
        c = self.channels[x]
        if not (int(target[1]) in (-1, c) and (int(target[0]) in (0, -1) or int(target[1]) == c)):
            return False
        if int(target[1]) == -1 and int(target[0]) == -1:
            return False
        return self._lane(node, x, node.output[0], 2, kind="reshape")

    def _on_Resize(self, node: onnx.NodeProto, tracked_in: list[str]) -> bool:
        x = node.input[0]
        if tracked_in != [x]:
            return False
        ins = list(node.input) + [""] * 4
        # scales are input 2 of Resize from opset 11 (after roi), input 1 of Resize-10 and Upsample
        scales_name = ins[2] if node.op_type == "Resize" and opset_version(self.model) >= 11 else ins[1]
        scales = self.index.array(scales_name) if scales_name else None
        sizes = ins[3] if node.op_type == "Resize" else ""
        if sizes or scales is None or scales.size < 2 or float(scales[1]) != 1.0 or float(scales[0]) != 1.0:
            return False
        return self._lane(node, x, node.output[0], self.rank[x])

    _on_Upsample = _on_Resize

    def _unit_spatial(self, name: str) -> bool:
        shp = self._shape(name)
        if shp is not None and len(shp) == self.rank.get(name, -1):
            return all(d == 1 for d in shp[2:])
        producer = self.index.producer.get(name)
        return producer is not None and producer.op_type.startswith("Global")


def _dense_features(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(in, out) features of a Gemm (transA=0, constant float32 weight and bias) or a MatMul by a
    constant float32 matrix; None for anything else."""
    if len(node.input) < 2:
        return None
    w = index.initializers.get(node.input[1])
    if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
        return None
    rows, cols = int(w.dims[0]), int(w.dims[1])
    if node.op_type == "MatMul":
        return rows, cols
    if attr(node, "transA", 0) or (len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2])):
        return None
    return (cols, rows) if attr(node, "transB", 0) else (rows, cols)


def split_sizes(index: GraphIndex, node: onnx.NodeProto, channels: int) -> list[int] | None:
    """The channel counts of a Split's outputs, or None when they are not constant."""
    split = attr(node, "split")
    if split is None and len(node.input) > 1 and node.input[1]:
        arr = index.array(node.input[1])
        if arr is None:
            return None
        split = arr.tolist()
    n = len(node.output)
    if split is None:
        if channels % n:
            return None
        split = [channels // n] * n
    split = [int(s) for s in split]
    return split if sum(split) == channels and len(split) == n else None


def kept_indices(channels: int, removed: set[int]) -> np.ndarray:
    return np.array([c for c in range(channels) if c not in removed], dtype=np.int64)
