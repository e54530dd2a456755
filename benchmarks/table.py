"""Side-by-side table: every pipeline on every trained model, against onnxruntime's own int8.

For each model (the trained glyph CNNs in models/ and PP-OCR's real orientation classifier) and each
pipeline (each pass alone at a default and an aggressive setting, the shipped default recipe, and
onnxruntime's `quantize_static` int8 as the baseline a user would pick instead; PP-OCR's recognizer
and detector get the baseline and the default recipe only), it prints:
file bytes, lzma bytes, size ratio (lzma, original/compressed), MACs ratio, ORT p50 latency ratio
(original/compressed, interleaved runs in one process), accuracy and its drop.

Writes benchmarks/out/table.{md,json,png}, stamped with the date and git commit.

    python benchmarks/table.py                  # everything (~10 min on 2 cores)
    python benchmarks/table.py --models glyph_resnet --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import onnxcomp
from onnxcomp import evaldata
from onnxcomp.analysis import total_macs
from onnxcomp.model import load_model, model_bytes, save_model
from onnxcomp.runtime import make_session, measure_latency

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"

# (label, pipeline). The int8 row is onnxruntime's quantize_static, wrapped only to share calibration.
PIPELINES: list[tuple[str, str]] = [
    ("tucker evbmf", "tucker"),
    ("tucker evbmf+refit", "tucker{refit=on}"),
    ("tucker evbmf w=0.5+refit", "tucker{weaken=0.5,refit=on}"),
    ("tucker response e=0.98", "tucker{method=response,rank=energy:0.98}"),
    ("tucker budget 0.5+refit (aggressive)", "tucker{budget=macs:0.5,refit=on}"),
    ("ort int8 (baseline)", "int8"),
    ("default recipe", "default"),
]


HEAVY_PIPELINES = ("ort int8 (baseline)", "default recipe")


@dataclass
class Case:
    name: str
    path: Path
    test: tuple[np.ndarray, np.ndarray | None]
    calib: tuple[np.ndarray, np.ndarray | None]
    note: str
    # how "acc %" is read: classify = top-1 accuracy on labels; sequence = share of test lines whose
    # CTC argmax sequence equals the original model's; map = share of pixels whose text/no-text call
    # (probability > 0.3, PP-OCR's DB threshold) equals the original model's
    metric: str = "classify"
    heavy: bool = False  # only the baseline and the default recipe (each guarded Tucker run takes minutes)
    texts: list[str] | None = None  # a recognizer's test lines as rendered (its real labels)


def load_cases(names: list[str] | None, quick: bool) -> list[Case]:
    n_test = 620 if quick else 62 * 40
    cases = []
    for stem in ("glyph_resnet", "glyph_mobilenetv2"):
        if names and stem not in names:
            continue
        cases.append(Case(stem, ROOT / "models" / f"{stem}.onnx",
                          evaldata.glyph_dataset("test", n=n_test), evaldata.glyph_dataset("calib"),
                          "62-class glyphs, test split"))
    if not names or "ppocr_cls" in names:
        cases.append(Case("ppocr_cls", evaldata.ppocr_cls_model_path(),
                          evaldata.ppocr_cls_dataset(n=200 if quick else 600, seed=1),
                          evaldata.ppocr_cls_dataset(n=128, seed=2),
                          "PP-OCR mobile v2.0 text orientation, rendered lines"))
    root = evaldata.ppocr_cls_model_path().parent
    if not names or "ppocr_rec" in names:
        x_rec, texts = evaldata.ppocr_rec_dataset(n=100 if quick else 200, seed=1)
        cases.append(Case("ppocr_rec", root / "ch_PP-OCRv4_rec_infer.onnx", (x_rec, None),
                          (evaldata.ppocr_rec_dataset(n=128, seed=2)[0], None),
                          "PP-OCRv4 recognizer, rendered lines 3x48x320", metric="sequence", heavy=True,
                          texts=texts))
    if not names or "ppocr_det" in names:
        cases.append(Case("ppocr_det", root / "ch_PP-OCRv4_det_infer.onnx",
                          (evaldata.ppocr_det_dataset(n=16 if quick else 32, seed=1), None),
                          (evaldata.ppocr_det_dataset(n=48, seed=2), None),
                          "PP-OCRv4 detector, rendered pages 3x320x320", metric="map", heavy=True))
    return cases


def outputs_of(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = make_session(model, optimize=True, threads=2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def task_score(case: Case, model: onnx.ModelProto, reference: np.ndarray | None,
               outputs: np.ndarray | None = None) -> float:
    """The case's "acc %" (see Case.metric); `reference` is the original model's output on the test set,
    `outputs` the model's own when the caller has them already (not run again)."""
    x, y = case.test
    if case.metric == "classify":
        return accuracy_of(model, x, y)
    out = outputs_of(model, x) if outputs is None else outputs
    if reference is None:
        return 100.0
    if case.metric == "sequence":
        return 100.0 * float(np.mean((out.argmax(-1) == reference.argmax(-1)).all(axis=1)))
    return 100.0 * float(np.mean((out > 0.3) == (reference > 0.3)))


