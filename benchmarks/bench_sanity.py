"""Sanity benchmarks for the measurement tools (scripts, not unit tests: they take a minute and need
a quiet machine to mean much).

    python benchmarks/bench_sanity.py latency [--model resnet18] [--threads 2] [--runs 20] [--rounds 3]
        Times the zoo model against itself with `measure_latency` (two sessions of the same model,
        interleaved). The p50 ratio must lie in [0.9, 1.1]: anything else means the timing method
        favours one side. Exit 0 inside the band, 1 outside.

    python benchmarks/bench_sanity.py capture [--model vgg16] [--samples 64] [--batch-size 8]
        Runs `activation_stats` over every Conv/Gemm output of the zoo model on random calibration
        data and prints the peak resident memory before and after, to show that capture streams
        (holding one batch of activations, not all of them). Run it under `/usr/bin/time -v` for an
        outside view of the same peak.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def latency(args: argparse.Namespace) -> int:
    from onnxcomp import zoo
    from onnxcomp.data import random_source
    from onnxcomp.runtime import measure_latency

    model = zoo.build(args.model)
    feeds = random_source(model, {}, samples=1, batch_size=1).first_batch()[0]
    res = measure_latency([model, model], feeds, threads=args.threads, warmup=args.warmup, runs=args.runs,
                          rounds=args.rounds, names=[f"{args.model}-A", f"{args.model}-B"])
    for r in res:
        print(f"{r.name:14s} p50 {r.p50_ms:8.2f} ms  p90 {r.p90_ms:8.2f} ms  min {r.min_ms:8.2f} ms  "
              f"ratio {r.ratio:.3f} [{r.ratio_min:.3f}, {r.ratio_max:.3f}]")
    ratio = res[1].ratio
    ok = 0.9 <= ratio <= 1.1
    print(f"p50 ratio B/A = {ratio:.3f}: {'OK' if ok else 'OUT OF BAND'} (band [0.9, 1.1])")
    return 0 if ok else 1


def capture(args: argparse.Namespace) -> int:
    from onnxcomp import zoo
    from onnxcomp.data import random_source
    from onnxcomp.runtime import activation_stats

    model = zoo.build(args.model)
    tensors = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    src = random_source(model, {}, samples=args.samples, batch_size=args.batch_size, seed=0)
    print(f"{args.model}: {model.ByteSize() / 2**20:.0f} MiB model, {len(tensors)} tensors, "
          f"{args.samples} samples in batches of {args.batch_size}")
    print(f"after building the model: RSS {_rss_mb():.0f} MiB, peak {_peak_mb():.0f} MiB")
    t0 = time.perf_counter()
    stats = activation_stats(model, src, tensors)
    dt = time.perf_counter() - t0
    values = sum(int(s.count[0]) * s.channels for s in stats.values())
    print(f"activation_stats: {dt:.1f} s, {values / 1e9:.2f} G activation values summarised "
          f"({values * 4 / 2**30:.1f} GiB as float32 if kept)")
    print(f"after capture: RSS {_rss_mb():.0f} MiB, peak {_peak_mb():.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency", help="zoo model vs itself: p50 ratio in [0.9, 1.1]")
    lat.add_argument("--model", default="resnet18")
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--warmup", type=int, default=5)
    lat.add_argument("--runs", type=int, default=20)
    lat.add_argument("--rounds", type=int, default=3)
    lat.set_defaults(func=latency)
    cap = sub.add_parser("capture", help="peak memory of activation statistics")
    cap.add_argument("--model", default="vgg16")
    cap.add_argument("--samples", type=int, default=64)
    cap.add_argument("--batch-size", type=int, default=8)
    cap.set_defaults(func=capture)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
