"""Peak resident memory of normalize + tucker on the zoo's VGG-16 (553 MB) against the model's bytes
(issue: <= 2.5x).

1. The command a user runs, `onnxcomp optimize vgg16.onnx -o out.onnx -p "normalize,tucker{rank=R}"`
   (no data, so no guard), in its own process: its peak resident set (ru_maxrss from wait4).
2. The same steps in this process, stage by stage (VmRSS and the high-water mark VmHWM from
   /proc/self/status, Linux), each stage's input handed over with `OwnedModel` as the CLI does.

    python benchmarks/memory.py [--rank macs:0.3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def cli_peak_mb(args: list[str]) -> tuple[int, float, int]:
    """(peak RSS MB, seconds, exit code) of `python -m onnxcomp ARGS` in a child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "onnxcomp", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode() if child.stderr else ""
    if child.returncode:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss // 1024, time.perf_counter() - t0, child.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", default="macs:0.3")
    args = ap.parse_args()

    from onnxcomp.model import load_model, save_model
    from onnxcomp.passes.base import Context
    from onnxcomp.pipeline import OwnedModel, Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "vgg16.onnx"
        subprocess.run([sys.executable, "-m", "onnxcomp", "zoo", "vgg16", "-o", str(src)], check=True,
                       capture_output=True)
        size_mb = src.stat().st_size / 2**20
        pipeline = f"normalize,tucker{{rank={args.rank}}}"
        peak, sec, code = cli_peak_mb(["optimize", str(src), "-o", str(Path(tmp) / "cli.onnx"), "-p", pipeline,
                                       "--no-guard", "-q"])
        print(f"model file {size_mb:.0f} MB")
        print(f"`onnxcomp optimize -p \"{pipeline}\" --no-guard`: exit {code}, {sec:.0f} s, "
              f"peak {peak} MB = {peak / size_mb:.2f}x the model (target <= 2.5x)")

        rows = []
        base_rss, base_hwm = rss_mb()
        model = load_model(src)
        rows.append(("load", *rss_mb()))
        owned = OwnedModel(model)
        del model
        normalized, _ = Pipeline.parse("normalize", normalize=False).run(owned, Context())
        rows.append(("normalize", *rss_mb()))
        owned = OwnedModel(normalized)
        del normalized
        result, _ = Pipeline.parse(f"tucker{{rank={args.rank}}}", normalize=False).run(owned, Context())
        rows.append((f"tucker{{rank={args.rank}}}", *rss_mb()))
        save_model(result, Path(tmp) / "out.onnx")
        rows.append(("save", *rss_mb()))
        print(f"\nin this process (before loading: RSS {base_rss} MB, peak {base_hwm} MB):")
        print(f"{'stage':<28}{'RSS MB':>8}{'peak MB':>9}{'peak / model':>14}")
        for stage, rss, hwm in rows:
            print(f"{stage:<28}{rss:>8}{hwm:>9}{hwm / size_mb:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
