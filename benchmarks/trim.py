"""Channel trimming by value locality against magnitude (L1) filter pruning, on specialized tasks.

Per model, the pass calibrates on data of a narrow task and is scored on held-apart data of the same
task (never seen by the pass):
* glyph_resnet / glyph_mobilenetv2 (62 glyph classes) specialized to the 10 digits: calibration on
  `calib/digits` (200 images), top-1 accuracy on `test/digits` (1000), argmax over all 62 logits;
* ppocr_cls (PP-OCR orientation) and ppocr_rec (the 6625-class Chinese/Latin PP-OCRv4 recognizer) on
  rendered Latin text lines only: accuracy on labels (cls) and the share of test lines whose CTC
  argmax sequence equals the original model's (rec).
Rows: the default threshold (only near-constant channels), then MAC targets 0.2 / 0.3 / 0.4 for
`criterion=locality` (metric std, and output), `border=interior`, `round=8`, and `criterion=l1` (the
same folding, limits and rounding; only the choice of channels differs), then least-squares refits
(`refit=on|sequential`; not on the recognizer, whose ~40 refit layers take minutes per row). Figures: conv MACs removed, params, onnxruntime latency ratio against the
original (interleaved in one process, p50 of several rounds, 2 threads), the task score, seconds.
No guard: these are the pass's own choices; `onnxcomp optimize` would check them on held-out data.

Part `models`: every zoo, onnx light_* and rapidocr model through the pass (benchmarks/out/trim_models.md).

Part `rounding` (benchmarks/out/trim_rounding.md): at each MAC target, kept counts rounded to the step
measured on this machine (`round=latency`, the default) against fixed steps 16 and 8 and no rounding:
the original and the trimmed models timed interleaved in one process (p50 ratios over several rounds),
with MACs and task score.

    python benchmarks/trim.py [--part tasks|models|rounding|all] [--only glyph_resnet,ppocr_cls] [--quick] [--out benchmarks/out/trim.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TARGETS = (0.2, 0.3, 0.4)


@dataclass
class Case:
    name: str
    path: Path
    calib: np.ndarray
    test: tuple[np.ndarray, np.ndarray | None]
    shape: list[int]
    metric: str  # classify | sequence
    note: str


def cases(names: list[str] | None, quick: bool) -> list[Case]:
    from onnxcomp import evaldata

    out = []
    for stem in ("glyph_resnet", "glyph_mobilenetv2"):
        if not names or stem in names:
            xt, yt = evaldata.glyph_dataset("test", "digits", n=500 if quick else None)
            out.append(Case(stem, ROOT / "models" / f"{stem}.onnx", evaldata.glyph_dataset("calib", "digits")[0],
                            (xt, yt), [1, 1, 32, 32], "classify", "62 glyph classes, specialized to digits"))
    root = evaldata.ppocr_cls_model_path().parent
    if not names or "ppocr_cls" in names:
        out.append(Case("ppocr_cls", evaldata.ppocr_cls_model_path(), evaldata.ppocr_cls_dataset(n=128, seed=2)[0],
                        evaldata.ppocr_cls_dataset(n=200 if quick else 400, seed=1), [1, 3, 48, 192], "classify",
                        "PP-OCR orientation, rendered Latin lines"))
    if not names or "ppocr_rec" in names:
        out.append(Case("ppocr_rec", root / "ch_PP-OCRv4_rec_infer.onnx", evaldata.ppocr_rec_dataset(n=128, seed=2)[0],
                        (evaldata.ppocr_rec_dataset(n=60 if quick else 120, seed=1)[0], None), [1, 3, 48, 320],
                        "sequence", "PP-OCRv4 recognizer (6625 classes), rendered Latin lines"))
    return out


def outputs(model: onnx.ModelProto, x: np.ndarray, batch: int = 32) -> np.ndarray:
    from onnxcomp.runtime import make_session

    sess = make_session(model, optimize=True, threads=2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def score(case: Case, out: np.ndarray, ref: np.ndarray) -> float:
    from onnxcomp import evaldata

    if case.metric == "classify":
        return evaldata.accuracy(out.reshape(len(out), -1), case.test[1])
    return 100.0 * float(np.mean((out.argmax(-1) == ref.argmax(-1)).all(axis=1)))


def conv_macs(model: onnx.ModelProto, shape: list[int]) -> int:
    from onnxcomp.analysis import layer_costs

    name = model.graph.input[0].name
    return sum(c.macs or 0 for c in layer_costs(model, {name: shape}) if c.op == "Conv")


def run_case(case: Case, runs: int, rounds: int) -> list[dict]:
    from onnxcomp.analysis import count_params
    from onnxcomp.data import open_source
    from onnxcomp.model import load_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.runtime import measure_latency

    model = Pipeline.parse("normalize").run(load_model(case.path), Context())[0]
    inp = model.graph.input[0].name
    ref = outputs(model, case.test[0])
    base = {"model": case.name, "config": "original", "conv_macs_removed": 0.0, "params_ratio": 1.0,
            "latency_ratio": 1.0, "latency_ratio_b8": 1.0, "task": score(case, ref, ref), "seconds": 0.0,
            "metric": case.metric}
    rows = [base]
    macs0, params0 = conv_macs(model, case.shape), count_params(model)
    configs = [("threshold (default)", "trim")]
    refit_rows = [] if case.name == "ppocr_rec" else [  # rec: ~40 refit layers, minutes per row
        ("output-error target 0.3, refit=sequential", "trim{target=0.3,metric=output,refit=sequential}"),
        ("locality target 0.4, refit=on", "trim{target=0.4,refit=on}"),
        ("locality target 0.4, refit=sequential", "trim{target=0.4,refit=sequential}")]
    for t in TARGETS:
        configs += [(f"locality target {t:g}", f"trim{{target={t}}}"),
                    (f"locality target {t:g}, border=interior", f"trim{{target={t},border=interior}}"),
                    *([(f"locality target {t:g}, round=8", f"trim{{target={t},round=8}}"),
                       (f"locality target {t:g}, round=16", f"trim{{target={t},round=16}}")] if t == 0.3 else []),
                    (f"output-error target {t:g}", f"trim{{target={t},metric=output}}"),
                    (f"L1 target {t:g}", f"trim{{target={t},criterion=l1}}")]
    for label, spec in configs + refit_rows:
        ctx = Context(data=open_source({inp: case.calib}, model=model, batch_size=32),
                      input_shapes={inp: case.shape})
        t0 = time.perf_counter()
        out, _ = Pipeline.parse(spec, normalize=False).run(model, ctx)
        seconds = time.perf_counter() - t0
        lat = [measure_latency([model, out], {inp: case.test[0][:b]}, runs=runs, rounds=rounds,
                               names=["original", label])[1].ratio for b in (1, 8)]
        row = {"model": case.name, "config": label, "conv_macs_removed": 1 - conv_macs(out, case.shape) / macs0,
               "params_ratio": params0 / max(count_params(out), 1), "latency_ratio": lat[0], "latency_ratio_b8": lat[1],
               "task": score(case, outputs(out, case.test[0]), ref), "seconds": seconds, "metric": case.metric}
        rows.append(row)
        print(f"{case.name:<18} {label:<38} conv MACs -{100 * row['conv_macs_removed']:5.1f}%  latency "
              f"{row['latency_ratio']:.3f} / b8 {row['latency_ratio_b8']:.3f}  task {row['task']:.2f} (orig {base['task']:.2f})  ({seconds:.1f} s)",
              flush=True)
    return rows


ROUNDINGS = ("latency", "16", "8", "1")


def rounding_rows(case: Case, runs: int, rounds: int) -> list[dict]:
    """Per MAC target: the same selection with kept counts rounded to the step measured here
    (round=latency), to 16, to 8 and not at all, timed side by side with the original."""
    from onnxcomp.data import open_source
    from onnxcomp.model import load_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.runtime import measure_latency

    model = Pipeline.parse("normalize").run(load_model(case.path), Context())[0]
    inp = model.graph.input[0].name
    ref = outputs(model, case.test[0])
    macs0 = conv_macs(model, case.shape)
    rows = []
    for t in TARGETS:
        outs, secs, step = {}, {}, None
        for rnd in ROUNDINGS:
            ctx = Context(data=open_source({inp: case.calib}, model=model, batch_size=32),
                          input_shapes={inp: case.shape})
            t0 = time.perf_counter()
            outs[rnd], rep = Pipeline.parse(f"trim{{target={t},round={rnd}}}", normalize=False).run(model, ctx)
            secs[rnd] = time.perf_counter() - t0
            if rnd == "latency":
                step = rep.passes[-1].figures.get("rounding", {}).get("step")
        lat = {b: measure_latency([model, *outs.values()], {inp: case.test[0][:b]}, runs=runs, rounds=rounds,
                                  names=["original", *(f"round={r}" for r in ROUNDINGS)])[1:] for b in (1, 8)}
        for k, rnd in enumerate(ROUNDINGS):
            rows.append({"model": case.name, "target": t, "round": rnd if rnd != "latency" else f"latency (step {step})",
                         "latency_ratio": lat[1][k].ratio, "latency_ratio_b8": lat[8][k].ratio,
                         "conv_macs_removed": 1 - conv_macs(outs[rnd], case.shape) / macs0,
                         "task": score(case, outputs(outs[rnd], case.test[0]), ref), "seconds": secs[rnd]})
        print(f"{case.name:<18} target {t:g}: " + "  ".join(
            f"round={r['round']} {r['latency_ratio']:.3f} (-{100 * r['conv_macs_removed']:.1f}%)"
            for r in rows[-len(ROUNDINGS):]), flush=True)
    return rows


def _markdown(header: str, columns: list[str], cells: list[list[str]], notes: str) -> str:
    """A report: the header, one markdown table, a note under it."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([*lines, "", notes]) + "\n"


