"""`normalize`: the canonical form every other pass matches against, run first in every pipeline.

What it does, in one rebuild of the graph (the input model is never modified):

1. **Constants become initializers.** `Constant`, `ConstantOfShape` and any other node whose inputs
   are all constant is evaluated and its outputs stored as initializers; `Identity` and inference-mode
   `Dropout` are removed by pointing their consumers at their input.
2. **Graph inputs that merely mirror an initializer are dropped** (IR < 4 models list every
   initializer as an input; the `light_*` zoo does). The IR version is raised to 4 where needed.
3. **Dead nodes and unused initializers are removed.**
4. **BatchNormalization after Conv / ConvTranspose is folded** into the weight and bias, and so is a
   per-channel `Mul` / `Add` / `Sub` / `Div` by a constant that follows (Caffe2 "Scale" layers).
5. **Shape inference** runs at the end with symbolic dims left symbolic (no batch=1 is baked in).

Why a small folder of our own rather than onnx-graphsurgeon's `fold_constants`: graphsurgeon imports
the whole graph into its own IR, runs the constant subgraph through an onnxruntime session and
exports again, which costs several copies of every weight (the zoo's VGG-16 is 550 MB) and gives us
no say over which constants get materialised. Here constant nodes are evaluated one at a time with
the onnx reference implementation (pure numpy, deterministic, honours the model's opset), existing
initializers are shared, not copied, until the output is written, and we decide per tensor what to
fold: decompression subgraphs that other passes create on purpose (`DequantizeLinear`, a `Gather`
from a codebook) stay compressed, and a growing op (`Expand`, `Tile`, `ConstantOfShape`, ...) is only
materialised when its result feeds a layer's weights or is small.

Why this module builds the graph itself instead of going through `GraphEditor`: normalize is the
step that establishes what `GraphEditor` assumes (weights are initializers, no aliases, sorted
nodes). It renames consumers, drops inputs and replaces most of the graph at once; doing that with
per-edit copies of a 550 MB model would be slow and memory-hungry.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.errors import BadInputError, first_line
from onnxcomp.graph import attr, node_label, opset_version
from onnxcomp.model import runtime_compatible
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
from onnxcomp.shapes import weightless

# Ops never evaluated at compile time: random, stateful, or deliberate decompression steps.
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
    }
)
# Lookups that may decode a compressed weight (codebook[indices]): folded only when the result is
# not bigger than the table it reads, so a codebook-compressed model stays compressed.
_GATHER_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
_DECODE_OPS = _GATHER_OPS | {"DequantizeLinear"}
# What feeds a decoder (e.g. Cast(uint8 indices -> int64)) may not grow beyond this when folded.
_DECODE_GROWTH_BYTES = 4096
# Input slots that hold a layer's parameters: constants reaching them are always materialised.
_PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
# A constant not feeding parameters is folded only if it grows by at most this (or not at all).
_SMALL_BYTES = 1 << 22
# Initializers above this many elements are left out of the shape-inference skeleton.
_SKELETON_MAX_ELEMENTS = 4096
_CONV_OPS = ("Conv", "ConvTranspose")
_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


@dataclass
class NormalizeConfig(PassConfig):
    """`include` / `exclude` / `ops` choose which Conv layers may absorb a following BatchNorm or
    affine op; constant folding, alias and dead-node removal always apply to the whole graph."""

    fold_constants: bool = option(True, "turn Constant/ConstantOfShape/constant subgraphs into initializers")
    fold_bn: bool = option(True, "fold BatchNormalization into the Conv/ConvTranspose before it")
    fold_affine: bool = option(True, "fold a per-channel Mul/Add/Sub/Div by a constant after a Conv into it")
    shape_inference: bool = option(True, "annotate tensor shapes (symbolic dims stay symbolic)")


@dataclass(frozen=True)
class _Fill:
    """A tensor of one repeated value (a folded ConstantOfShape), kept unexpanded until needed:
    the light_* models fill 550 MB of weights this way, and writing the bytes straight into the
    output TensorProto avoids three intermediate copies."""

    shape: tuple[int, ...]
    value: np.ndarray  # 0-d, carries the dtype

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.value.dtype.itemsize

    def materialize(self) -> np.ndarray:
        return np.full(self.shape, self.value, dtype=self.value.dtype)


class _Consts:
    """Constant tensors by name: original TensorProtos (shared, never copied), new numpy arrays,
    or unexpanded fills."""

    def __init__(self) -> None:
        self.values: dict[str, onnx.TensorProto | np.ndarray | _Fill] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def set(self, name: str, value: onnx.TensorProto | np.ndarray | _Fill) -> None:
        self.values[name] = value

    def array(self, name: str) -> np.ndarray:
        v = self.values[name]
        if isinstance(v, np.ndarray):
            return v
        if isinstance(v, _Fill):
            return v.materialize()
        return numpy_helper.to_array(v)

    def nbytes(self, name: str) -> int:
        v = self.values[name]
        if isinstance(v, (np.ndarray, _Fill)):
            return int(v.nbytes)
        return _tensor_nbytes(v)

    def shape(self, name: str) -> tuple[int, ...]:
        v = self.values[name]
        if isinstance(v, (np.ndarray, _Fill)):
            return tuple(v.shape)
        return tuple(int(d) for d in v.dims)


def _write_tensor(t: onnx.TensorProto, name: str, value: onnx.TensorProto | np.ndarray | _Fill) -> None:
    """Fill the (empty) output tensor `t` with `value`, copying the payload once."""
    if isinstance(value, onnx.TensorProto):
        t.CopyFrom(value)
        t.name = name
        return
    dtype = value.dtype
    if dtype.kind not in "fiub" or dtype.itemsize not in (1, 2, 4, 8) or dtype.names is not None:
        arr = value.materialize() if isinstance(value, _Fill) else value
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(dtype)
    t.dims.extend(int(d) for d in value.shape)
    little = dtype.newbyteorder("<")
    if isinstance(value, _Fill):
        n = int(np.prod(value.shape, dtype=np.int64))
        t.raw_data = value.value.astype(little).tobytes() * n
    else:
        t.raw_data = np.ascontiguousarray(value, dtype=little).tobytes()


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    try:
        item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        item = 8
    return n * max(item, 1)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _outer_refs(graph: onnx.GraphProto, acc: set[str]) -> None:
    """Every name read inside `graph` (and its own subgraphs): an over-approximation of the names it
    takes from outer scopes, which is all liveness needs (ONNX names are unique across scopes)."""
    for n in graph.node:
        acc.update(i for i in n.input if i)
        for sg in _subgraphs(n):
            _outer_refs(sg, acc)
    acc.update(o.name for o in graph.output)


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads: its inputs plus outer-scope names its subgraphs use."""
    names = [i for i in node.input if i]
    extra: set[str] = set()
    for sg in _subgraphs(node):
        _outer_refs(sg, extra)
    if extra:
        names.extend(sorted(extra - set(names)))
    return names


