"""Codebook weights: sizes, speed and memory on zoo VGG-16 / ResNet-50, and task accuracy on the
trained and rapidocr models.

Part `zoo`: per model and bits (per-tensor codebooks, 8/6/4/3/2), a child process runs the pass,
writes the model, and reports the seconds of each, its peak resident memory up to then (VmHWM),
file bytes, lzma (xz -6) bytes and ratios against the fp32 file (children run before the parent
loads anything big); then onnxruntime latency of the
result against the original, interleaved in one process (p50 of many runs, ratio).

Part `accuracy`: per trained / rapidocr model (normalized; calibration and test data apart, the
test data never seen by the pass): the task figure (accuracy, sequence agreement or detection map as
in benchmarks/table.py) at 8/6/4/3 bits plain k-means, data-aware (Hessian-diagonal weighting) at
4/3 bits, mixed bits by measured sensitivity (avg_bits=4 and 3), the same with per-channel
scales (`scale=channel`), and with error-compensated rounding (`compensate=gptq`), with the file
ratio; for the recognizer also the lines and characters read right against the rendered texts.

    python benchmarks/codebook.py [--part zoo|accuracy|all] [--only vgg16,glyph_resnet] [--out benchmarks/out/codebook.md]
                                  [--configs REGEX --merge]   (re-measure some accuracy rows in place)
                                  [--full]                    (the full test splits: 2480 glyphs, 600 cls, 200 rec, 32 det)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ZOO_BITS = (8, 6, 4, 3, 2)
# compensate=none where the label does not say gptq (the rows measured before GPTQ rounding was the default)
ACC_CONFIGS = [(f"{b} bits", f"bits={b},weighting=none,compensate=none") for b in (8, 6, 4, 3)]
ACC_CONFIGS += [(f"{b} bits, data-aware", f"bits={b},weighting=hessian,compensate=none") for b in (4, 3)]
ACC_CONFIGS += [(f"avg {b} bits, mixed", f"avg_bits={b},compensate=none") for b in (4, 3)]
ACC_CONFIGS += [("4 bits, channel scales", "bits=4,scale=channel,compensate=none")]
ACC_CONFIGS += [(f"avg {b} bits, mixed, channel scales", f"avg_bits={b},scale=channel,compensate=none") for b in (4, 3)]
ACC_CONFIGS += [(f"{b} bits, channel scales, gptq", f"bits={b},scale=channel,compensate=gptq,samples=128")
                for b in (4, 3)]
ACC_CONFIGS += [("avg 4 bits, mixed, channel scales, gptq", "avg_bits=4,scale=channel,compensate=gptq,samples=128")]


def _peak_rss() -> int:
    """This process's peak resident bytes since exec: VmHWM (getrusage's ru_maxrss survives exec, so
    a child started by a big parent would report the parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(model_path: str, bits: int, out_path: str) -> dict:
    """Compress `model_path` at `bits`, write it; figures measured in this (fresh) process."""
    from onnxcomp.model import load_model, save_model
    from onnxcomp.passes import Context, get_pass

    t0 = time.perf_counter()
    model = load_model(model_path)
    loaded = time.perf_counter()
    result = get_pass("codebook")(bits=bits).run(model, Context())
    clustered = time.perf_counter()
    save_model(result.model, out_path)
    written = time.perf_counter()
    peak = _peak_rss()
    layers = [r for r in result.layers if r.action == "rewritten"]
    return {"load_s": loaded - t0, "cluster_s": clustered - loaded, "write_s": written - clustered,
            "total_s": written - t0, "peak_bytes": peak, "layers": len(layers),
            "storage": sorted({r.figures["storage"] for r in layers}),
            "clustering": sorted({r.figures.get("clustering", "") for r in layers})}


