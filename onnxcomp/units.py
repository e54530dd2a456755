"""Units: the small subgraphs the cost model times alone, cut from a model or built for a rewrite.

A unit holds the nodes, its runtime inputs (shapes, element types, optionally real values), its
constants (real TensorProtos, or shapes for random values: a layer's time depends on shapes, not on
weight values) and its outputs; `signature()` hashes what a timing depends on, so a timing is
cached across layers and models. `split_units` cuts a whole model the way onnxruntime fuses it (a
weighted op takes the elementwise ops after it along); `UnitCutter(model).cut(chain, values)` cuts any chain. Reads models,
never edits them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.graph import function_key

UNIT_VERSION = 1
# Ops onnxruntime folds into the weighted op before them (Conv+BN, Conv+Add(bias), Conv+activation,
# Conv+Add(residual)+Relu in the NCHWc layout); a unit takes them along so it times what runs.
FUSABLE = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh",
                     "HardSwish", "Add", "Mul"})
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
                      "QLinearMatMul"})
_STANDARD_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
# Constants whose values are part of a unit's signature (shape tensors, pads, axes, scales).
_VALUE_SIGNATURE_ELEMS = 64
_COPY = "__copy{}"  # suffix of the j-th copy's tensors (j >= 2) in `Unit.repeated_model`


@dataclass
class Unit:
    """A subgraph to time alone: `nodes` reading runtime `inputs` (name -> (shape, elem type)) and
    `constants` (name -> TensorProto with its real values, or (shape, elem type) for a random
    tensor), writing `outputs`. `macs` and `bytes` feed the analytic model; `feeds` (real values)
    replace random inputs when given. `problem` set: the unit cannot be built alone, and says why."""

    name: str
    nodes: list[onnx.NodeProto]
    inputs: dict[str, tuple[tuple[int, ...], int]]
    constants: dict[str, Any]
    outputs: list[str]
    opsets: dict[str, int]
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    macs: int = 0
    bytes: int = 0
    feeds: dict[str, np.ndarray] | None = None
    problem: str | None = None

    @property
    def ops(self) -> str:
        return "+".join(n.op_type for n in self.nodes if n.op_type != "Constant") or "Constant"

    def signature(self) -> str:
        """Stable hash of what the timing depends on; tensor and node names do not count."""
        rename: dict[str, str] = {}

        def canon(name: str) -> str:
            if not name:
                return ""
            return rename.setdefault(name, f"t{len(rename)}")

        h = hashlib.sha256(f"unit-v{UNIT_VERSION}".encode())
        for name, (shape, et) in self.inputs.items():
            h.update(f"in {canon(name)} {list(shape)} {et};".encode())
        for name, c in self.constants.items():
            canon(name)
            if isinstance(c, onnx.TensorProto):
                h.update(f"c {rename[name]} {list(c.dims)} {c.data_type}".encode())
                if math.prod(c.dims) <= _VALUE_SIGNATURE_ELEMS:
                    h.update(numpy_helper.to_array(c).tobytes())
            else:
                h.update(f"c {rename[name]} {list(c[0])} {c[1]}".encode())
        for n in self.nodes:
            ins = [canon(i) for i in n.input]
            outs = [canon(o) for o in n.output]
            attrs = [a.SerializeToString() for a in sorted(n.attribute, key=lambda a: a.name)]
            h.update(f"n {n.domain}:{n.op_type} {ins} {outs}".encode())
            for a in attrs:
                h.update(a)
        for d, v in sorted(self.opsets.items()):
            h.update(f"op {d}={v}".encode())
        for f in self.functions:
            h.update(f.SerializeToString())
        h.update(str([canon(o) for o in self.outputs]).encode())
        return h.hexdigest()[:32]

    def model(self, seed: int = 0) -> onnx.ModelProto:
        """The one-unit model (random constants drawn from `seed`)."""
        from onnxcomp.model import runtime_compatible

        rng = np.random.default_rng(seed)
        inits = []
        for name, c in self.constants.items():
            if isinstance(c, onnx.TensorProto):
                t = onnx.TensorProto()
                t.CopyFrom(c)
                t.name = name
                inits.append(t)
            else:
                inits.append(numpy_helper.from_array(_random(rng, c[0], c[1]), name))
        inputs = [helper.make_tensor_value_info(n, et, list(s)) for n, (s, et) in self.inputs.items()]
        outputs = [onnx.ValueInfoProto(name=o) for o in self.outputs]  # onnxruntime infers the types
        graph = helper.make_graph(self.nodes, f"unit:{self.name}", inputs, outputs, initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                              functions=self.functions or None)
        return runtime_compatible(m)

    def repeated_model(self, copies: int = 2, seed: int = 0) -> onnx.ModelProto:
        """The one-unit model with `copies - 1` more independent copies of the unit after the first:
        each its own inputs (fed the same values, `repeated_feeds`), constants and outputs, so
        onnxruntime can merge nothing between them. Its time minus the one-unit model's, per added
        copy, is what the unit adds to a run already under way (the session call, the first kernel's
        start and its thread-pool wake-up paid once)."""
        m = self.model(seed)
        g = m.graph
        nodes, inits, inputs = list(g.node), list(g.initializer), list(g.input)
        for j in range(2, copies + 1):
            suffix = _COPY.format(j)
            renamed = {name: f"{name}{suffix}" for name in self.inputs}
            renamed.update({t.name: f"{t.name}{suffix}" for t in inits})
            renamed.update({o: f"{o}{suffix}" for n in nodes for o in n.output if o})
            for n in nodes:
                c = onnx.NodeProto()
                c.CopyFrom(n)
                c.name = f"{n.name}{suffix}" if n.name else ""
                c.input[:] = [renamed.get(i, i) for i in n.input]
                c.output[:] = [renamed.get(o, o) for o in n.output]
                g.node.append(c)
            for t in inits:
                c = onnx.TensorProto()
                c.CopyFrom(t)
                c.name = renamed[t.name]
                g.initializer.append(c)
            for vi in inputs:
                c = onnx.ValueInfoProto()
                c.CopyFrom(vi)
                c.name = renamed.get(vi.name, vi.name)
                g.input.append(c)
            g.output.extend([onnx.ValueInfoProto(name=renamed[o]) for o in self.outputs])
        return m

    def repeated_feeds(self, copies: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
        f = self.make_feeds(seed)
        out = dict(f)
        for j in range(2, copies + 1):
            out.update({f"{k}{_COPY.format(j)}": v for k, v in f.items()})
        return out

    def make_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        if self.feeds is not None:
            return self.feeds
        rng = np.random.default_rng(seed + 1)
        return {n: _random(rng, s, et) for n, (s, et) in self.inputs.items()}


def _random(rng: np.random.Generator, shape: Sequence[int], elem_type: int) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(tuple(shape), dtype=np.float32).astype(dtype)
    if dtype == np.bool_:
        return rng.random(tuple(shape)) < 0.5
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -8), min(info.max, 8) + 1, size=tuple(shape)).astype(dtype)


def unit_for_nodes(name: str, nodes: Sequence[onnx.NodeProto], inputs: dict[str, tuple[tuple[int, ...], int]],
                   constants: dict[str, Any], outputs: Sequence[str], opset: int, *, macs: int = 0,
                   extra_opsets: dict[str, int] | None = None) -> Unit:
    """A unit from freshly made nodes (a pass's candidate rewrite); constants given as shapes are random."""
    nbytes = sum(math.prod(s) * _itemsize(et) for s, et in inputs.values())
    for c in constants.values():
        dims, et = (tuple(c.dims), c.data_type) if isinstance(c, onnx.TensorProto) else c
        nbytes += math.prod(dims) * _itemsize(et)
    opsets = {"": opset, **(extra_opsets or {})}
    return Unit(name, list(nodes), dict(inputs), dict(constants), list(outputs), opsets, macs=int(macs), bytes=nbytes)


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:
        return 4


class UnitCutter:
    """Cuts units out of one model (`cut(chain, values)`); what that needs is computed once, so
    cutting many units of one model reuses it: producers, consumers, the tensors
    that are constant (initializers and outputs of constant subgraphs), opsets, local functions."""

    def __init__(self, model: onnx.ModelProto):
        from onnxcomp.graph import GraphIndex

        self.index = GraphIndex(model)
        g = model.graph
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.constant: dict[str, onnx.NodeProto | None] = {t.name: None for t in g.initializer}
        self.const_nodes: set[int] = set()
        for n in g.node:  # graph order is topological
            if n.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
                continue
            if (n.op_type == "Constant" or (n.input and all((not i) or i in self.constant for i in n.input))) and n.output:
                self.const_nodes.add(id(n))
                for o in n.output:
                    self.constant[o] = n
        self.opsets = {(o.domain or ""): o.version for o in model.opset_import}
        self.local = {function_key(f): f for f in model.functions}

    def cut(self, chain: Sequence[onnx.NodeProto], values: dict[str, np.ndarray], macs: dict[str, int] | None = None,
            internal: set[str] | None = None) -> Unit:
        """The unit of `chain`; its outputs are the tensors read outside it, except those in
        `internal` (a DequantizeLinear's output the unit shares with other units: each has its own)."""
        from onnxcomp.graph import node_label

        produced = {o for c in chain for o in c.output if o}
        members = {id(c) for c in chain}
        inputs: dict[str, tuple[tuple[int, ...], int]] = {}
        feeds: dict[str, np.ndarray] = {}
        consts: dict[str, Any] = {}
        pre: list[onnx.NodeProto] = []
        problem = None
        seen_pre: set[int] = set()

        def pull_constant(name: str) -> None:
            producer = self.constant.get(name)
            if producer is None:
                t = self.index.initializers[name]
                # Weights kept on disk (a model over 2 GB) are timed with random values of their
                # shape: the time does not depend on them, and the one-layer model must be in memory.
                external = t.data_location == onnx.TensorProto.EXTERNAL
                consts[name] = (tuple(int(d) for d in t.dims), t.data_type) if external else t
                return
            if id(producer) in seen_pre:
                return
            for i in producer.input:
                if i and i not in consts:
                    pull_constant(i)
            seen_pre.add(id(producer))
            pre.append(producer)

        for c in chain:
            for i in c.input:
                if not i or i in produced or i in inputs or i in consts:
                    continue
                if i in self.constant:
                    pull_constant(i)
                elif i in values:
                    v = values[i]
                    inputs[i] = (tuple(int(d) for d in v.shape), helper.np_dtype_to_tensor_dtype(v.dtype))
                    feeds[i] = v
                else:
                    problem = problem or f"input '{i}' has no known value at these shapes"
            if c.domain not in _STANDARD_DOMAINS and function_key(c) not in self.local:
                problem = problem or f"custom op {c.domain}.{c.op_type} has no body to run alone"
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in c.attribute):
                problem = problem or f"{c.op_type} has subgraphs (control flow is not timed alone)"
        outs = [o for c in chain for o in c.output
                if o and o not in (internal or ())
                and (o in self.graph_outputs or any(id(u) not in members for u in self.consumers.get(o, [])))]
        if not outs:
            outs = [chain[-1].output[0]]
        funcs = list({function_key(c): self.local[function_key(c)] for c in chain if function_key(c) in self.local}.values())
        nbytes = sum(v.nbytes for v in feeds.values()) + sum(int(values[o].nbytes) for o in outs if o in values)
        for c in consts.values():
            dims, et = (tuple(c.dims), c.data_type) if isinstance(c, onnx.TensorProto) else c
            nbytes += math.prod(dims) * _itemsize(et)
        return Unit(node_label(chain[0]), pre + list(chain), inputs, consts, outs, dict(self.opsets), funcs,
                    macs=int(sum((macs or {}).get(node_label(c), 0) or 0 for c in chain)), bytes=int(nbytes),
                    feeds=feeds, problem=problem)


