"""The pass contract: typed configs, per-layer records, results, the run context and the registry.

A pass is a pure function of (model, config, context): `run` must not modify its input model, and
must return a `PassResult` whose `layers` say, for every layer it looked at, either what it rewrote
or why it skipped it. Subclasses register themselves by `name` (see `Pass.__init_subclass__`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxcomp.errors import PipelineSyntaxError
from onnxcomp.graph import node_label
from onnxcomp.progress import QUIET, Progress

REWRITTEN = "rewritten"
SKIPPED = "skipped"


def option(default: Any, help: str, choices: Iterable[str] | None = None, search: Any = None,
           stronger: str | None = None) -> Any:
    """Declare a config field with its one-line help (and optional allowed values). `search` is the
    option's domain in the default search space (`onnxcomp.search.space`): a list of values or a
    {low, high[, step]} range; options without one are not searched by default. `stronger`:
    "lower" or "higher", which way a numeric value compresses more (the search's warm start reads
    a domain's mildest and strongest ends from it)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if search is not None:
        meta["search"] = search
    if stronger is not None:
        if stronger not in ("lower", "higher"):
            raise ValueError(f"stronger must be 'lower' or 'higher', got {stronger!r}")
        meta["stronger"] = stronger
    return field(default=default, metadata=meta)


@dataclass
class PassConfig:
    """Options every pass has. Subclasses add their own fields with `option(...)`.

    `include` / `exclude` are regexes matched (re.search) against node names; `ops` is a `|`-separated
    list of op types to consider (empty = the pass's own default set).
    """

    include: str = option("", "only layers whose node name matches this regex")
    exclude: str = option("", "skip layers whose node name matches this regex")
    ops: str = option("", "'|'-separated op types to consider (default: all the pass handles)")

    def validate(self) -> None:
        """Raise ValueError with a user-facing message when a value is out of range."""
        for key in ("include", "exclude"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise ValueError(f"{key}: invalid regex ({exc})") from None

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def coerce_option(cls, key: str, raw: Any, pass_name: str = "") -> Any:
        """One option's value, typed and checked against its choices. PipelineSyntaxError naming the
        option (with the closest known name) when `key` is unknown, or the value when it is unusable."""
        known = {f.name: f for f in cls.fields()}
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; options are: {', '.join(known)}"
            raise PipelineSyntaxError(f"pass '{pass_name}' has no option '{key}'{hint}")
        value = _coerce(raw, typing.get_type_hints(cls)[key], f"{pass_name}.{key}")
        choices = known[key].metadata.get("choices")
        if choices and str(value) not in choices:
            raise PipelineSyntaxError(f"{pass_name}.{key}={raw!s}: must be one of {', '.join(choices)}")
        return value

    @classmethod
    def from_options(cls, options: dict[str, Any], pass_name: str = "") -> PassConfig:
        """Build from raw values (strings from a pipeline string, or typed values from a recipe)."""
        kwargs = {key: cls.coerce_option(key, raw, pass_name) for key, raw in options.items()}
        cfg = cls(**kwargs)
        try:
            cfg.validate()
        except ValueError as exc:
            raise PipelineSyntaxError(f"{pass_name}: {exc}") from None
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_defaults(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.fields() if getattr(self, f.name) != f.default}


def _coerce(raw: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] or X | None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() == "none"):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).lower()
            if s in ("1", "true", "on", "yes"):
                return True
            if s in ("0", "false", "off", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(str(raw)) if not isinstance(raw, (int, float)) else int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return str(raw)
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise PipelineSyntaxError(f"{where}={raw!s}: expected {name}") from None
    return raw


@dataclass
class LayerRecord:
    """What a pass did to one layer. `output` is the tensor name the rewrite preserves, so the
    validator can compare the layer's output between models and roll a layer back."""

    node: str
    op: str
    action: str  # REWRITTEN or SKIPPED
    reason: str = ""
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    output: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclass
class PassResult:
    model: onnx.ModelProto
    layers: list[LayerRecord] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return any(r.action == REWRITTEN for r in self.layers) or bool(self.figures.get("modified"))


@dataclass
class Context:
    """What a pass may use besides the model: calibration data, seed, input shapes, progress.

    `data` is a DataSource (onnxcomp.data) or None. `input_shapes` maps input names to concrete
    shapes, used to fill symbolic dims for MAC counts and random data. `held_data` holds the
    samples the guard checks on; a pass may report figures on them, never fit to them.
    """

    data: Any = None
    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    progress: Progress = QUIET
    calibration_batches: int = 0  # 0 = all the data source yields
    cost_model: Any = None  # onnxcomp.costmodel.CostModel; `costs()` makes the default one on first use
    held_data: Any = None  # the guard's held-out samples (a DataSource) when it has some: for reports only

    def costs(self) -> Any:
        """The cost model passes consult for measured per-layer latency (one per run, so every pass
        and the guard time with the same settings and share one cache)."""
        if self.cost_model is None:
            from onnxcomp.costmodel import CostModel

            self.cost_model = CostModel(target_ms=60.0)
        return self.cost_model

    def rng(self, *salt: str) -> np.random.Generator:
        """A generator seeded from the run seed and a salt (pass/layer name): order-independent."""
        import zlib

        key = zlib.crc32("/".join(salt).encode())
        return np.random.default_rng([self.seed, key])


_REGISTRY: dict[str, type[Pass]] = {}


class Pass:
    """Base class. Subclasses set `name`, `summary`, `Config`, `default_ops` and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    default_ops: ClassVar[tuple[str, ...]] = ()
    needs_data: ClassVar[bool] = False  # True: refuses to run without ctx.data

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in _REGISTRY and _REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise RuntimeError(f"two passes named {cls.name!r}")
            _REGISTRY[cls.name] = cls

    def __init__(self, config: PassConfig | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("give either a config object or keyword options, not both")
        self.config = config if config is not None else self.Config.from_options(options, self.name)

    def __repr__(self) -> str:
        """The pass in pipeline-string syntax; `Pipeline.parse(repr(p))` configures the same pass."""
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.config.non_defaults().items())
        return f"{self.name}{{{opts}}}" if opts else self.name

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- layer selection shared by every pass -------------------------------------------------
    def op_types(self) -> tuple[str, ...]:
        if self.config.ops:
            return tuple(o for o in self.config.ops.split("|") if o)
        return self.default_ops

    def selection_reason(self, node: onnx.NodeProto) -> str | None:
        """None if the node is selected, else why not (for the report)."""
        label = node_label(node)
        if self.config.include and not re.search(self.config.include, label):
            return f"not matched by include={self.config.include}"
        if self.config.exclude and re.search(self.config.exclude, label):
            return f"matched by exclude={self.config.exclude}"
        return None

    def candidates(self, model: onnx.ModelProto) -> list[onnx.NodeProto]:
        """Nodes of the pass's op types, in graph order (selection is checked per node)."""
        ops = set(self.op_types())
        return [n for n in model.graph.node if n.op_type in ops]


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; PipelineSyntaxError with a suggestion otherwise."""
    load_builtin_passes()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known passes: {', '.join(sorted(_REGISTRY))}"
        raise PipelineSyntaxError(f"unknown pass '{name}'{hint}")
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def load_builtin_passes() -> None:
    """Import every module of onnxcomp.passes so their classes register (no central list to edit)."""
    import importlib
    import pkgutil

    import onnxcomp.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"onnxcomp.passes.{mod.name}")


def _format_value(v: Any) -> str:
    """A value as the pipeline-string parser reads it back: quoted when it holds `,{}=` quotes,
    spaces at its ends, or is empty."""
    text = str(v)
    if text and not any(c in text for c in ",{}='\"") and text == text.strip():
        return text
    quote = "'" if '"' in text else '"'
    return f"{quote}{text}{quote}"


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays become Python ones, NaN/inf become strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    return obj
