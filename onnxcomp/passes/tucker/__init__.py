"""`tucker`: low-rank decomposition of Conv / Gemm / MatMul layers (Kim et al., ICLR 2016).

Per layer, by shape:

* KxK conv with more than `first_layer` input channels -> **Tucker-2** on the output and input
  channel modes: `Conv 1x1 (S->R_in)`, `Conv KxK (R_in->R_out, original stride/pads/dilation/auto_pad)`,
  `Conv 1x1 (R_out->T, original bias)`, nodes `<name>/tucker_in`, `/tucker_core`, `/tucker_out`.
  A mode whose rank comes out full is dropped (its factor would be a square matrix that costs MACs
  and saves nothing) unless both are full (only possible when `min_gain` allows growth; useful to
  check the rewrite itself).
* KxK conv with few input channels (the RGB stem) -> **Tucker-1** on the output mode only:
  `/tucker_core` (S->R_out, original geometry) + `/tucker_out` (1x1, R_out->T).
* 1x1 conv, Gemm, MatMul with a constant 2-D right operand -> **truncated SVD** into two layers,
  `<name>/svd_a` (carries the original stride for a conv; Gemm's alpha is scaled into it) and
  `<name>/svd_b` (carries the bias; a Gemm keeps its `C` and `beta`). Off with `svd=off`.

The last node of every chain writes the layer's original output tensor, so validation can compare
it and roll a layer back. Grouped / depthwise convs are skipped: a depthwise conv has no channel
mixing to factor, and per-group decomposition is not implemented.

**Rank rules** (`rank=`), per decomposed mode of size R (R = the unfolding's maximal rank):
`evbmf` — analytic empirical VBMF (onnxcomp.linalg.vbmf) of the mode unfolding, softened by
`weaken` w as MUSCO does: r = R - w (R - r_evbmf) (w = 1 raw EVBMF, w = 0 full rank); a layer whose
raw EVBMF rank is 0 is skipped whatever w (its weights are indistinguishable from noise).
`<f>` — ceil(f R). `energy:<e>` — the fewest components holding a share e of the mode's spectrum.
`macs:<m>` — the rank pair, on the grid of multiples of `round`, with the least estimated
reconstruction error (from the energy each mode discards, see onnxcomp.linalg.decompose) whose
chain costs at most m times the layer's MACs. Ranks are then rounded to the nearest multiple of `round` (MLAS runs multiples of
16/32 much faster) and clamped to [max(min_rank, round), R]. A layer is skipped unless the chain cuts
its MACs by at least `min_gain`.

**Global budget** (`budget=macs:<f>`, overrides `rank`): the model's total Conv/Gemm/MatMul MACs
must fall to f times the original. Each decomposable layer offers its Pareto front of (MACs,
estimated relative reconstruction error e) over rank pairs on the `round` grid (only options that
save at least `min_gain` of the layer). The objective is the product of the energy every layer
keeps, prod (1 - e_l) (Zhang et al., TPAMI 2016): starting from nothing decomposed, a greedy loop
repeatedly takes the single move — one layer to a cheaper option — with the smallest increase of
-log(1 - e) per MAC saved, until the total meets the target or no move is left. Errors are relative
per layer, so every layer counts the same however large it is; the log makes each further cut of
one layer dearer, so the budget is spread instead of wrecking the largest layers. The pass figures
give the achieved ratio (`budget_achieved`), `budget_met`, the reach (`budget_floor`: the ratio with
every layer at its cheapest option; `budget_fixed`: the share outside the layers the pass considers,
those it cannot decompose or whose shapes are unknown, so no speed-up above 1 / `budget_fixed` is
possible; a considered layer with no option counts at its full cost in the floor; with a latency
budget the share is the whole run minus the layers alone, 0 when they add up to more), and a
`budget_note` when the target is out of reach. Needs static spatial shapes (the model's or `--input-shape`).
With `--data` (`allocate=auto` or `sensitivity`), each option's error proxy is replaced by what it
*measures*: the layer alone decomposed at up to 4 options of its front, the whole model's relative
squared output error on 64 calibration samples (proxies of the options in between scaled by the
nearest measured one), so the cut goes where the model-output damage per MAC saved is smallest;
`allocate=energy` keeps the weight-energy proxy. On PP-OCR's classifier at macs:0.9 this keeps
87.75% top-1 where the energy proxy keeps 81.75% (97.50% before; tests/test_budget_sensitivity.py).

**Measured latency** (`objective=latency`, the default): fewer MACs is not lower latency (thin 1x1
convs are memory-bound, small layers pay per-op overheads), so once the rank rule has chosen, the
layer and its options are timed alone in onnxruntime by the cost model (onnxcomp.costmodel, with the
run's session settings, cached per machine): the rank rule's choice, Tucker-1 on either mode (one
mode kept whole), and each with its ranks rounded up to a multiple of 32. Among the options whose
estimated error is at most the rank rule's choice's (and, for `rank=macs:<m>`, whose MACs stay
within m), the fastest is kept; a layer no option beats by `min_speedup` (default 5%) is left alone,
with the timings in its figures (`latency`). A layer whose input shape is unknown cannot be built
alone and keeps the MAC rule (figures `cost`). `objective=macs` skips the timing.
`budget=latency:<f>`: the global budget in measured time: per layer, the layer and up to 5 options
of its front are timed (the rest interpolated in MACs), the whole model is timed with the same
settings, and the greedy allocation below runs on milliseconds instead of MACs, so the cut goes
where time saved per unit of error is cheapest on this machine (`budget_achieved` is the predicted
share of the model's time; `budget_measured` the real one: the result timed against the input,
interleaved, the median of 3 pairings, all in `budget_measured_ratios`; `budget_met` is the prediction's).
Decisions read the latency cache first, so a second run on the same machine decides the same way;
on a cold cache a layer within a few percent of `min_speedup` may go either way.

**Data-aware refit** (`refit=on`, needs `--data`): the layer's original output Y and the output Z
of its chain up to the last layer, both computed from the layer's *original* input on the
calibration data (one onnxruntime run of the original model with the truncated chains attached as
probes), give a least-squares problem min ||Y - (W Z + b)||^2 for the last 1x1 layer's weights and
bias, solved from accumulated normal equations (bounded memory; `positions` rows sampled per batch
with the run's seeded rng). One calibration sample in four (the 2nd, 6th, ...) is held out: ridge
strengths pulling the weights towards the decomposition's are tried on the rest, and the best one on
the held-out samples is applied only if it beats the plain decomposition there by more than the
sampling noise of that estimate (onnxcomp.linalg.decompose.validated_refit); with fewer than 2
samples nothing is refit (the figures say so). This replaces the paper's fine-tuning for what a
linear refit can do: it re-mixes the kept components and re-centres the output (absorbing the mean
of what was truncated), but cannot recover information the first layers threw away, and it fits
each layer to exact inputs, so errors that accumulate across layers are not compensated.

**Sequential refit** (`refit=sequential`, needs `--data`): the same least-squares problem, but in
graph order and against the inputs each layer receives in the model compressed so far (every
earlier chain in place, already refit), with the original model's output of the layer as the
target (He et al. 2017; AdaRound/BRECQ-style reconstruction by least squares, no gradients). Error
from upstream layers is compensated where a linear map can; response-PCA chains are refit too.
Costs one run of the partly compressed model and one of the original per layer. On the trained
models it lowers the end-to-end error well below refit=on's (benchmarks/refit.py).

**Response PCA** (`method=response`, needs `--data`; Zhang et al., TPAMI 2016): instead of
factoring the weights, take the top principal directions P (T x r) of each layer's output responses
on the calibration data and rewrite y = W x + b as y ~= P (P^T W) x + [m + P P^T (b - m)] (m the mean
response): a KxK/1x1 conv `P^T W` with the original geometry followed by a 1x1 `P` with the new bias
(two layers, like Tucker-1). On trained compact nets the responses are far more low-rank than the
weights. The rank rules read the response spectrum (evbmf on the sampled response matrix). A layer
with fewer sampled rows (sample x position) than output channels is skipped: its response
covariance is singular and any rank rule would read an artefact of the sample size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp import costs
from onnxcomp.errors import BadInputError
from onnxcomp.graph import (
    ConvLayer,
    DenseLayer,
    GraphEditor,
    GraphIndex,
    attr,
    make_node,
    node_label,
    read_conv,
    read_dense,
)
from onnxcomp.linalg import decompose as dec
from onnxcomp.linalg.vbmf import evbmf_max_rank, evbmf_spectrum
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
from onnxcomp.passes.tucker import latency

if TYPE_CHECKING:
    from onnxcomp.costmodel import ModelTimer

# refit=on holds out every _HOLDOUT-th calibration sample (the 2nd, 6th, ...) to check the fit.
_HOLDOUT = 4
# allocate=sensitivity measures at most this many rank options per layer.
_PROBES = 4
# budget=latency times at most this many rank options per layer (the others are interpolated).
_TIMED = 5
# budget=latency reads the whole model's time this many times (for _WHOLE_MS each) spread over the
# layers' timing, besides one before the sensitivity probes and one at the end.
_WHOLE = 4
_WHOLE_MS = 300.0
_WHOLE_PAIRS = 3  # interleaved timings of the input and the result of a latency budget (median ratio kept)

_RANK_RE = re.compile(r"^(?:evbmf|(?:energy|macs):[0-9.eE+-]+|[0-9.eE+-]+)$")


@dataclass
class TuckerConfig(PassConfig):
    rank: str = option("evbmf", "rank rule: evbmf | <fraction of each mode> | energy:<share kept> | macs:<layer MACs fraction>",
                       stronger="lower")
    weaken: float = option(1.0, "with rank=evbmf: r = R - w (R - r_evbmf); 1 = raw EVBMF, 0 = full rank")
    round: int = option(16, "round ranks to a multiple of this (MLAS is fastest on multiples of 16/32); 1 = off")
    min_rank: int = option(1, "smallest rank per decomposed mode")
    svd: bool = option(True, "decompose 1x1 convs and Gemm/MatMul by truncated SVD (two layers)")
    min_gain: float = option(0.10, "skip a layer unless its MACs drop by at least this fraction (negative allows growth)")
    refit: str = option("off", "least-squares refit of each chain's last layer on --data: on (to the layer's "
                        "original inputs) | sequential (in graph order, to the inputs it receives in the "
                        "compressed model, targets from the original) | off")
    budget: str = option("", "global target macs:<f> (the model's MACs fall to f) or latency:<f> (its measured "
                         "onnxruntime time falls to f, from per-layer timings): per-layer ranks (overrides rank)",
                         search=["macs:0.85", "macs:0.7", "macs:0.5"])
    objective: str = option("latency", "what a rewrite must save: latency (each layer's options timed alone in "
                            "onnxruntime on this machine by the cost model; the fastest within the rank rule's "
                            "error is kept, a layer no faster is left alone) | macs", choices=("latency", "macs"))
    min_speedup: float = option(0.05, "with objective=latency: skip a layer unless its measured time drops by this fraction")
    allocate: str = option("auto", "how budget= spreads the cut: sensitivity (measured model-output error of each "
                           "layer, needs --data), energy (kept-energy product), auto (sensitivity with --data)",
                           choices=("auto", "sensitivity", "energy"))
    method: str = option("weights", "weights: factor the weights; response: PCA of the layer outputs on --data",
                         choices=("weights", "response"))
    first_layer: int = option(4, "convs with at most this many input channels get Tucker-1 (output mode only)")
    positions: int = option(4096, "rows (sample x position) drawn per batch per layer for refit / response (0 = all)")
    iterations: int = option(10, "HOOI iterations after the HOSVD initialisation of Tucker-2")

    def validate(self) -> None:
        super().validate()
        refit = str(self.refit).strip().lower()
        aliases = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off", "none": "off"}
        refit = aliases.get(refit, refit)
        if refit not in ("on", "off", "sequential"):
            raise ValueError(f"refit={self.refit}: must be on, off or sequential")
        self.refit = refit
        parse_rank(self.rank)
        if not 0.0 <= self.weaken <= 1.0:
            raise ValueError(f"weaken={self.weaken}: must be in [0, 1]")
        if self.round < 1:
            raise ValueError(f"round={self.round}: must be >= 1")
        if self.min_rank < 1:
            raise ValueError(f"min_rank={self.min_rank}: must be >= 1")
        if not self.min_gain < 1.0:
            raise ValueError(f"min_gain={self.min_gain}: must be < 1")
        if self.budget:
            parse_budget(self.budget)
        if not 0.0 <= self.min_speedup < 1.0:
            raise ValueError(f"min_speedup={self.min_speedup}: must be in [0, 1)")
        if self.first_layer < 0:
            raise ValueError(f"first_layer={self.first_layer}: must be >= 0")
        if self.positions < 0:
            raise ValueError(f"positions={self.positions}: must be >= 0")
        if self.iterations < 0:
            raise ValueError(f"iterations={self.iterations}: must be >= 0")


def parse_rank(text: str) -> tuple[str, float]:
    """`evbmf` -> ("evbmf", 0); `0.5` -> ("fraction", 0.5); `energy:0.9`; `macs:0.3`. ValueError if bad."""
    t = str(text).strip().lower()
    if t == "evbmf":
        return "evbmf", 0.0
    if not _RANK_RE.match(t):
        raise ValueError(f"rank={text}: expected evbmf, a fraction in (0, 1], energy:<0..1> or macs:<0..1>")
    kind, _, value = t.rpartition(":")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"rank={text}: '{value}' is not a number") from None
    kind = kind or "fraction"
    if kind in ("fraction", "energy") and not 0.0 < v <= 1.0:
        raise ValueError(f"rank={text}: the value must be in (0, 1]")
    if kind == "macs" and not 0.0 < v < 1.0:
        raise ValueError(f"rank={text}: the MACs fraction must be in (0, 1)")
    return kind, v


def parse_budget(text: str) -> tuple[str, float]:
    """`macs:0.3` -> ("macs", 0.3); `latency:0.5` -> ("latency", 0.5). ValueError if bad."""
    kind, _, value = str(text).strip().lower().partition(":")
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if kind not in ("macs", "latency") or not 0.0 < v < 1.0:
        raise ValueError(f"budget={text}: expected macs:<fraction in (0, 1)> or latency:<fraction in (0, 1)>")
    return kind, v


# -- per-layer planning ----------------------------------------------------------------------------


@dataclass
class _Plan:
    """A decomposable layer: its weight in conv form W (T, S, *k) and what may be done with it."""

    node: onnx.NodeProto
    kind: str  # "tucker2", "tucker1" (output mode only, KxK), "svd" (1x1 conv / dense)
    weight: np.ndarray  # conv form; for a dense layer (out, in)
    bias: np.ndarray | None
    cost: dec.ChainCost
    static: bool  # cost positions come from known shapes
    in_shape: tuple[int, ...] | None = None  # the layer's input at the given shapes (static only)
    conv: ConvLayer | None = None
    dense: DenseLayer | None = None
    params_before: int = 0
    macs_before: int | None = None
    figures: dict = field(default_factory=dict)
    ranks: tuple[int | None, int | None] | None = None
    # filled by the decomposition:
    first_w: np.ndarray | None = None  # chain layers, conv form (dense: (out, in) per layer)
    core_w: np.ndarray | None = None
    last_w: np.ndarray | None = None
    last_b: np.ndarray | None = None
    response: dec.ResponseStats | None = None
    new_bias: bool = False  # a dense chain's last layer gets its own (fitted) bias
    bases: dict[int, dec.ModeBasis] = field(default_factory=dict)  # mode -> singular basis (cached)
    reload: Callable[[], np.ndarray] | None = None  # reads the weight again from the model (see spill)
    shape: tuple[int, ...] = ()  # the weight's shape, known while it is spilled

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.weight.shape)

    def spill(self) -> None:
        """Drop this plan's weight copy when it can be read again (`reload`): a pass over VGG-16 holds
        one layer's weight at a time instead of a second copy of the whole model."""
        if self.reload is not None:
            self.weight = None  # type: ignore[assignment]
            # the layer descriptions keep their geometry: a NaN placeholder of the weight's shape
            # (no memory), so any read of its values would show at once
            if self.conv is not None:
                self.conv = dataclasses.replace(self.conv, weight=_placeholder(self.conv.weight))
            if self.dense is not None:
                self.dense = dataclasses.replace(self.dense, weight=_placeholder(self.dense.weight))

    def load(self) -> np.ndarray:
        """The weight (read again if spilled)."""
        if self.weight is None:
            assert self.reload is not None
            self.weight = self.reload()
        return self.weight

    def release_factors(self) -> None:
        """Drop the decomposition's arrays once they are in the graph editor."""
        self.first_w = self.core_w = self.last_w = None

    @property
    def name(self) -> str:
        return node_label(self.node)

