"""Read-only model analysis: parameter counts, MACs per layer, sizes. Never edits a model.

A *layer* is a node that carries weights or does the heavy arithmetic:

* Conv, ConvTranspose, Gemm, and MatMul with one constant operand. The weight may be an initializer
  or the output of a constant subgraph (e.g. a codebook `Gather(codebook, indices)` or a
  `DequantizeLinear(q, scale, zero_point)`, possibly followed by Reshape/Cast/...): the layer's
  params are then the stored elements of that subgraph (indices + codebook entries + scales), its
  `weight_bits` their storage bits, and its MACs those of the dense op it feeds (the runtime folds the
  subgraph once).
* a call to a model-local function (`ModelProto.functions`, custom domain), e.g. a Winograd
  convolution: costed by its body, inlined at the call's input shapes, counting every Conv,
  ConvTranspose, Gemm, MatMul (constant or not) and elementwise Mul it executes; params are the
  constants it is given plus the constants in its body. A pass can teach analysis a better cost for
  its own op with `register_cost(domain, op_type, fn)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxcomp import costs
from onnxcomp.graph import GraphIndex, attr, function_key, node_label
from onnxcomp.shapes import check_input_shapes, static_shapes
from onnxcomp.sizes import serialized_bytes

CODEBOOK_INDICES = "onnxcomp codebook indices: "  # doc_string prefix of a packed index tensor, then "<n> x <b> bits"


def tensor_elements(t: onnx.TensorProto) -> int:
    """Elements a tensor stands for: a packed codebook index tensor counts its indices, not bytes."""
    if t.doc_string.startswith(CODEBOOK_INDICES):
        try:
            return int(t.doc_string[len(CODEBOOK_INDICES):].split()[0])
        except (ValueError, IndexError):
            pass
    return math.prod(t.dims)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer (constants held in Constant nodes are counted too); packed
    codebook indices count one per weight."""
    total = sum(tensor_elements(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = attr(node, "value")
            if value is not None:
                total += math.prod(value.dims)
    return int(total)


def tensor_bits(tensor: onnx.TensorProto) -> int:
    """Storage bits of a tensor's elements at its dtype (4 for INT4/UINT4, 32 for FLOAT, ...)."""
    return math.prod(tensor.dims) * dtype_bits(tensor.data_type)


def dtype_bits(data_type: int) -> int:
    four = {getattr(onnx.TensorProto, n, -1) for n in ("INT4", "UINT4", "FLOAT4E2M1")}
    if data_type in four:
        return 4
    if data_type in {getattr(onnx.TensorProto, n, -1) for n in ("INT2", "UINT2")}:
        return 2
    if data_type == onnx.TensorProto.BOOL:
        return 8
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8)
    except Exception:
        return 32


def param_bits(model: onnx.ModelProto) -> int:
    """Storage bits of every initializer and Constant-node value (the honest size of low-bit weights)."""
    total = sum(tensor_bits(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                total += tensor_bits(value)
    return int(total)


@dataclass
class LayerCost:
    """Cost of one layer. `macs` is None when a shape it needs is unknown.

    `kind`: "dense" (plain constant weights), "codebook" (weights gathered from a codebook),
    "quantized" (DequantizeLinear weights), "folded" (another constant subgraph), "function"
    (a model-local function call costed by its body) or whatever a registered cost hook says.
    """

    node: str
    op: str
    params: int
    macs: int | None
    kernel: tuple[int, ...] = ()
    in_channels: int | None = None
    out_channels: int | None = None
    groups: int = 1
    strides: tuple[int, ...] = ()
    kind: str = "dense"
    weight_bits: int | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kernel"], d["strides"] = list(self.kernel), list(self.strides)
        return d


# --------------------------------------------------------------------------------------------
# cost hooks
# --------------------------------------------------------------------------------------------
CostFn = Callable[[onnx.NodeProto, "CostContext"], "LayerCost | None"]
_COST_HOOKS: dict[tuple[str, str], CostFn] = {}


def register_cost(domain: str, op_type: str, fn: CostFn) -> None:
    """Teach analysis the cost of `domain::op_type` nodes. `fn(node, ctx)` returns a LayerCost (or
    None: not a layer). It overrides the built-in rule, including the body-based cost of a function;
    `ctx.function_cost(node)` gives that default if the hook only wants to adjust it."""
    _COST_HOOKS[(_norm_domain(domain), op_type)] = fn


def unregister_cost(domain: str, op_type: str) -> None:
    _COST_HOOKS.pop((_norm_domain(domain), op_type), None)


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class CostContext:
    """What a cost function may read: the model, its GraphIndex, inferred shapes, constant subgraphs."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None):
        check_input_shapes(model, input_shapes)
        self.model = model
        self.index = GraphIndex(model)
        self.input_shapes = input_shapes or {}
        self.shapes = static_shapes(model, input_shapes)
        self.functions = {function_key(f): f for f in model.functions}
        self._cones: dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None] = {}
        self._elem_types: dict[str, int] | None = None

    def shape(self, name: str) -> tuple | None:
        """Inferred dims of a tensor (None per unknown dim), or None if unknown."""
        return self.shapes.get(name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shapes.get(name)
        if s is None or any(d is None for d in s):
            return None
        return tuple(int(d) for d in s)

    def const_cone(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(initializer names, op types) of the constant subgraph producing `name`, or None when the
        tensor depends on a graph input. An initializer alone gives ((name,), ())."""
        if name in self._cones:
            return self._cones[name]
        self._cones[name] = None  # guards cycles
        result: tuple[tuple[str, ...], tuple[str, ...]] | None
        if not name:
            result = ((), ())
        elif name in self.index.initializers:
            result = ((name,), ())
        elif name in self.index.graph_inputs:
            result = None
        else:
            node = self.index.producer.get(name)
            if node is None or node.op_type in _NONDETERMINISTIC:
                result = None
            else:
                inits: list[str] = []
                ops: list[str] = [node.op_type]
                ok = True
                for inp in node.input:
                    sub = self.const_cone(inp)
                    if sub is None:
                        ok = False
                        break
                    inits.extend(sub[0])
                    ops.extend(sub[1])
                if ok and node.op_type == "Constant":
                    inits.append(f"constant:{node_label(node)}")
                result = (tuple(dict.fromkeys(inits)), tuple(ops)) if ok else None
        self._cones[name] = result
        return result

    def cone_size(self, name: str) -> tuple[int, int]:
        """(elements, storage bits) of the constants behind tensor `name` (0, 0 if not constant)."""
        cone = self.const_cone(name)
        if cone is None:
            return 0, 0
        elems = bits = 0
        for key in cone[0]:
            if key.startswith("constant:"):
                node = self._constant_node(key[len("constant:"):])
                value = attr(node, "value") if node is not None else None
                if isinstance(value, onnx.TensorProto):
                    elems += math.prod(value.dims)
                    bits += tensor_bits(value)
                continue
            t = self.index.initializers[key]
            elems += tensor_elements(t)
            bits += tensor_bits(t)
        return elems, bits

    def _constant_node(self, label: str) -> onnx.NodeProto | None:
        for n in self.model.graph.node:
            if n.op_type == "Constant" and node_label(n) == label:
                return n
        return None

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.index.initializers:
            return tuple(self.index.initializers[name].dims)
        return self.static_shape(name)

    def kind_of(self, name: str) -> str:
        cone = self.const_cone(name)
        if cone is None or not cone[1]:
            return "dense"
        if "Gather" in cone[1] or "GatherElements" in cone[1] or "GatherND" in cone[1]:
            return "codebook"
        if "DequantizeLinear" in cone[1]:
            return "quantized"
        return "folded"

    def elem_type(self, name: str) -> int:
        """ONNX element type of a main-graph tensor (FLOAT when nothing says otherwise)."""
        if name in self.index.initializers:
            return self.index.initializers[name].data_type
        if self._elem_types is None:
            self._elem_types = {}
            g = self.model.graph
            for vi in list(g.input) + list(g.value_info) + list(g.output):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    self._elem_types[vi.name] = vi.type.tensor_type.elem_type
        return self._elem_types.get(name, onnx.TensorProto.FLOAT)

    def fill_shapes_from_runtime(self, names: list[str]) -> bool:
        """Read the shapes of `names` from one onnxruntime run on random input at the given input
        shapes. False (shapes left unknown) when the inputs are not fully known or the run fails."""
        from onnxcomp.data import model_inputs, random_source
        from onnxcomp.errors import OnnxcompError
        from onnxcomp.runtime import run_batches

        inputs = model_inputs(self.model)
        if not inputs:
            return False
        first = self.input_shapes.get(inputs[0].name) or self.input_shapes.get("")
        batch = int(first[0]) if first else 1
        try:
            src = random_source(self.model, self.input_shapes, samples=batch, batch_size=batch)
            _, values, _ = next(iter(run_batches(self.model, src, names)))
        except (OnnxcompError, StopIteration):
            return False
        except Exception:  # onnxruntime failing on random input: keep the inferred shapes only
            return False
        for name, value in values.items():
            self.shapes[name] = tuple(int(d) for d in np.shape(value))
        return True

    def function_cost(self, node: onnx.NodeProto) -> LayerCost:
        """Cost of a call to a model-local function, from its body at this call's input shapes."""
        return _function_cost(self, node)


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


# --------------------------------------------------------------------------------------------
# per-node rules
# --------------------------------------------------------------------------------------------
def _const_operand(ctx: CostContext, name: str) -> bool:
    return bool(name) and ctx.const_cone(name) is not None


def _params_bits(ctx: CostContext, names: list[str]) -> tuple[int, int]:
    elems = bits = 0
    for n in names:
        if n:
            e, b = ctx.cone_size(n)
            elems += e
            bits += b
    return elems, bits


def _conv_cost(ctx: CostContext, node: onnx.NodeProto) -> LayerCost | None:
    if len(node.input) < 2 or not _const_operand(ctx, node.input[1]):
        return None
    if _const_operand(ctx, node.input[0]):
        return None  # computed from constants alone: folded at load, not a layer that runs
    w = ctx.weight_shape(node.input[1])
    g = int(attr(node, "group", 1))
    has_b = len(node.input) > 2 and bool(node.input[2])
    params, bits = _params_bits(ctx, [node.input[1], node.input[2] if has_b else ""])
    kind = ctx.kind_of(node.input[1])
    label = node_label(node)
    if w is None:
        return LayerCost(label, node.op_type, params, None, groups=g, kind=kind, weight_bits=bits,
                         detail="weight shape unknown")
    nsp = len(w) - 2
    strides = tuple(attr(node, "strides", [1] * nsp))
    if node.op_type == "Conv":
        macs = costs.conv_macs(list(w), ctx.shape(node.output[0]))
        return LayerCost(label, "Conv", params, macs, tuple(w[2:]), w[1] * g, w[0], g, strides, kind, bits)
    macs = costs.conv_transpose_macs(list(w), g, ctx.shape(node.input[0]))
    return LayerCost(label, "ConvTranspose", params, macs, tuple(w[2:]), w[0], w[1] * g, g, strides, kind, bits)


def _dense_cost(ctx: CostContext, node: onnx.NodeProto) -> LayerCost | None:
    const = [i for i in node.input[:2] if _const_operand(ctx, i)]
    if len(const) != 1 or len(node.input) < 2:
        return None
    label = node_label(node)
    w = ctx.weight_shape(const[0])
    has_b = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
    bias = node.input[2] if has_b and _const_operand(ctx, node.input[2]) else ""
    params, bits = _params_bits(ctx, [const[0], bias])
    kind = ctx.kind_of(const[0])
    if w is None:
        return LayerCost(label, node.op_type, params, None, kind=kind, weight_bits=bits, detail="weight shape unknown")
    if node.op_type == "Gemm":
        if len(w) != 2:
            return None
        if const[0] == node.input[1]:
            k, n = (w[1], w[0]) if attr(node, "transB", 0) else (w[0], w[1])
            a = ctx.shape(node.input[0])
            m = None
            if a is not None and len(a) == 2:
                m = a[1] if attr(node, "transA", 0) else a[0]
            macs = None if m is None else int(m * k * n)
            return LayerCost(label, "Gemm", params, macs, (), k, n, kind=kind, weight_bits=bits)
        m, k = (w[1], w[0]) if attr(node, "transA", 0) else (w[0], w[1])
        b = ctx.shape(node.input[1])
        n = None
        if b is not None and len(b) == 2:
            n = b[0] if attr(node, "transB", 0) else b[1]
        macs = None if n is None else int(m * k * n)
        return LayerCost(label, "Gemm", params, macs, (), k, n, kind=kind, weight_bits=bits)
    # MatMul
    if const[0] == node.input[1]:
        if len(w) == 2:
            rows = costs.leading_rows(ctx.shape(node.input[0]))
            return LayerCost(label, "MatMul", params, costs.dense_macs(w[0], w[1], rows), (), w[0], w[1],
                             kind=kind, weight_bits=bits)
        macs = _matmul_macs(ctx.shape(node.input[0]), ctx.shape(node.output[0]))
        return LayerCost(label, "MatMul", params, macs, (), w[-2] if len(w) >= 2 else w[0], w[-1], kind=kind,
                         weight_bits=bits)
    macs = _matmul_macs(ctx.shape(node.input[0]), ctx.shape(node.output[0]))
    return LayerCost(label, "MatMul", params, macs, (), w[-1] if w else None, None, kind=kind, weight_bits=bits)


def _matmul_macs(a_shape, out_shape) -> int | None:
    """MACs of a (batched, broadcast) MatMul: output elements x the contracted dim."""
    if not a_shape or out_shape is None or a_shape[-1] is None or any(d is None for d in out_shape):
        return None
    return int(math.prod(out_shape) * a_shape[-1])


# --------------------------------------------------------------------------------------------
# function bodies
# --------------------------------------------------------------------------------------------
_BODY_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul")


def _body_op_macs(node: onnx.NodeProto, shape) -> int | None:
    """MACs of one node of an inlined function body from its tensors' shapes (None if unknown)."""
    op = node.op_type
    if op == "Conv":
        w = shape(node.input[1])
        if w is None or any(d is None for d in w):
            return None
        return costs.conv_macs(list(w), shape(node.output[0]))
    if op == "ConvTranspose":
        w = shape(node.input[1])
        if w is None or any(d is None for d in w):
            return None
        return costs.conv_transpose_macs(list(w), int(attr(node, "group", 1)), shape(node.input[0]))
    if op == "Gemm":
        a, b = shape(node.input[0]), shape(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2 or None in a or None in b:
            return None
        m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if attr(node, "transB", 0) else b[1]
        return int(m * k * n)
    if op == "MatMul":
        return _matmul_macs(shape(node.input[0]), shape(node.output[0]))
    if op == "Mul":
        out = shape(node.output[0])
        if out is None or any(d is None for d in out):
            return None
        return int(math.prod(out))
    return 0


def _function_cost(ctx: CostContext, node: onnx.NodeProto) -> LayerCost:
    label = node_label(node)
    op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
    fn = ctx.functions.get(function_key(node))
    const_inputs = [i for i in node.input if i and ctx.const_cone(i) is not None]
    params, bits = _params_bits(ctx, const_inputs)
    body_consts = 0
    if fn is not None:
        for n in fn.node:
            if n.op_type == "Constant":
                value = attr(n, "value")
                if isinstance(value, onnx.TensorProto):
                    body_consts += math.prod(value.dims)
                    bits += tensor_bits(value)
    params += body_consts
    macs, inner = _inline_macs(ctx, node)
    x = ctx.shape(node.input[0]) if node.input else None
    y = ctx.shape(node.output[0]) if node.output else None
    kernel = tuple(attr(node, "kernel_shape", []) or ())
    strides = tuple(attr(node, "strides", []) or ())
    in_ch = x[1] if x is not None and len(x) >= 2 else None
    out_ch = y[1] if y is not None and len(y) >= 2 else None
    detail = ", ".join(f"{k} {v}" for k, v in inner.items() if v) if inner else "body not costed"
    return LayerCost(label, op, params, macs, kernel, in_ch, out_ch, int(attr(node, "group", 1)), strides,
                     "function", bits, detail)


def _inline_macs(ctx: CostContext, node: onnx.NodeProto) -> tuple[int | None, dict[str, int]]:
    """Inline one call in a throw-away model typed at this call's input shapes and cost the body."""
    import onnx.inliner

    inputs = []
    for name in dict.fromkeys(i for i in node.input if i):
        shape = ctx.shape(name)
        inputs.append(helper.make_tensor_value_info(name, ctx.elem_type(name), list(shape) if shape is not None else None))
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    graph = helper.make_graph([node], "call", inputs, outputs)
    mini = helper.make_model(graph, opset_imports=list(ctx.model.opset_import), functions=list(ctx.model.functions))
    mini.ir_version = ctx.model.ir_version or onnx.IR_VERSION
    try:
        flat = onnx.inliner.inline_local_functions(mini)
    except Exception:
        return None, {}
    shapes = static_shapes(flat, {})
    total: int | None = 0
    per_op: dict[str, int] = {}
    for n in flat.graph.node:
        if n.op_type not in _BODY_MAC_OPS:
            continue
        m = _body_op_macs(n, shapes.get)
        if m is None:
            total = None
            continue
        per_op[n.op_type] = per_op.get(n.op_type, 0) + m
        if total is not None:
            total += m
    return total, {f"{k} MACs": v for k, v in per_op.items()}


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def node_cost(ctx: CostContext, node: onnx.NodeProto) -> LayerCost | None:
    """The LayerCost of `node`, or None when it is not a layer."""
    hook = _COST_HOOKS.get((_norm_domain(node.domain), node.op_type))
    if hook is not None:
        return hook(node, ctx)
    if _norm_domain(node.domain) == "":
        if node.op_type in ("Conv", "ConvTranspose"):
            return _conv_cost(ctx, node)
        if node.op_type in ("Gemm", "MatMul"):
            return _dense_cost(ctx, node)
        return None
    if function_key(node) in ctx.functions:
        return _function_cost(ctx, node)
    return None


def layer_costs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    *,
    runtime_shapes: bool = True,
) -> list[LayerCost]:
    """One LayerCost per layer (see the module docstring), in graph order.

    Shapes come from onnx shape inference. Where it gives up (e.g. a Reshape whose target is
    computed from `Shape` at run time, common in Paddle exports) and every input dim is known,
    `runtime_shapes=True` runs the model once in onnxruntime on random input of the given shape
    to read the missing tensors' shapes.
    """
    ctx = CostContext(model, input_shapes)
    pairs: list[tuple[onnx.NodeProto, LayerCost]] = []
    for node in model.graph.node:
        cost = node_cost(ctx, node)
        if cost is not None:
            pairs.append((node, cost))
    unknown = [node for node, cost in pairs if cost.macs is None]
    if runtime_shapes and unknown:
        wanted = []
        for node in unknown:
            for name in [*node.input, *node.output]:
                if name and ctx.static_shape(name) is None and ctx.const_cone(name) is None:
                    wanted.append(name)
        if wanted and ctx.fill_shapes_from_runtime(list(dict.fromkeys(wanted))):
            redo = {id(node) for node in unknown}
            pairs = [(node, node_cost(ctx, node) if id(node) in redo else cost) for node, cost in pairs]
            pairs = [(node, cost) for node, cost in pairs if cost is not None]
    return [cost for _, cost in pairs]


def total_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int | None:
    """Sum of the layers' MACs (layers with unknown MACs are left out; None if none is known)."""
    return _sum_macs(layer_costs(model, input_shapes))


def _sum_macs(layers: list[LayerCost]) -> int | None:
    known = [layer.macs for layer in layers if layer.macs is not None]
    return sum(known) if known else None


def summary(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *, lzma: bool = False) -> dict:
    """Totals for a report: params, param bits, MACs (None if unknown; the sum of the known layers,
    a lower bound, when `macs_unknown` layers have unknown MACs), serialized bytes, nodes.
    `lzma=True` adds `lzma_bytes` (slow on large models: several seconds per 100 MB)."""
    layers = layer_costs(model, input_shapes)
    out = {
        "params": count_params(model),
        "param_bits": param_bits(model),
        "macs": _sum_macs(layers),  # a lower bound when macs_unknown > 0
        "macs_unknown": sum(1 for layer in layers if layer.macs is None),
        "bytes": serialized_bytes(model),
        "nodes": len(model.graph.node),
    }
    if lzma:
        from onnxcomp.sizes import lzma_bytes

        out["lzma_bytes"] = lzma_bytes(model)
    return out


@dataclass
class CodebookLayer:
    """One codebook-weight layer as stored: index bits and storage, bytes, and the entropy bound."""

    node: str
    bits: int
    storage: str  # uint4 | uint2 | packed | uint8
    indices: int
    index_bytes: int
    codebook_bytes: int
    entropy_bits: float  # per index: the bound a lossless coder reaches

    @property
    def entropy_bytes(self) -> int:
        return int(math.ceil(self.entropy_bits * self.indices / 8)) + self.codebook_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "entropy_bytes": self.entropy_bytes}


def codebook_layers(model: onnx.ModelProto) -> list[CodebookLayer]:
    """Every codebook index tensor of `model` (marked by onnxcomp's doc_string), decoded to count
    its entropy; the layer is the name before `/codebook_indices`."""
    from onnx import numpy_helper

    from onnxcomp.linalg import bitpack

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for t in model.graph.initializer:
        if not t.doc_string.startswith(CODEBOOK_INDICES):
            continue
        try:
            n_text, _x, bits_text, *_ = t.doc_string[len(CODEBOOK_INDICES):].split()
            n, bits = int(n_text), int(bits_text)
        except ValueError:
            continue
        raw = np.frombuffer(t.raw_data, dtype=np.uint8)
        if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT2):
            per = 8 // bits
            labels = ((raw[:, None] >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)).ravel()[:n]
            storage = f"uint{bits}"
        elif raw.size == n:
            labels, storage = raw, "uint8"
        else:
            labels, storage = bitpack.unpack(raw, bits, n), "packed"
        layer = t.name.split("/codebook_indices")[0]
        book_bytes = sum(int(numpy_helper.to_array(inits[name]).nbytes)  # the codebook, and its channel scales
                         for name in (f"{layer}/codebook", f"{layer}/codebook_scale") if name in inits)
        out.append(CodebookLayer(layer, bits, storage, n, len(t.raw_data), book_bytes,
                                 bitpack.entropy_bits(labels, 1 << bits)))
    return out


@dataclass
class Inspection:
    """Everything `onnxcomp inspect` shows: layers, totals and sizes."""

    layers: list[LayerCost]
    params: int
    param_bits: int
    macs: int | None
    macs_complete: bool
    bytes: int
    nodes: int
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int | None = None
    lzma_bytes: int | None = None
    codebooks: list[CodebookLayer] = field(default_factory=list)

    def as_dict(self) -> dict:
        total = self.macs or 0
        return {
            "codebooks": [c.as_dict() for c in self.codebooks],
            "params": self.params,
            "param_bits": self.param_bits,
            "macs": self.macs,
            "macs_complete": self.macs_complete,
            "bytes": self.bytes,
            "file_bytes": self.file_bytes,
            "lzma_bytes": self.lzma_bytes,
            "nodes": self.nodes,
            "op_counts": self.op_counts,
            "layers": [
                {**layer.as_dict(), "mac_share": (layer.macs / total) if total and layer.macs is not None else None}
                for layer in self.layers
            ],
        }


def inspect(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *, lzma: bool = False,
            path: str | None = None) -> Inspection:
    """Per-layer costs plus model totals (and on-disk / lzma sizes when asked)."""
    from onnxcomp import sizes

    layers = layer_costs(model, input_shapes)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}.{n.op_type}" if _norm_domain(n.domain) else n.op_type
        ops[key] = ops.get(key, 0) + 1
    return Inspection(
        layers=layers,
        params=count_params(model),
        param_bits=param_bits(model),
        macs=_sum_macs(layers),
        macs_complete=all(layer.macs is not None for layer in layers),
        bytes=serialized_bytes(model),
        nodes=len(model.graph.node),
        op_counts=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        file_bytes=sizes.file_bytes(path) if path else None,
        lzma_bytes=(sizes.lzma_bytes(path) if path else sizes.lzma_bytes(model)) if lzma else None,
        codebooks=codebook_layers(model),
    )
