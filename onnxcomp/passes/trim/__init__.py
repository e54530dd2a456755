"""`trim`: channel trimming by value locality for a specialized task (S-VELCRO, Gabbay et al. 2022).

On calibration data from the user's narrow task, some channels barely vary (a dead ReLU lane, a
filter that only fires on classes the task never sees). Such a channel is removed for real: the
producing layer's output row, every lane it passes through (BN, activations, pooling, depthwise
convs, per-channel constants) and the consuming layers' input columns go, and its constant value is
folded into the consumers' outputs (onnxcomp.passes.trim.rewrite). No back-propagation.

* **Groups** (onnxcomp.channels): channels tied by a residual Add, a Concat/Split, an SE Mul or a
  depthwise conv go together or not at all; a group touching anything not understood (a Reshape,
  a grouped conv, a graph output, ...) is left alone, with the reason in the report.
* **Metric** (`metric=`): `std` (the default) scores a channel by the RMS of its deviation from its
  fold value divided by the RMS of the whole tensor, measured where the consumers read it. The error a
  fold adds to a consumer is linear in that deviation, so the score bounds the damage; it needs no
  second tolerance. `output` weights that deviation by the consumers' weights: the relative error the
  fold adds to their outputs (channels taken as uncorrelated); it ranks channels across layers by
  their effect, which kept the PP-OCR classifier far better (benchmarks/trim.py), while `std` did
  better on the digit-specialized glyph models. `share` scores it by the fraction of its values within `tol` x the tensor's RMS
  of the fold value (the paper's notion of value locality: repeated values); it forgives rare
  outliers that `std` counts. A group's score is its worst channel's.
* **How many**: `threshold=` (std / output: score <= threshold, default 0.01; share: share >=
  threshold, default 0.99), or `target=<fraction of the model's MACs to remove>`, most local groups first.
  `max_per_layer`, `min_channels` and `round` bound each layer: kept output counts are multiples of a
  step or unchanged. `round=latency` (the default) measures the step on this machine
  (onnxcomp.passes.trim.latency: onnxruntime's convs run a count at the speed of the next multiple of
  their NCHWc block, 16 with AVX-512, 8 with AVX2); `round=<n>` fixes it. With a threshold a layer is
  rounded up (a channel that did not qualify is never trimmed to round); under a target it is rounded
  to the nearer multiple, down by trimming its next most local channels.
* **Borders** (`border=exact`, the default): with static spatial dims a removed channel's zero-padded
  border is folded exactly, as a constant map added to the consumer's output; that Add stops
  onnxruntime's conv fusions (benchmarks/trim.py, rows `border=interior`).
  `border=interior` folds the channel's mean value into the bias instead: no Add, the border (and
  any per-position variation of the fold) approximated
  (the guard checks the result).
* **Refit** (`refit=on|sequential`, onnxcomp.passes.trim.refit): the consumers' kept weights and
  bias re-solved by least squares to reproduce the original layer outputs (ThiNet / He et al. 2017),
  kept only where held-out calibration samples confirm it.
* **Baseline**: `criterion=l1` ranks filters by their L1 norm (magnitude filter pruning, Li et al.
  2017) instead, with the same folding and limits, so the two can be compared at one MAC cut.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcomp.analysis import layer_costs
from onnxcomp.channels import ChannelGraph, ChannelGroup, kept_indices
from onnxcomp.errors import BadInputError
from onnxcomp.graph import attr, node_label, read_conv
from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassConfig,
    PassResult,
    option,
)
from onnxcomp.passes.trim import latency, locality, refit, rewrite

MIN_SAMPLES = 8  # fewer samples than this say nothing about a channel's spread
REFIT_ROWS = 2048  # sample x position rows drawn per batch per refit layer
DEFAULT_THRESHOLD = {"std": 0.01, "output": 0.01, "share": 0.99}


@dataclass
class TrimConfig(PassConfig):
    metric: str = option("std", "std: residual RMS around the fold value / the tensor's RMS | output: the error "
                         "the fold adds to the consumers' outputs (std weighted by their weights) | share: fraction "
                         "of values within tol of the fold value", choices=("std", "output", "share"))
    threshold: float | None = option(None, "std / output: trim groups scoring <= this (default 0.01); share: trim "
                                     "groups with share >= this (default 0.99); ignored with target")
    tol: float = option(0.02, "share: a value is 'at the fold value' within tol x the tensor's RMS")
    target: float = option(0.0, "remove this fraction of the model's MACs, most local groups first (0: threshold)",
                           search=[0.1, 0.2, 0.3, 0.4], stronger="higher")
    criterion: str = option("locality", "locality: value locality on --data (S-VELCRO) | l1: smallest filter L1 "
                            "norm first (magnitude-pruning baseline; needs target)", choices=("locality", "l1"))
    max_per_layer: float = option(0.75, "a layer loses at most this fraction of its output channels")
    min_channels: int = option(4, "a layer keeps at least this many output channels")
    round: str = option("latency", "kept output channel counts are multiples of a step (or unchanged): latency (the "
                        "step this machine's convs run in, measured by the cost model; 16 with --no-measure) | "
                        "<n> | 1: off")
    border: str = option("exact", "exact: with static spatial dims a removed channel's zero-padded border is folded "
                         "exactly (a constant map added to the consumer's output) | interior: its mean value "
                         "goes into the bias (no extra Add, faster; the border is approximated)",
                         choices=("exact", "interior"))
    samples: int = option(256, "calibration samples for the locality statistics")
    refit: str = option("off", "least-squares refit of the layers that lost input channels, to the original's "
                        "output on --data: on (from the original's inputs) | sequential (from the trimmed "
                        "model's, in graph order) | off", choices=("off", "on", "sequential"))

    def validate(self) -> None:
        super().validate()
        if self.target != 0 and not 0 < self.target < 1:
            raise ValueError(f"target={self.target:g}: must be a fraction of the MACs in (0, 1)")
        if self.threshold is not None:
            if self.metric in ("std", "output") and self.threshold < 0:
                raise ValueError(f"threshold={self.threshold:g}: the std score is >= 0")
            if self.metric == "share" and not 0 < self.threshold <= 1:
                raise ValueError(f"threshold={self.threshold:g}: a share lies in (0, 1]")
        if self.criterion == "l1" and self.target == 0:
            raise ValueError("criterion=l1 has no threshold: give target=<fraction of MACs>")
        if not 0 < self.max_per_layer <= 1:
            raise ValueError(f"max_per_layer={self.max_per_layer:g}: must be in (0, 1]")
        if self.min_channels < 1:
            raise ValueError("min_channels must be >= 1")
        self.round = str(self.round)  # a config built in Python may give a number
        if self.round != "latency" and not (self.round.isdigit() and int(self.round) >= 1):
            raise ValueError(f"round={self.round}: 'latency' or a whole number >= 1")
        if self.samples < MIN_SAMPLES:
            raise ValueError(f"samples={self.samples}: the locality statistics need at least {MIN_SAMPLES}")
        if not self.tol > 0:
            raise ValueError("tol must be > 0")


@dataclass
class _Group:
    group: ChannelGroup
    score: float = np.inf  # lower = trimmed first
    dropped: str = ""  # why a qualifying group was not trimmed


class TrimPass(Pass):
    name = "trim"
    summary = "remove channels that barely vary on --data (S-VELCRO value locality), folding their constant"
    Config = TrimConfig
    default_ops = ("Conv", "Gemm", "MatMul")
    needs_data = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg: TrimConfig = self.config  # type: ignore[assignment]
        if ctx.data is None:
            raise BadInputError("trim needs calibration data from the task: give --data")
        cg = ChannelGraph(model)
        groups = [_Group(g) for g in cg.groups()]
        self._block_unselected(cg, groups)
        open_groups = [g for g in groups if g.group.blocked is None]
        sink_tensors = {s.tensor for s in cg.sinks}
        wanted = sorted({t for g in open_groups for t in g.group.tensors if t in sink_tensors})
        per_position = {t: _static_spatial(cg.shapes.get(t)) for t in wanted}
        limit = ctx.calibration_batches or None
        locs = locality.measure(model, ctx.data, wanted, per_position, max_samples=cfg.samples,
                                max_batches=limit) if wanted else {}
        samples = min((loc.samples for loc in locs.values()), default=0)
        if wanted and samples < MIN_SAMPLES:
            raise BadInputError(f"trim: {samples} calibration samples; the locality statistics need at least {MIN_SAMPLES}")
        if cfg.metric == "share" and locs:
            locality.measure_share(model, ctx.data, locs, cfg.tol, max_samples=cfg.samples, max_batches=limit)
        layers = {c.node: c for c in layer_costs(model, ctx.input_shapes)}
        costs = {name: c.macs for name, c in layers.items()}
        self._score(cg, open_groups, locs, cfg)
        counts = self._counts(ctx, cfg)
        chosen = self._choose(cg, open_groups, costs, cfg, counts)
        removed: dict[str, list[int]] = defaultdict(list)
        for g in chosen:
            for t, ch in g.group.slots:
                removed[t].append(ch)
        held = self._held_scores(model, ctx, chosen, locs, per_position, cfg) if chosen else {}
        new, node_figs = model, {}
        if chosen:
            new, node_figs, written = rewrite.shrink(model, cg, {t: sorted(r) for t, r in removed.items()}, locs,
                                                     exact_border=cfg.border == "exact")
            if cfg.refit != "off":
                kept = {t: kept_indices(cg.channels[t], set(r)) for t, r in removed.items()}
                new, refit_figs = refit.refit(model, new, cg, kept, written, ctx.data, cfg.refit, REFIT_ROWS,
                                              lambda name, k: ctx.rng("trim", name, str(k)), limit)
                for name, figs in refit_figs.items():
                    node_figs.setdefault(name, {}).update(figs)
        slot_score = {(t, ch): g.score for g in chosen for t, ch in g.group.slots}
        records = self._records(model, cg, groups, node_figs, removed, slot_score, held, cfg, layers)
        figures = self._figures(cg, groups, chosen, locs, cfg, costs, samples, records)
        if counts.figures:  # the step was needed (a layer's count was rounded)
            figures["rounding"] = counts.figures
        if held and cfg.criterion == "locality" and cfg.metric == "std" and not cfg.target:
            # the std score is what the threshold judged: a group above it on held-out samples was
            # constant enough on the calibration samples only (its fold is exact there, not beyond)
            limit = figures["threshold"]
            figures["groups_above_threshold_heldout"] = sum(
                1 for g in chosen if max((held.get(s, 0.0) for s in g.group.slots), default=0.0) > limit + 1e-12)
        if cfg.refit != "off":
            figures["refit"] = cfg.refit
            figures["refit_applied"] = sum(1 for f in node_figs.values() if f.get("refit") == "applied")
        return PassResult(new, records, figures)

    # -- selection --------------------------------------------------------------------------------
    def _block_unselected(self, cg: ChannelGraph, groups: list[_Group]) -> None:
        """A group touching a layer the user's include/exclude/ops leave out is not trimmed."""
        ops = set(self.op_types())
        touched: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for t, node in cg.sources.items():
            touched[t].append(node)
        for s in cg.sinks:
            touched[s.tensor].append(s.node)
        for lane in cg.lanes:
            touched[lane.tensor].append(lane.node)
        for g in groups:
            if g.group.blocked is not None:
                continue
            for t in g.group.tensors:
                for node in touched.get(t, ()):
                    if node.op_type in ("Conv", "Gemm", "MatMul") and node.op_type not in ops:
                        g.group.blocked = f"touches {node_label(node)}, whose op {node.op_type} is not selected"
                    elif node.op_type in ("Conv", "Gemm", "MatMul"):
                        why = self.selection_reason(node)
                        if why:
                            g.group.blocked = f"touches {node_label(node)} ({why})"
                    if g.group.blocked:
                        break
                if g.group.blocked:
                    break

    def _score(self, cg: ChannelGraph, groups: list[_Group], locs: dict, cfg: TrimConfig) -> None:
        if cfg.criterion == "l1":
            norms: dict[str, np.ndarray] = {}
            for t, node in cg.sources.items():
                w = cg.index.array(node.input[1])
                if node.op_type == "Conv":
                    l1 = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
                else:  # rows of x @ W are the columns (Gemm transB=1: rows of the stored matrix)
                    l1 = np.abs(w).sum(axis=1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0)
                norms[t] = l1 / max(float(l1.mean()), 1e-30)
            for g in groups:
                vals = [norms[t][ch] for t, ch in g.group.slots if t in norms]
                g.score = float(max(vals)) if vals else np.inf
            return
        per_slot: dict[str, np.ndarray] = {}
        if cfg.metric == "output":
            for s in cg.sinks:
                if s.tensor in locs:
                    rel = _output_error(cg, s, locs[s.tensor])
                    per_slot[s.tensor] = rel if s.tensor not in per_slot else np.maximum(per_slot[s.tensor], rel)
        else:
            for t, loc in locs.items():
                per_slot[t] = 1.0 - loc.share if cfg.metric == "share" else loc.score
        for g in groups:
            vals = [float(per_slot[t][ch]) for t, ch in g.group.slots if t in per_slot]
            g.score = max(vals) if vals else np.inf

    def _counts(self, ctx: Context, cfg: TrimConfig) -> _Counts:
        """The step kept counts are rounded to: `round=<n>`, or measured on this machine (round=latency)."""
        if cfg.round != "latency":
            return _Counts(lambda: (int(cfg.round), {"round": int(cfg.round)}))

        def measure() -> tuple[int, dict]:
            cm = ctx.costs()
            if not cm.measure_enabled:
                return FALLBACK_ROUND, {"round": "latency", "step": FALLBACK_ROUND,
                                        "note": f"measuring is off: multiples of {FALLBACK_ROUND}"}
            step, figures = latency.measured_step(cm)
            if step is None:
                figures["note"] = f"multiples of {FALLBACK_ROUND}"
            return step or FALLBACK_ROUND, {"round": "latency", "step": step or FALLBACK_ROUND, **figures}

        return _Counts(measure)

    def _choose(self, cg: ChannelGraph, groups: list[_Group], costs: dict, cfg: TrimConfig,
                counts: _Counts) -> list[_Group]:
        """The groups to trim: the most local first, within the per-layer limits, then rounded."""
        order = sorted((g for g in groups if np.isfinite(g.score)), key=lambda g: (g.score, g.group.id))
        if cfg.target:
            total = sum(m for m in costs.values() if m)
            if not total:
                raise BadInputError("trim target= needs the model's MACs: give --input-shape (its dims are unknown)")
            budget = cfg.target * total
        else:
            thr = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLD[cfg.metric]
            limit = 1.0 - thr if cfg.metric == "share" else thr
            order = [g for g in order if g.score <= limit + 1e-12]
            budget = np.inf
        ledger = _MacLedger(cg, costs)
        count: Counter = Counter()
        chosen: list[_Group] = []
        refused: set[int] = set()  # untrimmed by rounding: not offered again
        for _ in range(4):  # rounding gives some MACs back; under a target, fill again from the next groups
            taken = {g.group.id for g in chosen}
            saved = ledger.removed(count)
            added = False
            for g in order:
                if saved >= budget:
                    break
                if g.group.id in taken or g.group.id in refused:
                    continue
                why = _misfit(cg, g, count, cfg)
                if why:
                    g.dropped = why
                    continue
                saved += ledger.delta(g, count)
                count.update(t for t, _ in g.group.slots)
                chosen.append(g)
                added = True
            if cfg.target:
                self._round_down(cg, chosen, count, order, refused, counts, cfg)
            before = {g.group.id for g in chosen}
            chosen = self._round(cg, chosen, count, counts)
            refused |= before - {g.group.id for g in chosen}
            if not cfg.target or not added or ledger.removed(count) >= budget:
                break
        return chosen

    def _round_down(self, cg: ChannelGraph, chosen: list[_Group], count: Counter, order: list[_Group],
                    refused: set[int], counts: _Counts, cfg: TrimConfig) -> None:
        """Under a MAC target, round a layer's kept count down when an allowed count below is the
        nearer one: trim its next most local groups (within the limits). `_round` then rounds the rest up."""
        taken = {g.group.id for g in chosen}
        for t in cg.sources:
            c = cg.channels[t]
            down = counts.down(c - count[t]) if count[t] else None
            if down is None:
                continue
            for g in order:
                if c - count[t] <= down:
                    break
                if (g.group.id in taken or g.group.id in refused or t not in g.group.tensors
                        or _misfit(cg, g, count, cfg)):
                    continue
                count.update(tt for tt, _ in g.group.slots)
                chosen.append(g)
                taken.add(g.group.id)
                g.dropped = ""

    def _round(self, cg: ChannelGraph, chosen: list[_Group], count: Counter, counts: _Counts) -> list[_Group]:
        """Untrim the least local groups of each layer until its kept count is an allowed one."""
        kept = list(chosen)
        changed = True
        while changed:
            changed = False
            for t in cg.sources:
                c = cg.channels[t]
                if count[t] == 0 or counts.ok(c - count[t], c):
                    continue
                mine = sorted((g for g in kept if t in g.group.tensors),
                              key=lambda g: (-g.score, -g.group.id))
                for g in mine:
                    if counts.ok(c - count[t], c):
                        break
                    kept.remove(g)
                    g.dropped = f"{counts.label} in {node_label(cg.sources[t])}"
                    count.subtract(Counter(tt for tt, _ in g.group.slots))
                    changed = True
        return kept

    # -- reporting --------------------------------------------------------------------------------
    def _held_scores(self, model, ctx: Context, chosen: list[_Group], locs: dict, per_position: dict,
                     cfg: TrimConfig) -> dict[tuple[str, int], float]:
        """The trimmed channels' std score on the guard's held-out samples (report only)."""
        if ctx.held_data is None:
            return {}
        tensors = sorted({t for g in chosen for t, _ in g.group.slots if t in locs})
        try:
            held = locality.measure(model, ctx.held_data, tensors, per_position, max_samples=cfg.samples)
        except BadInputError:
            return {}
        out: dict[tuple[str, int], float] = {}
        for g in chosen:
            scores = []
            for t, ch in g.group.slots:
                if t in held:
                    h, fit = held[t], locs[t]
                    # deviation on held-out samples from the fold value fitted on the calibration samples
                    shift = np.sqrt(np.mean((h.fold[ch] - fit.fold[ch]) ** 2))
                    scores.append(float(np.hypot(h.residual[ch], shift) / max(fit.rms, 1e-30)))
            if scores:  # a group's score is its worst channel's, as on the calibration samples
                out.update(dict.fromkeys(g.group.slots, max(scores)))
        return out

    def _figures(self, cg, groups, chosen, locs, cfg, costs, samples, records: list[LayerRecord]) -> dict:
        blocked = Counter(_reason_kind(g.group.blocked) for g in groups if g.group.blocked)
        total = sum(m for m in costs.values() if m)
        saved = sum(r.macs_before - r.macs_after for r in records
                    if r.action == REWRITTEN and r.macs_before is not None and r.macs_after is not None)
        figures = {
            "criterion": cfg.criterion,
            "metric": cfg.metric if cfg.criterion == "locality" else "l1 norm",
            "samples": samples,
            "groups": len(groups),
            "groups_blocked": sum(1 for g in groups if g.group.blocked),
            "groups_trimmed": len(chosen),
            "channels_trimmed": sum(1 for g in chosen for t, _ in g.group.slots if t in cg.sources),  # layer rows
            "macs_removed": int(saved),
            "macs_removed_fraction": round(saved / total, 4) if total else None,
            "blocked_reasons": dict(blocked.most_common(6)),
            "per_position_tensors": sum(1 for loc in locs.values() if loc.per_position),
        }
        if cfg.target:
            figures["target"] = cfg.target
        else:
            figures["threshold"] = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLD[cfg.metric]
        return figures

    def _records(self, model, cg: ChannelGraph, groups: list[_Group], node_figs: dict, removed: dict,
                 slot_score: dict, held: dict, cfg: TrimConfig, costs: dict) -> list[LayerRecord]:
        index = cg.index
        by_tensor: dict[str, list[_Group]] = defaultdict(list)
        for g in groups:
            for t in g.group.tensors:
                by_tensor[t].append(g)
        sink_of = {id(s.node): s for s in cg.sinks}
        records = []
        for node in self.candidates(model):
            label = node_label(node)
            cost = costs.get(label)
            params = cost.params if cost else None
            macs = cost.macs if cost else None
            figs = dict(node_figs.get(label, {}))
            if figs:
                frac_out = 1 - figs.get("out_channels_trimmed", 0) / max(figs.get("out_channels", 1), 1)
                frac_in = 1 - figs.get("in_channels_trimmed", 0) / max(figs.get("in_channels", 1), 1)
                scores = []
                held_scores = []
                if figs.get("out_channels_trimmed"):
                    t = node.output[0]
                    scores += [slot_score[(t, ch)] for ch in removed.get(t, ())]
                    held_scores += [held[(t, ch)] for ch in removed.get(t, ()) if (t, ch) in held]
                s = sink_of.get(id(node))
                if s is not None and figs.get("in_channels_trimmed"):
                    scores += [slot_score[(s.tensor, ch)] for ch in removed.get(s.tensor, ())]
                    held_scores += [held[(s.tensor, ch)] for ch in removed.get(s.tensor, ()) if (s.tensor, ch) in held]
                figs["locality"] = round(max(scores), 6) if scores else None
                if held_scores:
                    figs["locality_heldout"] = round(max(held_scores), 6)
                records.append(LayerRecord(
                    label, node.op_type, REWRITTEN, "", params,
                    None if params is None else int(round(params * frac_out * frac_in)),
                    macs, None if macs is None else int(round(macs * frac_out * frac_in)),
                    # a layer that lost output rows no longer has the original's output to compare
                    output="" if figs.get("out_channels_trimmed") else node.output[0], figures=figs))
                continue
            reason, extra = self._skip_reason(node, index, cg, by_tensor, cfg)
            records.append(LayerRecord(label, node.op_type, SKIPPED, reason, params, params, macs, macs,
                                       output=node.output[0] if node.output else "", figures=extra))
        return records

    def _skip_reason(self, node, index, cg: ChannelGraph, by_tensor, cfg: TrimConfig) -> tuple[str, dict]:
        """Why a layer was left alone, and its best (lowest) group score when it had open groups."""
        why = self.selection_reason(node)
        if why:
            return why, {}
        t = node.output[0] if node.output else ""
        if t not in cg.sources:
            if node.op_type == "Conv":
                conv = read_conv(index, node)
                if isinstance(conv, str):
                    return conv, {}
                if conv.group > 1:
                    return (f"grouped Conv (group={conv.group}): depthwise channels go with their input's"
                            if conv.weight.shape[1] == 1 else f"grouped Conv (group={conv.group}) is not trimmed"), {}
            return "its output is not a channel tensor trimming follows (not [N, C] / NCHW rows of this layer)", {}
        mine = by_tensor.get(t, [])
        open_ = [g for g in mine if g.group.blocked is None]
        if not open_:
            first = next((g.group.blocked for g in mine if g.group.blocked), "no groups")
            return f"its output channels cannot be trimmed: {first}", {}
        best = min(g.score for g in open_)
        extra = {"best_score": round(best, 6) if np.isfinite(best) else None}
        dropped = [g for g in open_ if g.dropped]
        if dropped:
            return f"{len(dropped)} qualifying channel(s) kept: {dropped[0].dropped}", extra
        if cfg.target:
            return f"no channel chosen within target={cfg.target:g}", extra
        thr = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLD[cfg.metric]
        if cfg.metric == "share":
            return f"no output channel qualifies: every share is below threshold={thr:g}", extra
        return f"no output channel qualifies: every locality score is above threshold={thr:g}", extra