def _rename_inputs(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    """`node` itself when it reads no renamed tensor, else a copy reading the new names."""
    if not rename or not any(r in rename for r in _reads(node)):
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    _rename_in_place(new, rename)
    return new


def _rename_in_place(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    for k, name in enumerate(node.input):
        if name in rename:
            node.input[k] = rename[name]
    for sg in _subgraphs(node):
        for n in sg.node:
            _rename_in_place(n, rename)
        for o in sg.output:
            if o.name in rename:
                o.name = rename[o.name]


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a valid order, keeping the given order whenever it already is one (stable)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    reads = [[r for r in _reads(n) if r in producer and r not in available] for n in nodes]
    if all(producer[r] < k for k, rs in enumerate(reads) for r in rs):
        return nodes
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for k, rs in enumerate(reads):
        d = {producer[r] for r in rs if producer[r] != k}
        deps.append(d)
        for p in d:
            users[p].append(k)
    heap = [k for k, d in enumerate(deps) if not d]
    heapq.heapify(heap)
    out: list[onnx.NodeProto] = []
    while heap:
        k = heapq.heappop(heap)
        out.append(nodes[k])
        for u in users[k]:
            deps[u].discard(k)
            if not deps[u]:
                heapq.heappush(heap, u)
    if len(out) != len(nodes):
        raise BadInputError("the graph has a cycle; it is not a valid ONNX model")
    return out


# -- evaluating one constant node ------------------------------------------------------------------


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | np.ndarray | None:
    """The value of a `Constant` node without running anything (None: use the generic path)."""
    if len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
        if a.t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return a.t  # shared with the source node: copied once, when the output is written
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    return None


def _constant_of_shape(node: onnx.NodeProto, shape: np.ndarray) -> _Fill:
    value = attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dims = tuple(int(d) for d in shape.reshape(-1))
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return _Fill(dims, np.array(fill[0], dtype=fill.dtype))


def _evaluate(node: onnx.NodeProto, inputs: dict[str, np.ndarray], model: onnx.ModelProto) -> list[np.ndarray]:
    """Run one node with the onnx reference implementation at the model's opset; the expected
    output element types come from onnx type inference and results are cast to them."""
    from onnx.reference import ReferenceEvaluator

    names = [i for i in dict.fromkeys(node.input) if i]
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].dtype), list(inputs[n].shape))
        for n in names
    ]
    outs = [o for o in node.output if o]
    graph = helper.make_graph(
        [node], "fold", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs]
    )
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=8)
    probe.functions.extend(model.functions)
    expected: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
        for vi in inferred.graph.output:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                expected[vi.name] = vi.type.tensor_type.elem_type
    except Exception:
        pass
    results = ReferenceEvaluator(probe).run(None, {n: inputs[n] for n in names})
    out: list[np.ndarray] = []
    for name, value in zip(outs, results, strict=True):
        if not isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(f"{type(value).__name__} result")
        value = np.asarray(value)
        helper.np_dtype_to_tensor_dtype(value.dtype)  # raises for types a TensorProto cannot hold
        want = expected.get(name)
        if want and want != helper.np_dtype_to_tensor_dtype(value.dtype):
            value = value.astype(helper.tensor_dtype_to_np_dtype(want))
        out.append(value)
    return out


