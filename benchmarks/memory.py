"""Peak resident memory of normalize + tucker on the zoo's VGG-16 (553 MB), stage by stage, against
the model's bytes (issue: <= 2.5x). Each stage prints the resident set and the high-water mark
from /proc/self/status (Linux).

    python benchmarks/memory.py [--rank macs:0.3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def rss_mb() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", default="macs:0.3")
    args = ap.parse_args()
    import subprocess
    import sys

    from onnxcomp.model import load_model, save_model
    from onnxcomp.passes.base import Context, get_pass
    from onnxcomp.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "vgg16.onnx"
        # built in another process, so this one's high-water mark is the passes' alone
        subprocess.run([sys.executable, "-m", "onnxcomp", "zoo", "vgg16", "-o", str(src)], check=True,
                       capture_output=True)
        size_mb = src.stat().st_size / 2**20
        rows = []
        t0 = time.perf_counter()
        base_rss, base_hwm = rss_mb()
        model = load_model(src)
        rows.append(("load", *rss_mb()))
        normalized, _ = Pipeline.parse("normalize").run(model, Context())
        rows.append(("normalize", *rss_mb()))
        result = get_pass("tucker")(rank=args.rank).run(normalized, Context())
        rows.append((f"tucker{{rank={args.rank}}}", *rss_mb()))
        save_model(result.model, Path(tmp) / "out.onnx")
        rows.append(("save", *rss_mb()))
        print(f"model file {size_mb:.0f} MB; before loading it: RSS {base_rss} MB, peak {base_hwm} MB; "
              f"{time.perf_counter() - t0:.0f}s")
        print(f"{'stage':<28}{'RSS MB':>8}{'peak MB':>9}{'peak / model':>14}")
        for stage, rss, hwm in rows:
            print(f"{stage:<28}{rss:>8}{hwm:>9}{hwm / size_mb:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