FALLBACK_ROUND = 16  # round=latency when the probes cannot be timed: AVX-512's NCHWc block


class _Counts:
    """The kept channel counts a layer may end at: multiples of a step, or the whole layer. The step
    (and its figures) comes from `resolve`, called when a count is first rounded."""

    def __init__(self, resolve: Callable[[], tuple[int, dict]]):
        self._resolve = resolve
        self._step: int | None = None
        self.figures: dict = {}

    @property
    def step(self) -> int:
        if self._step is None:
            self._step, self.figures = self._resolve()
        return self._step

    @property
    def label(self) -> str:
        latency = self.figures.get("round") == "latency"
        return f"round={self.figures.get('round')}" + (f" (multiples of {self.step} here)" if latency else "")

    def ok(self, kept: int, c: int) -> bool:
        return kept >= c or kept % self.step == 0

    def down(self, kept: int) -> int | None:
        """Under a MAC target, the multiple to round `kept` down to, when it is the nearer one."""
        r = kept % self.step
        return kept - r if 0 < r <= self.step // 2 else None


class _MacLedger:
    """MACs a set of trimmed channels removes: a layer that loses a share p of its output rows and q
    of its input columns keeps (1 - p)(1 - q) of its MACs."""

    def __init__(self, cg: ChannelGraph, costs: dict):
        self.cg = cg
        self.layers: dict[int, list] = {}  # node id -> [macs, output tensor, input tensor]
        for t, node in cg.sources.items():
            self.layers.setdefault(id(node), [costs.get(node_label(node)) or 0, None, None])[1] = t
        for lane in cg.lanes:
            if lane.kind == "depthwise":
                self.layers.setdefault(id(lane.node), [costs.get(node_label(lane.node)) or 0, None, None])[1] = lane.tensor
        for sink in cg.sinks:
            self.layers.setdefault(id(sink.node), [costs.get(node_label(sink.node)) or 0, None, None])[2] = sink.tensor
        self.by_tensor: dict[str, list[int]] = defaultdict(list)
        for key, (_, out, inp) in self.layers.items():
            for t in {out, inp} - {None}:
                self.by_tensor[t].append(key)

    def _layer(self, key: int, count: Counter) -> float:
        macs, out, inp = self.layers[key]
        keep = 1.0
        for t in (out, inp):
            if t is not None:
                keep *= 1.0 - count[t] / self.cg.channels[t]
        return macs * (1.0 - keep)

    def removed(self, count: Counter) -> float:
        return sum(self._layer(k, count) for k in self.layers)

    def delta(self, g: _Group, count: Counter) -> float:
        """The MACs trimming `g` on top of `count` would add."""
        keys = {k for t in g.group.tensors for k in self.by_tensor.get(t, ())}
        after = count + Counter(t for t, _ in g.group.slots)
        return sum(self._layer(k, after) - self._layer(k, count) for k in keys)


