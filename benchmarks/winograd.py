"""The Winograd form against onnxruntime's own Conv: per layer, whole model, joint sparsity.

Part `speed` (zoo vgg16 and resnet18, 224x224, batch 1, 2 threads, onnxruntime's CPU provider):
* per eligible layer: the p50 latency of the direct Conv (with its Relu, which onnxruntime fuses) and
  of WinogradConv F(2,3) / F(4,3) (with the Relu apart), the products by batched MatMul and by grouped
  1x1 Conv ("g"), each built alone and run interleaved (the
  pass's own cost model with a fresh cache and 0.4 s per unit), the multiplications per image, and
  the max error of the layer's output in the all-F(2,3) / all-F(4,3) models relative to its max;
* whole models, interleaved in one process (p50 of >= 15 runs each, three such timings, the median
  speed-up kept): the original, the pass's
  per-layer choice (`winograd`, objective=latency), every eligible layer at F(4,3) (MatMul
  products, then grouped-Conv products), every one at F(2,3); and the same for the conv stack alone
  (the model cut before its classifier).

Part `pack`: `uquant{bits=4}` (a 4-bit-equivalent universal quantization) of zoo vgg16, then
`onnxcomp pack` with lzma and zstd: bytes against the fp32 .onnx file, the codes' entropy bound,
and the same after `winograd{objective=macs,tile=2,sparsity=0.5:0.5}` (the jointly sparse model, its
Winograd weights stored, 1.78x as many conv weights, half of them zero).

Part `sparsity`: `winograd{objective=macs,tile=T,sparsity=S:W}` without retraining, on zoo resnet18
(output cosine against the original on 16 random images) and on the trained glyph_resnet (top-1 on
its 62-class test set, 1000 images), with the achieved sparsities and the multiplications each
platform needs when it skips zeros; the guarded `optimize` (which puts back the layers that break
the tolerance) for the trained model.

    python benchmarks/winograd.py [--part speed|stage|bias|sparsity|pack|all] [--models vgg16,resnet18] [--out benchmarks/out/winograd.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHOLE_REPEATS = 3  # interleaved timings of the whole-model variants (spread in time; the median speed-up kept)


def _run(model, feeds, outputs=()):
    import onnxruntime as ort
    from onnx import helper

    if outputs:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        have = {o.name for o in work.graph.output}
        work.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs if o not in have)
        model = work
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _conv_stack(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model up to its last tensor before Flatten / GlobalAveragePool (the conv stack)."""
    from onnx import helper

    from onnxcomp.graph import remove_unused_initializers

    cut = next(n for n in model.graph.node if n.op_type in ("Flatten", "GlobalAveragePool")).input[0]
    producers = {o: n for n in model.graph.node for o in n.output}
    keep, todo = set(), [cut]
    while todo:
        node = producers.get(todo.pop())
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            todo.extend(node.input)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in model.graph.node if id(n) in keep]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.output[:]
    out.graph.output.append(helper.make_empty_tensor_value_info(cut))
    remove_unused_initializers(out)
    return out


