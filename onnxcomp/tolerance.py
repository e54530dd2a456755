"""What "equivalent enough" means for a validation: elementwise, cosine or top-1 criteria."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