# -- the pass --------------------------------------------------------------------------------------


class NormalizePass(Pass):
    name = "normalize"
    summary = "fold constants into initializers, fold BatchNorm into Conv, drop dead nodes, infer shapes"
    Config = NormalizeConfig
    default_ops = _CONV_OPS

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """A new, equivalent model in canonical form; `model` is left untouched."""
        cfg: NormalizeConfig = self.config  # type: ignore[assignment]
        return _Normalizer(model, cfg, self).run()


class _Normalizer:
    def __init__(self, model: onnx.ModelProto, cfg: NormalizeConfig, owner: NormalizePass):
        self.model = model
        self.cfg = cfg
        self.owner = owner
        g = model.graph
        self.consts = _Consts()
        for t in g.initializer:
            self.consts.set(t.name, t)
        self.sparse = {t.values.name: t for t in g.sparse_initializer}
        self.data_inputs = [vi for vi in g.input if vi.name not in self.consts and vi.name not in self.sparse]
        self.graph_outputs = [o.name for o in g.output]
        self.output_set = set(self.graph_outputs)
        self.layers: list[LayerRecord] = []
        self.figures: dict = {}
        self.names: set[str] | None = None

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> PassResult:
        g = self.model.graph
        nodes_before = len(g.node)
        inits_before = len(g.initializer)
        available = {vi.name for vi in self.data_inputs} | set(self.consts.values) | set(self.sparse)
        nodes = _toposort(list(g.node), available)
        nodes, folded, aliases = self._fold_and_unalias(nodes)
        nodes, dead = self._remove_dead(nodes)
        bn_folded = affine_folded = 0
        if self.cfg.fold_bn or self.cfg.fold_affine:
            nodes, bn_folded, affine_folded = self._fold_into_convs(nodes)
        self._report_unfolded_weights(nodes)
        out = self._build(nodes)
        shape_status = self._infer_shapes(out) if self.cfg.shape_inference else "off"
        dropped_inputs = len(g.input) - len(out.graph.input)
        self.figures.update(
            {
                "constants_folded": folded,
                "aliases_removed": aliases,
                "dead_nodes_removed": dead,
                "bn_folded": bn_folded,
                "affine_folded": affine_folded,
                "inputs_dropped": dropped_inputs,
                "nodes_before": nodes_before,
                "nodes_after": len(out.graph.node),
                "initializers_before": inits_before,
                "initializers_after": len(out.graph.initializer),
                "shape_inference": shape_status,
            }
        )
        self.figures["modified"] = bool(
            folded or aliases or dead or bn_folded or affine_folded or dropped_inputs
            or nodes_before != len(out.graph.node) or inits_before != len(out.graph.initializer)
        )
        return PassResult(out, self.layers, self.figures)

    # -- stage 1: constants and aliases -------------------------------------------------------
    @staticmethod
    def _closure(nodes: list[onnx.NodeProto], seeds: list[str]) -> set[str]:
        """`seeds` and every tensor they are computed from."""
        producer = {o: n for n in nodes for o in n.output if o}
        todo = list(seeds)
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            p = producer.get(name)
            if p is not None:
                todo.extend(_reads(p))
        return seen

    def _fold_and_unalias(self, nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], int, int]:
        used: Counter[str] = Counter(self.graph_outputs)
        for n in nodes:
            used.update(_reads(n))
        # Tensors computing some layer's parameters are materialised whatever their size; tensors
        # feeding a decoder (codebook lookup, DequantizeLinear) must not grow, so that a compressed
        # model stays compressed.
        params = self._closure(
            nodes, [n.input[k] for n in nodes for k in _PARAM_SLOTS.get(n.op_type, ()) if k < len(n.input)]
        )
        self.decode_inputs = self._closure(nodes, [i for n in nodes if n.op_type in _DECODE_OPS for i in n.input])
        rename: dict[str, str] = {}
        kept: list[onnx.NodeProto] = []
        folded = aliases = 0
        self.fold_failures: dict[str, str] = {}
        for node in nodes:
            node = _rename_inputs(node, rename)
            src = self._alias_source(node, used)
            if src is not None:
                rename[node.output[0]] = src
                aliases += 1
                continue
            if self.cfg.fold_constants and self._fold(node, params):
                folded += 1
                continue
            kept.append(node)
        kept, removed = self._unalias_outputs(kept)
        return kept, folded, aliases + removed

    def _unalias_outputs(self, nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], int]:
        """Remove `Identity` nodes that forward a node's result to a graph output by letting the
        producer write the graph output directly (its other readers are renamed too)."""
        producer = {o for n in nodes for o in n.output if o}
        rename: dict[str, str] = {}
        drop: set[int] = set()
        for k, n in enumerate(nodes):
            if n.op_type != "Identity" or n.domain not in ("", "ai.onnx") or len(n.input) != 1:
                continue
            src, dst = n.input[0], n.output[0]
            if dst in self.output_set and src in producer and src not in self.output_set and src not in rename:
                rename[src] = dst
                drop.add(k)
        if not rename:
            return nodes, 0
        out: list[onnx.NodeProto] = []
        for k, n in enumerate(nodes):
            if k in drop:
                continue
            if any(o in rename for o in n.output):
                n2 = onnx.NodeProto()
                n2.CopyFrom(n)
                for j, o in enumerate(n2.output):
                    if o in rename:
                        n2.output[j] = rename[o]
                _rename_in_place(n2, rename)
                n = n2
            else:
                n = _rename_inputs(n, rename)
            out.append(n)
        return out, len(drop)

    def _alias_source(self, node: onnx.NodeProto, used: Counter[str]) -> str | None:
        """The input an Identity / inference Dropout merely forwards, or None if it must stay."""
        if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            return None
        if not node.output or node.output[0] in self.output_set:
            return None
        if node.op_type == "Identity":
            return node.input[0]
        if node.op_type != "Dropout":
            return None
        if len(node.output) > 1 and node.output[1] and used[node.output[1]]:
            return None  # the mask is used
        version = opset_version(self.model)
        if version < 7 and not attr(node, "is_test", 0):
            return None
        if len(node.input) > 2 and node.input[2]:
            mode = node.input[2]
            if mode not in self.consts or bool(self.consts.array(mode).reshape(-1)[0]):
                return None  # training mode (or unknown): really drops
        return node.input[0]

    def _fold(self, node: onnx.NodeProto, params: set[str]) -> bool:
        """Evaluate `node` if it is constant; store its outputs and return True when folded."""
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
            return False
        if any(True for _ in _subgraphs(node)):
            return False
        if any(o in self.output_set for o in node.output):
            return False  # a graph output must stay produced by a node
        ins = [i for i in node.input if i]
        if any(i not in self.consts for i in ins):
            return False
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                self.consts.set(node.output[0], value)
                return True
        outs = [o for o in node.output if o]
        if not outs:
            return False
        try:
            if node.op_type == "ConstantOfShape":
                values = [_constant_of_shape(node, self.consts.array(node.input[0]))]
            elif node.op_type == "Shape":  # no need to expand a (possibly huge) tensor for its shape
                dims = self.consts.shape(node.input[0])
                values = [np.array(dims[attr(node, "start", 0) : attr(node, "end", None)], dtype=np.int64)]
            else:
                feeds = {i: self.consts.array(i) for i in dict.fromkeys(ins)}
                values = _evaluate(node, feeds, self.model)
        except Exception as exc:  # an op the reference cannot run: keep the node, say why
            self.fold_failures[node_label(node)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            return False
        in_bytes = sum(self.consts.nbytes(i) for i in set(ins))
        out_bytes = sum(int(v.nbytes) for v in values)
        if node.op_type in _GATHER_OPS and out_bytes > self.consts.nbytes(node.input[0]):
            return False  # a lookup that expands its table: keep it compressed
        if any(o in self.decode_inputs for o in outs):
            if out_bytes > max(in_bytes, _DECODE_GROWTH_BYTES):
                return False
        elif out_bytes > max(in_bytes, _SMALL_BYTES) and not any(o in params for o in outs):
            return False
        for name, value in zip(outs, values, strict=True):
            self.consts.set(name, value)
        return True

    # -- stage 2: dead code -------------------------------------------------------------------
    def _remove_dead(self, nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], int]:
        live: set[str] = set(self.graph_outputs)
        keep_flags = [False] * len(nodes)
        for k in range(len(nodes) - 1, -1, -1):
            n = nodes[k]
            if any(o in live for o in n.output if o):
                keep_flags[k] = True
                live.update(_reads(n))
        kept = [n for n, f in zip(nodes, keep_flags, strict=True) if f]
        return kept, len(nodes) - len(kept)

    # -- stage 3: BatchNorm / affine folding --------------------------------------------------
    def _unique(self, base: str, nodes: list[onnx.NodeProto]) -> str:
        if self.names is None:
            self.names = set(self.consts.values) | set(self.sparse) | {vi.name for vi in self.model.graph.input}
            self.names |= self.output_set
            for n in self.model.graph.node:
                self.names.add(n.name)
                self.names.update(n.input)
                self.names.update(n.output)
            for n in nodes:
                self.names.update(n.output)
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def _fold_into_convs(self, nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], int, int]:
        work: list[onnx.NodeProto | None] = list(nodes)
        consumers: dict[str, list[int]] = defaultdict(list)
        uses: Counter[str] = Counter(self.graph_outputs)
        for k, n in enumerate(work):
            for r in _reads(n):
                consumers[r].append(k)
                uses[r] += 1
        bn_done = affine_done = 0
        handled: set[int] = set()  # BatchNorms folded or already reported
        for k, node in enumerate(nodes):
            if node.op_type not in _CONV_OPS or node.domain not in ("", "ai.onnx"):
                continue
            current = node
            while True:
                out = current.output[0]
                nxt = consumers.get(out, [])
                if len(nxt) != 1 or out in self.output_set or uses[out] != 1:
                    break
                j = nxt[0]
                follower = work[j]
                if follower is None:
                    break
                if follower.op_type == "BatchNormalization" and self.cfg.fold_bn:
                    result = self._fold_bn(current, follower, nodes, uses)
                elif follower.op_type in _AFFINE_OPS and self.cfg.fold_affine and follower.domain in ("", "ai.onnx"):
                    result = self._fold_affine(current, follower, nodes, uses)
                else:
                    break
                if isinstance(result, str):
                    if follower.op_type == "BatchNormalization":
                        self._skip_bn(follower, result)
                        handled.add(j)
                    break
                current = result
                work[k] = current
                work[j] = None
                handled.add(j)
                if follower.op_type == "BatchNormalization":
                    bn_done += 1
                else:
                    affine_done += 1
        # Report BatchNorms that no Conv could take.
        producer = {o: n for n in nodes for o in n.output if o}
        for j, n in enumerate(nodes):
            if n.op_type == "BatchNormalization" and j not in handled and self.cfg.fold_bn:
                p = producer.get(n.input[0])
                if p is None:
                    why = "input is not produced by a Conv (graph input)"
                elif p.op_type not in _CONV_OPS:
                    why = f"input is produced by {p.op_type}, not a Conv"
                else:
                    why = "the Conv output has other consumers (or is a graph output)"
                self._skip_bn(n, why)
        return [n for n in work if n is not None], bn_done, affine_done

    def _skip_bn(self, bn: onnx.NodeProto, reason: str) -> None:
        self.layers.append(
            LayerRecord(node=node_label(bn), op="BatchNormalization", action=SKIPPED, reason=reason, output=bn.output[0])
        )

    def _conv_params(self, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | str:
        w_name = conv.input[1] if len(conv.input) > 1 else ""
        if not w_name or w_name not in self.consts:
            return "the Conv weight is not constant"
        w = self.consts.array(w_name)
        if w.dtype.kind != "f":
            return f"the Conv weight has dtype {w.dtype}, not floating point"
        b = None
        if len(conv.input) > 2 and conv.input[2]:
            if conv.input[2] not in self.consts:
                return "the Conv bias is not constant"
            b = self.consts.array(conv.input[2])
        return w, b

    @staticmethod
    def _out_channels(conv: onnx.NodeProto, w: np.ndarray) -> int:
        if conv.op_type == "ConvTranspose":
            return int(w.shape[1]) * int(attr(conv, "group", 1))
        return int(w.shape[0])

    @staticmethod
    def _scale_weight(conv: onnx.NodeProto, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Multiply every output channel of the conv weight by `scale` (float64 math, weight dtype out)."""
        s = scale.astype(np.float64)
        if conv.op_type == "ConvTranspose":
            g = int(attr(conv, "group", 1))
            cin, cout_g = w.shape[0], w.shape[1]
            w6 = w.astype(np.float64).reshape((g, cin // g, cout_g) + w.shape[2:])
            w6 *= s.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))
            return w6.reshape(w.shape).astype(w.dtype)
        return (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)

    def _rebuilt_conv(
        self,
        conv: onnx.NodeProto,
        w: np.ndarray,
        b: np.ndarray,
        output: str,
        nodes: list[onnx.NodeProto],
        uses: Counter[str],
        w_changed: bool,
    ) -> onnx.NodeProto:
        """The conv with new weight/bias values and `output`; reuses a parameter's name when only
        this conv reads it, else stores the value under a new name derived from the conv's name."""
        label = node_label(conv).replace(":", "_")
        w_name = conv.input[1]
        if w_changed:
            if uses[w_name] == 1 and w_name not in self.output_set:
                self.consts.set(w_name, w)
            else:
                new = self._unique(f"{label}/weight_folded", nodes)
                self.consts.set(new, w)
                uses[w_name] -= 1
                uses[new] += 1
                w_name = new
        b_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else ""
        if b_name and uses[b_name] == 1 and b_name not in self.output_set:
            self.consts.set(b_name, b)
        else:
            new = self._unique(f"{label}/bias_folded", nodes)
            self.consts.set(new, b)
            if b_name:
                uses[b_name] -= 1
            uses[new] += 1
            b_name = new
        out = onnx.NodeProto()
        out.CopyFrom(conv)
        del out.input[:]
        out.input.extend([conv.input[0], w_name, b_name])
        del out.output[:]
        out.output.append(output)
        return out

    def _fold_bn(
        self, conv: onnx.NodeProto, bn: onnx.NodeProto, nodes: list[onnx.NodeProto], uses: Counter[str]
    ) -> onnx.NodeProto | str:
        reason = self.selection_reason_for(conv)
        if reason:
            return reason
        if any(o and uses[o] for o in bn.output[1:]):
            return "BatchNormalization outputs running statistics (training mode)"
        if attr(bn, "training_mode", 0):
            return "BatchNormalization is in training mode"
        if opset_version(self.model) < 9 and attr(bn, "spatial", 1) == 0:
            return "BatchNormalization with spatial=0 is not per-channel"
        if len(bn.input) < 5 or any(i not in self.consts for i in bn.input[1:5]):
            return "BatchNormalization statistics are not constant"
        params = self._conv_params(conv)
        if isinstance(params, str):
            return params
        w, b = params
        c = self._out_channels(conv, w)
        gamma, beta, mean, var = (self.consts.array(i).astype(np.float64) for i in bn.input[1:5])
        if any(p.size != c for p in (gamma, beta, mean, var)):
            return f"BatchNormalization parameters do not have one value per output channel ({c})"
        eps = float(attr(bn, "epsilon", 1e-5))
        scale = gamma.reshape(-1) / np.sqrt(var.reshape(-1) + eps)
        b0 = b.astype(np.float64).reshape(-1) if b is not None else np.zeros(c)
        new_b = ((b0 - mean.reshape(-1)) * scale + beta.reshape(-1)).astype(w.dtype)
        new_w = self._scale_weight(conv, w, scale)
        params_before = int(w.size + (b.size if b is not None else 0) + 4 * c)
        new_conv = self._rebuilt_conv(conv, new_w, new_b, bn.output[0], nodes, uses, True)
        for i in bn.input[1:5]:
            uses[i] -= 1
        self._record_fold(conv, bn, params_before, new_w, new_b)
        return new_conv

    def _fold_affine(
        self, conv: onnx.NodeProto, op: onnx.NodeProto, nodes: list[onnx.NodeProto], uses: Counter[str]
    ) -> onnx.NodeProto | str:
        out = conv.output[0]
        if len(op.input) != 2:
            return f"{op.op_type} does not have two inputs"
        if op.input[0] == out and op.input[1] != out:
            other = op.input[1]
        elif op.input[1] == out and op.input[0] != out and op.op_type in ("Mul", "Add"):
            other = op.input[0]
        else:
            return f"{op.op_type} is not conv-output {op.op_type} constant"
        if other not in self.consts:
            return f"{op.op_type} operand is not constant"
        if self.selection_reason_for(conv):
            return "not selected"
        params = self._conv_params(conv)
        if isinstance(params, str):
            return params
        w, b = params
        c = self._out_channels(conv, w)
        rank = w.ndim  # conv output rank = 2 + spatial = weight rank
        shape = self.consts.shape(other)
        if len(shape) > rank:
            return "operand has a higher rank than the conv output"
        padded = (1,) * (rank - len(shape)) + tuple(shape)
        if padded[0] != 1 or any(d != 1 for d in padded[2:]) or padded[1] not in (1, c):
            return "operand is not per-channel"
        v = self.consts.array(other)
        if v.dtype != w.dtype:
            return "operand dtype differs from the weight"
        vec = np.broadcast_to(v.reshape(-1).astype(np.float64), (c,)) if v.size in (1, c) else None
        if vec is None:
            return "operand is not per-channel"
        b0 = b.astype(np.float64).reshape(-1) if b is not None else np.zeros(c)
        if op.op_type == "Mul":
            new_w, new_b, w_changed = self._scale_weight(conv, w, vec), b0 * vec, True
        elif op.op_type == "Div":
            if np.any(vec == 0):
                return "division by zero"
            new_w, new_b, w_changed = self._scale_weight(conv, w, 1.0 / vec), b0 / vec, True
        elif op.op_type == "Add":
            new_w, new_b, w_changed = w, b0 + vec, False
        else:  # Sub
            new_w, new_b, w_changed = w, b0 - vec, False
        new_b = new_b.astype(w.dtype)
        params_before = int(w.size + (b.size if b is not None else 0) + v.size)
        new_conv = self._rebuilt_conv(conv, new_w, new_b, op.output[0], nodes, uses, w_changed)
        uses[other] -= 1
        self._record_fold(conv, op, params_before, new_w, new_b)
        return new_conv

    def _record_fold(
        self, conv: onnx.NodeProto, folded: onnx.NodeProto, params_before: int, new_w: np.ndarray, new_b: np.ndarray
    ) -> None:
        """The report line of a conv that absorbed `folded`; the layer now writes `folded`'s output."""
        self.layers.append(
            LayerRecord(
                node=node_label(conv),
                op=conv.op_type,
                action=REWRITTEN,
                params_before=params_before,
                params_after=int(new_w.size + new_b.size),
                output=folded.output[0],
                figures={"folded": folded.op_type, "folded_node": node_label(folded)},
            )
        )

    def selection_reason_for(self, conv: onnx.NodeProto) -> str | None:
        reason = self.owner.selection_reason(conv)
        if reason:
            return reason
        if self.owner.config.ops and conv.op_type not in self.owner.op_types():
            return f"{conv.op_type} not in ops={self.owner.config.ops}"
        return None

    def _report_unfolded_weights(self, nodes: list[onnx.NodeProto]) -> None:
        """A skipped record for every Conv/ConvTranspose/Gemm whose weight is still computed at run time."""
        producer = {o: n for n in nodes for o in n.output if o}
        data = {vi.name for vi in self.data_inputs}
        for n in nodes:
            if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2:
                continue
            w = n.input[1]
            if w in self.consts or w in self.sparse:
                continue
            p = producer.get(w)
            if p is None:
                why = f"weight is the graph input '{w}'" if w in data else f"weight '{w}' has no producer"
            else:
                why = f"weight is computed at run time by {p.op_type} '{node_label(p)}'"
                if node_label(p) in self.fold_failures:
                    why += f" (could not fold: {self.fold_failures[node_label(p)]})"
            self.layers.append(LayerRecord(node=node_label(n), op=n.op_type, action=SKIPPED, reason=why, output=n.output[0]))

    # -- output -------------------------------------------------------------------------------
    def _build(self, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        src = self.model
        out = onnx.ModelProto()
        out.ir_version = src.ir_version
        for f in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(out, f, getattr(src, f))
        out.opset_import.extend(src.opset_import)
        out.metadata_props.extend(src.metadata_props)
        out.functions.extend(src.functions)
        g, sg = out.graph, src.graph
        g.name = sg.name
        g.doc_string = sg.doc_string
        g.input.extend(self.data_inputs)
        g.output.extend(sg.output)
        g.node.extend(nodes)
        used: set[str] = set(self.graph_outputs)
        for n in nodes:
            used.update(_reads(n))
        for name in list(self.consts.values):
            if name not in used:
                continue
            _write_tensor(g.initializer.add(), name, self.consts.values.pop(name))
        self.consts.values.clear()
        g.sparse_initializer.extend(t for name, t in self.sparse.items() if name in used)
        produced = {o for n in nodes for o in n.output if o}
        known = produced | {i.name for i in g.initializer} | {vi.name for vi in g.input}
        g.quantization_annotation.extend(a for a in sg.quantization_annotation if a.tensor_name in known)
        if not self.cfg.shape_inference:
            g.value_info.extend(vi for vi in sg.value_info if vi.name in produced and vi.name not in self.output_set)
        if g.initializer and out.ir_version < 4:
            out.ir_version = 4  # initializers that are not graph inputs need IR >= 4
        runtime_compatible(out)
        return out

    def _infer_shapes(self, out: onnx.ModelProto) -> str:
        """Annotate value_info by running onnx shape inference on a weight-free skeleton of `out`
        (big initializers become typed inputs), so no weight is copied and the 2 GB limit does not
        apply. Symbolic dims stay symbolic. Returns "ok" or why it failed (the model is still valid)."""
        g = out.graph
        skel = weightless(out, _SKELETON_MAX_ELEMENTS)
        error = ""
        inferred = None
        for data_prop in (True, False):
            try:
                inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=data_prop)
                break
            except Exception as exc:
                error = first_line(exc)
        if inferred is None:
            return f"failed: {error}"
        skip = {vi.name for vi in g.input} | {vi.name for vi in g.output} | {t.name for t in g.initializer}
        g.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in skip)
        return "ok"
