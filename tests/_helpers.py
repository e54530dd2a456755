"""Helpers shared by the tests: the real models' paths, concrete input shapes, random feeds, a plain
onnxruntime runner and a one-layer model builder. Test modules import them as `from _helpers import ...`
(pytest puts tests/ on sys.path), so the suite collects from any directory; conftest.py wraps them as fixtures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Concrete shapes for the PP-OCR models' dynamic dims (det / rec / cls by file name).
PPOCR_INPUT_SHAPES = {"det": [1, 3, 320, 320], "rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}


def light_model_paths() -> list[Path]:
    """The 9 `light_*.onnx` models shipped inside the onnx package (opset 9, ConstantOfShape weights)."""
    return sorted(LIGHT_DIR.glob("light_*.onnx"))


def ppocr_model_paths() -> list[Path]:
    """The 3 PP-OCR models of rapidocr-onnxruntime (Paddle exports), or [] when it is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted((root / "models").glob("*.onnx"))


def input_shapes_for(model: onnx.ModelProto, path: Path | str | None = None) -> dict[str, list[int]]:
    """Concrete shapes for a model's data inputs: declared dims, PP-OCR shapes by file name, else
    1 for a symbolic leading dim and 32 for other symbolic dims."""
    inits = {t.name for t in model.graph.initializer}
    stem = Path(path).stem if path is not None else ""
    preset = next((shape for key, shape in PPOCR_INPUT_SHAPES.items() if f"_{key}_" in stem), None)
    out: dict[str, list[int]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if preset is not None:
            out[vi.name] = list(preset)
            continue
        dims = []
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.dim_value > 0 else (1 if k == 0 else 32))
        out[vi.name] = dims
    return out


def random_feeds(model: onnx.ModelProto, path: Path | str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (integers in [0, 10) for integer inputs) for every data input."""
    rng = np.random.default_rng(seed)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    feeds = {}
    for name, shape in input_shapes_for(model, path).items():
        dtype = helper.tensor_dtype_to_np_dtype(types[name])
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def ort_run(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    extra_outputs: list[str] | tuple[str, ...] = (),
    optimize: bool = True,
) -> dict[str, np.ndarray]:
    """Run a model in onnxruntime (CPU) and return every output by name. `extra_outputs`
    (intermediate tensor names) are exposed on a copy of the model; `optimize=False` turns off
    onnxruntime's graph optimisations (much faster to load for models with huge weights)."""
    import onnxruntime as ort

    if extra_outputs:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        have = {o.name for o in work.graph.output}
        for name in extra_outputs:
            if name not in have:
                work.graph.output.append(helper.make_empty_tensor_value_info(name))
        model = work
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def make_conv_model(
    *,
    cin: int = 4,
    cout: int = 8,
    kernel: int = 3,
    group: int = 1,
    bias: bool = True,
    bn: bool = False,
    transpose: bool = False,
    opset: int = 13,
    batch: str | int = "N",
    hw: int = 8,
    seed: int = 0,
) -> onnx.ModelProto:
    """A one-layer model `x -> Conv (or ConvTranspose) [-> BatchNormalization] -> y` with random
    float32 weights as initializers and a symbolic batch dim. Node names: `conv`, `bn`."""
    rng = np.random.default_rng(seed)
    if transpose:
        w = rng.standard_normal((cin, cout // group, kernel, kernel)).astype(np.float32)
    else:
        w = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv.weight")]
    conv_inputs = ["x", "conv.weight"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "conv.bias"))
        conv_inputs.append("conv.bias")
    conv_out = "conv_out" if bn else "y"
    nodes = [
        helper.make_node(
            "ConvTranspose" if transpose else "Conv",
            conv_inputs,
            [conv_out],
            name="conv",
            kernel_shape=[kernel, kernel],
            pads=[kernel // 2] * 4,
            group=group,
        )
    ]
    if bn:
        stats = {
            "bn.scale": rng.uniform(0.5, 2.0, cout),
            "bn.bias": rng.standard_normal(cout),
            "bn.mean": rng.standard_normal(cout),
            "bn.var": rng.uniform(0.1, 3.0, cout),
        }
        inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()]
        nodes.append(helper.make_node("BatchNormalization", [conv_out, *stats], ["y"], name="bn", epsilon=1e-3))
    graph = helper.make_graph(
        nodes,
        "tiny_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model