def speed(names: list[str], lines: list[str]) -> None:
    from onnxcomp import zoo
    from onnxcomp.costmodel import CostModel
    from onnxcomp.passes import REWRITTEN, Context, get_pass

    for arch in names:
        t0 = time.perf_counter()
        base = get_pass("normalize")().run(zoo.build(arch), Context()).model
        feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        costs = CostModel(cache=False, target_ms=400.0)
        chosen = get_pass("winograd")().run(base, Context(cost_model=costs))
        dense = {m: get_pass("winograd")(objective="macs", tile=str(m)).run(base, Context()) for m in (2, 4)}
        grouped = get_pass("winograd")(objective="macs", tile="4", products="grouped").run(base, Context())
        outs = [r.output for r in dense[4].layers if r.action == REWRITTEN]
        ref = _run(base, feeds, outs)
        err = {m: _run(dense[m].model, feeds, outs) for m in (2, 4)}
        lines += [f"## {arch}: per layer (224x224, batch 1, 2 threads)", "",
                  "| layer | C_in -> C_out @ HxW | direct ms | F(2,3) ms | F(4,3) ms | F(2,3)g ms | F(4,3)g ms | "
                  "best speed-up | chosen | multiplications direct / F(4,3) products | F(2,3) err | F(4,3) err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        shapes = {}
        from onnxcomp.shapes import static_shapes
        shapes = static_shapes(base)
        conv_w = {t.name: tuple(t.dims) for t in base.graph.initializer}
        by_name = {n.name: n for n in base.graph.node}
        for rec in chosen.layers:
            lat = rec.figures.get("latency")
            if not lat:
                continue
            node = by_name[rec.node]
            co, ci = conv_w[node.input[1]][:2]
            h = shapes[node.input[0]][2]
            d4 = next(r for r in dense[4].layers if r.node == rec.node)
            mult = d4.figures["multiplications"]
            r = rec.output
            e2 = np.abs(err[2][r] - ref[r]).max() / np.abs(ref[r]).max()
            e4 = np.abs(err[4][r] - ref[r]).max() / np.abs(ref[r]).max()
            pick = (f"F({rec.figures['tile']},3){'g' if rec.figures['products'] == 'grouped conv' else ''}"
                    if rec.action == REWRITTEN else "direct")
            lines.append(f"| {rec.node} | {ci} -> {co} @ {h} | {lat['direct_ms']:.3f} | {lat['F2_ms']:.3f} | "
                         f"{lat['F4_ms']:.3f} | {lat['F2_grouped_ms']:.3f} | {lat['F4_grouped_ms']:.3f} | "
                         f"{lat['speedup']:.2f}x | {pick} | {mult['direct'] / 1e6:.0f}M / "
                         f"{mult['products'] / 1e6:.0f}M | {e2:.1e} | {e4:.1e} |")
        lines.append("")
        variants = {"original": base, "winograd (per-layer choice)": chosen.model,
                    "all eligible F(4,3)": dense[4].model, "all eligible F(4,3)g": grouped.model,
                    "all eligible F(2,3)": dense[2].model}
        for label, models in (("whole model", variants),
                              ("conv stack", {k: _conv_stack(v) for k, v in variants.items()})):
            # This VM has spells of seconds to minutes in which a whole model runs up to 1.5x slower: the
            # set is timed WHOLE_REPEATS times (interleaved each time), a speed-up per timing, the median kept.
            timer = costs.model_timer(list(models.values()), feeds)
            runs = [timer.read(4000.0) for _ in range(WHOLE_REPEATS)]
            del timer
            lines += [f"### {arch}: {label}, interleaved", "",
                      f"| model | p50 ms (median of {WHOLE_REPEATS} timings) | speed-up vs original (median) | "
                      "speed-ups timed |", "|---|---|---|---|"]
            for k, key in enumerate(models):
                ups = sorted(run[0].ms / run[k].ms for run in runs)
                ms = sorted(run[k].ms for run in runs)[len(runs) // 2]
                lines.append(f"| {key} | {ms:.2f} | {ups[len(ups) // 2]:.3f}x | {' '.join(f'{u:.3f}' for u in ups)} |")
            lines.append("")
        n_rw = sum(1 for r in chosen.layers if r.action == REWRITTEN)
        lines.append(f"{arch}: the pass chose Winograd for {n_rw} of {len(outs)} eligible layers "
                     f"({time.perf_counter() - t0:.0f} s for this model).")
        lines.append("")
        print("\n".join(lines[-40:]), flush=True)


def sparsity(lines: list[str]) -> None:
    from onnxcomp import evaldata, zoo
    from onnxcomp.passes import Context, get_pass

    lines += ["## joint sparsity without retraining", "",
              "| model | setting | achieved spatial / Winograd | multiplications skipped spatial / Winograd | score |",
              "|---|---|---|---|---|"]
    r18 = get_pass("normalize")().run(zoo.build("resnet18"), Context()).model
    x = np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32)
    ref = _run(r18, {"input": x})
    ref = next(iter(ref.values()))
    for tile, s in (("2", "0.5:0.5"), ("4", "0.5:0.5"), ("2", "0.3:0.3")):
        res = get_pass("winograd")(objective="macs", tile=tile, sparsity=s).run(r18, Context())
        got = next(iter(_run(res.model, {"input": x}).values()))
        cos = float(np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        lines.append(_sparsity_row("zoo resnet18", tile, s, res, f"output cosine {cos:.4f} (16 random images)"))
    glyph = onnx.load(str(ROOT / "models" / "glyph_resnet.onnx"))
    glyph = get_pass("normalize")().run(glyph, Context()).model
    xt, yt = evaldata.glyph_dataset("test", "all", n=1000)
    def top1(m):
        out = next(iter(_run(m, {m.graph.input[0].name: xt}).values()))
        return float(np.mean(out.argmax(1) == yt))
    lines.append(f"| glyph_resnet | original | - | - | top-1 {top1(glyph):.2%} |")
    for tile, s in (("2", "0.5:0.5"), ("2", "0.3:0.3"), ("4", "0.3:0.3")):
        res = get_pass("winograd")(objective="macs", tile=tile, sparsity=s).run(glyph, Context())
        lines.append(_sparsity_row("glyph_resnet", tile, s, res, f"top-1 {top1(res.model):.2%}"))
    lines.append("")
    print("\n".join(lines[-12:]), flush=True)


def pack_part(lines: list[str]) -> None:
    from onnxcomp import zoo
    from onnxcomp.container import pack
    from onnxcomp.model import model_bytes
    from onnxcomp.passes import Context, get_pass

    def run(model, spec):
        for name, opts in spec:
            model = get_pass(name)(**opts).run(model, Context()).model
        return model

    joint = ("winograd", {"objective": "macs", "tile": "2", "sparsity": "0.5:0.5"})
    q4 = ("uquant", {"bits": 4})
    variants = [("uquant{bits=4}", [q4], ("lzma", "zstd")),
                ("winograd F(2,3) 0.5:0.5, uquant{bits=4} (Winograd weights stored)", [joint, q4], ("lzma",)),
                ("winograd F(2,3) 0.5:0.5, winograd-to-spatial, uquant{bits=4} (spatial weights stored)",
                 [joint, ("winograd-to-spatial", {}), q4], ("lzma",))]
    lines += ["## pack: universal quantization + lossless coding (zoo vgg16)", "",
              "| model | part | fp32 .onnx bytes | coder | packed bytes | ratio | entropy bound of the codes | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    whole = get_pass("normalize")().run(zoo.build("vgg16"), Context()).model
    for part, base in (("whole model", whole), ("conv stack", _conv_stack(whole))):
        fp32 = len(model_bytes(base))
        for label, spec, coders in variants:
            q = run(base, spec)
            for coder in coders:
                t0 = time.perf_counter()
                blob, stats = pack(q, coder)
                lines.append(f"| {label} | {part} | {fp32:,} | {coder} | {len(blob):,} | {fp32 / len(blob):.2f}x | "
                             f"{stats.entropy_bytes:,} | {time.perf_counter() - t0:.1f} |")
                print(lines[-1], flush=True)
    lines.append("")


def _sparsity_row(name, tile, setting, res, score):
    tot = res.figures.get("sparsity", {})
    recs = [r for r in res.layers if "sparsity" in r.figures]
    s = np.mean([r.figures["sparsity"]["spatial"] for r in recs]) if recs else 0.0
    w = np.mean([r.figures["sparsity"]["winograd"] for r in recs]) if recs else 0.0
    return (f"| {name} | F({tile},3) {setting} | {s:.2f} / {w:.2f} ({len(recs)} layers) | "
            f"{tot.get('spatial_skipped', 0):.1%} / {tot.get('winograd_skipped', 0):.1%} | {score} |")


def output_stage(lines: list[str]) -> None:
    """The form's output transform alone, interleaved: the MatMul by kron(A^T, A^T) followed by
    DepthToSpace (the body before 2026-12-06) against the ConvTranspose by A^T that replaced it."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxcomp.costmodel import CostModel
    from onnxcomp.linalg.winograd import output_transform_matrix, transforms

    m, a2 = 4, 36
    kron = output_transform_matrix(transforms(m)).astype(np.float32)  # [m*m, a*a]
    lines += ["## F(4,3) output stage alone: MatMul + DepthToSpace vs ConvTranspose (interleaved)", "",
              "| C_out @ tiles | MatMul + DepthToSpace ms | ConvTranspose ms | speed-up | max abs difference |",
              "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for co, t in ((64, 56), (128, 28), (256, 14), (512, 7), (512, 4)):
        x = rng.standard_normal((1, a2, co * t * t)).astype(np.float32)

        def model(nodes, inits, shape=x.shape):
            g = helper.make_graph(nodes, "stage", [helper.make_tensor_value_info("P", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
            out = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            out.ir_version = 8
            return out

        old = model([helper.make_node("MatMul", ["A", "P"], ["y"]), helper.make_node("Reshape", ["y", "s"], ["b"]),
                     helper.make_node("DepthToSpace", ["b"], ["Y"], blocksize=m, mode="DCR")],
                    {"A": kron, "s": np.array([-1, m * m * co, t, t], np.int64)})
        new = model([helper.make_node("Reshape", ["P", "g"], ["p"]),
                     helper.make_node("ConvTranspose", ["p", "W"], ["y"], strides=[m, m]),
                     helper.make_node("Reshape", ["y", "s"], ["Y"])],
                    {"W": np.ascontiguousarray(kron.T.reshape(a2, 1, m, m)), "g": np.array([-1, a2, co * t, t], np.int64),
                     "s": np.array([-1, co, t * m, t * m], np.int64)})
        diff = float(np.abs(_run(old, {"P": x})["Y"] - _run(new, {"P": x})["Y"]).max())
        est = CostModel(cache=False).time_models([old, new], {"P": x}, min_runs=30, target_ms=3000.0)
        lines.append(f"| {co} @ {t}x{t} | {est[0].ms:.3f} | {est[1].ms:.3f} | {est[0].ms / est[1].ms:.2f}x | {diff:.1e} |")
    lines.append("")
    print("\n".join(lines[-10:]), flush=True)


def _grouped_layer(geom, inits: dict, points: list[float], fused: bool) -> onnx.ModelProto:
    """A grouped F(4,3) WinogradConv + Relu over x [1, C_in, H, W]; its bias on the products'
    Conv (`fused`) or added by an Add after the call (as the body before 2026-12-07 did inside)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxcomp.passes.winograd import function as fn

    if fused:
        nodes = [fn.call(["x", "u", "k", "a", "b"], "c", "winograd", geom, points, True, True)]
    else:
        nodes = [fn.call(["x", "u", "k", "a"], "c0", "winograd", geom, points, False, True),
                 helper.make_node("Add", ["c0", "bias_planes"], ["c"])]
    nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    shape = [1, geom.c_in, geom.height, geom.width]
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    out = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(fn.DOMAIN, 1)],
                            functions=[fn.function(17, bias=fused, crop=geom.crop, grouped=True)])
    out.ir_version = 8
    return out


def bias_part(lines: list[str]) -> None:
    """One grouped F(4,3) layer (bias, Relu) at vgg16's shapes: the bias as an Add over the output
    (the body before 2026-12-07) against the bias on the products' Conv (at the point-1 tile
    position, `function.point_one`), interleaved, five pairings, the median ratio kept."""
    from onnxcomp.costmodel import CostModel
    from onnxcomp.linalg import winograd as wg
    from onnxcomp.passes.winograd import function as fn

    t = wg.transforms(4)
    points = [float(p) for p in t.points]
    lines += ["## F(4,3) grouped layer with bias and Relu: bias by Add vs on the products' Conv (interleaved)", "",
              "| C_in -> C_out @ HxW | Add ms | on the products ms | speed-up (median of 5) | pairings | max abs difference |",
              "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for ci, co, hw in ((128, 256, 56), (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 14)):
        w = (rng.standard_normal((co, ci, 3, 3)) * (2 / (9 * ci)) ** 0.5).astype(np.float32)
        bias = rng.standard_normal(co).astype(np.float32)
        geom = fn.Geometry(4, ci, co, hw, hw, (1, 1, 1, 1))
        inits = {"u": wg.filter_transform(w.astype(np.float64), t).astype(np.float32),
                 "k": wg.input_transform_kernel(t).astype(np.float32),
                 "a": wg.output_transform_matrix(t).astype(np.float32), "b": bias,
                 "bias_planes": bias.reshape(co, 1, 1)}

        add, fused = (_grouped_layer(geom, inits, points, f) for f in (False, True))
        x = {"x": rng.standard_normal((1, ci, hw, hw)).astype(np.float32)}
        diff = float(np.abs(_run(add, x)["y"] - _run(fused, x)["y"]).max())
        cm = CostModel(cache=False)
        pairs = sorted((e[0].ms, e[1].ms) for e in (cm.time_models([add, fused], x, target_ms=1000.0) for _ in range(5)))
        ratios = sorted(a / f for a, f in pairs)
        mid = next(p for p in pairs if p[0] / p[1] == ratios[2])
        lines.append(f"| {ci} -> {co} @ {hw} | {mid[0]:.3f} | {mid[1]:.3f} | {ratios[2]:.3f}x | "
                     f"{' '.join(f'{r:.3f}' for r in ratios)} | {diff:.1e} |")
    lines.append("")
    print("\n".join(lines[-8:]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("speed", "stage", "bias", "sparsity", "pack", "all"), default="all")
    ap.add_argument("--models", default="vgg16,resnet18")
    ap.add_argument("--out", default=str(HERE / "out" / "winograd.md"))
    args = ap.parse_args()
    import onnxruntime as ort

    from onnxcomp.costmodel import machine

    mach = machine()
    lines = ["# Winograd form vs onnxruntime's Conv", "",
             f"onnxruntime {ort.__version__}, {mach['cpu']} ({', '.join(mach['isa'])}), 2 threads; "
             f"`python benchmarks/winograd.py --part {args.part}`", ""]
    if args.part in ("speed", "all"):
        speed([m for m in args.models.split(",") if m], lines)
    if args.part in ("stage", "all"):
        output_stage(lines)
    if args.part in ("bias", "all"):
        bias_part(lines)
    if args.part in ("sparsity", "all"):
        sparsity(lines)
    if args.part in ("pack", "all"):
        pack_part(lines)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
