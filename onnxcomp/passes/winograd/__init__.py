"""Winograd form (Choi, El-Khamy and Lee 2018): 3x3 convs as `ai.onnxcomp.WinogradConv` on
pre-transformed weights, optionally jointly sparse; and its inverse, `winograd-to-spatial`.

`winograd` rewrites each eligible Conv (3x3, stride 1, dilation 1, group 1, any channels and pads,
fixed input height and width) into a call of the model-local function of `function.py`, whose weights
are U = G g G^T [a*a, C_out, C_in] for F(m x m, 3 x 3), m = `tile` (matrices from
`onnxcomp.linalg.winograd`, Cook-Toom on chosen points). onnxruntime inlines the body, so the model
runs anywhere; the weights grow (a/3)^2 times (1.78x for m=2, 4x for m=4), which the report counts.

Speed (`objective=latency`, the default): the Winograd form pays only on wide layers (measured on
this machine: more than 1.4x at 256 channels at 56x56, slower than onnxruntime's own Conv at 64
channels), so each layer's direct Conv and its Winograd forms (F(2,3) and F(4,3), the products by
batched MatMul or by grouped 1x1 Conv: `products`) are timed alone, interleaved, through the cost
model (`onnxcomp.costmodel`), and the fastest is kept; a layer no form beats by
`min_speedup` stays direct with both figures in its reason. Layers faster alone can still make the
model slower (zoo resnet18: four layers 1.08-1.19x alone, the model 0.97x), so with `verify=on` (the
default) the rewritten model is timed whole against the input and the input is kept when it is not
faster (`measured_speedup` in the figures). Much of that loss was the cache: timed alone, a layer's
weights stay cached between runs, but a model whose weights exceed the last-level cache reads them
from memory every run, and the Winograd weights are 1.78-4x the direct ones (resnet18's 256-channel
layer at 14: 1.09x cached, 0.97x cold). So when the model's weights exceed half that cache
(`costmodel.model_weights_exceed_cache`), every form is timed with the cache emptied before each run
(figures `latency.weights`: cold or cached). Layer timings come from the cache, the whole-model
timing never: a model within a few percent of 1.0x may go either way between runs.
`objective=macs` rewrites every eligible layer (fewer multiplications always), at `tile` (auto: 4).

Joint sparsity (`sparsity=<spatial>:<winograd>`): `linalg.winograd.joint_sparsify` finds, per layer
and without retraining, Winograd-domain weights exactly `winograd` sparse whose spatial filters (what
`winograd-to-spatial` gives back) are exactly `spatial` sparse; the report gives both sparsities,
the multiplications each platform needs when it skips zeros, and the weight errors. The guard (with
`--data`) judges the output and puts back the layers that break it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.costmodel import model_weights_exceed_cache
from onnxcomp.graph import (
    GraphEditor,
    GraphIndex,
    attr,
    drop_unused_functions,
    node_label,
    opset_version,
    read_conv,
)
from onnxcomp.linalg import winograd as wg
from onnxcomp.model import convert_opset
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
from onnxcomp.passes.winograd import function as fn
from onnxcomp.shapes import static_shapes
from onnxcomp.units import Unit, unit_for_nodes

_TILES = (2, 4, 6)
_VERIFY_PAIRINGS, _VERIFY_MS = 3, 500.0  # verify=on: interleaved whole-model timings, ms of runs each
_AUTO_TILES = (2, 4)  # F(6,3)'s fp32 error is 30-50x the direct conv's: only when asked for
_F = onnx.TensorProto.FLOAT


@dataclass
class WinogradConfig(PassConfig):
    tile: str = option("auto", "output tile m of F(m x m, 3 x 3): 2, 4, 6, or auto (per layer the fastest "
                       "measured of 2 and 4; with objective=macs, 4)", choices=("auto", "2", "4", "6"))
    objective: str = option("latency", "latency: keep a layer direct unless its Winograd form is measured faster "
                            "(cost model); macs: rewrite every eligible layer", choices=("latency", "macs"))
    products: str = option("auto", "how the Winograd-domain products run: matmul (one batched MatMul), grouped "
                           "(one grouped 1x1 Conv, whose weight onnxruntime prepacks), or auto (with objective=latency "
                           "per layer the faster measured; with objective=macs, matmul)",
                           choices=("auto", "matmul", "grouped"))
    min_speedup: float = option(0.05, "with objective=latency: keep a layer direct unless its Winograd form is "
                                "this fraction faster")
    verify: str = option("on", "with objective=latency: time the rewritten model against the input (interleaved, "
                         "3 pairings, median) and keep the input when it is not faster", choices=("on", "off"))
    sparsity: str = option("", "joint sparsity '<spatial>:<winograd>' (fractions of zero weights in each domain, "
                           "e.g. 0.6:0.5), found without retraining")
    rounds: int = option(10, "alternating-projection rounds of the joint sparsity search")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.min_speedup < 1.0:
            raise ValueError(f"min_speedup={self.min_speedup}: must be in [0, 1)")
        if self.rounds < 0:
            raise ValueError(f"rounds={self.rounds}: must be >= 0")
        self.sparsity_targets()

    def sparsity_targets(self) -> tuple[float, float] | None:
        """(spatial, winograd) fractions, or None without sparsity; ValueError when malformed."""
        if not self.sparsity:
            return None
        parts = self.sparsity.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            s, w = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"sparsity={self.sparsity}: expected '<spatial>:<winograd>', e.g. 0.6:0.5") from None
        for v in (s, w):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"sparsity={self.sparsity}: each fraction must be in [0, 1)")
        return s, w

    def tiles(self) -> tuple[int, ...]:
        if self.tile != "auto":
            return (int(self.tile),)
        return _AUTO_TILES if self.objective == "latency" else (4,)

    def product_forms(self) -> tuple[bool, ...]:
        """The products' forms to consider, as `grouped` flags."""
        if self.products != "auto":
            return (self.products == "grouped",)
        return (False, True) if self.objective == "latency" else (False,)


