"""What "equivalent enough" means for a validation: elementwise, cosine, SQNR and task criteria,
flat (one set for every output) or per output kind (`KindTolerance`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from onnxcomp.errors import BadInputError

# What an output holds, inferred from its shape (onnxcomp.validation.infer_kind) or forced with --task:
#   classify  [N, C] scores (trailing 1-dims allowed), C > 1: top-1 per sample
#   sequence  [N, T, C] with T, C > 1 (CTC, tagging): argmax over C per position
#   dense     [N, C, H, W, ...] with 1 < C <= 1000 (segmentation): argmax over C per pixel
#   regress   anything else (a probability map, boxes, embeddings): cosine / SQNR / rel L2
KINDS = ("classify", "sequence", "dense", "regress")
ARGMAX_KINDS = ("classify", "sequence", "dense")


@dataclass(frozen=True)
class Tolerance:
    """A candidate passes when every criterion that is set holds on every output it applies to.

    rtol/atol: numpy.allclose-style |cand - ref| <= atol + rtol * |ref| elementwise (every output).
    min_cosine: cosine similarity of each flattened output (per sample) at least this (every output).
    min_sqnr_db: signal-to-quantization-noise ratio of each output at least this many dB (every output).
    max_top1_drop: in points. Classifier outputs: top-1 accuracy drop (with labels) or top-1
        disagreement; sequence / dense outputs: argmax disagreement per position (pixel).
    max_sequence_drop: sequence / dense outputs: percent of samples whose argmax sequence (map)
        changed anywhere, what a CTC or segmentation user reads.
    """

    rtol: float | None = None
    atol: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    max_top1_drop: float | None = None
    max_sequence_drop: float | None = None

    def __post_init__(self) -> None:
        """BadInputError for a criterion that could never fail or never pass (NaN, negative, ...):
        a NaN rtol, for one, made every elementwise comparison false, so nothing was a violation."""
        for key, value in asdict(self).items():
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise BadInputError(f"tolerance {key}={value!r}: expected a finite number")
            if key == "min_cosine" and not -1.0 <= value <= 1.0:
                raise BadInputError(f"tolerance min_cosine={value:g}: a cosine lies in [-1, 1]")
            if key not in ("min_cosine", "min_sqnr_db") and value < 0:
                raise BadInputError(f"tolerance {key}={value:g}: must not be negative")

    def for_kind(self, kind: str) -> Tolerance:
        """The criteria for an output of `kind` (a flat tolerance is the same for every kind)."""
        return self

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    @property
    def elementwise(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def needs(self) -> set[str]:
        """Output kinds at least one of which the model must have for every criterion to apply."""
        out: set[str] = set()
        if self.max_top1_drop is not None:
            out.add("argmax")
        if self.max_sequence_drop is not None:
            out.add("sequence")
        return out

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in asdict(self).items() if v is not None]
        return ", ".join(parts) if parts else "none (figures only)"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class KindTolerance:
    """Criteria chosen by each output's kind: `by_kind[kind]`, else `by_kind["default"]`, else none.

    This is what a recipe's `tolerance:` mapping with kind keys and the guard's default are: a
    top-1 bound means nothing on a probability map, and a cosine bound on logits blocks rewrites
    that keep every answer.
    """

    by_kind: Mapping[str, Tolerance]

    def for_kind(self, kind: str) -> Tolerance:
        return self.by_kind.get(kind) or self.by_kind.get("default") or Tolerance()

    @property
    def is_set(self) -> bool:
        return any(t.is_set for t in self.by_kind.values())

    @property
    def elementwise(self) -> bool:
        return any(t.elementwise for t in self.by_kind.values())

    def needs(self) -> set[str]:
        return set()  # each kind's criteria apply only to outputs of that kind

    def describe(self) -> str:
        return "; ".join(f"{k}: {t.describe()}" for k, t in self.by_kind.items())

    def as_dict(self) -> dict:
        return {k: t.as_dict() for k, t in self.by_kind.items()}


AnyTolerance = Tolerance | KindTolerance

# onnxsim's defaults: what "the rewrite is exact" means for fp32 models.
EXACT = Tolerance(rtol=1e-4, atol=1e-5)

# The guard's tolerance for a `-p` string without tolerance flags (README, "The guard"): each output
# judged by what its user reads. 20 dB SQNR is a relative L2 error of 0.1 (cosine about 0.995).
GUARD_DEFAULT = KindTolerance({
    "classify": Tolerance(max_top1_drop=1.0),
    "sequence": Tolerance(max_top1_drop=1.0, max_sequence_drop=2.0),
    "dense": Tolerance(max_top1_drop=1.0),
    "regress": Tolerance(min_sqnr_db=20.0),
})


def tolerance_from_mapping(doc: Any, where: str) -> AnyTolerance:
    """A recipe's `tolerance:` value: criteria (`{max_top1_drop: 1}`, every output) or a mapping from
    output kinds (and `default`) to criteria. BadInputError naming `where` otherwise."""
    fields = {f.name for f in dataclasses.fields(Tolerance)}

    def flat(d: Any, at: str) -> Tolerance:
        if not isinstance(d, Mapping):
            raise BadInputError(f"{at}: expected a mapping of criteria ({', '.join(sorted(fields))})")
        unknown = sorted(set(d) - fields)
        if unknown:
            raise BadInputError(f"{at}: unknown criterion {unknown[0]!r} (known: {', '.join(sorted(fields))})")
        try:
            return Tolerance(**{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                for k, v in d.items()})
        except BadInputError as exc:
            raise BadInputError(f"{at}: {exc}") from None

    if not isinstance(doc, Mapping) or not doc:
        raise BadInputError(f"{where}: expected a non-empty mapping")
    keys = set(doc)
    if keys <= fields:
        return flat(doc, where)
    allowed = set(KINDS) | {"default"}
    if not keys <= allowed:
        bad = sorted(keys - allowed - fields) or sorted(keys & fields)
        raise BadInputError(f"{where}: {bad[0]!r} is neither a criterion nor an output kind "
                            f"({', '.join((*KINDS, 'default'))}); do not mix the two")
    return KindTolerance({k: flat(v, f"{where}.{k}") for k, v in doc.items()})
