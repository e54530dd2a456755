"""Per-layer latency of a model on this machine, from the cost model, against the whole model measured.

`profile(model, feeds)` runs the model once (unoptimised, every intermediate tensor captured) to get
each unit's real inputs, cuts it into units (onnxcomp.costmodel.split_units), estimates every unit,
and times the whole model with the same settings. The prediction is the sum over units of what each
adds to a run under way, plus one session call, plus the layout conversions onnxruntime keeps inside
the model. Per unit that is its in-run cost (`Estimate.in_run_ms`: the unit repeated in one model,
minus once, per copy), or for a unit over 64 MB or one that cannot be repeated its time alone net of
one session call. Units are timed net of the NCHWc reorders onnxruntime wraps around each alone; the
model pays the ones where a blocked layer meets one that is not (one profiled run names them, and
each is timed like a unit). Reads the model, never edits it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcomp.costmodel import CostModel, Estimate, machine
from onnxcomp.units import split_units


@dataclass
class LayerProfile:
    name: str
    ops: str
    estimate: Estimate
    net_ms: float
    macs: int
    bytes: int

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s (2 flops per MAC) on the unit's net time."""
        return 2.0 * self.macs / (self.net_ms * 1e6) if self.macs and self.net_ms > 0 else None

    def as_dict(self) -> dict[str, Any]:
        g = self.gflops
        return {"name": self.name, "ops": self.ops, **self.estimate.as_dict(), "net_ms": round(self.net_ms, 5),
                "macs": self.macs, "bytes": self.bytes, "gflops": None if g is None else round(g, 2)}


@dataclass
class Profile:
    layers: list[LayerProfile]
    overhead_ms: float
    predicted_ms: float
    measured: Estimate
    settings: dict
    machine: dict
    feeds: dict[str, list[int]]
    seconds: float
    units_measured: int
    units_cached: int
    units_analytic: int
    layout_ms: float = 0.0  # the layout conversions onnxruntime keeps inside the model, in-run
    layout_ops: int = 0
    notes: list[str] = field(default_factory=list)
    readings: list[float] = field(default_factory=list)  # the whole model's p50 ms, before and after the layers

    @property
    def error(self) -> float:
        """Predicted over measured whole-model time, minus 1."""
        return self.predicted_ms / self.measured.ms - 1.0 if self.measured.ms > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "machine": self.machine, "feeds": self.feeds,
                "overhead_ms": round(self.overhead_ms, 5), "predicted_ms": round(self.predicted_ms, 4),
                "layout": {"ops": self.layout_ops, "ms": round(self.layout_ms, 5)},
                "measured": self.measured.as_dict(), "measured_readings": [round(r, 4) for r in self.readings],
                "error": round(self.error, 4), "seconds": round(self.seconds, 2),
                "units": {"measured": self.units_measured, "cached": self.units_cached,
                          "analytic": self.units_analytic},
                "notes": self.notes, "layers": [layer.as_dict() for layer in self.layers]}