@dataclass
class _Plan:
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    pads: tuple[int, int, int, int]
    batch: int
    height: int
    width: int
    tile: int = 4
    grouped: bool = False  # products by grouped 1x1 Conv instead of batched MatMul
    figures: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_label(self.node)

    def geometry(self, m: int) -> fn.Geometry:
        return fn.Geometry(m, int(self.weight.shape[1]), int(self.weight.shape[0]), self.height, self.width, self.pads)

    @property
    def macs(self) -> int:
        co, ci = self.weight.shape[:2]
        ho, wo = self.geometry(2).out_hw
        return int(self.batch * co * ci * 9 * ho * wo)


class WinogradPass(Pass):
    name = "winograd"
    summary = "3x3 stride-1 convs as WinogradConv on pre-transformed weights (F(2,3)/F(4,3)), chosen by measured speed"
    Config = WinogradConfig
    default_ops = ("Conv",)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg: WinogradConfig = self.config
        figures: dict = {}
        given = model
        if opset_version(model) < fn.MIN_OPSET and any(n.op_type == "Conv" for n in model.graph.node):
            converted, note = convert_opset(model, fn.MIN_OPSET, "the WinogradConv body")
            figures["opset"] = note
            if opset_version(converted) < fn.MIN_OPSET:
                return PassResult(model, [LayerRecord(node_label(n), n.op_type, SKIPPED, note, output=n.output[0])
                                          for n in self.candidates(model)], figures)
            model = converted
        index = GraphIndex(model)
        shapes = static_shapes(model)  # the model's own dims (batch 1): a grid is built for fixed H, W only
        layers: dict[int, LayerRecord] = {}
        plans: list[_Plan] = []
        for node in self.candidates(model):
            plan = _plan(index, node, shapes, self.selection_reason(node))
            if isinstance(plan, str):
                layers[id(node)] = LayerRecord(node_label(node), node.op_type, SKIPPED, plan, output=node.output[0])
            else:
                plans.append(plan)
        chosen: list[_Plan] = []
        cold = model_weights_exceed_cache(model)  # layers timed with their weights out of the cache
        for plan in ctx.progress.iter(plans, "winograd"):
            reason = self._choose_tile(plan, cfg, ctx, index, cold)
            if reason is not None:
                layers[id(plan.node)] = _record(plan, SKIPPED, reason)
            else:
                chosen.append(plan)
        if not chosen:  # nothing to rewrite: the input as it came (not its opset conversion)
            figures.pop("opset", None)
            return PassResult(given, [layers[id(n)] for n in self.candidates(model)], figures)
        editor = GraphEditor(model)
        shared: dict[int, tuple[str, str]] = {}
        opset = opset_version(model)
        targets = cfg.sparsity_targets()
        for plan in chosen:
            t = wg.transforms(plan.tile)
            if plan.tile not in shared:
                shared[plan.tile] = (
                    editor.add_initializer(f"winograd/F{plan.tile}x3/input_transform",
                                           wg.input_transform_kernel(t).astype(np.float32)),
                    editor.add_initializer(f"winograd/F{plan.tile}x3/output_transform",
                                           wg.output_transform_matrix(t).astype(np.float32)))
            layers[id(plan.node)] = _rewrite(editor, plan, t, shared[plan.tile], targets, cfg.rounds, opset)
        out = editor.apply()
        if cfg.objective == "latency" and cfg.verify == "on":
            ratio, ratios = _measured_speedup(given, out, ctx)
            figures["measured_speedup"] = {"median": round(ratio, 4), "timings": [round(r, 4) for r in ratios]}
            if ratio <= 1.0:  # layers faster alone, the model not: keep the input (resnet18: 0.97x)
                reason = (f"the rewritten model ran {ratio:.3f}x as fast as the input (whole models, interleaved, "
                          f"median of {len(ratios)}): every layer kept direct (verify=on)")
                for plan in chosen:
                    layers[id(plan.node)] = _record(plan, SKIPPED, reason)
                figures.pop("opset", None)
                return PassResult(given, [layers[id(n)] for n in self.candidates(model)], figures)
        ordered = [layers[id(n)] for n in self.candidates(model)]
        done = [r for r in ordered if r.action == REWRITTEN]
        if done:
            figures["tiles"] = {str(m): sum(1 for r in done if r.figures.get("tile") == m) for m in _TILES}
            if targets is not None:
                figures["sparsity"] = _sparsity_totals(done)
        return PassResult(out, ordered, figures)

    def _choose_tile(self, plan: _Plan, cfg: WinogradConfig, ctx: Context, index: GraphIndex,
                     cold: bool = False) -> str | None:
        """Set plan.tile and plan.grouped, or say why the layer stays direct. `cold`: time each form
        with its weights out of the cache (the model's own do not fit in it)."""
        forms = [(m, g) for m in cfg.tiles() for g in cfg.product_forms()]
        if cfg.objective == "macs":
            plan.tile, plan.grouped = forms[0]
            return None
        units = [_direct_unit(plan, index), *[_winograd_unit(plan, m, index, g) for m, g in forms]]
        est = ctx.costs().estimate(units, fresh=False, cold=cold)
        base = est[0].total_ms
        timed = sorted((e.total_ms, k) for k, e in enumerate(est[1:]))
        plan.figures["latency"] = {"direct_ms": round(base, 5), "source": est[0].source, "weights": "cold" if cold else "cached",
                                   **{f"F{m}{'_grouped' if g else ''}_ms": round(e.total_ms, 5)
                                      for e, (m, g) in zip(est[1:], forms, strict=True)}}
        if est[0].reason:
            plan.figures["latency"]["reason"] = est[0].reason
        ms, best = timed[0]
        plan.figures["latency"]["speedup"] = round(base / ms, 4) if ms > 0 else None
        if not ms < base * (1.0 - cfg.min_speedup):
            return (f"direct is faster: its fastest Winograd form ({_form_label(*forms[best])}) runs "
                    f"{base / max(ms, 1e-9):.2f}x as fast ({base:.4f} -> {ms:.4f} ms, {est[0].source}"
                    f"{', weights cold' if cold else ''}); needs "
                    f"{1.0 / (1.0 - cfg.min_speedup):.2f}x (min_speedup={cfg.min_speedup:g})")
        plan.tile, plan.grouped = forms[best]
        return None


