"""Value locality of channels on calibration data: each channel's fold value and how far it strays.

For a tensor whose spatial dims are static in the model, the fold value is the channel's mean *per
position* over the samples (so a channel that is constant across samples but not across positions,
e.g. near a zero-padded border, still folds exactly) and the residual is the deviation from that
map. For tensors with dynamic spatial dims the fold value is one number per channel (the mean over
samples and positions). The locality score of a channel is its residual RMS divided by the RMS of
the whole tensor, so one threshold means the same thing in every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import BadInputError
from onnxcomp.runtime import CAPTURE_BUDGET, ChannelStats, run_batches


@dataclass
class Locality:
    """The measured locality of one tensor's channels.

    `fold` is [C, *spatial] (per position) or [C]; `residual` the per-channel RMS deviation from it;
    `rms` the tensor's RMS over every channel; `share` (when measured) the fraction of each channel's
    values within the share tolerance of its fold value."""

    fold: np.ndarray
    residual: np.ndarray
    rms: float
    samples: int
    per_position: bool
    share: np.ndarray | None = None

    @property
    def score(self) -> np.ndarray:
        """Residual RMS relative to the tensor's RMS, per channel (0 = exactly constant)."""
        if self.rms <= 0:
            return np.zeros_like(self.residual)
        return self.residual / self.rms

    def channel_fold(self, channels: Sequence[int]) -> np.ndarray:
        return self.fold[np.asarray(channels, dtype=np.int64)]


def measure(model: onnx.ModelProto, source: Any, tensors: Sequence[str], per_position: dict[str, bool], *,
            max_samples: int, max_batches: int | None = None) -> dict[str, Locality]:
    """Locality of every tensor in `tensors` (channel axis 1) over at most `max_samples` samples of
    `source`, in one run of the model. BadInputError when the source yields nothing."""
    names = list(dict.fromkeys(tensors))
    pos: dict[str, tuple[tuple[int, ...], ChannelStats]] = {}
    chan: dict[str, ChannelStats] = {}
    seen = 0
    for _, values, _ in run_batches(model, source, names, max_batches=max_batches, max_bytes=CAPTURE_BUDGET):
        n = None
        for name in names:
            x = values[name]
            if x.ndim < 2:
                raise BadInputError(f"tensor '{name}' has rank {x.ndim}: it has no channel axis")
            take = min(x.shape[0], max_samples - seen)
            n = take
            x = x[:take]
            if per_position.get(name) and x.ndim > 2:
                # every (channel, position) is a column of its own: the same running moments, per position
                shape = pos.setdefault(name, (x.shape[1:], ChannelStats.empty(int(np.prod(x.shape[1:])))))[0]
                if x.shape[1:] != shape:  # the data changed size: the model's dims were not static after all
                    raise BadInputError(f"tensor '{name}' changed shape between batches ({shape} -> {x.shape[1:]})")
                pos[name][1].update(x.reshape(x.shape[0], -1), 1)
            else:
                chan.setdefault(name, ChannelStats.empty(x.shape[1])).update(x, 1)
        del values
        seen += n or 0
        if seen >= max_samples:
            break
    if seen == 0:
        raise BadInputError("trim: the calibration data yielded no samples")
    out: dict[str, Locality] = {}
    for name, (shape, ps) in pos.items():
        var, mean = ps.var.reshape(shape), ps.mean.reshape(shape)
        residual = np.sqrt(var.reshape(shape[0], -1).mean(axis=1))
        rms = float(np.sqrt((var + mean**2).mean()))
        out[name] = Locality(mean, residual, rms, int(ps.count[0]), True)
    for name, cs in chan.items():
        rms = float(np.sqrt((cs.var + cs.mean**2).mean()))
        out[name] = Locality(cs.mean.copy(), cs.std, rms, seen, False)
    return out


def measure_share(model: onnx.ModelProto, source: Any, localities: dict[str, Locality], tol: float, *,
                  max_samples: int, max_batches: int | None = None) -> None:
    """Fill each Locality's `share`: the fraction of a channel's values within tol x the tensor's RMS
    of its fold value (a second run over the same samples; the fold values come from the first)."""
    names = list(localities)
    hits = {n: np.zeros(localities[n].fold.shape[0]) for n in names}
    total = dict.fromkeys(names, 0)
    seen = 0
    for _, values, _ in run_batches(model, source, names, max_batches=max_batches, max_bytes=CAPTURE_BUDGET):
        take = 0
        for name in names:
            loc = localities[name]
            x = values[name]
            take = min(x.shape[0], max_samples - seen)
            x = x[:take].astype(np.float64)
            fold = loc.fold if loc.per_position else loc.fold.reshape((-1,) + (1,) * (x.ndim - 2))
            near = np.abs(x - fold[None]) <= tol * max(loc.rms, 1e-30)
            hits[name] += near.reshape(take, near.shape[1], -1).sum(axis=(0, 2))
            total[name] += take * (int(np.prod(x.shape[2:])) if x.ndim > 2 else 1)
        del values
        seen += take
        if seen >= max_samples:
            break
    for name in names:
        localities[name].share = hits[name] / max(total[name], 1)
