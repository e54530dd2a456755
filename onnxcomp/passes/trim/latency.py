"""Trim's side of the cost model: the channel-count step this machine's conv kernels run in.

onnxruntime's CPU convs run a channel count at the speed of the next multiple of their block (the
NCHWc block: 16 floats with AVX-512, 8 with AVX2): measured on an AMD EPYC (AVX-512), a 3x3 conv at
28x28 ran 40, 44 and 48 channels in the same time and 52 to 64 in the same, 38% longer. A trimmed
count between two multiples pays for the next one and loses channels for nothing, so kept counts are
rounded to multiples of the step. The step is measured once per machine and session settings (and
cached with every other timing): a probe conv is timed at 64 channels and at a count just above each
multiple of 32, 16, 8 and 4 below it; a step is *flat* when that count runs at the full count's time
(within FLAT: it pays for the whole stair), and the step is the largest flat one in both probe shapes
(1 when none is; in practice 4 at least: 2 channels of 64 save less than the timing noise).

Timing each trimmed layer at its candidate counts instead (the part of the model a count changes,
fold Adds and layout neighbours included) was tried and withdrawn: at the same MAC cut it ran 0-6%
slower than multiples of 16 on every benchmark model here (an earlier form of benchmarks/trim.py
--part rounding; DESIGN.md), its microsecond differences being noise next to the staircase.
"""

from __future__ import annotations

from typing import Any

from onnx import TensorProto, helper

from onnxcomp.units import Unit, unit_for_nodes

STEPS = (32, 16, 8, 4)
FULL = 64  # the probe's channel count; a multiple of every step
PROBES = ((3, 28), (1, 56))  # (kernel, height = width) of the probe conv
# A count inside the full count's stair runs at >= this share of its time (measured here 0.97-1.03 at
# 52 vs 64 channels); one stair below it ran at 0.68-0.88 (48 vs 64), quadratic MACs 0.77 (56 vs 64).
FLAT = 0.9
_F = TensorProto.FLOAT
_OPSET = 17


def _probe_count(step: int) -> int:
    """A count inside the stair below FULL when the step is `step`: a quarter of the step above the
    multiple below (a half for 8, 2 for 4), a multiple of 4 where it can (counts that are not ran a
    slower kernel here: 58 and 62 channels 10-35% slower than 64)."""
    return FULL - step + {8: 4, 4: 2}.get(step, step // 4)


def probe_unit(channels: int, kernel: int, size: int) -> Unit:
    """A conv of `channels` in and out between two 64-channel 1x1 convs (its neighbours keep their
    layout), with its ReLU, at [1, 64, size, size]."""
    nodes = [
        helper.make_node("Conv", ["x", "w_in"], ["a"], name="into", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["a", "w", "b"], ["c"], name="probe", kernel_shape=[kernel, kernel],
                         pads=[kernel // 2] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w_out"], ["y"], name="out_of", kernel_shape=[1, 1]),
    ]
    consts = {"w_in": ((channels, FULL, 1, 1), _F), "w": ((channels, channels, kernel, kernel), _F),
              "b": ((channels,), _F), "w_out": ((FULL, channels, 1, 1), _F)}
    macs = size * size * (2 * FULL * channels + channels * channels * kernel * kernel)
    return unit_for_nodes(f"trim-probe:{kernel}x{kernel}@{size}:{channels}", nodes, {"x": ((1, FULL, size, size), _F)},
                          consts, ["y"], _OPSET, macs=macs)


def measured_step(cost_model: Any) -> tuple[int | None, dict]:
    """(step, figures): the largest flat step of STEPS, 1 when none is; None when the probes could
    not be timed (figures["reason"] says why)."""
    counts = [FULL, *(_probe_count(s) for s in STEPS)]
    units = [probe_unit(c, k, hw) for k, hw in PROBES for c in counts]
    estimates = cost_model.estimate(units)
    bad = next((e for e in estimates if e.source == "analytic"), None)
    if bad is not None:
        return None, {"reason": f"probe not timed: {bad.reason}"}
    times: dict[str, dict[int, float]] = {}
    for j, (k, hw) in enumerate(PROBES):
        mine = estimates[j * len(counts):(j + 1) * len(counts)]
        times[f"{k}x{k}@{hw}"] = {c: e.total_ms for c, e in zip(counts, mine, strict=True)}

    def flat(step: int, t: dict[int, float]) -> bool:  # the count inside the stair gains nothing
        return t[_probe_count(step)] >= FLAT * t[FULL]

    step = next((s for s in STEPS if all(flat(s, t) for t in times.values())), 1)
    figures = {"probe_ms": {shape: {str(c): round(v, 5) for c, v in t.items()} for shape, t in times.items()},
               "source": "+".join(sorted({e.source for e in estimates}))}
    return step, figures
