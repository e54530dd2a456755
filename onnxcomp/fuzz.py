"""Random convolutional graphs and a checker that runs the CLI on them (benchmarks/fuzz.py and a
CI-sized subset in tests/test_fuzz.py).

`random_graph(rng)` builds a valid model: opset 11-21; batch and spatial dims fixed or symbolic; a
chain of blocks (Conv with kernel 1/3/5, strides, dilations, symmetric / asymmetric pads or
auto_pad, groups and depthwise; BatchNormalization; Relu / LeakyRelu / Sigmoid / HardSigmoid / Clip;
residual Add; a Concat of two branches or a Split), then either a classifier head (global pooling,
Flatten, Gemm) or a dense output. `check_graph` runs pipelines on it through `onnxcomp.cli.main`
and returns the problems found: an exit code other than 0/1/2, a traceback or a multi-line error,
an output that fails onnx's checker or onnxruntime or changes output shapes, an exact pass out of
its tolerance, a reported error that an independent recomputation does not confirm.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class Graph:
    model: onnx.ModelProto
    input_shape: list[int]  # concrete shape for data (batch included)
    description: str


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0
        self.notes: list[str] = []

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def init(self, base: str, arr: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def conv(self, x: str, c: int, hw: tuple[int, int]) -> tuple[str, int, tuple[int, int]]:
        r = self.rng
        k = int(r.choice([1, 3, 3, 5]))
        stride = int(r.choice([1, 1, 2])) if min(hw) >= 6 else 1
        dil = int(r.choice([1, 1, 2])) if k > 1 and min(hw) >= 2 * k + 1 else 1
        group = 1
        kind = r.random()
        if kind < 0.2:
            group, cout = c, c  # depthwise
        else:
            cout = int(r.choice([4, 8, 12, 16, 24]))
            if kind < 0.35 and c % 2 == 0 and cout % 2 == 0:
                group = 2
        w = (r.standard_normal((cout, c // group, k, k)) / math.sqrt(c // group * k * k)).astype(np.float32)
        inputs = [x, self.init("w", w)]
        if r.random() < 0.7:
            inputs.append(self.init("b", (0.1 * r.standard_normal(cout)).astype(np.float32)))
        attrs: dict[str, Any] = {"kernel_shape": [k, k], "strides": [stride, stride], "dilations": [dil, dil],
                                 "group": group}
        ek = dil * (k - 1) + 1
        mode = r.random()
        if mode < 0.15 and dil == 1:  # onnxruntime runs no dilated conv with SAME padding
            attrs["auto_pad"] = "SAME_UPPER"
            out = tuple(-(-d // stride) for d in hw)
        elif mode < 0.25 and min(hw) >= ek + 1:
            attrs["auto_pad"] = "VALID"
            out = tuple((d - ek) // stride + 1 for d in hw)
        else:
            if mode < 0.45:  # asymmetric
                pads = [int(r.integers(0, ek)) for _ in range(4)]
            else:
                pads = [ek // 2] * 4
            attrs["pads"] = pads
            out = ((hw[0] + pads[0] + pads[2] - ek) // stride + 1, (hw[1] + pads[1] + pads[3] - ek) // stride + 1)
        if min(out) < 1:
            attrs.pop("auto_pad", None)
            attrs["pads"] = [ek // 2] * 4
            out = tuple((d + 2 * (ek // 2) - ek) // stride + 1 for d in hw)
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", inputs, [y], name=y, **attrs))
        self.notes.append(f"conv{k}x{k}/s{stride}/d{dil}/g{group}:{c}->{cout}")
        return y, cout, out  # type: ignore[return-value]

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        args = [self.init("s", r.uniform(0.5, 1.5, c).astype(np.float32)),
                self.init("bb", (0.1 * r.standard_normal(c)).astype(np.float32)),
                self.init("m", (0.1 * r.standard_normal(c)).astype(np.float32)),
                self.init("v", r.uniform(0.5, 2.0, c).astype(np.float32))]
        y = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [x, *args], [y], name=y, epsilon=1e-5))
        return y

    def act(self, x: str, opset: int) -> str:
        r = self.rng
        op = str(r.choice(["Relu", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Clip"]))
        y = self.name(op.lower())
        if op == "Clip":
            lo = self.init("lo", np.array(0.0, np.float32))
            hi = self.init("hi", np.array(6.0, np.float32))
            self.nodes.append(helper.make_node("Clip", [x, lo, hi], [y], name=y))
        elif op == "LeakyRelu":
            self.nodes.append(helper.make_node(op, [x], [y], name=y, alpha=0.1))
        else:
            self.nodes.append(helper.make_node(op, [x], [y], name=y))
        return y


def random_graph(rng: np.random.Generator) -> Graph:
    """A random valid conv graph (see the module docstring)."""
    b = _Builder(rng)
    opset = int(rng.integers(11, 22))
    c = int(rng.choice([1, 3, 4, 8]))
    hw = (int(rng.integers(6, 21)), int(rng.integers(6, 21)))
    c0, hw0 = c, hw
    sym_batch = rng.random() < 0.7
    sym_spatial = rng.random() < 0.3
    x = "x"
    for _ in range(int(rng.integers(2, 6))):
        r = rng.random()
        if r < 0.15 and min(hw) >= 2:  # residual: conv (same channels, stride 1, same pads) + Add
            w = (rng.standard_normal((c, c, 3, 3)) / math.sqrt(9 * c)).astype(np.float32)
            y = b.name("conv")
            b.nodes.append(helper.make_node("Conv", [x, b.init("w", w)], [y], name=y, kernel_shape=[3, 3],
                                            pads=[1, 1, 1, 1]))
            y = b.act(y, opset)
            s = b.name("add")
            b.nodes.append(helper.make_node("Add", [x, y], [s], name=s))
            x = s
            b.notes.append("residual")
            continue
        if r < 0.25:  # two 1x1 branches concatenated
            outs = []
            total = 0
            for _branch in range(2):
                co = int(rng.choice([4, 8]))
                w = (rng.standard_normal((co, c, 1, 1)) / math.sqrt(c)).astype(np.float32)
                y = b.name("conv")
                b.nodes.append(helper.make_node("Conv", [x, b.init("w", w)], [y], name=y, kernel_shape=[1, 1]))
                outs.append(y)
                total += co
            y = b.name("concat")
            b.nodes.append(helper.make_node("Concat", outs, [y], name=y, axis=1))
            x, c = y, total
            b.notes.append("concat")
            continue
        if r < 0.32 and c % 2 == 0 and c >= 4:  # split the channels and add the halves
            a_, b_ = b.name("split"), b.name("split")
            if opset >= 13:
                sizes = b.init("sizes", np.array([c // 2, c // 2], np.int64))
                b.nodes.append(helper.make_node("Split", [x, sizes], [a_, b_], name=a_, axis=1))
            else:
                b.nodes.append(helper.make_node("Split", [x], [a_, b_], name=a_, axis=1, split=[c // 2, c // 2]))
            s = b.name("add")
            b.nodes.append(helper.make_node("Add", [a_, b_], [s], name=s))
            x, c = s, c // 2
            b.notes.append("split")
            continue
        x, c, hw = b.conv(x, c, hw)
        if rng.random() < 0.4:
            x = b.bn(x, c)
        if rng.random() < 0.8:
            x = b.act(x, opset)
    classifier = rng.random() < 0.6
    if classifier:
        g = b.name("gap")
        b.nodes.append(helper.make_node("GlobalAveragePool", [x], [g], name=g))
        f = b.name("flatten")
        b.nodes.append(helper.make_node("Flatten", [g], [f], name=f, axis=1))
        classes = int(rng.choice([5, 10]))
        wf = (rng.standard_normal((classes, c)) / math.sqrt(c)).astype(np.float32)
        out = "y"
        b.nodes.append(helper.make_node("Gemm", [f, b.init("wf", wf), b.init("bf", np.zeros(classes, np.float32))],
                                        [out], name="head", transB=1))
    else:
        out = "y"
        b.nodes.append(helper.make_node("Identity", [x], [out], name="out"))
    batch_dim: Any = "N" if sym_batch else 1
    dims = [batch_dim, c0, "H" if sym_spatial else hw0[0], "W" if sym_spatial else hw0[1]]
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset <= 14 else 8
    inferred = onnx.shape_inference.infer_shapes(model)
    found = [v for v in inferred.graph.value_info if v.name == out] + [v for v in inferred.graph.output if v.name == out]
    if found and found[0].type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(found[0])
    else:
        model.graph.output[0].type.tensor_type.shape.SetInParent()  # rank unknown, but a shape field
    shape = [2 if sym_batch else 1, c0, *hw0]
    desc = f"opset {opset}, input {dims}, {'classifier' if classifier else 'dense'} head: " + ", ".join(b.notes)
    return Graph(model, shape, desc)


@dataclass
class Run:
    """One pipeline on one graph: what the CLI did and what was wrong with it."""

    pipeline: str
    with_data: bool
    exit_code: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # skip reasons of the layers, counted
    rewritten: int = 0  # layers rewritten by the passes after normalize
    off_data: float | None = None  # a data-exact pass: its max abs error on a fresh input, relative to the output's max


# Exactness claims: True holds on any input; "data" holds on the samples the pass calibrated on (the
# guard's calibration split): a channel constant on those is folded exactly, but a fresh input may move
# it (the pass reports each trimmed channel's locality on the held-out samples); Run.off_data records
# how far, as a figure, not a problem.
DATA_EXACT = "data"

# (pipeline, needs data, extra flags, claims exactness: False, True or DATA_EXACT)
PIPELINES: list[tuple[str, bool, tuple[str, ...], bool | str]] = [
    ("normalize", False, (), True),
    # full ranks, growth allowed: every decomposable layer rewritten, and exactly (a rewrite check)
    ("tucker{rank=1.0,round=1,min_gain=-10,iterations=0,objective=macs}", False, (), True),
    ("tucker{rank=0.5,round=1,min_gain=-1}", False, (), False),
    ("tucker{method=response,rank=energy:0.9,round=2},int8{samples=16}", True, (), False),
    ("tucker{rank=0.5,round=2,refit=sequential}", True, ("--no-guard", "--validate"), False),
    ("tucker{budget=macs:0.7,round=2}", True, (), False),
    ("default", True, (), False),
    # codebooks: the reported error recomputed; with data, mixed bits measured and composed with tucker
    ("codebook{bits=3,granularity=channel,min_params=16}", True, ("--no-guard", "--validate"), False),
    ("codebook{bits=4,scale=channel,min_params=16}", True, ("--no-guard", "--validate"), False),
    ("tucker{rank=0.5,round=2,objective=macs},codebook{min_params=16,samples=8}", True, (), False),
    # trimming: only channels constant on the data (exact there), and by a MAC target (the reported error recomputed)
    ("trim{threshold=0,round=1}", True, (), DATA_EXACT),
    ("trim{target=0.3,round=1,min_channels=1},codebook{bits=4,min_params=16}", True, ("--no-guard", "--validate"), False),
    # Winograd: dense F(4,3) and F(2,3) there and back are exact; joint sparsity's reported error recomputed
    ("winograd{objective=macs,tile=4}", False, (), True),
    ("winograd{objective=macs,tile=2},winograd-to-spatial", False, (), True),
    ("winograd{objective=macs,sparsity=0.5:0.5}", True, ("--no-guard", "--validate"), False),
    # universal quantization: the reported error recomputed
    ("uquant{bits=4,min_params=16}", True, ("--no-guard", "--validate"), False),
]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from onnxcomp.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException as exc:  # anything escaping main is a finding, not a crash of the fuzzer
            return 99, out.getvalue(), err.getvalue() + f"\nescaped main: {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue()


def _session(model: onnx.ModelProto | str):
    """Plain onnxruntime, on purpose not onnxcomp.runtime: the recomputation must not share the
    code it checks."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _exactness_problems(reference: list[np.ndarray], got: list[np.ndarray], where: str = "") -> list[str]:
    problems = []
    for r, g in zip(reference, got, strict=True):
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        err_abs = float(np.max(np.abs(g - r))) if r.size else 0.0
        if err_abs > 1e-4 * scale + 1e-5:
            problems.append(f"exact pass off by {err_abs:.3g} at scale {scale:.3g}{where}")
    return problems


