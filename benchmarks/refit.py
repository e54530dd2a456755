"""refit=sequential against refit=on (and no refit) on the trained models, judged on their test data.

Per model and rank rule: the end-to-end relative L2 error of the logits against the original model
and top-1 accuracy, on data the refit never saw (glyphs: the test split; PP-OCR classifier: rendered
lines of another seed), and the pass's seconds.

    python benchmarks/refit.py [--out benchmarks/out/refit.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcomp import evaldata
from onnxcomp.data import open_source
from onnxcomp.model import load_model, model_bytes
from onnxcomp.passes.base import Context
from onnxcomp.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
RULES = ["rank=0.5", "rank=0.35", "rank=evbmf,weaken=0.5"]


def cases():
    x_cal, y_cal = evaldata.glyph_dataset("calib", "all")
    x_test, y_test = evaldata.glyph_dataset("test", "all", n=1240)
    for name in ("glyph_resnet", "glyph_mobilenetv2"):
        yield name, load_model(ROOT / "models" / f"{name}.onnx"), "input", (x_cal, y_cal), (x_test, y_test)
    x_cal, y_cal = evaldata.ppocr_cls_dataset(256, seed=0)
    x_test, y_test = evaldata.ppocr_cls_dataset(400, seed=1)
    yield "ppocr_cls", load_model(evaldata.ppocr_cls_model_path()), "x", (x_cal, y_cal), (x_test, y_test)


def run(model, name, x):
    sess = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)]).astype(np.float64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "refit.md"))
    args = ap.parse_args()
    rows = []
    for name, model, inp, (xc, yc), (xt, yt) in cases():
        model = Pipeline.parse("normalize").run(model, Context())[0]
        ref = run(model, inp, xt)
        base_acc = evaldata.accuracy(ref, yt)
        for rule in RULES:
            line = [name, rule, f"{base_acc:.2f}"]
            for refit in ("off", "on", "sequential"):
                ctx = Context(data=open_source({inp: xc, "labels": yc}, model=model))
                t0 = time.perf_counter()
                out, _ = Pipeline.parse(f"tucker{{{rule},refit={refit}}}", normalize=False).run(model, ctx)
                secs = time.perf_counter() - t0
                y = run(out, inp, xt)
                rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                line += [f"{rel:.4f}", f"{evaldata.accuracy(y, yt):.2f}", f"{secs:.1f}"]
            rows.append(line)
            print(" | ".join(line), flush=True)
    head = ["model", "rule", "top-1 before"]
    for refit in ("no refit", "refit=on", "refit=sequential"):
        head += [f"rel L2 ({refit})", f"top-1 ({refit})", "s"]
    lines = [f"# refit=sequential vs refit=on on test data ({platform.machine()}, {os.cpu_count()} cores)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
