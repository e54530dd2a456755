"""A search's trials and front as a PNG (matplotlib, the `eval` extra). Reads results, edits nothing.

One objective: the objective's ratio (x) against the accuracy figure (y: accuracy with labels, else
top-1 / sequence agreement with the original), feasible trials as dots, infeasible as grey crosses,
the front as a line, the original as a star at (1, its accuracy), reference pipelines (int8) as diamonds. The y axis spans the feasible
trials and the original with a margin (an axis down to the worst broken trial would hide every
difference that matters); infeasible trials below it are drawn on the bottom edge. Two objectives:
the two ratios, the front as a line.
"""

from __future__ import annotations

from typing import Any


def _metric(result: Any) -> dict | None:
    """The user metric's figures of the first trial that has them (the search ran with --metric)."""
    for r in list(result.trials) + list(getattr(result, "references", [])):
        m = r.figures.get("metric")
        if isinstance(m, dict) and isinstance(m.get("reference"), (int, float)):
            return m
    return None


def _quality(r: Any, metric: bool = False) -> float | None:
    f = r.figures
    if metric:
        m = f.get("metric")
        return float(m["candidate"]) if isinstance(m, dict) and isinstance(m.get("candidate"), (int, float)) else None
    for key in ("cand_top1_acc", "top1_agreement", "sequence_agreement"):
        if isinstance(f.get(key), (int, float)):
            return float(f[key])  # percent, as validation reports them
    return None


def _reference(result: Any) -> float:
    m = _metric(result)
    if m is not None:
        return float(m["reference"])
    for r in result.trials:
        if isinstance(r.figures.get("ref_top1_acc"), (int, float)):
            return float(r.figures["ref_top1_acc"])
    return 100.0  # agreement with the original: the original agrees with itself


def plot_front(result: Any, path: str, title: str = "") -> None:
    """Write `front_png` to `path` (atomically)."""
    from onnxcomp.model import save_bytes

    save_bytes(path, front_png(result, title))


def front_png(result: Any, title: str = "") -> bytes:
    """The trials and front as PNG bytes (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = result.objectives
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=110)
    feas = [r for r in result.trials if r.status == "feasible"]
    bad = [r for r in result.trials if r.status == "infeasible"]
    front = sorted(result.front, key=lambda r: r.values[objs[0]])
    if len(objs) == 1:
        o = objs[0]
        metric = _metric(result)
        by_metric = metric is not None

        def quality(r: Any) -> float | None:  # the metric score, or accuracy / agreement (%)
            return _quality(r, by_metric)

        ref = _reference(result)
        feas = [r for r in feas if quality(r) is not None]
        front = [r for r in front if quality(r) is not None]
        ys = [quality(r) for r in feas + front] + [ref]
        lo, hi = min(ys), max(ys)
        if by_metric:
            pad = max(0.15 * (hi - lo), 1e-3 * max(abs(hi), 1e-9))
            ymin, ymax = lo - pad, hi + pad
        else:
            pad = max(0.5, 0.15 * (hi - lo))
            ymin, ymax = lo - pad, min(100.0, hi + pad) if hi < 100 else hi + pad * 0.3
        ax.scatter([r.values[o] for r in feas], [quality(r) for r in feas], s=22, color="#4c72b0",
                   label="feasible trial", zorder=3)
        if bad:
            ax.scatter([r.values[o] for r in bad], [max(ymin, quality(r) or ymin) for r in bad], marker="x", s=22,
                       color="#999999", label="infeasible (clipped to the axis)", zorder=2)
        if front:
            ax.plot([r.values[o] for r in front], [quality(r) for r in front], "-o", color="#dd8452", ms=5,
                    label="front (re-judged on all held-out samples)", zorder=4)
            for k, r in enumerate(front):
                ax.annotate(f"#{r.number}", (r.values[o], quality(r)), textcoords="offset points",
                            xytext=(6, 6 if k % 2 == 0 else -12), fontsize=8)
        ax.scatter([1.0], [ref], marker="*", s=140, color="#c44e52", label="original", zorder=5)
        for r in getattr(result, "references", []):
            if r.status == "failed" or quality(r) is None:
                continue
            y = max(ymin, min(ymax, quality(r)))
            ax.scatter([r.values[o]], [y], marker="D", s=50, color="#55a868", zorder=5,
                       label=f"{r.pipeline} ({r.status})")
            ax.annotate(r.pipeline.split("{")[0], (r.values[o], y), textcoords="offset points", xytext=(6, -12), fontsize=8)
        ax.set_ylim(ymin - 0.04 * (ymax - ymin), ymax)  # the clipped infeasible markers stay whole
        ax.set_xlabel(f"{o} (ratio to the original; smaller is better)")
        ax.set_ylabel(f"metric {metric['name']}" if by_metric else "accuracy / agreement with the original (%)")
    else:
        a, b = objs
        ax.scatter([r.values[a] for r in feas], [r.values[b] for r in feas], s=22, color="#4c72b0", label="feasible trial")
        if bad:
            ax.scatter([r.values[a] for r in bad], [r.values[b] for r in bad], marker="x", s=22, color="#999999",
                       label="infeasible")
        if front:
            ax.plot([r.values[a] for r in front], [r.values[b] for r in front], "-o", color="#dd8452", ms=5, label="front")
        ax.scatter([1.0], [1.0], marker="*", s=140, color="#c44e52", label="original", zorder=5)
        ax.set_xlabel(f"{a} ratio")
        ax.set_ylabel(f"{b} ratio")
    ax.grid(alpha=0.3)
    # Beside the axes, not in them: inside, "best" still covered the infeasible markers clipped to the bottom.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    n_feasible = sum(1 for r in result.trials if r.status == "feasible")
    ax.set_title(f"{title}: {len(result.trials)} trials, {n_feasible} feasible" if title else "search")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