def capture_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every tensor (or those in `names`) of one unoptimised run on `feeds`, graph inputs included."""
    from onnxcomp.runtime import make_session, run_session

    if names is None:
        names = list(dict.fromkeys(o for n in model.graph.node for o in n.output if o))
    names = [n for n in names if n not in feeds]
    sess = make_session(model, optimize=False, extra_outputs=names)
    outs = [o.name for o in sess.get_outputs()]
    values = dict(zip(outs, run_session(sess, outs, feeds, "the model"), strict=True))
    values.update(feeds)
    return {k: v for k, v in values.items() if isinstance(v, np.ndarray)}


def profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], cost_model: CostModel | None = None,
            *, progress: Any = None) -> Profile:
    """Per-layer estimates of `model` on `feeds` and the whole model measured, with `cost_model`'s settings.

    The whole model is timed twice, before the layers and after, and the faster reading is `measured`
    (both are in `readings`): on an AMD EPYC VM a model of many small ops ran 1.3-1.6x slower in
    machine-wide spells of seconds to minutes (at any time; several came right after a cold profile's
    hundreds of sessions) while its layers alone did not (PP-OCR rec 9.4 ms in a fresh process,
    14.9 ms after its cold profile; PP-OCR det 8.6 ms before its layers, 14.0 ms after), and the slow
    reading made the layers' sum look 26-37% low. A spell covering both readings is still that
    run's error."""
    from onnxcomp.analysis import layer_costs

    cm = cost_model or CostModel()
    t0 = time.perf_counter()
    if progress is not None:
        progress.message("timing the whole model")
    whole = cm.model_timer([model], feeds)  # one session for both readings
    first = whole.read()[0]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    macs = {c.node: c.macs or 0 for c in layer_costs(model, shapes)}
    if progress is not None:
        progress.message("capturing the tensors of one run")
    values = capture_values(model, feeds)
    units = split_units(model, values, macs)
    del values
    if progress is not None:
        progress.message(f"timing {len(units)} layers")
    before_m, before_c = cm.measured_units, cm.cached_units
    estimates = cm.estimate(units, together=False, in_run=True)
    overhead = cm.overhead_ms()
    layers = []
    for u, e in zip(units, estimates, strict=True):
        # What the unit adds to a run under way (its added copies in one model), else (over 64 MB, or
        # not repeated) its time alone net of one call. The smaller of the two, taken once as the
        # tighter bound, summed 5-14% low on five models once runs were I/O-bound (both are noisy,
        # and a minimum of noisy figures is biased low); the in-run figure alone came within 5%.
        alone = max(e.ms - overhead, 0.0)
        net = alone if e.in_run_ms is None else e.in_run_ms
        layers.append(LayerProfile(u.name, u.ops, e, net, u.macs, u.bytes))
    if progress is not None:
        progress.message("timing the layout conversions the model keeps")
    kept = cm.kept_layout_conversions(model, feeds)
    layout_ms = cm.layout_costs(kept) if kept else 0.0
    predicted = overhead + sum(layer.net_ms for layer in layers) + layout_ms
    if progress is not None:
        progress.message("timing the whole model again")
    last = whole.read()[0]
    del whole
    measured = min(first, last, key=lambda e: e.ms)
    analytic = sum(1 for e in estimates if e.source == "analytic")
    notes = []
    if cm.cache is not None and cm.cache.ignored:
        notes.append(cm.cache.ignored)
    return Profile(layers, overhead, predicted, measured, cm.settings.as_dict(), machine(), shapes,
                   time.perf_counter() - t0, cm.measured_units - before_m, cm.cached_units - before_c, analytic,
                   layout_ms, len(kept), notes, [first.ms, last.ms])


def plot(p: Profile, path: str, title: str = "", top: int = 25) -> None:
    """Horizontal bars of the `top` slowest layers (net ms), colour by source, the totals in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxcomp.model import save_bytes

    rows = sorted(p.layers, key=lambda layer: layer.net_ms, reverse=True)[:top][::-1]
    colours = {"measured": "#3b75af", "cache": "#7aa6d6", "analytic": "#d98b3a"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    ax.barh(range(len(rows)), [r.net_ms for r in rows], color=[colours[r.estimate.source] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r.name} ({r.ops})"[:48] for r in rows], fontsize=7)
    for k, r in enumerate(rows):
        g = r.gflops
        if g is not None:
            ax.text(r.net_ms, k, f" {g:.0f} GFLOP/s", va="center", fontsize=6)
    ax.set_xlabel("ms per run (net of the session's fixed cost)")
    ax.set_title(f"{title} predicted {p.predicted_ms:.2f} ms vs measured {p.measured.ms:.2f} ms "
                 f"({p.error:+.0%}), {p.settings['threads']} threads", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    save_bytes(path, buf.getvalue())
