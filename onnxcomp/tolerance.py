"""What "equivalent enough" means for a validation: elementwise, cosine or top-1 criteria."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from onnxcomp.errors import BadInputError


@dataclass(frozen=True)
class Tolerance:
    """A candidate passes when every criterion that is set holds on every output.

    rtol/atol: numpy.allclose-style |cand - ref| <= atol + rtol * |ref| elementwise.
    min_cosine: cosine similarity of each flattened output (per sample) at least this.
    max_top1_drop: top-1 accuracy drop in points (with labels) or top-1 disagreement in percent.
    """

    rtol: float | None = None
    atol: float | None = None
    min_cosine: float | None = None
    max_top1_drop: float | None = None

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
            if key != "min_cosine" and value < 0:
                raise BadInputError(f"tolerance {key}={value:g}: must not be negative")

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    @property
    def elementwise(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in asdict(self).items() if v is not None]
        return ", ".join(parts) if parts else "none (figures only)"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# onnxsim's defaults: what "the rewrite is exact" means for fp32 models.
EXACT = Tolerance(rtol=1e-4, atol=1e-5)
