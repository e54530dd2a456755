"""Sensitivity analysis: for every layer a pass would rewrite, the model-output error and task
agreement when only that layer is rewritten.

One pass run on the whole model finds the candidates; then, per layer, the pass re-runs restricted
to that layer (`include=^name$`, the user's exclude kept) and the result is compared with the input
model on the data. The input model's outputs are computed once (validation.compare's ref_cache) and
reused by every layer. Results are cached on disk by (model bytes, pass config, data bytes, task,
onnxruntime version) in $ONNXCOMP_CACHE_DIR (default ~/.cache/onnxcomp/sensitivity), so the guard,
budgets and searches that ask again pay nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcomp.passes.base import REWRITTEN, Context, Pass, _jsonable

CACHE_VERSION = 1


@dataclass
class LayerSensitivity:
    """The damage one layer's rewrite does to the model output (alone)."""

    node: str
    op: str
    macs_saved: int | None
    params_saved: int | None
    rel_l2: float  # largest over outputs of ||cand - ref|| / ||ref||
    sqnr_db: float  # smallest over outputs
    cosine: float  # smallest per-sample cosine over outputs
    agreement: float | None  # smallest top-1 / per-position argmax agreement over argmax outputs, percent
    sequence_agreement: float | None  # smallest whole-sequence agreement (sequence / dense outputs)
    figures: dict[str, Any] = field(default_factory=dict)  # the pass's own figures for the layer

    @property
    def per_mac(self) -> float | None:
        """Relative L2 error per million MACs saved (None when the rewrite saves none)."""
        if not self.macs_saved or self.macs_saved <= 0:
            return None
        return self.rel_l2 / (self.macs_saved / 1e6)


@dataclass
class Sensitivity:
    pipeline: str
    data: str
    samples: int
    kinds: dict[str, str]
    layers: list[LayerSensitivity]
    skipped: list[dict[str, str]]
    seconds: float
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return _jsonable({
            "pipeline": self.pipeline, "data": self.data, "samples": self.samples, "kinds": self.kinds,
            "seconds": round(self.seconds, 3), "cached": self.cached,
            "layers": [{**dataclasses.asdict(s), "per_mac": s.per_mac} for s in self.layers],
            "skipped": self.skipped,
        })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        def num(v: Any) -> Any:
            return float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v

        layers = [LayerSensitivity(**{k: num(v) for k, v in item.items() if k != "per_mac"}) for item in d["layers"]]
        return cls(d["pipeline"], d["data"], d["samples"], d["kinds"], layers, d["skipped"], d["seconds"], cached=True)

    def by_node(self) -> dict[str, LayerSensitivity]:
        return {s.node: s for s in self.layers}