def _task_cells(r: dict) -> list[str]:
    """The columns every task table ends with: latency at batch 1 and 8, task score, pass seconds."""
    return [f"{r['latency_ratio']:.3f}", f"{r['latency_ratio_b8']:.3f}", f"{r['task']:.2f}", f"{r['seconds']:.1f}"]


def render_rounding(rows: list[dict], header: str) -> str:
    return _markdown(header, ["model", "target", "round", "conv MACs removed", "latency, batch 1", "latency, batch 8",
                              "task score", "pass s"],
                     [[r["model"], f"{r['target']:g}", r["round"], f"{100 * r['conv_macs_removed']:.1f}%", *_task_cells(r)]
                      for r in rows],
                     "Latency: the trimmed model's p50 over the original's; the original and the four roundings "
                     "interleaved in one process (< 1 is faster). `round=latency` measures the step this machine's convs "
                     "run channel counts in (onnxcomp/passes/trim/latency.py; cached on disk after the first run).")


def model_rows() -> list[dict]:
    """Every zoo model, onnx light_* model and rapidocr model through normalize + trim{target=0.2}
    on 8 random samples: trimmed or skipped with reasons, output valid and loadable, same shapes."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tests"))
    from _helpers import input_shapes_for, light_model_paths, ppocr_model_paths

    from onnxcomp import zoo
    from onnxcomp.data import open_source
    from onnxcomp.model import runtime_compatible
    from onnxcomp.passes.base import Context
    from onnxcomp.passes.normalize import NormalizePass
    from onnxcomp.passes.trim import TrimPass

    sources = [(f"zoo {n}", lambda n=n: zoo.build(n), None) for n in zoo.ZOO]
    sources += [(p.stem, lambda p=p: onnx.load(str(p)), p) for p in light_model_paths() + ppocr_model_paths()]
    rows = []
    for label, load, path in sources:
        t0 = time.perf_counter()
        model = NormalizePass().run(load(), Context()).model
        shapes = input_shapes_for(model, path)
        (name, shape), = shapes.items()
        x = np.random.default_rng(0).standard_normal((8, *shape[1:])).astype(np.float32)
        result = TrimPass(target=0.2, samples=8).run(model, Context(data=open_source({name: x}, model=model,
                                                                                    batch_size=4), input_shapes=shapes))
        out = result.model
        runtime_compatible(out)
        onnx.checker.check_model(out)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ref = ort.InferenceSession(model.SerializeToString(), so).run(None, {name: x[:1]})
        got = ort.InferenceSession(out.SerializeToString(), so).run(None, {name: x[:1]})
        same = [g.shape for g in got] == [r.shape for r in ref]
        reasons = result.figures["blocked_reasons"]
        rows.append({"model": label, "rewritten": sum(r.action == "rewritten" for r in result.layers),
                     "layers": len(result.layers), "macs": result.figures["macs_removed_fraction"],
                     "same_shapes": same, "blocked": "; ".join(f"{k} ({v})" for k, v in list(reasons.items())[:3]),
                     "seconds": time.perf_counter() - t0})
        print(f"{label:<32} rewritten {rows[-1]['rewritten']:>3}/{rows[-1]['layers']:<3} MACs -{100 * (rows[-1]['macs'] or 0):.1f}%"
              f"  shapes {'ok' if same else 'CHANGED'}  ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows


def render_models(rows: list[dict], header: str) -> str:
    return _markdown(header, ["model", "layers rewritten", "MACs removed", "output shapes",
                              "channels blocked by (groups)", "s"],
                     [[r["model"], f"{r['rewritten']}/{r['layers']}", f"{100 * (r['macs'] or 0):.1f}%",
                       "same" if r["same_shapes"] else "CHANGED", r["blocked"], f"{r['seconds']:.1f}"] for r in rows],
                     "normalize + `trim{target=0.2,samples=8}` on 8 random samples; every output passes onnx's checker "
                     "and loads in onnxruntime.")


def render(rows: list[dict], header: str) -> str:
    return _markdown(header, ["model", "config", "conv MACs removed", "params", "latency, batch 1", "latency, batch 8",
                              "task score", "pass s"],
                     [[r["model"], r["config"], f"{100 * r['conv_macs_removed']:.1f}%", f"{r['params_ratio']:.2f}x",
                       *_task_cells(r)] for r in rows],
                     "Task score: top-1 % on the task's test labels (classify), or % of test lines whose CTC argmax "
                     "sequence equals the original model's (sequence). Latency: the trimmed model's p50 over the "
                     "original's, interleaved in one process (< 1 is faster).")


def main(argv: list[str] | None = None) -> int:
    from onnxcomp.costmodel import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("tasks", "models", "rounding", "all"), default="all",
                    help="tasks: the specialized-task table; models: every real model runs through trim; "
                         "rounding: round=latency against fixed steps")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--quick", action="store_true", help="smaller test sets and fewer timing runs")
    ap.add_argument("--out", default=str(HERE / "out" / "trim.md"))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or None
    runs, rounds = (10, 3) if args.quick else (30, 5)
    m = machine()
    where = f"on {m['cpu']}, onnxruntime {m['onnxruntime']}, 2 threads, {time.strftime('%Y-%m-%d')}."
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.part in ("models", "all"):
        out = Path(args.out).with_name("trim_models.md")
        out.write_text(render_models(model_rows(), f"# trim on every real model\n\n`python benchmarks/trim.py "
                                                   f"--part models` {where}"))
        print(f"wrote {out}")
    if args.part in ("tasks", "all"):
        rows = []
        for case in cases(names, args.quick):
            rows.extend(run_case(case, runs, rounds))
        header = (f"# trim: value locality vs L1 filter pruning on specialized tasks\n\n"
                  f"`python benchmarks/trim.py{' --quick' if args.quick else ''}` {where}")
        Path(args.out).write_text(render(rows, header))
        print(f"wrote {args.out}")
    if args.part in ("rounding", "all"):
        rows = []
        for case in cases(names, args.quick):
            rows.extend(rounding_rows(case, runs, rounds))
        out = Path(args.out).with_name("trim_rounding.md")
        out.write_text(render_rounding(rows, f"# trim: kept counts rounded to the measured step vs fixed steps\n\n"
                                             f"`python benchmarks/trim.py --part rounding` {where}"))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
