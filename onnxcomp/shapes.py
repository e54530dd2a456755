"""Static shapes for analysis: fill symbolic input dims, run onnx shape inference, read every tensor."""

from __future__ import annotations

import math

import onnx
from onnx import helper

from onnxcomp.errors import BadInputError


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """`["x:1,3,224,224", "mask:1,10"]` -> {"x": [1, 3, 224, 224], ...}; a bare `1,3,224,224` names
    the first input and is stored under the key "" ."""
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise BadInputError(f"--input-shape {spec!r}: expected NAME:D0,D1,... with integer dims") from None
        if any(d <= 0 for d in shape):
            raise BadInputError(f"--input-shape {spec!r}: dims must be positive integers")
        if name in out:
            raise BadInputError(f"--input-shape {spec!r}: input '{name or '(first)'}' is given twice")
        out[name] = shape
    return out


def check_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None) -> None:
    """BadInputError unless every shape in `given` names a data input of `model` (the key "" stands
    for the first one), has the input's rank, and agrees with every dim the model fixes. Run it
    before shapes reach shape inference, which would otherwise quietly use a wrong shape."""
    if not given:
        return
    inits = {t.name for t in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in inits]
    by_name = {i.name: i for i in data_inputs}
    for key, shape in given.items():
        if key == "":
            if not data_inputs:
                raise BadInputError("--input-shape: the model has no inputs")
            vi = data_inputs[0]
        elif key in by_name:
            vi = by_name[key]
        else:
            names = ", ".join(by_name) or "(none)"
            raise BadInputError(f"--input-shape names '{key}', but the model's inputs are: {names}")
        if any(not isinstance(d, int) or d <= 0 for d in shape):
            raise BadInputError(f"--input-shape {vi.name}: dims must be positive integers, got {list(shape)}")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = list(tt.shape.dim)
        declared = "[" + ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"
        if len(shape) != len(dims):
            raise BadInputError(
                f"--input-shape {vi.name}: {len(shape)} dims given, the model input has {len(dims)} {declared}"
            )
        for k, (g, d) in enumerate(zip(shape, dims, strict=True)):
            if d.HasField("dim_value") and d.dim_value > 0 and g != d.dim_value:
                raise BadInputError(
                    f"--input-shape {vi.name}: dim {k} is {g} but the model fixes it to {d.dim_value} {declared}"
                )


def resolve_input_shape(model: onnx.ModelProto, name: str, given: dict[str, list[int]], batch: int | None = 1) -> list:
    """Dims for graph input `name`: the user's shape if given, else the declared dims with a
    symbolic leading (batch) dim set to `batch`. Unknown dims stay as strings (their symbol)."""
    inits = {t.name for t in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in inits]
    if name in given:
        return list(given[name])
    if "" in given and data_inputs and data_inputs[0].name == name:
        return list(given[""])
    vi = next(i for i in data_inputs if i.name == name)
    dims: list = []
    for k, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif k == 0 and batch is not None:
            dims.append(batch)
        else:
            dims.append(d.dim_param or "?")
    return dims


def weightless(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """A skeleton of `model` for shape inference: initializers larger than `max_elements` (or stored
    externally) become typed graph inputs of the same shape; small ones, such as Reshape targets,
    stay for data propagation. Old value_info is left out. Copies no large weight, so inference is
    fast and the 2 GB protobuf limit does not apply."""
    out = onnx.ModelProto()
    out.ir_version = max(model.ir_version, 4)  # initializers need not be inputs from IR 4 on
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if math.prod(t.dims) <= max_elements and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:  # an IR<4 model already declares it as an input
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    g.sparse_initializer.extend(src.sparse_initializer)
    return out


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, tuple]:
    """Shape of every tensor onnx can infer once the inputs are concrete (unknown dims are None).
    Runs on `weightless(model)`: no weight is copied."""
    given = input_shapes or {}
    work = weightless(model)
    inits = {t.name for t in model.graph.initializer}
    for vi in work.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = resolve_input_shape(model, vi.name, given)
        shape = vi.type.tensor_type.shape
        for d, value in zip(shape.dim, dims, strict=False):
            if isinstance(value, int):
                d.Clear()
                d.dim_value = value
    try:
        inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
    except Exception:
        inferred = work
    out: dict[str, tuple] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
    for t in inferred.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def shapes_from_data(model: onnx.ModelProto, source, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """`given` completed with one sample's shape (leading dim 1) of every data input the model
    leaves partly symbolic, read from the first batch of `source` (a DataSource): the MAC, size and
    latency figures then describe the data the user actually runs. Inputs in `given` win."""
    out = dict(given or {})
    if source is None:
        return out
    named = {k for k in out if k}
    first = next((i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}), None)
    if "" in out and first is not None:
        named.add(first)
    inits = {t.name for t in model.graph.initializer}
    symbolic = []
    for vi in model.graph.input:
        if vi.name in inits or vi.name in named:
            continue
        dims = vi.type.tensor_type.shape.dim
        if any(d.dim_value <= 0 for d in dims[1:]):
            symbolic.append(vi.name)
    if not symbolic:
        return out
    feeds, _ = source.first_batch()
    for name in symbolic:
        if name in feeds and feeds[name].ndim >= 1:
            out[name] = [1, *(int(d) for d in feeds[name].shape[1:])]
    return out