def _batched(model: onnx.ModelProto | str, xs: np.ndarray, step: int) -> list[np.ndarray]:
    """The model's outputs on samples `xs`, `step` at a time (one session)."""
    sess = _session(model)
    parts = [sess.run(None, {"x": xs[i:i + step]}) for i in range(0, len(xs), step)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def check_graph(graph: Graph, folder: Path, seed: int,
                pipelines: list[tuple[str, bool, tuple[str, ...], bool | str]] | None = None) -> list[Run]:
    """Run every pipeline on `graph` through the CLI (files in `folder`) and check the results."""
    import time

    rng = np.random.default_rng(seed)
    src = folder / "in.onnx"
    onnx.save(graph.model, src)
    before = src.read_bytes()
    n = 40
    data = folder / "d.npz"
    xs = rng.standard_normal((n, *graph.input_shape[1:])).astype(np.float32)
    np.savez(data, x=xs)
    probe = {"x": rng.standard_normal(graph.input_shape).astype(np.float32)}
    reference = _outputs(graph.model, probe)
    runs = []
    for spec, needs_data, flags, exact in pipelines or PIPELINES:
        out, report = folder / "out.onnx", folder / "report.json"
        for f in (out, report):
            f.unlink(missing_ok=True)
        argv = ["optimize", str(src), "-o", str(out), "-p", spec, "-q", "--report", str(report), *flags]
        if needs_data:
            argv += ["--data", str(data)]
        t0 = time.perf_counter()
        code, _stdout, err = _cli(argv)
        run = Run(spec, needs_data, code, time.perf_counter() - t0)
        runs.append(run)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if code not in (0, 1, 2):
            run.problems.append(f"exit {code}: {lines[-1] if lines else '(no message)'}")
        if "Traceback" in err:
            run.problems.append("a traceback on stderr")
        if sum(1 for line in lines if line.startswith("onnxcomp:")) > 1:
            run.problems.append("more than one error line")
        if src.read_bytes() != before:
            run.problems.append("the input file changed")
        if code == 2 and out.exists():
            run.problems.append("an output was written on bad input")
        if code != 0 or not out.exists():
            if code == 0:
                run.problems.append("exit 0 but no output")
            continue
        try:
            written = onnx.load(str(out))
            onnx.checker.check_model(written)
            got = _outputs(str(out), probe)
        except Exception as exc:
            run.problems.append(f"invalid output: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        if [g.shape for g in got] != [r.shape for r in reference]:
            run.problems.append(f"output shapes changed: {[r.shape for r in reference]} -> {[g.shape for g in got]}")
            continue
        step = graph.input_shape[0]  # the batch the model takes (1 when it fixes it)
        if exact is True:
            run.problems += _exactness_problems(reference, got)
        elif exact == DATA_EXACT:
            from onnxcomp.data import held_out_mask

            fit = xs if "--no-guard" in flags else xs[~held_out_mask(len(xs))]
            fit = fit[:len(fit) - len(fit) % step]
            run.problems += _exactness_problems(_batched(graph.model, fit, step), _batched(str(out), fit, step),
                                                " on its calibration samples")
            run.off_data = max((float(np.max(np.abs(g - r))) / max(float(np.max(np.abs(r))), 1e-30)
                                for r, g in zip(reference, got, strict=True) if r.size), default=0.0)
        rep = json.loads(report.read_text()) if report.exists() else {}
        for p in rep.get("passes", []):
            if p["name"] != "normalize":
                run.rewritten += int(p.get("rewritten", 0))
            for layer in p.get("layers", []):
                if layer["action"] == "skipped" and p["name"] != "normalize":
                    key = f"{p['name']}: {layer['reason'].split(' (')[0][:90]}"
                    run.reasons[key] = run.reasons.get(key, 0) + 1
        if "--validate" in flags and rep.get("validation"):
            claimed = rep["validation"]["summary"].get("max_abs_err")
            truth = max((float(np.max(np.abs(a - b))) for a, b in zip(
                _batched(graph.model, xs, step), _batched(str(out), xs, step), strict=True) if a.size), default=0.0)
            if not isinstance(claimed, (int, float)) or abs(claimed - truth) > 1e-3 * max(truth, 1e-6) + 1e-6:
                run.problems.append(f"reported max abs err {claimed} but it is {truth:.6g}")
    return runs


def fuzz(count: int, seed: int, pipelines=None, progress=None, per_graph: int | None = None) -> list[tuple[Graph, list[Run]]]:
    """`count` random graphs from `seed`, each checked with `check_graph` on every pipeline, or
    with `per_graph` on a window of that many that rotates over the list (graph i starts at
    pipeline i * per_graph), so a short run still gives every pipeline count * per_graph / len graphs."""
    results = []
    specs = list(pipelines or PIPELINES)
    for i in range(count):
        graph = random_graph(np.random.default_rng([seed, i]))
        chosen = specs if per_graph is None else [specs[(i * per_graph + k) % len(specs)] for k in range(per_graph)]
        with tempfile.TemporaryDirectory(prefix="onnxcomp-fuzz-") as tmp:
            results.append((graph, check_graph(graph, Path(tmp), seed=i, pipelines=chosen)))
        if progress is not None:
            progress(i + 1, count)
    return results