def zoo_rows(names: list[str] | None) -> list[dict]:
    from onnxcomp.costmodel import CostModel
    from onnxcomp.model import load_model
    from onnxcomp.sizes import file_bytes, lzma_bytes

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcomp-bench-codebook-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("vgg16", "resnet50"):
            if names and name not in names:
                continue
            src = tmp / f"{name}.onnx"
            subprocess.run([sys.executable, "-m", "onnxcomp", "zoo", name, "-o", str(src)], check=True, capture_output=True)
            base_bytes, base_lzma = file_bytes(src), lzma_bytes(src)
            original = load_model(str(src))
            import numpy as np

            feeds = {original.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
            for bits in ZOO_BITS:
                out = tmp / f"{name}_{bits}.onnx"
                done = subprocess.run([sys.executable, __file__, "--child", str(src), str(bits), str(out)],
                                      check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                size, packed = file_bytes(out), lzma_bytes(out)
                base_t, cand_t = CostModel().time_models([original, load_model(str(out))], feeds, target_ms=3000.0)
                row.update({"model": name, "bits": bits, "fp32_bytes": base_bytes, "fp32_lzma": base_lzma,
                            "file_bytes": size, "lzma_bytes": packed, "ratio": base_bytes / size,
                            "lzma_ratio": base_bytes / packed, "model_bytes_peak_x": row["peak_bytes"] / base_bytes,
                            "latency_ratio": cand_t.ms / base_t.ms, "base_ms": base_t.ms, "ms": cand_t.ms,
                            "runs": min(base_t.runs, cand_t.runs)})
                rows.append(row)
                print(f"{name} {bits} bits: {row['ratio']:.2f}x file, {row['lzma_ratio']:.2f}x lzma, cluster "
                      f"{row['cluster_s']:.1f} s, all {row['total_s']:.1f} s, peak {row['model_bytes_peak_x']:.2f}x, "
                      f"latency {row['latency_ratio']:.3f}", flush=True)
                out.unlink()
    return rows


def accuracy_rows(names: list[str] | None, configs: str = "", full: bool = False) -> list[dict]:
    from table import load_cases, outputs_of, sizes, task_score, text_scores

    from onnxcomp.data import open_source
    from onnxcomp.model import load_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import Pipeline

    rows = []
    for case in load_cases(names, quick=not full):
        model = Pipeline.parse("normalize").run(load_model(case.path), Context())[0]
        inp = model.graph.input[0].name
        xc = case.calib[0]
        ref = outputs_of(model, case.test[0])
        base_score = task_score(case, model, ref)
        base_size, base_lzma = sizes(model)
        rows.append({"model": case.name, "config": "fp32", "task": base_score, "ratio": 1.0,
                     "lzma_ratio": base_size / base_lzma, "avg_bits": 32.0, "seconds": 0.0,
                     "text": text_scores(case, ref)})
        for label, opts in ACC_CONFIGS:
            if configs and not re.search(configs, label):
                continue
            ctx = Context(data=open_source({inp: xc}, model=model))
            t0 = time.perf_counter()
            out, report = Pipeline.parse(f"codebook{{{opts}}}", normalize=False).run(model, ctx)
            seconds = time.perf_counter() - t0
            size, packed = sizes(out)
            got = outputs_of(out, case.test[0]) if case.texts is not None else None  # scored twice, run once
            row = {"model": case.name, "config": label, "task": task_score(case, out, ref, got),
                   "ratio": base_size / size, "lzma_ratio": base_size / packed,
                   "avg_bits": report.passes[-1].figures.get("avg_bits_achieved"), "seconds": seconds,
                   "metric": case.metric, "text": None if got is None else text_scores(case, got)}
            rows.append(row)
            print(f"{case.name:<18} {label:<22} task {row['task']:.2f} (fp32 {base_score:.2f})  "
                  f"{row['ratio']:.2f}x file  {row['lzma_ratio']:.2f}x lzma  ({seconds:.0f} s)", flush=True)
    return rows


def render(zoo: list[dict], acc: list[dict]) -> str:
    from onnxcomp.costmodel import machine

    m = machine()
    out = ["# Codebook weights (`python benchmarks/codebook.py`)", "",
           f"{m.get('cpu')}, onnxruntime {m.get('onnxruntime')}, 2 threads. Per-tensor codebooks unless said.", ""]
    if zoo:
        out += ["## Zoo models: size, time, memory, latency", "",
                "| model | bits | file MB | ratio vs fp32 | lzma MB | lzma ratio | cluster s | written s (all) | "
                "peak memory / model bytes | latency ratio (p50) | storage |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in zoo:
            out.append(f"| {r['model']} | {r['bits']} | {r['file_bytes'] / 1e6:.1f} | {r['ratio']:.2f}x | "
                       f"{r['lzma_bytes'] / 1e6:.1f} | {r['lzma_ratio']:.2f}x | {r['cluster_s']:.1f} | {r['total_s']:.1f} | "
                       f"{r['model_bytes_peak_x']:.2f}x | {r['latency_ratio']:.3f} | {', '.join(r['storage'])} |")
        out.append("")
        out.append("fp32 files: " + ", ".join(sorted({f"{r['model']} {r['fp32_bytes'] / 1e6:.1f} MB" for r in zoo})) + ".")
        out.append("")
    if acc:
        out += ["## Task accuracy (test data the pass never saw)", "",
                "Task figure: top-1 accuracy % (glyphs, ppocr_cls), whole-sequence agreement with the fp32 "
                "model % (ppocr_rec), detection map agreement % (ppocr_det); see benchmarks/table.py. "
                "Text (ppocr_rec only): % of the test lines read exactly / % character accuracy, against the "
                "rendered texts (greedy CTC decoding as rapidocr does; characters: 1 - edits / characters of the "
                "truth, below 0 when the output is longer garbage). `gptq`: "
                "`compensate=gptq,samples=128`, the weights rounded onto the codebook column by column with the "
                "error moved along the inverse input Hessian of up to 128 calibration samples.", "",
                "| model | config | task | text: lines / chars | avg bits | file ratio | lzma ratio | seconds |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in acc:
            text = "" if not r.get("text") else f"{r['text'][0]:.1f} / {r['text'][1]:.2f}"
            out.append(f"| {r['model']} | {r['config']} | {r['task']:.2f} | {text} | {r['avg_bits'] or 0:.2f} | "
                       f"{r['ratio']:.2f}x | {r['lzma_ratio']:.2f}x | {r['seconds']:.1f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("zoo", "accuracy", "all"))
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--out", default=str(HERE / "out" / "codebook.md"))
    ap.add_argument("--configs", default="", help="accuracy part: only the configs whose label matches this regex")
    ap.add_argument("--full", action="store_true", help="accuracy part: the full test splits (benchmarks/table.py's)")
    ap.add_argument("--merge", action="store_true",
                    help="replace the measured rows in --out's existing JSON (same model and config), keep the others")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else None
    zoo = zoo_rows(names) if args.part in ("zoo", "all") else []
    acc = accuracy_rows(names, args.configs, args.full) if args.part in ("accuracy", "all") else []
    old = Path(args.out).with_suffix(".json")
    if args.merge and old.is_file():
        before = json.loads(old.read_text())
        new = {(r["model"], r["config"]): r for r in acc}
        acc = [new.pop((r["model"], r["config"]), r) for r in before.get("accuracy", [])] + list(new.values())
        zoo = zoo or before.get("zoo", [])
    text = render(zoo, acc)
    Path(args.out).write_text(text + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"zoo": zoo, "accuracy": acc}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