def _measured_speedup(model: onnx.ModelProto, out: onnx.ModelProto, ctx: Context) -> tuple[float, list[float]]:
    """The input's time over the rewritten model's, whole models timed interleaved `_VERIFY_PAIRINGS`
    times on one random batch: (median, all). Layers are chosen by their time alone, and on zoo
    resnet18 four layers 1.08-1.19x faster alone made the model 0.97x as fast."""
    from onnxcomp.data import random_source

    # the model's own dims, not --input-shape: the tile grids were built for them
    feeds = random_source(model, None, samples=1, batch_size=1, seed=ctx.seed).first_batch()[0]
    pairs = ctx.costs().paired_timings(model, out, feeds, pairings=_VERIFY_PAIRINGS, target_ms=_VERIFY_MS)
    ratios = [before / after for before, after in reversed(pairs)]  # ascending
    return ratios[len(ratios) // 2], ratios


def _form_label(m: int, grouped: bool) -> str:
    """F(4,3) or F(4,3) grouped: a Winograd form as the report names it."""
    return f"F({m},3)" + (" grouped" if grouped else "")


def _plan(index: GraphIndex, node: onnx.NodeProto, shapes: dict, selection: str | None) -> _Plan | str:
    """A rewrite plan for one Conv, or the reason it stays (checked in the order a user would ask)."""
    if selection:
        return selection
    conv = read_conv(index, node)
    if isinstance(conv, str):
        return conv
    if conv.spatial_rank != 2:
        return f"{conv.spatial_rank}-D convolution: the Winograd form is built for 2-D"
    if conv.kernel != (3, 3):
        return f"kernel {conv.kernel[0]}x{conv.kernel[1]}: the Winograd form is built for 3x3"
    if conv.group != 1:
        return f"group={conv.group}: grouped and depthwise convs have too few products per tile to gain"
    if any(s != 1 for s in conv.strides):
        return f"strides {conv.strides}: F(m, 3) needs stride 1"
    if any(d != 1 for d in conv.dilations):
        return f"dilations {conv.dilations}: F(m, 3) needs dilation 1"
    x = shapes.get(node.input[0])
    if x is None or len(x) != 4 or x[2] is None or x[3] is None:
        return "input height/width not fixed in the model: the Winograd form is built for one tile grid"
    h, w = int(x[2]), int(x[3])
    if conv.pads is None:  # SAME_*: stride 1, 3x3 -> one on each side
        pads = (1, 1, 1, 1)
    else:
        pads = (conv.pads[0], conv.pads[1], conv.pads[2], conv.pads[3])
    if h + pads[0] + pads[2] < 3 or w + pads[1] + pads[3] < 3:
        return f"input {h}x{w} with pads {list(pads)} is smaller than the 3x3 kernel"
    return _Plan(node, conv.weight, conv.bias, pads, int(x[0] or 1), h, w)


def _record(plan: _Plan, action: str, reason: str = "", **extra) -> LayerRecord:
    co, ci = plan.weight.shape[:2]
    return LayerRecord(plan.name, "Conv", action, reason, params_before=int(co * ci * 9), macs_before=plan.macs,
                       output=plan.node.output[0], figures=plan.figures, **extra)


def _rewrite(editor: GraphEditor, plan: _Plan, t: wg.Transforms, shared: tuple[str, str],
             targets: tuple[float, float] | None, rounds: int, opset: int) -> LayerRecord:
    geom = plan.geometry(plan.tile)
    co, ci = plan.weight.shape[:2]
    u64 = wg.filter_transform(plan.weight, t)
    if targets is not None:
        joint = wg.joint_sparsify(plan.weight, t, targets[0], targets[1], rounds)
        u64 = joint.u
        plan.figures["sparsity"] = _sparsity_figures(joint, geom, t, plan.batch)
    u = u64.astype(np.float32)
    base = plan.name
    inputs = [plan.node.input[0], editor.add_initializer(f"{base}/winograd_U", u), *shared]
    bias = plan.bias is not None
    if bias:
        inputs.append(editor.add_initializer(f"{base}/winograd_bias", plan.bias.astype(np.float32)))  # type: ignore[union-attr]
    call = fn.call(inputs, plan.node.output[0], editor.unique_name(f"{base}/winograd"), geom,
                   [float(p) for p in t.points], bias, plan.grouped)
    if targets is not None:
        call.attribute.append(helper.make_attribute("spatial_sparsity", float(targets[0])))
    editor.replace(plan.node, [call])
    editor.add_function(fn.function(opset, bias=bias, crop=geom.crop, grouped=plan.grouped), fn.DOMAIN_VERSION)
    mults = wg.multiplications(ci, co, geom.tiles, t, outputs=math.prod(geom.out_hw))
    plan.figures.update({
        "tile": plan.tile, "tiles": list(geom.tiles_hw), "products": "grouped conv" if plan.grouped else "matmul",
        "multiplications": {k: int(v * plan.batch) for k, v in mults.items()},
        "weight_growth": round(t.alpha**2 / 9.0, 4)})
    macs_after = plan.batch * (mults["input_transform"] + mults["products"] + mults["output_transform"])
    return _record(plan, REWRITTEN, params_after=int(u.size), macs_after=int(macs_after))


def _sparsity_figures(joint: wg.JointSparse, geom: fn.Geometry, t: wg.Transforms, batch: int) -> dict:
    ho, wo = geom.out_hw
    nnz_s = int(np.count_nonzero(joint.spatial))
    nnz_w = int(np.count_nonzero(joint.u))
    return {"spatial": round(1.0 - nnz_s / joint.spatial.size, 4), "winograd": round(1.0 - nnz_w / joint.u.size, 4),
            "spatial_multiplications": nnz_s * ho * wo * batch, "winograd_multiplications": nnz_w * geom.tiles * batch,
            "dense_spatial_multiplications": int(joint.spatial.size * ho * wo * batch),
            "dense_winograd_multiplications": int(joint.u.size * geom.tiles * batch),
            "spatial_error": round(joint.spatial_error, 5), "winograd_error": round(joint.u_error, 5),
            "round": joint.round}


def _sparsity_totals(done: list[LayerRecord]) -> dict:
    keys = ("spatial_multiplications", "winograd_multiplications", "dense_spatial_multiplications",
            "dense_winograd_multiplications")
    tot = {k: sum(int(r.figures["sparsity"][k]) for r in done if "sparsity" in r.figures) for k in keys}
    return {**tot, "spatial_skipped": round(1 - tot[keys[0]] / max(tot[keys[2]], 1), 4),
            "winograd_skipped": round(1 - tot[keys[1]] / max(tot[keys[3]], 1), 4)}


# ---------------------------------------------------------------------------------------------
# units for the cost model: the layer as it runs now, and its Winograd forms
# ---------------------------------------------------------------------------------------------
def _tail(plan: _Plan, index: GraphIndex) -> list[onnx.NodeProto]:
    """The Relu onnxruntime fuses into the direct Conv (and runs apart after a WinogradConv): timed
    with both forms, so the comparison is of what each model would run."""
    users = index.consumers.get(plan.node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Relu" and plan.node.output[0] not in index.graph_outputs:
        return [helper.make_node("Relu", ["conv_out"], ["y"], name="relu")]
    return []


def _finish(nodes: list[onnx.NodeProto], tail: list[onnx.NodeProto]) -> list[str]:
    if tail:
        nodes[-1].output[0] = "conv_out"
        nodes.extend(tail)
    return ["y"]


def _direct_unit(plan: _Plan, index: GraphIndex) -> Unit:
    co, ci = plan.weight.shape[:2]
    consts = {"w": ((int(co), int(ci), 3, 3), _F)}
    ins = ["x", "w"]
    if plan.bias is not None:
        consts["b"] = ((int(co),), _F)
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["y"], name="conv", pads=list(plan.pads), kernel_shape=[3, 3])]
    outs = _finish(nodes, _tail(plan, index))
    return unit_for_nodes(f"{plan.name}:direct", nodes, {"x": ((1, int(ci), plan.height, plan.width), _F)}, consts,
                          outs, 17, macs=plan.macs // max(plan.batch, 1))


def _winograd_unit(plan: _Plan, m: int, index: GraphIndex, grouped: bool = False) -> Unit:
    t = wg.transforms(m)
    geom = plan.geometry(m)
    co, ci = plan.weight.shape[:2]
    a2 = t.alpha**2
    bias = plan.bias is not None
    consts: dict = {"u": ((a2, int(co), int(ci)), _F),
                    "k": numpy_helper.from_array(wg.input_transform_kernel(t).astype(np.float32), "k"),
                    "a": numpy_helper.from_array(wg.output_transform_matrix(t).astype(np.float32), "a")}
    ins = ["x", "u", "k", "a"]
    if bias:
        consts["b"] = ((int(co),), _F)
        ins.append("b")
    nodes = [fn.call(ins, "y", "winograd", geom, [float(p) for p in t.points], bias, grouped)]
    outs = _finish(nodes, _tail(plan, index))
    mults = wg.multiplications(int(ci), int(co), geom.tiles, t)
    unit = unit_for_nodes(f"{plan.name}:F{m}{'g' if grouped else ''}", nodes, {"x": ((1, int(ci), plan.height, plan.width), _F)}, consts, outs,
                          17, macs=mults["input_transform"] + mults["products"] + mults["output_transform"],
                          extra_opsets={fn.DOMAIN: fn.DOMAIN_VERSION})
    unit.functions = [fn.function(17, bias=bias, crop=geom.crop, grouped=grouped)]
    return unit


# ---------------------------------------------------------------------------------------------
# the inverse
# ---------------------------------------------------------------------------------------------
class WinogradToSpatialPass(Pass):
    name = "winograd-to-spatial"
    summary = "WinogradConv back to a plain Conv (exact without Winograd-domain pruning), for spatial platforms"
    default_ops = (fn.OP,)

    def candidates(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        return [n for n in model.graph.node if fn.is_call(n)]

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        index = GraphIndex(model)
        editor = GraphEditor(model)
        records: list[LayerRecord] = []
        for node in self.candidates(model):
            reason = self.selection_reason(node)
            rec = reason if reason else _to_spatial(editor, index, node)
            if isinstance(rec, str):
                records.append(LayerRecord(node_label(node), node.op_type, SKIPPED, rec, output=node.output[0]))
            else:
                records.append(rec)
        if not editor.changed:
            return PassResult(model, records)
        out = editor.apply()
        drop_unused_functions(out)
        return PassResult(out, records)


def _to_spatial(editor: GraphEditor, index: GraphIndex, node: onnx.NodeProto) -> LayerRecord | str:
    u = index.array(node.input[1]) if len(node.input) > 1 else None
    if u is None or u.ndim != 3:
        return "U is not a constant [a*a, C_out, C_in] initializer"
    m = int(attr(node, "tile", 0))
    points = attr(node, "points")
    try:
        t = wg.transforms(m, 3, tuple(Fraction(p) for p in points) if points else None)
    except ValueError as exc:
        return f"unusable tile/points ({exc})"
    if u.shape[0] != t.alpha**2:
        return f"U has {u.shape[0]} positions, F({m},3) needs {t.alpha**2}"
    g = wg.filter_inverse(u, t)
    spatial = attr(node, "spatial_sparsity")
    if spatial:
        g = wg.spatial_from(u, t, float(spatial))
    back = wg.filter_transform(g, t)
    residual = float(np.linalg.norm(back - u) / max(np.linalg.norm(u), 1e-30))
    name = node_label(node).removesuffix("/winograd")
    inputs = [node.input[0], editor.add_initializer(f"{name}/weight", g.astype(np.float32))]
    if len(node.input) > 4 and node.input[4]:
        inputs.append(node.input[4])
    # the original node's name, free again (node and tensor names are separate namespaces in ONNX)
    taken = any(n.name == name for n in index.graph.node)
    conv = helper.make_node("Conv", inputs, list(node.output), name=editor.unique_name(name) if taken else name,
                            kernel_shape=[3, 3], pads=list(attr(node, "pads")), strides=[1, 1], dilations=[1, 1])
    editor.replace(node, [conv])
    co, ci = u.shape[1:]
    exact = residual < 1e-6 and not spatial
    return LayerRecord(node_label(node), node.op_type, REWRITTEN,
                       "exact inverse" if exact else "least-squares inverse of Winograd-domain pruned weights",
                       params_before=int(u.size), params_after=int(g.size), output=node.output[0],
                       figures={"tile": m, "residual": round(residual, 8),
                                "spatial_sparsity": round(float(np.mean(g == 0)), 4)})