def text_scores(case: Case, out: np.ndarray) -> tuple[float, float] | None:
    """A recognizer's (% lines read exactly, % character accuracy) against the rendered texts, CTC
    decoded greedily as rapidocr does; None for other cases."""
    if case.texts is None:
        return None
    return evaldata.text_accuracy(evaldata.ctc_greedy_texts(out, evaldata.ctc_characters(case.path)), case.texts)


def accuracy_of(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    sess = make_session(model, optimize=True, threads=2)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return evaldata.accuracy(logits.reshape(len(x), -1), y)


def sizes(model: onnx.ModelProto) -> tuple[int, int]:
    raw = model_bytes(model)
    return len(raw), len(lzma.compress(raw, preset=6))


def run_case(case: Case, pipelines: list[tuple[str, str]], runs: int, rounds: int) -> list[dict]:
    original = load_model(case.path)
    input_name = next(i.name for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer})
    shape = [1, *case.test[0].shape[1:]]
    calib = {input_name: case.calib[0]}
    if case.calib[1] is not None:
        calib["labels"] = case.calib[1]
    rows: list[dict] = []
    variants: list[tuple[str, onnx.ModelProto, dict]] = []
    base_bytes, base_lzma = sizes(original)
    base_macs = total_macs(original, {input_name: shape})
    reference = None if case.metric == "classify" else outputs_of(original, case.test[0])
    base_acc = task_score(case, original, None if case.metric == "classify" else reference)
    variants.append(("original", original, {"seconds": 0.0}))
    for label, spec in pipelines:
        if case.heavy and label not in HEAVY_PIPELINES and pipelines is PIPELINES:
            continue
        t0 = time.perf_counter()
        try:
            out, report = onnxcomp.optimize(original, spec, data=calib, seed=0, input_shapes={input_name: shape})
        except Exception as exc:  # a pipeline that cannot run on this model is a row, not a crash
            rows.append({"model": case.name, "pipeline": label, "spec": spec, "error": f"{type(exc).__name__}: {exc}"})
            continue
        # Round-trip through a file: what the user would deploy, and what onnxruntime loads.
        with tempfile.TemporaryDirectory() as tmp:
            save_model(out, Path(tmp) / "m.onnx")
            out = load_model(Path(tmp) / "m.onnx")
        guard = report.guard or {}
        variants.append((label, out, {"seconds": time.perf_counter() - t0, "spec": spec,
                                      "rewritten": sum(p.rewritten for p in report.passes),
                                      "guard_seconds": guard.get("seconds"),
                                      "put_back": sum(len(p.guard["restored"]) for p in report.passes if p.guard),
                                      "dropped": [p.name for p in report.passes if p.guard and p.guard.get("dropped")]}))
    latency = measure_latency([m for _, m, _ in variants], {input_name: case.test[0][:1]},
                              threads=2, warmup=10, runs=runs, rounds=rounds, names=[v[0] for v in variants])
    for (label, model, extra), lat in zip(variants, latency, strict=True):
        nbytes, nlzma = sizes(model)
        macs = total_macs(model, {input_name: shape})
        acc = base_acc if label == "original" else task_score(case, model, reference)
        rows.append({
            "model": case.name, "pipeline": label, "spec": extra.get("spec", ""),
            "bytes": nbytes, "lzma_bytes": nlzma, "size_ratio": base_lzma / nlzma,
            "macs": macs, "macs_ratio": (base_macs / macs) if base_macs and macs else None,
            "p50_ms": lat.p50_ms, "latency_ratio": 1.0 / lat.ratio,
            "latency_ratio_spread": [1.0 / lat.ratio_max, 1.0 / lat.ratio_min],
            "accuracy": acc, "accuracy_drop": base_acc - acc,
            "optimize_seconds": extra["seconds"], "rewritten_layers": extra.get("rewritten"),
            "guard_seconds": extra.get("guard_seconds"), "layers_put_back": extra.get("put_back"),
            "passes_dropped": extra.get("dropped"), "metric": case.metric,
        })
    return rows


