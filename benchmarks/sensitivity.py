"""Sensitivity analysis and guard timing on real models.

For each model: the candidates of the pass, the seconds `onnxcomp.sensitivity.analyse` takes cold
(no disk cache) and from the cache, and the guard's overhead on `-p default` (seconds spent checking
and repairing, next to the run's total). The goal: a ~50-layer model with 64 calibration samples
measured in under 60 s on 2 cores.

    python benchmarks/sensitivity.py [--samples 64] [--out benchmarks/out/sensitivity.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxcomp import evaldata
from onnxcomp.data import holdout_split, open_source
from onnxcomp.model import load_model
from onnxcomp.passes.base import Context
from onnxcomp.pipeline import Pipeline, guard_for
from onnxcomp.sensitivity import analyse
from onnxcomp.tolerance import GUARD_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


def models(samples: int):
    """(name, model path, data arrays, pass spec) for every real model at hand."""
    x, y = evaldata.glyph_dataset("calib", "all", n=samples)
    yield "glyph_resnet", ROOT / "models" / "glyph_resnet.onnx", {"input": x, "labels": y}, "tucker{rank=0.5}"
    yield "glyph_mobilenetv2", ROOT / "models" / "glyph_mobilenetv2.onnx", {"input": x, "labels": y}, "tucker{rank=0.5}"
    ppocr = Path(evaldata.ppocr_cls_model_path()).parent
    xc, yc = evaldata.ppocr_cls_dataset(samples)
    yield "ppocr_cls", ppocr / "ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": xc, "labels": yc}, "tucker{rank=0.5}"
    xr, _ = evaldata.ppocr_rec_dataset(samples)
    yield "ppocr_rec", ppocr / "ch_PP-OCRv4_rec_infer.onnx", {"x": xr}, "tucker{rank=0.5}"
    yield "ppocr_det", ppocr / "ch_PP-OCRv4_det_infer.onnx", {"x": evaldata.ppocr_det_dataset(samples)}, "tucker{rank=0.5}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sensitivity.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ONNXCOMP_CACHE_DIR"] = cache
        for name, path, arrays, spec in models(args.samples):
            if args.only and name not in args.only.split(","):
                continue
            model = load_model(path)
            source = open_source(arrays, model=model, batch_size=16)
            model = Pipeline.parse("normalize").run(model, Context(data=source))[0]
            fit, held = holdout_split(source)
            p = Pipeline.parse(spec, normalize=False).passes[0]
            t0 = time.perf_counter()
            cold = analyse(model, p, Context(data=fit), held)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = analyse(model, p, Context(data=fit), held)
            t_warm = time.perf_counter() - t0
            assert warm.cached
            worst = max(cold.layers, key=lambda s: s.rel_l2) if cold.layers else None
            # guard overhead on the default recipe
            pipe = Pipeline.parse("default")
            guard, ctx = guard_for(model, Context(data=source), pipe.tolerance or GUARD_DEFAULT)
            t0 = time.perf_counter()
            _, report = pipe.run(model, ctx, guard=guard)
            t_run = time.perf_counter() - t0
            restored = sum(len(p.guard["restored"]) for p in report.passes if p.guard)
            rows.append([name, spec, len(cold.layers), cold.samples, f"{t_cold:.1f}", f"{t_warm:.2f}",
                         worst.node if worst else "-", f"{worst.rel_l2:.3g}" if worst else "-",
                         f"{t_run:.1f}", f"{guard.seconds:.1f}", restored])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    head = ["model", "pass", "layers", "held-out samples", "sensitivity s (cold)", "s (cached)", "most sensitive",
            "its rel L2", "-p default s", "guard s", "layers put back"]
    lines = [f"# Sensitivity and guard timing ({args.samples} samples, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