def split_units(model: onnx.ModelProto, values: dict[str, np.ndarray], macs: dict[str, int] | None = None) -> list[Unit]:
    """Cut `model` into units in graph order: each weighted op with the sole-consumer chain of ops
    onnxruntime fuses into it, every other op alone; constant subgraphs go with the units that read
    them. In a QDQ model each op also takes the DequantizeLinear nodes of its activation inputs and
    the QuantizeLinear its chain ends in (onnxruntime runs DQ -> op -> Q as one int8 kernel, such as
    QLinearConv, and a Q -> DQ boundary costs nothing inside the model; timed as separate units, an
    int8 glyph ResNet summed to 4.5x its time); a DQ shared by several ops goes with each, as
    onnxruntime duplicates it. `values` holds the runtime tensors of one real run (unit inputs take
    their values and shapes from it); a tensor missing from it makes its unit unbuildable, with the
    reason."""
    cutter = UnitCutter(model)
    producer = cutter.index.producer
    done: set[int] = set()
    chains: list[tuple[int, list[onnx.NodeProto], set[str]]] = []  # (graph position, nodes, shared DQ outputs)
    position = {id(n): k for k, n in enumerate(model.graph.node)}

    def activation_dq(name: str) -> onnx.NodeProto | None:
        p = producer.get(name)
        if p is None or p.op_type != "DequantizeLinear" or id(p) in cutter.const_nodes:
            return None
        return p

    for n in model.graph.node:
        if id(n) in cutter.const_nodes or id(n) in done or n.op_type in _QDQ:
            continue
        chain = [n]
        if n.op_type in WEIGHTED:
            while len(chain) < 4:
                out = chain[-1].output[0] if chain[-1].output else ""
                users = cutter.consumers.get(out, [])
                if (len(users) != 1 or out in cutter.graph_outputs or users[0].op_type not in FUSABLE
                        or id(users[0]) in done):
                    break
                chain.append(users[0])
        out = chain[-1].output[0] if chain[-1].output else ""
        users = cutter.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear" and out not in cutter.graph_outputs:
            chain.append(users[0])
        dqs = list({id(d): d for i in n.input if i and (d := activation_dq(i)) is not None}.values())
        done.update(id(c) for c in [*dqs, *chain])
        chains.append((position[id(n)], [*dqs, *chain], {o for d in dqs for o in d.output}))
    for n in model.graph.node:  # Q and DQ nodes no op took: a unit each
        if id(n) not in cutter.const_nodes and id(n) not in done and n.op_type in _QDQ:
            chains.append((position[id(n)], [n], set()))
    chains.sort(key=lambda c: c[0])
    return [cutter.cut(chain, values, macs or {}, internal=shared) for _, chain, shared in chains]