class TuckerPass(Pass):
    name = "tucker"
    summary = "Tucker-2 / SVD low-rank decomposition of Conv, Gemm, MatMul (EVBMF ranks, MAC budget, data refit)"
    Config = TuckerConfig
    # the default search space pins this: a trial's choices must not depend on timings taken beside other trials
    search_fixed = {"objective": "macs"}
    # In a search trial the per-layer choice must not depend on timings taken beside other trials.
    search_fixed = {"objective": "macs"}
    default_ops = ("Conv", "Gemm", "MatMul")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Decompose every selected layer it can; `model` is left untouched."""
        from onnxcomp.shapes import static_shapes

        cfg: TuckerConfig = self.config  # type: ignore[assignment]
        if (cfg.refit != "off" or cfg.method == "response") and ctx.data is None:
            what = f"refit={cfg.refit}" if cfg.refit != "off" else "method=response"
            raise BadInputError(f"tucker {what} needs calibration data: give --data")
        index = GraphIndex(model)
        shapes = static_shapes(model, ctx.input_shapes)  # on a weightless skeleton: no weight copy
        layers: list[LayerRecord] = []
        plans: list[_Plan] = []
        # Without data the weights are only needed one layer at a time (spectra, then the
        # decomposition): each plan drops its copy and reads it again when needed, so the pass holds
        # one layer's weight beside the model rather than a second copy of every weight (issue:
        # peak memory on VGG-16). Response PCA and refits keep them: they use every weight at once.
        spill = cfg.method != "response" and cfg.refit == "off"
        for node in self.candidates(model):
            plan = self._plan(index, node, shapes, cfg, spill)
            if isinstance(plan, str):
                layers.append(LayerRecord(node_label(node), node.op_type, SKIPPED, plan,
                                          output=node.output[0] if node.output else ""))
            else:
                if not spill:
                    plan.reload = None
                plan.spill()
                plans.append(plan)
        figures: dict = {"layers_considered": len(layers) + len(plans)}
        if cfg.method == "response" and plans:
            self._capture_responses(model, plans, ctx, cfg)
            usable = []
            for p in plans:
                T, n = p.shape[0], p.response.count  # type: ignore[union-attr]
                if n < T:  # fewer rows than channels: a singular covariance, its spectrum says nothing
                    layers.append(LayerRecord(
                        p.name, p.node.op_type, SKIPPED,
                        f"response PCA needs at least {T} calibration rows for this {T}-channel layer, got {n}",
                        params_before=p.params_before, macs_before=p.macs_before, output=p.node.output[0]))
                else:
                    usable.append(p)
            plans = usable

        decided: dict[int, str | None] = {}  # plan index -> skip reason or None (decompose)
        if cfg.budget:
            decided = self._allocate_budget(model, plans, ctx=ctx, cfg=cfg, figures=figures)
        else:
            for i, plan in ctx.progress.iter(list(enumerate(plans)), "tucker ranks"):
                decided[i] = self._choose_ranks(plan, cfg)
                if decided[i] is None and cfg.objective == "latency":
                    decided[i] = self._latency_pick(plan, cfg, ctx)
            if cfg.objective == "latency" and plans:
                figures["cost_model"] = _cost_model_summary(plans)

        todo = [p for i, p in enumerate(plans) if decided.get(i) is None]
        if spill:  # ranks are final: keep only the vectors each decomposition needs, no Gram matrix
            # (computed now, while no weight is loaded, so the eigensolver's workspace and the Gram
            # are gone before each weight is read again)
            for i, p in enumerate(plans):
                if decided.get(i) is not None:
                    p.bases.clear()
                    continue
                for mode, r in zip((0, 1), p.ranks or (None, None), strict=True):
                    if r is not None and mode in p.bases:
                        p.bases[mode].freeze(r)
        # Without refits each layer is decomposed on its own, so order is free: the largest weight
        # goes first, while no other layer's factors are held yet (VGG-16's fc6, 411 MB, is where
        # the pass peaks).
        order = sorted(todo, key=lambda p: -math.prod(p.shape)) if spill else todo
        for plan in ctx.progress.iter(order, "tucker"):
            self._decompose(plan, cfg)
        if cfg.refit == "on" and todo:
            self._refit(model, todo, ctx, cfg, figures)
        elif cfg.refit == "sequential" and todo:
            self._refit_sequential(model, todo, ctx, cfg, figures)

        editor = GraphEditor(model)
        by_node = {id(p.node): p for p in todo}
        reasons = {id(p.node): decided.get(i) for i, p in enumerate(plans)}
        records: dict[int, LayerRecord] = {}
        for plan in plans:
            key = id(plan.node)
            if key in by_node:
                records[key] = self._rewrite(editor, plan)
                plan.release_factors()  # now initializers in the editor
            else:
                records[key] = LayerRecord(plan.name, plan.node.op_type, SKIPPED, reasons[key] or "not chosen",
                                           params_before=plan.params_before, macs_before=plan.macs_before,
                                           output=plan.node.output[0], figures=plan.figures)
        # Report in graph order.
        skipped_by_name = {r.node: r for r in layers}
        ordered: list[LayerRecord] = []
        for node in self.candidates(model):
            rec = records.get(id(node)) or skipped_by_name.get(node_label(node))
            if rec is not None:
                ordered.append(rec)
        out = editor.apply(consume=True) if by_node else model
        if by_node and cfg.budget and parse_budget(cfg.budget)[0] == "latency":
            figures.update(_measured_budget(model, out, ctx))
        rewritten = [r for r in ordered if r.action == REWRITTEN]
        figures["rewritten"] = len(rewritten)
        known = [r for r in rewritten if r.macs_before is not None and r.macs_after is not None]
        if known:
            before = sum(r.macs_before for r in known)  # type: ignore[misc]
            after = sum(r.macs_after for r in known)  # type: ignore[misc]
            figures["rewritten_macs_ratio"] = round(before / after, 4) if after else None
        return PassResult(out, ordered, figures)

    # -- planning -------------------------------------------------------------------------------------
    def _plan(self, index: GraphIndex, node: onnx.NodeProto, shapes: dict, cfg: TuckerConfig,
              spill: bool = False) -> _Plan | str:
        reason = self.selection_reason(node)
        if reason:
            return reason
        if node.op_type == "Conv":
            layer = read_conv(index, node)
            if isinstance(layer, str):
                return layer
            if layer.group != 1:
                depthwise = layer.group == layer.in_channels and layer.weight.shape[1] == 1
                what = "depthwise conv" if depthwise else f"grouped conv (group={layer.group})"
                return f"{what}: no dense channel mixing to factor (per-group decomposition is not implemented)"
            w = layer.weight
            bad = _weight_problem(w)
            if bad:
                return bad
            T, S = int(w.shape[0]), int(w.shape[1])
            ksize = int(math.prod(w.shape[2:]))
            pointwise = ksize == 1
            if pointwise and not cfg.svd:
                return "1x1 conv and svd=off"
            kind = "svd" if pointwise else ("tucker1" if S <= cfg.first_layer else "tucker2")
            out_shape = shapes.get(node.output[0])
            in_shape = shapes.get(node.input[0])
            static = _known(out_shape) and _known(in_shape)
            if static:
                pos_out = math.prod(out_shape) / T  # type: ignore[arg-type]
                pos_in = math.prod(in_shape) / S  # type: ignore[arg-type]
            else:
                pos_out, pos_in = 1.0, float(math.prod(layer.strides))
            cost = dec.ChainCost(T, S, ksize, pos_in, pos_out)
            plan = _Plan(node, kind, w, layer.bias, cost, static, conv=layer, reload=lambda: _conv_weight(index, node),
                         in_shape=tuple(int(d) for d in in_shape) if static else None,  # type: ignore[union-attr]
                         params_before=costs.conv_params(w.shape, layer.bias is not None),
                         macs_before=costs.conv_macs(w.shape, out_shape))
            return plan
        if node.op_type in ("Gemm", "MatMul"):
            d = read_dense(index, node, copy=not spill)
            if isinstance(d, str):
                return d
            if not cfg.svd:
                return f"{node.op_type} and svd=off"
            raw = index.initializers.get(node.input[1])
            dtype = d.weight.dtype if raw is None else helper.tensor_dtype_to_np_dtype(raw.data_type)
            if dtype != np.float32:  # read_dense hands a MatMul weight over as float32 whatever it was
                return f"weight dtype {np.dtype(dtype)} is not float32"
            bad = _weight_problem(d.weight)
            if bad:
                return bad
            S, T = d.weight.shape
            rows = costs.leading_rows(shapes.get(node.input[0]))
            cost = dec.ChainCost(int(T), int(S), 1, float(rows or 1), float(rows or 1))
            bias = None
            if d.bias is not None:
                if d.bias.size not in (1, T) or (d.bias.ndim == 2 and d.bias.shape[0] != 1):
                    return f"Gemm bias of shape {list(d.bias.shape)} is not per output"
                bias = np.broadcast_to(np.asarray(d.bias, np.float64).reshape(-1) * d.beta, (T,)).copy()
            params = int(d.weight.size + (d.bias.size if d.bias is not None else 0))
            w = _conv_form(d)
            x_shape = shapes.get(node.input[0])
            plan = _Plan(node, "svd", w, bias, cost, rows is not None, reload=lambda: _dense_weight(index, node),
                         in_shape=tuple(int(v) for v in x_shape) if _known(x_shape) else None,  # type: ignore[union-attr]
                         dense=d, params_before=params, macs_before=costs.dense_macs(int(S), int(T), rows))
            return plan
        return f"op {node.op_type} is not handled"

    # -- rank selection --------------------------------------------------------------------------------
    def _spectra(self, plan: _Plan) -> tuple[np.ndarray, np.ndarray | None]:
        """Squared singular values of the output (and, for Tucker-2, input) mode."""
        if plan.response is not None:
            vals, _ = plan.response.principal()
            return vals * plan.response.count, None
        for mode in (0, 1) if plan.kind == "tucker2" else (0,):
            if mode not in plan.bases:
                plan.bases[mode] = dec.mode_basis(plan.load(), mode)
        e_in = plan.bases[1].energy if plan.kind == "tucker2" else None
        plan.spill()
        return plan.bases[0].energy, e_in

    def _choose_ranks(self, plan: _Plan, cfg: TuckerConfig) -> str | None:
        """Set plan.ranks from the rank rule; return a skip reason or None."""
        kind, value = parse_rank(cfg.rank)
        T, S = plan.shape[:2]
        if kind == "fraction" and plan.response is None:  # no spectrum needed
            e_out, e_in = np.zeros(T), (np.zeros(S) if plan.kind == "tucker2" else None)
        else:
            e_out, e_in = self._spectra(plan)
        plan.figures["rank_rule"] = cfg.rank
        if kind == "macs":
            opts = dec.rank_options(plan.cost, dec.tail_fraction(e_out),
                                    dec.tail_fraction(e_in) if e_in is not None else None, cfg.round, cfg.min_rank)
            best = dec.best_under(opts, value * plan.cost.original)
            if best is None:
                return f"no rank on the round={cfg.round} grid meets macs:{value:g} of this layer"
            plan.ranks = (best.r_out, best.r_in)
            if best.r_out is None and best.r_in is None:
                return "no decomposition meets the target"
            return self._gain_check(plan, cfg)

        def pick(energy: np.ndarray, full: int, dim: int, mode_shape: tuple[int, int], which: str) -> int | str:
            if kind == "evbmf":
                raw = evbmf_spectrum(np.sqrt(energy[:min(mode_shape)]), mode_shape).rank
                plan.figures.setdefault("evbmf", {})[which] = raw
                if raw == 0:
                    # Weakening softens a detected rank; it must not invent structure where EVBMF
                    # found none (on trained nets these are often gating layers, the most fragile).
                    if evbmf_max_rank(mode_shape) == 0:
                        return (f"EVBMF rank 0 on the {which} mode: its {mode_shape[0]}x{mode_shape[1]} unfolding "
                                "is too small for EVBMF to keep any component")
                    what = "responses" if plan.response is not None else "weights"
                    return f"EVBMF rank 0 on the {which} mode ({what} indistinguishable from noise)"
                r = dec.weaken_rank(full, raw, cfg.weaken)
            elif kind == "fraction":
                r = dec.fraction_rank(full, value)
            else:
                r = dec.energy_rank(energy[:full], value)
            r = dec.round_rank(min(r, full), cfg.round, dim, cfg.min_rank)
            return min(r, dim)

        if plan.response is not None:
            shape_out = (plan.response.count, T)
        else:
            shape_out = (T, int(math.prod(plan.shape[1:])))
        r_out = pick(e_out, min(shape_out) if plan.response is None else T, T, shape_out, "output")
        if isinstance(r_out, str):
            return r_out
        r_in: int | str | None = None
        if e_in is not None:
            shape_in = (S, int(T * math.prod(plan.shape[2:])))
            r_in = pick(e_in, min(shape_in), S, shape_in, "input")
            if isinstance(r_in, str):
                return r_in
        ro: int | None = r_out
        ri: int | None = r_in  # type: ignore[assignment]
        if plan.kind == "tucker2":
            # A full-size mode gets no factor layer, unless both are full (a pure rewrite check).
            if not (ro == T and ri == S):
                ro = None if ro == T else ro
                ri = None if ri == S else ri
        plan.ranks = (ro, ri)
        return self._gain_check(plan, cfg)

    def _gain_check(self, plan: _Plan, cfg: TuckerConfig) -> str | None:
        r_out, r_in = plan.ranks  # type: ignore[misc]
        plan.figures["ranks"] = {"output": r_out, "input": r_in}
        after = self._chain_macs(plan)
        gain = 1.0 - after / plan.cost.original
        plan.figures["mac_gain"] = round(gain, 4)
        if gain < cfg.min_gain:
            what = (f"ranks (out {r_out or 'full'}, in {r_in or 'full'})" if plan.kind == "tucker2"
                    else f"rank {r_out}")
            effect = f"cut MACs by only {gain:.0%}" if gain > 0 else (
                "save no MACs" if gain == 0 else f"add {-gain:.0%} MACs")
            return f"{what} would {effect} (min_gain={cfg.min_gain:g})"
        return None

    def _latency_pick(self, plan: _Plan, cfg: TuckerConfig, ctx: Context) -> str | None:
        """objective=latency: time the layer and its options (latency.alternatives: the rank rule's
        choice, Tucker-1 in either mode, ranks rounded up to 32) alone, interleaved; keep the fastest
        whose estimated error is at most the rank rule's choice's, or return a skip reason when none
        beats the layer by min_speedup. A layer that cannot be timed alone keeps the MAC rule."""
        base_unit = latency.layer_unit(plan, None)
        if base_unit is None:
            plan.figures["cost"] = "macs: the layer's input shape is unknown, so it cannot be timed alone"
            return None
        T, S = plan.shape[0], plan.shape[1]
        e_out, e_in = self._spectra(plan)
        t_out = dec.tail_fraction(e_out)
        t_in = dec.tail_fraction(e_in) if e_in is not None else None
        opts = latency.alternatives(plan, plan.ranks)  # type: ignore[arg-type]
        errs = [latency.option_error(o, t_out, t_in, T, S) for o in opts]
        keep = [(o, e) for o, e in zip(opts, errs, strict=True) if e <= errs[0] + 1e-12]
        kind, value = parse_rank(cfg.rank)
        if kind == "macs":  # the user's MAC bound still holds for every option
            keep = [(o, e) for o, e in keep if plan.cost.tucker(*o) <= value * plan.cost.original * (1 + 1e-9)]
        est = ctx.costs().estimate([base_unit, *[latency.layer_unit(plan, o) for o, _ in keep]])  # type: ignore[list-item]
        base = est[0]
        # Compared by the time each ran alone, reorders included: the same for the layer and its
        # chains (same input and output), so the ratio understates the gain, never overstates it.
        timed = sorted(((est[k + 1].total_ms, e, o) for k, (o, e) in enumerate(keep)), key=lambda t: (t[0], t[1]))
        ms, err, best = timed[0]
        plan.figures["latency"] = {
            "layer_ms": round(base.total_ms, 5), "source": base.source,
            "options": [{"ranks": {"output": o[0], "input": o[1]}, "ms": round(m, 5), "error_estimate": round(e, 6)}
                        for m, e, o in timed],
            "speedup": round(base.total_ms / ms, 4) if ms > 0 else None}
        if base.reason:
            plan.figures["latency"]["reason"] = base.reason
        if not ms < base.total_ms * (1.0 - cfg.min_speedup):
            return (f"its fastest option runs {base.total_ms / max(ms, 1e-9):.2f}x as fast as the layer "
                    f"({base.total_ms:.4f} -> {ms:.4f} ms, {base.source}); needs "
                    f"{1.0 / (1.0 - cfg.min_speedup):.2f}x (min_speedup={cfg.min_speedup:g})")
        plan.ranks = best
        plan.figures["ranks"] = {"output": best[0], "input": best[1]}
        plan.figures["mac_gain"] = round(1.0 - self._chain_macs(plan) / plan.cost.original, 4)
        return None

    def _chain_macs(self, plan: _Plan) -> float:
        r_out, r_in = plan.ranks  # type: ignore[misc]
        if plan.kind != "tucker2":
            return plan.cost.tucker(r_out, None)
        return plan.cost.tucker(r_out, r_in)

    # -- global budget -----------------------------------------------------------------------------------
    def _allocate_budget(self, model, plans, ctx, cfg, figures) -> dict[int, str | None]:
        from onnxcomp.analysis import layer_costs

        kind, target = parse_budget(cfg.budget)
        all_costs = layer_costs(model, ctx.input_shapes)
        usable = [p for p in plans if p.static and (kind == "macs" or p.in_shape is not None)]
        if plans and not usable:
            raise BadInputError(f"tucker budget={kind}:... needs static shapes: give --input-shape for symbolic dims")
        # Layers whose MACs stay unknown (shape inference could not reach them) count as 0 and are
        # left alone; the figures say how many.
        unknown = [c.node for c in all_costs if c.macs is None] + [p.name for p in plans if not p.static]
        total = float(sum(c.macs or 0 for c in all_costs))
        in_plans = {p.name for p in usable}
        fixed = float(sum(c.macs or 0 for c in all_costs if c.node not in in_plans))
        entries = []
        for p in usable:
            e_out, e_in = self._spectra(p)
            opts = dec.rank_options(p.cost, dec.tail_fraction(e_out),
                                    dec.tail_fraction(e_in) if e_in is not None else None, cfg.round, cfg.min_rank)
            opts = [o for o in opts if o.macs <= (1.0 - cfg.min_gain) * p.cost.original]
            entries.append((p.cost.original, opts))
        mode = cfg.allocate if cfg.allocate != "auto" else ("sensitivity" if ctx.data is not None else "energy")
        timer = _WholeModelTimer(model, ctx) if kind == "latency" else None
        if timer is not None:
            timer.read()  # a first reading before the sensitivity probes: readings spread in time
        if mode == "sensitivity":
            if ctx.data is None:
                raise BadInputError("tucker allocate=sensitivity needs calibration data: give --data")
            entries = self._sensitivity_weighted(model, usable, entries, target, ctx, cfg)
        figures["budget_allocation"] = mode
        entries_before_timing = entries
        if kind == "latency":
            entries, total, fixed = self._timed_entries(timer, usable, entries, ctx, figures, cfg)
        choice, achieved = dec.allocate_budget(entries, target * total, fixed)
        met = achieved <= target * total
        unit = "time" if kind == "latency" else "MACs"
        # the reach: every layer at its cheapest option (the floor), and what no option can touch (fixed)
        floor = fixed + sum(min([base, *(o.macs for o in opts)]) for base, opts in entries)
        figures.update({"budget_target": target, "budget_achieved": round(achieved / total, 4) if total else None,
                        "budget_met": met, "budget_floor": round(floor / total, 4) if total else None,
                        "budget_fixed": round(fixed / total, 4) if total else None})
        if kind == "latency":
            figures.update({"model_ms_before": round(total, 4), "model_ms_after_predicted": round(achieved, 4)})
        else:
            figures.update({"model_macs_before": int(total), "model_macs_after": int(achieved)})
        if not met:
            figures["budget_note"] = (
                f"{kind}:{target:g} is out of reach: with every decomposable layer at its cheapest option "
                f"(round={cfg.round}, min_rank={cfg.min_rank}, min_gain={cfg.min_gain:g}) the model keeps "
                f"{achieved / total:.3f} of its {unit}; {fixed / total:.3f} are in layers this pass cannot decompose")
        if unknown:
            figures["budget_macs_unknown"] = sorted(set(unknown))
        decided: dict[int, str | None] = {}
        slot = {id(p.node): k for k, p in enumerate(usable)}
        for i, p in enumerate(plans):
            p.figures["rank_rule"] = cfg.budget
            if id(p.node) not in slot:
                decided[i] = "budget: MACs unknown at the given input shapes"
                continue
            k = slot[id(p.node)]
            j = choice[k]
            if j is None:
                if not entries[k][1] and kind == "latency" and entries_before_timing[k][1]:
                    decided[i] = (f"budget: no rank runs min_speedup={cfg.min_speedup:g} of this layer's "
                                  "time faster (measured)")
                else:
                    decided[i] = (f"budget: no rank on the round={cfg.round} grid cuts this layer's MACs by "
                                  f"min_gain={cfg.min_gain:g}" if not entries[k][1]
                                  else "budget met without this layer" if met
                                  else f"budget: no option of this layer saves {unit}")
                continue
            o = entries[k][1][j]
            p.ranks = (o.r_out, o.r_in)
            p.figures["ranks"] = {"output": o.r_out, "input": o.r_in}
            if kind == "latency":
                p.figures["latency"]["chosen_ms"] = round(o.macs, 5)  # the option's cost is its time here
            p.figures["error_estimate"] = round(o.error, 6)
            decided[i] = None
        return decided

    def _timed_entries(self, timer, usable, entries, ctx, figures, cfg):
        """budget=latency: each layer's options with their cost in measured ms instead of MACs.

        Per layer, the layer itself and up to `_TIMED` options spread over its front are timed
        alone, interleaved (onnxcomp.costmodel); an option in between gets the time interpolated
        linearly in MACs between its measured neighbours. Times are what each adds to a run under
        way: a layer alone also pays a run's start (the call, its first kernel, waking the pool),
        several times a small layer's own cost; the layer's in-run cost (Estimate.in_run_ms) says how
        much, and its chains are charged the same start. Options are then kept on the front in time:
        each must run at least `min_speedup` of the layer's time faster than every option with less
        error (a cheaper rank that saves nothing measurable only adds error; without this, an out of
        reach budget took every layer to its lowest rank for a few microseconds). The model's own
        time is measured whole with the same settings, and what the layers do not account for is fixed.

        The whole model is read (`timer`) before the sensitivity probes, `_WHOLE` times spread over
        the layers' timing and at the end, and the fastest p50 is kept: on this VM a model of many
        small ops runs up to 1.6x slower in spells of seconds to tens of seconds (machine-wide: they
        carry across processes, and come in a quiet loop of fresh processes too) while its layers
        alone do not (PP-OCR rec: 8.2 ms in fresh processes, 12.8-13.5 ms after the probes, then 8.3);
        a whole-model time from such a spell against the layers' times inflated the fixed part until
        every budget took every layer to its lowest rank. All the readings are in the figures."""
        import dataclasses

        cm = ctx.costs()
        out = []
        layer_ms = 0.0
        sources: dict[str, int] = {}
        when = {round(k * len(usable) / _WHOLE) for k in range(_WHOLE)}  # before these layers
        for i, (p, (_, opts)) in enumerate(ctx.progress.iter(list(zip(usable, entries, strict=True)), "tucker latency")):
            if i in when:
                timer.read()
            picks = sorted({round(k * (len(opts) - 1) / max(_TIMED - 1, 1)) for k in range(_TIMED)}) if opts else []
            units = [latency.layer_unit(p, None), *[latency.layer_unit(p, (opts[j].r_out, opts[j].r_in)) for j in picks]]
            est = cm.estimate(units)  # type: ignore[arg-type]
            for e in est:
                sources[e.source] = sources.get(e.source, 0) + 1
            in_run = cm.estimate(units[:1], in_run=True)[0].in_run_ms  # type: ignore[arg-type]
            start = max(est[0].ms - in_run, 0.0) if in_run is not None else cm.overhead_ms()
            base = max(est[0].ms - start, 1e-6)
            layout = est[0].total_ms - est[0].ms  # the layer's boundary reorders: its chains pay the same
            layer_ms += base
            xs = [p.cost.original] + [opts[j].macs for j in picks]
            ys = [base] + [max(e.total_ms - layout - start, 1e-6) for e in est[1:]]
            order = np.argsort(xs)
            xs_sorted, ys_sorted = np.asarray(xs)[order], np.asarray(ys)[order]
            timed = [dataclasses.replace(o, macs=float(np.interp(o.macs, xs_sorted, ys_sorted))) for o in opts]
            front, last = [], base
            for o in sorted(timed, key=lambda o: (o.error, o.macs)):
                if o.macs <= last - cfg.min_speedup * base:
                    front.append(o)
                    last = o.macs
            p.figures["latency"] = {"layer_ms": round(base, 5), "run_start_ms": round(start, 5),
                                    "source": est[0].source,
                                    "timed": [{"ranks": {"output": opts[j].r_out, "input": opts[j].r_in},
                                               "ms": round(y, 5)} for j, y in zip(picks, ys[1:], strict=True)],
                                    "options_on_time_front": len(front)}
            out.append((base, front))
        timer.read()
        timer.close()
        whole = min(timer.readings)
        total = max(whole, layer_ms)
        figures["cost_model"] = {"layers": sources, "model_ms_measured": round(whole, 4),
                                 "model_ms_readings": [round(w, 4) for w in timer.readings],
                                 "layers_ms": round(layer_ms, 4)}
        return out, total, max(total - layer_ms, 0.0)

    def _sensitivity_weighted(self, model, usable, entries, target, ctx, cfg):
        """Each layer's options with their error proxy replaced by the measured model-output error.

        Up to `_PROBES` options per layer, spread over its front (all when it has no more), are
        measured: the layer alone decomposed at that option, the whole model's relative squared
        output error on up to 64 calibration samples (onnxcomp.sensitivity.OutputErrorProbe). An
        option not measured gets its proxy scaled by the sensitivity (output error / proxy) of the
        measured option nearest in MACs. A layer whose small weight error ruins the output (a gating
        layer) is then cut last.
        """
        import dataclasses

        from onnxcomp.sensitivity import OutputErrorProbe

        probe = OutputErrorProbe(model, ctx.data)
        out = []
        for p, (orig, opts) in ctx.progress.iter(list(zip(usable, entries, strict=True)), "tucker sensitivity"):
            if not opts:
                out.append((orig, opts))
                continue
            picks = sorted({round(k * (len(opts) - 1) / max(_PROBES - 1, 1)) for k in range(_PROBES)})
            saved_bases = dict(p.bases)
            measured: dict[int, float] = {}
            for j in picks:
                o = opts[j]
                p.ranks = (o.r_out, o.r_in)
                self._decompose(p, cfg)
                ed = GraphEditor(model)
                self._rewrite(ed, p)
                err = probe.error(ed.apply())
                measured[j] = err if math.isfinite(err) else 1.0
                p.bases.update(saved_bases)
            scaled = []
            for j, o in enumerate(opts):
                if j in measured:
                    e = measured[j]
                else:
                    near = min(measured, key=lambda m: abs(opts[m].macs - o.macs))
                    e = measured[near] / max(opts[near].error, 1e-12) * o.error
                scaled.append(dataclasses.replace(o, error=min(e, 1.0 - 1e-9)))
            p.figures["sensitivity_probes"] = [
                {"ranks": {"output": opts[j].r_out, "input": opts[j].r_in}, "macs": int(opts[j].macs),
                 "error_estimate": round(opts[j].error, 6), "output_error": round(measured[j], 6)} for j in picks]
            out.append((orig, scaled))
        return out

    # -- decomposition -----------------------------------------------------------------------------------
    def _decompose(self, plan: _Plan, cfg: TuckerConfig) -> None:
        r_out, r_in = plan.ranks  # type: ignore[misc]
        w = plan.load()
        if plan.response is not None:
            _, vecs = plan.response.principal()
            basis = vecs[:, : (r_out or w.shape[0])]
            w1, w2, b2 = dec.response_projection(w, plan.bias, basis, plan.response.mean)
            plan.core_w, plan.last_w, plan.last_b = w1, w2.reshape(w2.shape + (1,) * (w.ndim - 2)), b2
            plan.figures["method"] = "response"
            plan.new_bias = True
            plan.figures["response_energy_kept"] = round(1.0 - float(dec.tail_fraction(self._spectra(plan)[0])[basis.shape[1]]), 6)
            plan.figures["weight_error"] = round(dec.relative_error(w, np.tensordot(w2, w1, axes=(1, 0))), 6)
            return
        if plan.kind == "tucker2":
            t = dec.tucker_decompose(w, r_out, r_in, n_iter_max=cfg.iterations, bases=plan.bases)
        else:
            t = dec.tucker_decompose(w, r_out, None, bases=plan.bases)
        plan.bases.clear()  # free memory: a 4096-wide dense layer's basis is 128 MB
        plan.spill()
        plan.figures["method"] = {"tucker2": "tucker2" if (r_out and r_in) else "tucker1", "tucker1": "tucker1",
                                  "svd": "svd"}[plan.kind]
        plan.figures["error"] = round(t.error, 6)
        spatial = (1,) * (w.ndim - 2)
        plan.first_w = None if t.in_factor is None else t.in_factor.T.reshape(t.in_factor.shape[1], w.shape[1], *spatial)
        plan.core_w = t.core
        if t.out_factor is not None:
            plan.last_w = t.out_factor.reshape(w.shape[0], t.out_factor.shape[1], *spatial)
            plan.last_b = None if plan.bias is None else np.asarray(plan.bias, np.float64)
        else:  # input mode only: the core is the last layer and carries the bias
            plan.last_w, plan.last_b = None, None

    # -- graph rewrite -----------------------------------------------------------------------------------
    def _rewrite(self, ed: GraphEditor, plan: _Plan) -> LayerRecord:
        nodes, params = (self._conv_nodes(ed, plan) if plan.conv is not None else self._dense_nodes(ed, plan))
        ed.replace(plan.node, nodes)
        macs_after = None
        if plan.static and plan.macs_before is not None:
            macs_after = int(round(self._chain_macs(plan)))
        return LayerRecord(plan.name, plan.node.op_type, REWRITTEN, "", params_before=plan.params_before,
                           params_after=params, macs_before=plan.macs_before, macs_after=macs_after,
                           output=plan.node.output[0], figures=plan.figures)

    def _conv_nodes(self, ed: GraphEditor, plan: _Plan) -> tuple[list[onnx.NodeProto], int]:
        layer = plan.conv
        assert layer is not None
        name = plan.name
        nsp = layer.spatial_rank
        point = {"kernel_shape": [1] * nsp}
        pointwise = plan.kind == "svd"
        stages: list[tuple[str, np.ndarray, np.ndarray | None, dict]] = []
        if plan.first_w is not None:
            stages.append(("tucker_in", plan.first_w, None, point))
        core_bias = plan.bias if plan.last_w is None else None
        stages.append(("svd_a" if pointwise else "tucker_core", plan.core_w, core_bias, layer.geometry_attributes()))
        if plan.last_w is not None:
            stages.append(("svd_b" if pointwise else "tucker_out", plan.last_w, plan.last_b, point))
        nodes = []
        src = layer.node.input[0]
        params = 0
        for k, (suffix, w, b, attrs) in enumerate(stages):
            last = k == len(stages) - 1
            node_name = ed.unique_name(f"{name}/{suffix}")  # also names the tensor it writes
            out = layer.node.output[0] if last else node_name
            inputs = [src, ed.add_initializer(f"{name}/{suffix}.weight", np.asarray(w, np.float32))]
            params += int(np.asarray(w).size)
            if b is not None:
                inputs.append(ed.add_initializer(f"{name}/{suffix}.bias", np.asarray(b, np.float32)))
                params += int(np.asarray(b).size)
            nodes.append(make_node("Conv", inputs, [out], node_name, **attrs))
            src = out
        return nodes, params

    def _dense_nodes(self, ed: GraphEditor, plan: _Plan) -> tuple[list[onnx.NodeProto], int]:
        d = plan.dense
        assert d is not None and plan.core_w is not None and plan.last_w is not None
        name = plan.name
        node = d.node
        a = np.asarray(plan.core_w, np.float32).reshape(plan.core_w.shape[0], -1).T  # (in, r), alpha included
        b = np.asarray(plan.last_w, np.float32).reshape(plan.last_w.shape[0], -1).T  # (r, out)
        mid = ed.unique_name(f"{name}/svd_a")  # node and tensor share the name
        nodes = [make_node("MatMul", [node.input[0], ed.add_initializer(f"{name}/svd_a.weight", a)], [mid], mid)]
        params = a.size + b.size
        b_name = ed.add_initializer(f"{name}/svd_b.weight", b)
        if node.op_type == "Gemm":
            inputs = [mid, b_name]
            gemm_attrs: dict = {}
            if plan.new_bias:
                inputs.append(ed.add_initializer(f"{name}/svd_b.bias", np.asarray(plan.last_b, np.float32)))
                params += int(np.asarray(plan.last_b).size)
            elif len(node.input) > 2 and node.input[2]:
                inputs.append(node.input[2])
                params += int(d.bias.size) if d.bias is not None else 0
                beta = attr(node, "beta", 1.0)
                if beta != 1.0:
                    gemm_attrs["beta"] = float(beta)
            nodes.append(make_node("Gemm", inputs, [node.output[0]], ed.unique_name(f"{name}/svd_b"), **gemm_attrs))
        else:
            if plan.last_b is not None and plan.new_bias:
                tmp = ed.unique_name(f"{name}/svd_b")
                nodes.append(make_node("MatMul", [mid, b_name], [tmp], tmp))
                bias = ed.add_initializer(f"{name}/svd_b.bias", np.asarray(plan.last_b, np.float32))
                params += int(np.asarray(plan.last_b).size)
                nodes.append(make_node("Add", [tmp, bias], [node.output[0]], ed.unique_name(f"{name}/svd_bias")))
            else:
                nodes.append(make_node("MatMul", [mid, b_name], [node.output[0]], ed.unique_name(f"{name}/svd_b")))
        return nodes, int(params)

    # -- calibration data ---------------------------------------------------------------------------------
    def _probe_model(self, model: onnx.ModelProto, probes: dict[str, tuple[list[onnx.NodeProto], list]]) -> onnx.ModelProto:
        """A copy of `model` with probe nodes inserted right after the layers they belong to."""
        work = onnx.ModelProto()
        work.CopyFrom(model)
        new_nodes = []
        for n in work.graph.node:
            new_nodes.append(n)
            label = node_label(n)
            if label in probes:
                nodes, inits = probes[label]
                new_nodes.extend(nodes)
                work.graph.initializer.extend(inits)
        del work.graph.node[:]
        work.graph.node.extend(new_nodes)
        return work

    def _rows(self, arr: np.ndarray, channels_axis: int, rng: np.random.Generator, cap: int,
              pick: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, channels) view of an activation; `cap` random rows (the same `pick` for paired tensors)."""
        a = np.moveaxis(arr, channels_axis, -1)
        rows = a.reshape(-1, a.shape[-1])
        if pick is None:
            n = rows.shape[0]
            pick = np.sort(rng.choice(n, size=cap, replace=False)) if 0 < cap < n else np.arange(n)
        return rows[pick], pick

    def _batches(self, model: onnx.ModelProto, outputs: list[str], ctx: Context):
        from onnxcomp.runtime import run_batches

        limit = ctx.calibration_batches or None
        yield from run_batches(model, ctx.data, outputs=outputs, max_batches=limit, max_bytes=256 * 2**20)

    def _capture_responses(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: TuckerConfig) -> None:
        outputs = [p.node.output[0] for p in plans]
        for p in plans:
            p.response = dec.ResponseStats(p.shape[0])
        for k, (_feeds, values, _labels) in enumerate(self._batches(model, outputs, ctx)):
            for p in plans:
                y = values[p.node.output[0]]
                axis = 1 if p.conv is not None else y.ndim - 1
                rows, _ = self._rows(y, axis, ctx.rng("tucker", p.name, str(k)), cfg.positions)
                p.response.add(rows)  # type: ignore[union-attr]
        for p in plans:
            if p.response is None or p.response.count == 0:
                raise BadInputError("tucker method=response: the calibration data gave no samples")

    def _refit(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: TuckerConfig, figures: dict) -> None:
        fit = [p for p in plans if p.last_w is not None and p.figures.get("method") != "response"]
        for p in plans:
            if p.last_w is None:
                p.figures["refit"] = "n/a (the chain ends in the KxK core)"
            elif p.figures.get("method") == "response":
                p.figures["refit"] = "n/a (response PCA is already the least-squares fit)"
        if not fit:
            return
        probes: dict[str, tuple[list[onnx.NodeProto], list]] = {}
        probe_out: dict[str, str] = {}
        for p in fit:
            nodes, inits, out = self._head_nodes(p)
            probes[p.name] = (nodes, inits)
            probe_out[p.name] = out
        work = self._probe_model(model, probes)
        outputs = [x for p in fit for x in (p.node.output[0], probe_out[p.name])]
        # Every HOLDOUT-th calibration sample (counted per layer along the activation's leading
        # axis) is held out: the refit is kept only if it lowers the error on those samples.
        systems: dict[str, tuple[dec.LeastSquares, dec.LeastSquares]] = {}
        seen: dict[str, int] = {}
        held_samples: dict[str, int] = {}
        for p in fit:
            systems[p.name] = self._systems(p)
            seen[p.name] = held_samples[p.name] = 0
        batches = 0
        for k, (_feeds, values, _labels) in enumerate(self._batches(work, outputs, ctx)):
            batches += 1
            for p in fit:
                self._accumulate(p, values[p.node.output[0]], values[probe_out[p.name]], k, systems[p.name],
                                 seen, held_samples, ctx, cfg)
        if batches == 0:
            raise BadInputError("tucker refit=on: the calibration data gave no batches")
        for p in fit:
            self._apply_refit(p, systems[p.name], held_samples[p.name])
        figures["refit_batches"] = batches
        figures["refit_applied"] = sum(p.figures["refit"] == "applied" for p in fit)

    def _systems(self, p: _Plan) -> tuple[dec.LeastSquares, dec.LeastSquares]:
        """(train, held-out) normal equations for the chain's last layer."""
        has_bias = p.new_bias or not (p.dense is not None and p.dense.node.op_type == "MatMul" and p.bias is None)
        n_in, n_out = int(p.last_w.shape[1]), int(p.last_w.shape[0])  # type: ignore[union-attr]
        return dec.LeastSquares(n_in, n_out, bias=has_bias), dec.LeastSquares(n_in, n_out, bias=has_bias)

    def _accumulate(self, p: _Plan, y: np.ndarray, z: np.ndarray, k: int, systems, seen: dict, held_samples: dict,
                    ctx: Context, cfg: TuckerConfig) -> None:
        """Add batch `k`'s rows (targets y, chain-head outputs z) to the train or held-out system:
        every _HOLDOUT-th sample (counted along the leading axis) is held out."""
        axis = 1 if p.conv is not None else y.ndim - 1
        zr, pick = self._rows(z, axis, ctx.rng("tucker", p.name, str(k)), cfg.positions)
        yr, _ = self._rows(y, axis, ctx.rng("tucker", p.name, str(k)), cfg.positions, pick)
        samples = y.shape[0] if y.ndim > 1 else 1
        per_sample = max(1, (y.size // y.shape[axis]) // samples)
        sample = seen[p.name] + np.arange(samples)
        held_samples[p.name] += int(np.sum(sample % _HOLDOUT == 1))
        held = (seen[p.name] + pick // per_sample) % _HOLDOUT == 1
        seen[p.name] += samples
        train, check = systems
        train.add(zr[~held], yr[~held])
        check.add(zr[held], yr[held])

    def _refit_sequential(self, model: onnx.ModelProto, plans: list[_Plan], ctx: Context, cfg: TuckerConfig,
                          figures: dict) -> None:
        """refit=sequential: in graph order, each chain's last layer is refit to map the inputs it
        receives in the model compressed so far (every earlier chain in place, already refit) to
        the original model's output of the layer, so error from upstream layers is compensated
        (He et al. 2017; block reconstruction by least squares, no gradients). One run of the
        partly compressed model and one of the original per layer."""
        from onnxcomp.runtime import run_batches

        fit = [p for p in plans if p.last_w is not None]
        for p in plans:
            if p.last_w is None:
                p.figures["refit"] = "n/a (the chain ends in the KxK core)"
        limit = ctx.calibration_batches or None
        batches = 0
        for p in ctx.progress.iter(fit, "tucker refit"):
            ed = GraphEditor(model)
            for q in plans:
                if q is p:
                    break
                self._rewrite(ed, q)
            nodes, inits, head = self._head_nodes(p)
            work = self._probe_model(ed.apply() if ed.changed else model, {p.name: (nodes, inits)})
            systems = self._systems(p)
            seen, held_samples = {p.name: 0}, {p.name: 0}
            original = run_batches(model, ctx.data, outputs=[p.node.output[0]], max_batches=limit)
            compressed = run_batches(work, ctx.data, outputs=[head], max_batches=limit)
            batches = 0
            for k, ((_f, y, _l), (_f2, z, _l2)) in enumerate(zip(original, compressed, strict=True)):
                batches += 1
                self._accumulate(p, y[p.node.output[0]], z[head], k, systems, seen, held_samples, ctx, cfg)
            if batches == 0:
                raise BadInputError("tucker refit=sequential: the calibration data gave no batches")
            self._apply_refit(p, systems, held_samples[p.name])
        figures["refit_batches"] = batches
        figures["refit_applied"] = sum(p.figures["refit"] == "applied" for p in fit)

    def _apply_refit(self, p: _Plan, systems, held: int) -> None:
        """Solve, check on the held-out rows, and keep the refit only where it helps there."""
        train, check = systems
        w_old = p.last_w.reshape(p.last_w.shape[0], -1).T  # type: ignore[union-attr]
        r = dec.validated_refit(train, check, w_old, p.last_b, held_samples=held)
        p.figures["refit_rows"] = train.count + check.count
        p.figures["refit_heldout_rows"] = check.count
        p.figures["refit_error_before"] = round(r.calib_before, 6)  # type: ignore[arg-type]
        p.figures["refit_error_after"] = round(r.calib_after if r.applied else r.calib_before, 6)  # type: ignore[arg-type]
        if r.heldout_before is not None:
            p.figures["refit_heldout_error_before"] = round(r.heldout_before, 6)
            p.figures["refit_heldout_error_after"] = round(r.heldout_after if r.applied else r.heldout_before, 6)  # type: ignore[arg-type]
        if not r.applied and r.heldout_after is not None:
            p.figures["refit_candidate_heldout_error"] = round(r.heldout_after, 6)
        p.figures["refit"] = r.reason
        if r.applied:
            p.last_w = r.w.T.reshape(p.last_w.shape)  # type: ignore[union-attr]
            p.last_b = r.b
            p.figures["refit_ridge"] = r.ridge
            p.new_bias = r.b is not None

    def _head_nodes(self, plan: _Plan) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
        """Probe nodes computing the chain up to (not including) its last layer from the layer's input."""
        base = f"{plan.name}/tucker_refit_probe"
        src = plan.node.input[0]
        nodes, inits = [], []
        if plan.conv is not None:
            layer = plan.conv
            stages = []
            if plan.first_w is not None:
                stages.append((plan.first_w, {"kernel_shape": [1] * layer.spatial_rank}))
            stages.append((plan.core_w, layer.geometry_attributes()))
            for k, (w, attrs) in enumerate(stages):
                wn, out = f"{base}/{k}.weight", f"{base}/{k}"
                inits.append(numpy_helper.from_array(np.asarray(w, np.float32), wn))
                nodes.append(make_node("Conv", [src, wn], [out], f"{base}/{k}", **attrs))
                src = out
        else:
            a = np.asarray(plan.core_w, np.float32).reshape(plan.core_w.shape[0], -1).T  # type: ignore[union-attr]
            wn, out = f"{base}/0.weight", f"{base}/0"
            inits.append(numpy_helper.from_array(a, wn))
            nodes.append(make_node("MatMul", [src, wn], [out], f"{base}/0"))
            src = out
        return nodes, inits, src


class _WholeModelTimer:
    """The whole model timed with the cost model's settings on one random batch, `_WHOLE_MS` per
    reading, its session built once (`close` frees it)."""

    def __init__(self, model: onnx.ModelProto, ctx: Context):
        from onnxcomp.data import random_source

        feeds = random_source(model, ctx.input_shapes or None, samples=1, batch_size=1, seed=ctx.seed).first_batch()[0]
        self.timer: ModelTimer | None = ctx.costs().model_timer([model], feeds)
        self.readings: list[float] = []

    def read(self) -> None:
        assert self.timer is not None, "read after close"
        self.readings.append(self.timer.read(_WHOLE_MS)[0].ms)

    def close(self) -> None:
        self.timer = None


def _measured_budget(model: onnx.ModelProto, out: onnx.ModelProto, ctx: Context) -> dict:
    """budget=latency: the rewritten model timed against the input, interleaved, `_WHOLE_PAIRS` times
    (the median ratio kept, all in the figures). `budget_achieved` is the cost model's prediction: a
    sum of layers timed alone, which small chains inside a model do not always realize (glyph_resnet at
    budget=latency:0.52: 0.515 predicted, 0.67-0.71 measured; PP-OCR rec at 0.79: 0.79 and 0.81)."""
    from onnxcomp.data import random_source

    feeds = random_source(model, ctx.input_shapes or None, samples=1, batch_size=1, seed=ctx.seed).first_batch()[0]
    pairs = ctx.costs().paired_timings(model, out, feeds, pairings=_WHOLE_PAIRS, target_ms=_WHOLE_MS)
    before, after = pairs[len(pairs) // 2]
    return {"budget_measured": round(after / before, 4),
            "model_ms_measured_pair": [round(before, 4), round(after, 4)],
            "budget_measured_ratios": [round(a / b, 4) for b, a in pairs]}


def _cost_model_summary(plans: list[_Plan]) -> dict:
    """How many layers' latency choice came from measurements, the cache, the analytic model, or MACs."""
    counts: dict[str, int] = {}
    for p in plans:
        lat = p.figures.get("latency")
        key = lat["source"] if lat else ("macs" if "cost" in p.figures else None)
        if key:
            counts[key] = counts.get(key, 0) + 1
    return counts


def _placeholder(w: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.array(np.nan, dtype=w.dtype), w.shape)


def _conv_form(d: DenseLayer) -> np.ndarray:
    """A dense layer's weight as (out, in), Gemm's alpha folded in."""
    return d.weight.T if d.alpha == 1.0 else d.weight.T * np.float32(d.alpha)


def _conv_weight(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    layer = read_conv(index, node)
    assert not isinstance(layer, str), layer  # it was read once already
    return layer.weight


def _dense_weight(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    d = read_dense(index, node, copy=False)  # read-only: the decomposition only reads it
    assert not isinstance(d, str), d
    return _conv_form(d)


def _known(shape) -> bool:
    return shape is not None and len(shape) > 0 and all(isinstance(d, int) and d > 0 for d in shape)


def _weight_problem(w: np.ndarray) -> str | None:
    """Why a weight cannot be factored (NaN / inf, all zero), or None."""
    total = float(np.sum(w, dtype=np.float64))  # NaN / inf propagate; float32 values cannot overflow it
    if not math.isfinite(total):
        return "weight holds NaN or inf values"
    if not np.any(w):
        return "weight is all zeros (nothing to factor)"
    return None