def _output_error(cg: ChannelGraph, sink, loc: locality.Locality) -> np.ndarray:
    """Per input channel of a sink layer: the RMS error its fold adds to the layer's output, relative
    to the RMS the layer's inputs carry through its weights, sqrt(s_c^2 |W_c|^2 / sum_k E[x_k^2] |W_k|^2)
    (channels taken as uncorrelated)."""
    w = cg.index.array(sink.node.input[1]).astype(np.float64)
    c = cg.channels[sink.tensor]
    if sink.kind == "conv":
        col = (w**2).sum(axis=tuple(i for i in range(w.ndim) if i != 1))
    else:
        trans_b = sink.node.op_type == "Gemm" and bool(attr(sink.node, "transB", 0))
        rows = (w**2).sum(axis=0 if trans_b else 1)  # per input row of x @ W
        col = rows.reshape(c, -1).sum(axis=1)
    fold = loc.fold.reshape(c, -1)
    energy = loc.residual**2 + (fold**2).mean(axis=1)
    total = float((energy * col).sum())
    return np.sqrt(loc.residual**2 * col / max(total, 1e-30))


def _misfit(cg: ChannelGraph, g: _Group, count: Counter, cfg: TrimConfig) -> str:
    """Why trimming group `g` on top of `count` (channels trimmed per tensor) breaks a limit, or ""."""
    for t, n in Counter(t for t, _ in g.group.slots).items():
        c = cg.channels[t]
        if count[t] + n >= c:
            return f"would empty {t}"
        if t in cg.sources and count[t] + n > int(cfg.max_per_layer * c):
            return f"max_per_layer={cfg.max_per_layer:g} reached in {node_label(cg.sources[t])}"
        if t in cg.sources and c - count[t] - n < cfg.min_channels:
            return f"min_channels={cfg.min_channels} reached in {node_label(cg.sources[t])}"
    return ""


def _static_spatial(shape: tuple | None) -> bool:
    return shape is not None and len(shape) > 2 and all(isinstance(d, int) and d > 0 for d in shape[1:])


def _reason_kind(reason: str | None) -> str:
    """A blocked reason without its tensor name, for counting causes."""
    text = reason or ""
    text = text.split(": ", 1)[1] if ": " in text else text
    return re.sub(r"'[^']*'", "'...'", text)