def render(rows: list[dict], stamp: str) -> str:
    head = ["model", "pipeline", "file bytes", "lzma bytes", "size x", "MACs x", "latency x", "acc %", "drop",
            "s (guard s)", "put back / dropped"]
    lines = [f"# onnxcomp benchmark table\n\n{stamp}\n",
             "size x = original lzma bytes / compressed lzma bytes; MACs x and latency x = original / compressed "
             "(latency: onnxruntime p50, batch 1, 2 threads, interleaved runs; [min-max] over rounds). "
             "acc %: top-1 on labels for the classifiers; for ppocr_rec the share of test lines whose CTC argmax "
             "sequence equals the original's; for ppocr_det the share of pixels whose text/no-text call (p > 0.3) "
             "equals the original's. Every run is guarded (held-out quarter of the calibration data, the "
             "recipe's tolerance or the default); s = optimize seconds, guard s = of which checking and repairing; "
             "put back = layers the guard restored, dropped = passes it dropped.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['pipeline']} | error: {r['error'][:80]} |" + " |" * (len(head) - 3))
            continue
        lo, hi = r["latency_ratio_spread"]
        lines.append("| " + " | ".join([
            r["model"], r["pipeline"], f"{r['bytes']:,}", f"{r['lzma_bytes']:,}", f"{r['size_ratio']:.2f}",
            f"{r['macs_ratio']:.2f}" if r["macs_ratio"] else "-", f"{r['latency_ratio']:.2f} [{lo:.2f}-{hi:.2f}]",
            f"{r['accuracy']:.2f}", f"{r['accuracy_drop']:+.2f}",
            f"{r['optimize_seconds']:.1f} ({r['guard_seconds']:.1f})" if r.get("guard_seconds") is not None else
            f"{r['optimize_seconds']:.1f}",
            (f"{r['layers_put_back']}" + (f" / {', '.join(r['passes_dropped'])}" if r.get("passes_dropped") else ""))
            if r["pipeline"] != "original" else "-",
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == model and "error" not in r]
        ax.scatter([r["size_ratio"] for r in pts], [r["accuracy"] for r in pts], label=model)
        for r in pts:
            ax.annotate(r["pipeline"], (r["size_ratio"], r["accuracy"]), fontsize=7, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("size reduction (lzma bytes, original / compressed)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None,
                    help="subset: glyph_resnet glyph_mobilenetv2 ppocr_cls ppocr_rec ppocr_det")
    ap.add_argument("--quick", action="store_true", help="smaller test sets and fewer timing runs")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--pipeline", action="append", default=[], metavar="LABEL=SPEC",
                    help="run these pipelines instead of the standard set (repeatable)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    runs = args.runs or (20 if args.quick else 60)
    rounds = args.rounds or (2 if args.quick else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/out"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    stamp = (f"measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on commit {commit or '?'}"
             f"{' (+uncommitted changes)' if dirty else ''}, onnxcomp {onnxcomp.__version__}")
    pipelines = [tuple(p.split("=", 1)) for p in args.pipeline] or PIPELINES
    t0 = time.perf_counter()
    rows: list[dict] = []
    for case in load_cases(args.models, args.quick):
        print(f"== {case.name}", file=sys.stderr, flush=True)
        rows.extend(run_case(case, pipelines, runs, rounds))
    text = render(rows, stamp + f", {time.perf_counter() - t0:.0f}s in all")
    print(text)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=2))
    plot(rows, out / "table.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
