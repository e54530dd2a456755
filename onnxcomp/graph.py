"""Shared graph helpers: index a graph, read a Conv/Gemm and its weights, and apply edits.

Every pass reads layers through `GraphIndex` and writes through `GraphEditor`; no pass edits protobuf
lists by hand. Nodes a pass creates are named after the node they replace (`conv3/tucker_in`, ...).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Value of a node attribute (python types), or `default` when absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for `domain` ("" and "ai.onnx" are the same), 0 if not imported."""
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 0


class GraphIndex:
    """Read-only lookups over a model's main graph: initializers, producers, consumers, shapes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.graph_inputs = {i.name for i in self.graph.input if i.name not in self.initializers}
        self._shapes: dict[str, list] = {}
        for vi in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self._shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim
                ]

    def array(self, name: str) -> np.ndarray | None:
        """The initializer `name` as a numpy array, or None if it is not a constant."""
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def shape(self, name: str) -> list | None:
        """Shape from value_info (ints, symbolic names or None per dim), or None if unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        return self._shapes.get(name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shp = self.shape(name)
        if shp is None or any(not isinstance(d, int) or d <= 0 for d in shp):
            return None
        return tuple(shp)

    def nodes(self, op_types: Iterable[str] | None = None) -> list[onnx.NodeProto]:
        ops = set(op_types) if op_types is not None else None
        return [n for n in self.graph.node if ops is None or n.op_type in ops]


def node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    """A stable, human-readable name for a node (its name, else op + first output)."""
    if node.name:
        return node.name
    return f"{node.op_type}:{node.output[0]}" if node.output else f"{node.op_type}#{index}"


@dataclass
class ConvLayer:
    """A Conv node with constant weights, its attributes resolved to explicit values."""

    node: onnx.NodeProto
    weight: np.ndarray  # (T, S/g, *kernel)
    bias: np.ndarray | None
    group: int
    strides: list[int]
    dilations: list[int]
    pads: list[int] | None  # explicit begin..end pads; None when auto_pad is SAME_* (kept as attribute)
    auto_pad: str  # "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"

    @property
    def name(self) -> str:
        return node_label(self.node)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def spatial_rank(self) -> int:
        return self.weight.ndim - 2

    def geometry_attributes(self) -> dict:
        """Attributes to put on a replacement KxK conv so it sees exactly the same windows."""
        out: dict = {"strides": self.strides, "dilations": self.dilations, "kernel_shape": list(self.kernel)}
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out["auto_pad"] = self.auto_pad
        else:
            out["pads"] = self.pads if self.pads is not None else [0] * (2 * self.spatial_rank)
        return out


def read_conv(index: GraphIndex, node: onnx.NodeProto) -> ConvLayer | str:
    """A ConvLayer, or the reason this Conv cannot be read as one (non-constant weight, ...)."""
    if node.op_type != "Conv":
        return f"not a Conv ({node.op_type})"
    w = index.array(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return "weight is not a constant initializer"
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} is not float32"
    b = None
    if len(node.input) > 2 and node.input[2]:
        b = index.array(node.input[2])
        if b is None:
            return "bias is not a constant initializer"
    nsp = w.ndim - 2
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = attr(node, "pads")
    if auto_pad == "VALID":
        pads = [0] * (2 * nsp)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = None
    else:
        pads = list(pads) if pads is not None else [0] * (2 * nsp)
    return ConvLayer(
        node=node,
        weight=w,
        bias=b,
        group=int(attr(node, "group", 1)),
        strides=list(attr(node, "strides", [1] * nsp)),
        dilations=list(attr(node, "dilations", [1] * nsp)),
        pads=pads,
        auto_pad=auto_pad,
    )


@dataclass
class DenseLayer:
    """A Gemm, or a MatMul whose second operand is a constant 2-D matrix: y = x @ W (+ b)."""

    node: onnx.NodeProto
    weight: np.ndarray  # (in_features, out_features), i.e. already transposed to x @ W form
    bias: np.ndarray | None
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def name(self) -> str:
        return node_label(self.node)


def read_dense(index: GraphIndex, node: onnx.NodeProto, copy: bool = True) -> DenseLayer | str:
    """A DenseLayer (weights as x @ W), or the reason the node is not one. `copy=False`: the weight
    may be a read-only (possibly transposed) view of the initializer's bytes, one copy fewer (a
    4096 x 25088 layer is 411 MB)."""
    if node.op_type == "MatMul":
        w = index.array(node.input[1])
        if w is None or w.ndim != 2:
            return "MatMul second operand is not a constant matrix"
        return DenseLayer(node, w.astype(np.float32, copy=copy), None)
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA=1 is not supported"
        w = index.array(node.input[1])
        if w is None:
            return "Gemm weight is not a constant initializer"
        if attr(node, "transB", 0):
            w = w.T
        b = index.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b is None:
            return "Gemm bias is not a constant initializer"
        return DenseLayer(node, np.ascontiguousarray(w) if copy else w, b, float(attr(node, "alpha", 1.0)),
                          float(attr(node, "beta", 1.0)))
    return f"not a Gemm/MatMul ({node.op_type})"


@dataclass
class _Replacement:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


@dataclass
class GraphEditor:
    """Collects edits to a model and applies them in one place, keeping topological order.

    Usage: `ed = GraphEditor(model); ed.replace(node, [new nodes], {name: array}); new = ed.apply()`.
    A replacement's nodes are inserted where the replaced node stood, so as long as they consume only
    tensors the old node could see, order stays valid. Initializers no longer used are dropped.
    """

    model: onnx.ModelProto
    _replace: dict[int, _Replacement] = field(default_factory=dict)
    _remove: set[int] = field(default_factory=set)
    _new_init: list[onnx.TensorProto] = field(default_factory=list)
    _set_init: dict[str, onnx.TensorProto] = field(default_factory=dict)
    _functions: list[onnx.FunctionProto] = field(default_factory=list)
    _opsets: dict[str, int] = field(default_factory=dict)
    _used_names: set[str] | None = None
    _consumed: bool = False

    def unique_name(self, base: str) -> str:
        """`base` if no node/tensor has that name yet, else `base_1`, `base_2`, ... (reserved)."""
        if self._used_names is None:
            g = self.model.graph
            self._used_names = {t.name for t in g.initializer} | {v.name for v in g.input} | {
                v.name for v in g.output
            }
            for n in g.node:
                self._used_names.add(n.name)
                self._used_names.update(n.input)
                self._used_names.update(n.output)
        name, k = base, 0
        while name in self._used_names:
            k += 1
            name = f"{base}_{k}"
        self._used_names.add(name)
        return name

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant (name is made unique) and return its final name."""
        final = self.unique_name(name)
        self._new_init.append(numpy_helper.from_array(np.ascontiguousarray(array), final))
        return final

    def add_tensor(self, tensor: onnx.TensorProto) -> str:
        """Add a ready-made constant (typed sub-byte data, raw bytes); its name is made unique."""
        t = onnx.TensorProto()
        t.CopyFrom(tensor)
        t.name = self.unique_name(tensor.name)
        self._new_init.append(t)
        return t.name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """Give the existing initializer `name` a new value (same name, any shape the readers accept)."""
        if all(t.name != name for t in self.model.graph.initializer):
            raise ValueError(f"no initializer named {name!r}")
        self._set_init[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)

    def replace(self, node: onnx.NodeProto, new_nodes: Sequence[onnx.NodeProto]) -> None:
        """Replace `node` (by identity) with `new_nodes`; they must produce the node's outputs."""
        self._replace[self._position(node)] = _Replacement(list(new_nodes), [])

    def remove(self, node: onnx.NodeProto) -> None:
        self._remove.add(self._position(node))

    def add_function(self, fn: onnx.FunctionProto, opset_version: int = 1) -> None:
        """Register a model-local function (custom-domain op with a standard-op body); one per
        (domain, name, overload): a second registration of the same identity is ignored."""
        if all(function_key(f) != function_key(fn) for f in self._functions):
            self._functions.append(fn)
        self._opsets[fn.domain] = opset_version

    def _position(self, node: onnx.NodeProto) -> int:
        for i, n in enumerate(self.model.graph.node):
            if n is node:
                return i
        raise ValueError(f"node {node.name!r} is not in this model's graph")

    @property
    def changed(self) -> bool:
        return bool(self._replace or self._remove or self._new_init or self._set_init or self._functions)

    def apply(self, consume: bool = False) -> onnx.ModelProto:
        """A new model with all collected edits; the editor's source model is left untouched.

        Only the initializers the edited graph still reads are copied from the source (copying the
        whole model first would hold every replaced weight twice: 1 GB of transient copies for
        VGG-16's fully connected layers). `consume=True`: the new initializers move into the model
        one at a time (each dropped from the editor once copied), so they are not held twice at the
        end; the editor cannot apply again."""
        if self._consumed:
            raise RuntimeError("GraphEditor.apply(consume=True) already moved this editor's initializers out")
        out = onnx.ModelProto()
        _copy_fields(self.model, out, skip=("graph",))
        g = out.graph
        src = self.model.graph
        _copy_fields(src, g, skip=("node", "initializer", "value_info"))
        new_nodes: list[onnx.NodeProto] = []
        for i, n in enumerate(src.node):
            if i in self._remove:
                continue
            if i in self._replace:
                new_nodes.extend(self._replace[i].nodes)
            else:
                new_nodes.append(n)
        g.node.extend(new_nodes)
        used = used_tensor_names(out)
        for t in src.initializer:
            if t.name in used:
                g.initializer.add().CopyFrom(self._set_init.get(t.name, t))
        if consume:
            self._new_init.reverse()
            while self._new_init:  # protobuf copies on append: free each source as it goes
                g.initializer.append(self._new_init.pop())
            self._consumed = True
        else:
            g.initializer.extend(self._new_init)
        # IR < 4 models also list every initializer as a graph input: drop the dropped ones' entries
        gone = {t.name for t in src.initializer if t.name not in used}
        if gone and any(vi.name in gone for vi in g.input):
            keep = [vi for vi in g.input if vi.name not in gone]
            del g.input[:]
            g.input.extend(keep)
        for fn in self._functions:
            if all(function_key(f) != function_key(fn) for f in out.functions):
                out.functions.append(fn)
        if any(fn.overload for fn in out.functions):
            out.ir_version = max(out.ir_version, 10)  # function overloads arrived in IR 10
        for domain, version in self._opsets.items():
            if all(o.domain != domain for o in out.opset_import):
                out.opset_import.append(helper.make_opsetid(domain, version))
        remove_unused_initializers(out)
        # Old shape annotations may be stale for rewritten tensors: keep only graph I/O shapes.
        del g.value_info[:]
        return out


def function_key(obj: onnx.FunctionProto | onnx.NodeProto) -> tuple[str, str, str]:
    """(domain, name, overload) of a model-local function, or of the function a node calls."""
    name = obj.name if isinstance(obj, onnx.FunctionProto) else obj.op_type
    return obj.domain, name, obj.overload


def drop_unused_functions(model: onnx.ModelProto) -> int:
    """Remove (in place) model-local functions no main-graph node calls, and the opset imports of
    custom domains nothing uses any more. Returns how many functions went."""
    by_key = {function_key(f): f for f in model.functions}
    graph_nodes = list(model.graph.node)
    graphs = [g for n in model.graph.node for g in _subgraphs(n)]
    while graphs:  # nodes of If/Loop/Scan bodies, at any depth
        g = graphs.pop()
        graph_nodes.extend(g.node)
        graphs.extend(sg for n in g.node for sg in _subgraphs(n))
    stack = list(graph_nodes)
    called: set = set()
    while stack:  # and the functions those functions call
        key = function_key(stack.pop())
        if key in by_key and key not in called:
            called.add(key)
            stack.extend(by_key[key].node)
    keep = [f for f in model.functions if function_key(f) in called]
    gone = len(model.functions) - len(keep)
    if gone:
        del model.functions[:]
        model.functions.extend(keep)
    used_domains = {n.domain for n in graph_nodes} | {n.domain for f in keep for n in f.node} | {f.domain for f in keep}
    stale = [o for o in model.opset_import if o.domain not in ("", "ai.onnx") and o.domain not in used_domains]
    for o in stale:
        model.opset_import.remove(o)
    return gone


def _repeated(fd) -> bool:
    """Whether a protobuf field is repeated (`is_repeated` in protobuf 6+, `label` before)."""
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of protobuf message `src` into the empty `dst`, except those in `skip`."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if _repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def used_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name consumed by a main-graph node (including names its subgraphs read) or
    listed as a graph output. Function bodies are not visited: they only see their own inputs."""
    used: set[str] = {o.name for o in model.graph.output}
    used.update(i for n in model.graph.node for i in n.input if i)
    return used | subgraph_reads(model.graph)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Tensor names that nodes inside `graph`'s subgraphs (If/Loop/Scan bodies, at any depth) read;
    names a body defines itself are included too (harmless for "is it used" questions)."""
    out: set[str] = set()
    stack = [g for n in graph.node for g in _subgraphs(n)]
    while stack:
        g = stack.pop()
        for n in g.node:
            out.update(i for i in n.input if i)
            stack.extend(_subgraphs(n))
    return out


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers (and their graph-input entries) that nothing reads. Returns the count."""
    used = used_tensor_names(model)
    g = model.graph
    gone = {t.name for t in g.initializer if t.name not in used}
    dropped = sum(1 for t in g.initializer if t.name not in used)
    if dropped:
        # deleted in place: re-adding the kept tensors would copy them through serialization,
        # which fails past protobuf's 2 GB limit
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name not in used:
                del g.initializer[i]
        # IR < 4 models also list every initializer as a graph input: drop those entries too, or
        # the dropped weight would become an input the caller has to feed.
        inputs = [vi for vi in g.input if vi.name not in gone]
        if len(inputs) != len(g.input):
            del g.input[:]
            g.input.extend(inputs)
    return dropped


def make_node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> onnx.NodeProto:
    """helper.make_node with a mandatory name (so rewritten layers are findable in Netron)."""
    return helper.make_node(op, list(inputs), list(outputs), name=name, **attrs)
