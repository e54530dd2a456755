"""User metrics: `--metric module:function`, the way Olive's custom evaluators plug in.

The function is called as `fn(reference, candidate, labels)` with `reference` and `candidate` dicts
{output name: array over every checked sample} and `labels` an int64 array or None. It returns
`(score, higher_is_better)`, or a dict with keys `score` and `higher_is_better`. The reference's own
score is `fn(reference, reference, labels)`; the drop is how much worse the candidate scores, and
with `max_drop` set the metric joins the verdict (drop <= max_drop passes).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import BadInputError, first_line


@dataclass
class MetricScore:
    name: str
    reference: float
    candidate: float
    higher_is_better: bool
    max_drop: float | None

    @property
    def drop(self) -> float:
        return self.reference - self.candidate if self.higher_is_better else self.candidate - self.reference

    @property
    def passed(self) -> bool:
        return self.max_drop is None or self.drop <= self.max_drop

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reference": self.reference, "candidate": self.candidate,
                "higher_is_better": self.higher_is_better, "drop": self.drop, "max_drop": self.max_drop,
                "passed": self.passed}


class UserMetric:
    """A loaded `module:function` (a module on sys.path, or a path to a .py file before the colon)."""

    def __init__(self, spec: str, max_drop: float | None = None, source: str | None = None):
        """`source`: the text of the spec's .py file, run instead of reading the file (a search ships
        it to workers that may not have the file)."""
        if max_drop is not None and not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop)):
            raise BadInputError(f"--max-metric-drop {max_drop!r}: expected a finite number")
        self.spec = spec
        self.max_drop = max_drop
        self.fn = _load(spec, source)
        self.source = source if source is not None else file_source(spec)

    def _call(self, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], labels: np.ndarray | None):
        try:
            out = self.fn(ref, cand, labels)
        except Exception as exc:  # the user's code: any failure is bad input, one line
            raise BadInputError(f"--metric {self.spec} raised {type(exc).__name__}: {first_line(exc)}") from None
        if isinstance(out, dict):
            if "score" not in out:
                raise BadInputError(f"--metric {self.spec} returned a dict without 'score'")
            score, higher = out["score"], out.get("higher_is_better", True)
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            score, higher = out
        else:
            raise BadInputError(f"--metric {self.spec} must return (score, higher_is_better), got {type(out).__name__}")
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise BadInputError(f"--metric {self.spec} returned a score that is not a number: {score!r}") from None
        if not math.isfinite(score):
            raise BadInputError(f"--metric {self.spec} returned a non-finite score ({score})")
        if not isinstance(higher, (bool, np.bool_)):
            raise BadInputError(f"--metric {self.spec}: higher_is_better must be True or False, got {higher!r}")
        return score, bool(higher)

    def score(self, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], labels: np.ndarray | None) -> MetricScore:
        """The candidate's score next to the reference's own."""
        ref_score, higher = self._call(ref, ref, labels)
        cand_score, higher_c = self._call(ref, cand, labels)
        if higher != higher_c:
            raise BadInputError(f"--metric {self.spec} changed its mind about higher_is_better between calls")
        return MetricScore(self.spec, ref_score, cand_score, higher, self.max_drop)


def file_source(spec: str) -> str | None:
    """The text of the .py file a `path/to/file.py:function` spec names (None for a module spec or a
    file that cannot be read; loading the metric reports those)."""
    module_name = spec.rpartition(":")[0]
    if not module_name.endswith(".py"):
        return None
    try:
        return Path(module_name).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _load(spec: str, source: str | None = None) -> Callable:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise BadInputError(f"--metric {spec!r}: expected module:function (or path/to/file.py:function)")
    try:
        if module_name.endswith(".py") and source is not None:
            path = Path(module_name)
            module = types.ModuleType(f"onnxcomp_user_metric_{path.stem}")
            module.__file__ = str(path)
            sys.modules[module.__name__] = module
            exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user's own metric
        elif module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise BadInputError(f"--metric {spec}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"onnxcomp_user_metric_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise BadInputError(f"--metric {spec}: cannot import {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except BadInputError:
        raise
    except Exception as exc:  # ImportError, SyntaxError, or anything the module raises at import
        raise BadInputError(f"--metric {spec}: cannot import {module_name} ({type(exc).__name__}: {first_line(exc)})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise BadInputError(f"--metric {spec}: {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise BadInputError(f"--metric {spec}: {module_name}.{attr} is not callable")
    return fn