def cache_dir() -> Path:
    root = os.environ.get("ONNXCOMP_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "onnxcomp"
    return base / "sensitivity"


def _data_digest(source: Any) -> str:
    h = hashlib.sha256()
    for feeds, labels in source.batches():
        for name in sorted(feeds):
            h.update(name.encode())
            h.update(str(feeds[name].dtype).encode() + str(feeds[name].shape).encode())
            h.update(memoryview(feeds[name]).cast("B") if feeds[name].flags.c_contiguous else feeds[name].tobytes())
        if labels is not None:
            h.update(labels.tobytes())
    return h.hexdigest()


def cache_key(model: onnx.ModelProto, p: Pass, source: Any, task: Any) -> str:
    import onnxruntime as ort

    from onnxcomp.model import model_bytes

    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{ort.__version__}|{p!r}|{task!r}|".encode())
    h.update(hashlib.sha256(model_bytes(model)).digest())
    h.update(_data_digest(source).encode())
    return h.hexdigest()[:32]


def only_layer(p: Pass, node: str) -> Pass:
    """A copy of `p` restricted to one node (its exclude kept)."""
    return type(p)(dataclasses.replace(p.config, include=f"^{re.escape(node)}$"))


def analyse(model: onnx.ModelProto, p: Pass, ctx: Context, source: Any, *, task: Any = None,
            use_cache: bool = True) -> Sensitivity:
    """Per-layer sensitivity of `model` to pass `p` (see the module docstring). `ctx` is what the pass
    calibrates on; `source` what the damage is measured on (they may be the same data)."""
    from onnxcomp import validation

    key = cache_key(model, p, source, task) if use_cache else None
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return Sensitivity.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed, never trusted
    t0 = time.perf_counter()
    full = p.run(model, ctx)
    candidates = [r for r in full.layers if r.action == REWRITTEN]
    skipped = [{"node": r.node, "reason": r.reason} for r in full.layers if r.action != REWRITTEN]
    ref_cache: dict = {}
    base = validation.compare(model, model, source, None, task=task, ref_cache=ref_cache)
    kinds = {o.name: o.kind for o in base.outputs}
    layers: list[LayerSensitivity] = []
    for rec in ctx.progress.iter(candidates, f"sensitivity {p.name}"):
        one = only_layer(p, rec.node).run(model, ctx)
        mine = next((r for r in one.layers if r.node == rec.node and r.action == REWRITTEN), None)
        if mine is None:  # the layer's rewrite depends on the others (a budget): measure it anyway as skipped
            skipped.append({"node": rec.node, "reason": "not rewritten when the pass runs on this layer alone"})
            continue
        check = validation.compare(model, one.model, source, None, task=task, ref_cache=ref_cache)
        outs = check.outputs
        arg = [o.top1_agreement for o in outs if o.top1_agreement is not None]
        seq = [o.sequence_agreement for o in outs if o.sequence_agreement is not None]
        rel = max((_rel_l2(o) for o in outs), default=0.0)
        layers.append(LayerSensitivity(
            node=rec.node, op=rec.op,
            macs_saved=_saved(mine.macs_before, mine.macs_after), params_saved=_saved(mine.params_before, mine.params_after),
            rel_l2=rel, sqnr_db=min(o.sqnr_db for o in outs), cosine=min(o.cosine_min for o in outs),
            agreement=min(arg) if arg else None, sequence_agreement=min(seq) if seq else None,
            figures=dict(mine.figures)))
    result = Sensitivity(str(p), source.description, base.samples, kinds, layers, skipped, time.perf_counter() - t0)
    if path is not None:
        from onnxcomp.model import save_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_text(path, json.dumps(result.as_dict()) + "\n")
        except OSError:
            pass  # an unwritable cache only costs the next run its time
    return result


def _rel_l2(o: Any) -> float:
    """||d|| / ||ref|| from SQNR (validation keeps sums, not the vector)."""
    import math

    if o.sqnr_db == math.inf:
        return 0.0
    if o.sqnr_db == -math.inf:
        return math.inf
    return 10.0 ** (-o.sqnr_db / 20.0)


def _saved(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else int(before) - int(after)


class OutputErrorProbe:
    """The model-output error of candidate models against one reference, on the first `max_samples`
    samples of a data source, with the reference's outputs computed once (validation.compare and
    its reference cache do the running and the sums).

    `error(candidate)` is the relative squared error sum_outputs ||cand - ref||^2 / ||ref||^2 over
    those samples (inf when a candidate produces non-finite values where the reference does not).
    Passes use it to measure what a rewrite of one layer does to the whole model (a budget spends
    where this is smallest per MAC saved).
    """

    def __init__(self, reference: onnx.ModelProto, source: Any, max_samples: int = 64):
        import numpy as np

        from onnxcomp.data import open_source

        feeds: dict[str, list] = {}
        taken = 0
        for batch, _labels in source.batches():
            for name, v in batch.items():
                feeds.setdefault(name, []).append(v)
            taken += int(next(iter(batch.values())).shape[0])
            if taken >= max_samples:
                break
        arrays = {name: np.concatenate(parts)[:max_samples] for name, parts in feeds.items()}
        self.reference = reference
        self.source = open_source(arrays, model=reference, batch_size=int(getattr(source, "batch_size", 8)))
        self._ref_cache: dict = {}

    def error(self, candidate: onnx.ModelProto) -> float:
        from onnxcomp import validation

        check = validation.compare(self.reference, candidate, self.source, None, ref_cache=self._ref_cache)
        return sum(_rel_l2(o) ** 2 for o in check.outputs)
