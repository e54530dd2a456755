"""`onnxcomp search` against the default recipe on the trained models, and how trials scale.

Part `models`: per trained model of `models/` (glyph_resnet, glyph_mobilenetv2; 62 glyph classes):
* the default recipe (`optimize -p default`, guarded) on the calibration split with labels;
* `onnxcomp search --objective lzma --max-top1-drop 1` on the same data, default space, 2 workers,
  `--time-budget` seconds (default 540: the whole search, the warm start's probes and the front's
  re-check included);
* both models, and int8, scored on the test split (6200 images, labels): top-1, lzma bytes, ratio.
The fronts' PNGs go to benchmarks/out/search_<model>.png.

Part `scaling`: the same 8 trials on glyph_resnet (no cache, `--warm-start mild`, so no probes) with 1
and 2 local workers and with Ray on this machine (2 CPUs): trials per minute.

Part `front`: a two-objective search (lzma bytes and measured latency, NSGA-II) on glyph_resnet, one
worker (so each trial's latency is timed with the machine to itself), `--time-budget` seconds; the
front's members scored on the test split; its PNG is benchmarks/out/search_front_glyph_resnet.png.

    python benchmarks/search.py [--part models|scaling|front|all] [--budget 540] [--out benchmarks/out/search.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ("glyph_resnet", "glyph_mobilenetv2")


def _top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: x[i:i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
    return float(np.mean(preds == y) * 100)


def _onnxcomp(*args: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxcomp", *args], capture_output=True, text=True)
    if p.returncode:  # 1 (nothing held) says why on stderr too
        print(p.stderr[-2000:], file=sys.stderr)
    return p.returncode, p.stdout, time.perf_counter() - t0


def models_part(lines: list[str], budget: float, models: tuple[str, ...] = MODELS) -> None:
    from onnxcomp import evaldata
    from onnxcomp.sizes import lzma_bytes

    xt, yt = evaldata.glyph_dataset("test", "all")
    lines += ["## search vs the default recipe (trained models, test split: 6200 images)", "",
              f"Search: default space, `--objective lzma --max-top1-drop 1`, 2 workers, `--time-budget {budget:.0f}`.", "",
              "| model | variant | lzma bytes | vs original | top-1 (test) | drop | seconds | pipeline |",
              "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        calib = t / "calib.npz"
        x, y = evaldata.glyph_dataset("calib", "all")
        evaldata.save_npz(str(calib), x, y, "input")
        for stem in models:
            src = ROOT / "models" / f"{stem}.onnx"
            base_acc, base_lzma = _top1(src, xt, yt), lzma_bytes(str(src))
            lines.append(f"| {stem} | original | {base_lzma:,} | 1.000 | {base_acc:.2f}% | - | - | - |")
            rows = {}
            code, _, sec = _onnxcomp("optimize", str(src), "-o", str(t / "default.onnx"), "-p", "default", "--data",
                                     str(calib), "-q")
            rows["default recipe"] = (t / "default.onnx", sec, "default")
            code, _, sec = _onnxcomp("optimize", str(src), "-o", str(t / "int8.onnx"), "-p", "int8{objective=any}",
                                     "--no-guard", "--data", str(calib), "-q")
            rows["int8 (no guard)"] = (t / "int8.onnx", sec, "int8{objective=any}")
            code, out, sec = _onnxcomp("search", str(src), "--data", str(calib), "--objective", "lzma",
                                       "--max-top1-drop", "1", "--trials", "400", "--time-budget", str(budget),
                                       "--workers", "2", "--no-cache", "-o", str(t / "search.onnx"), "--json", "-q",
                                       "--plot", str(HERE / "out" / f"search_{stem}.png"))
            doc = json.loads(out) if out.strip().startswith("{") else {}
            best = (doc.get("best") or {}).get("pipeline", "-")
            counts = {s: sum(1 for r in doc.get("trials", []) if r["status"] == s) for s in ("feasible", "infeasible", "failed")}
            rows[f"search ({len(doc.get('trials', []))} trials: {counts['feasible']} feasible, "
                 f"{counts['infeasible']} infeasible, {counts['failed']} failed)"] = (t / "search.onnx", sec, best)
            sizes = {}
            for label, (path, sec, pipe) in rows.items():
                if not path.exists():
                    lines.append(f"| {stem} | {label} | - | - | - | - | {sec:.0f} | nothing written |")
                    continue
                lz, acc = lzma_bytes(str(path)), _top1(path, xt, yt)
                sizes[label.split(" (")[0]] = lz
                lines.append(f"| {stem} | {label} | {lz:,} | {lz / base_lzma:.3f} | {acc:.2f}% | {base_acc - acc:+.2f} | "
                             f"{sec:.0f} | `{pipe}` |")
            if "search" in sizes and "default recipe" in sizes:
                lines.append(f"| {stem} | **search / default recipe** | {sizes['search'] / sizes['default recipe']:.3f} | | | | | |")
            print("\n".join(lines[-6:]), flush=True)
    lines.append("")


def scaling_part(lines: list[str]) -> None:
    from onnxcomp import evaldata

    lines += ["## trials per minute (glyph_resnet, the same 8 trials, no cache)", "",
              "| executor | seconds | trials / minute |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        x, y = evaldata.glyph_dataset("calib", "all")
        evaldata.save_npz(str(calib), x, y, "input")
        src = ROOT / "models" / "glyph_resnet.onnx"
        for label, extra in (("local, 1 worker", ["--workers", "1"]), ("local, 2 workers", ["--workers", "2"]),
                             ("Ray on this machine (2 CPUs)", ["--workers", "2", "--ray", "local"])):
            code, out, sec = _onnxcomp("search", str(src), "--data", str(calib), "--trials", "8", "--no-cache",
                                       "--reference", "none", "--warm-start", "mild", "--json", "-q", *extra)
            doc = json.loads(out) if out.strip().startswith("{") else {}
            n = len(doc.get("trials", []))
            lines.append(f"| {label} | {sec:.0f} | {60 * n / sec:.1f} |")
            print(lines[-1], flush=True)
    lines.append("")


def front_part(lines: list[str], budget: float) -> None:
    from onnxcomp import evaldata
    from onnxcomp.sizes import lzma_bytes

    xt, yt = evaldata.glyph_dataset("test", "all")
    stem = "glyph_resnet"
    src = ROOT / "models" / f"{stem}.onnx"
    png = HERE / "out" / f"search_front_{stem}.png"
    lines += [f"## two objectives: lzma bytes and latency ({stem}, NSGA-II, 1 worker, `--time-budget {budget:.0f}`)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        x, y = evaldata.glyph_dataset("calib", "all")
        evaldata.save_npz(str(calib), x, y, "input")
        code, out, sec = _onnxcomp("search", str(src), "--data", str(calib), "--objective", "lzma", "--objective",
                                   "latency", "--max-top1-drop", "1", "--trials", "400", "--time-budget", str(budget),
                                   "--workers", "1", "--no-cache", "--json", "-q", "--plot", str(png))
        doc = json.loads(out) if out.strip().startswith("{") else {}
        trials = doc.get("trials", [])
        counts = {st: sum(1 for r in trials if r["status"] == st) for st in ("feasible", "infeasible", "failed")}
        lines += [f"{len(trials)} trials ({counts['feasible']} feasible, {counts['infeasible']} infeasible, "
                  f"{counts['failed']} failed) in {sec:.0f} s; the front, each member made again and scored on the "
                  f"test split (original top-1 {_top1(src, xt, yt):.2f}%, lzma {lzma_bytes(str(src)):,} B):", "",
                  "| trial | lzma ratio | latency ratio | top-1 (test) | pipeline |", "|---|---|---|---|---|"]
        for r in doc.get("front", []):
            path = Path(tmp) / f"t{r['number']}.onnx"
            # guarded, so the passes calibrate on the same calibration part as the search's trials
            c, _, _ = _onnxcomp("optimize", str(src), "-o", str(path), "-p", r["pipeline"], "--data", str(calib),
                                "--max-top1-drop", "1", "-q")
            acc = f"{_top1(path, xt, yt):.2f}%" if c == 0 and path.exists() else "-"
            lines.append(f"| {r['number']} | {r['values']['lzma']:.3f} | {r['values']['latency']:.3f} | {acc} | "
                         f"`{r['pipeline']}` |")
            print(lines[-1], flush=True)
    lines.append("")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("models", "scaling", "front", "all"), default="all")
    ap.add_argument("--budget", type=float, default=540.0)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, for part models")
    ap.add_argument("--out", default=str(HERE / "out" / "search.md"))
    args = ap.parse_args()
    lines = ["# onnxcomp search", "", f"`python benchmarks/search.py --part {args.part} --budget {args.budget:g}`", ""]
    if args.part in ("models", "all"):
        models_part(lines, args.budget, tuple(args.models.split(",")))
    if args.part in ("scaling", "all"):
        scaling_part(lines)
    if args.part in ("front", "all"):
        front_part(lines, min(args.budget, 420.0))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
