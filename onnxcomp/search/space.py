"""Search spaces over pipelines: which passes a trial may use, in which order, with which options.

A space is an ordered list of passes. Each pass is `required` (always in the pipeline) or optional
(a trial decides whether to use it), and each of its searched options has a domain: a list of
values (categorical) or a numeric range `{low, high[, step][, log]}`. Options not searched keep the
value given in the space (`fixed`) or the pass's default. A trial's choices become a pipeline
string (`Space.pipeline(params)`), so a trial is exactly what `onnxcomp optimize -p` would run.

The default space comes from the passes' own option metadata (`option(..., search=...)`, the way
Olive derives its search space from pass configs): every pass with at least one searchable option,
in a fixed order that composes (structure first, then weights): see `DEFAULT_ORDER`. Passes that
need data are left out when there is none. A YAML space:

    passes:
      - tucker: {rank: [0.3, 0.5, 0.7], objective: macs}     # a list: categorical; a scalar: fixed
      - trim: {target: {low: 0.0, high: 0.4, step: 0.1}, required: false}
      - codebook: {avg_bits: {low: 2, high: 6, step: 0.5}}

The warm start needs each domain's mildest and strongest end. For a numeric option whose metadata
says which way it compresses more (`option(..., stronger="lower"|"higher")`: codebook bits, k and
avg_bits, trim target, uquant bits and step) that decides, whatever the order given; otherwise list
values mildest first (a range's low end counts as the mildest).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp.errors import BadInputError, PipelineSyntaxError

# Structure-changing passes first (they change which weights exist), then weight coding.
DEFAULT_ORDER = ("trim", "tucker", "winograd", "codebook", "int8", "uquant")


@dataclass(frozen=True)
class Domain:
    """One searched option: `choices` (categorical) or a numeric range low..high (`step` for a
    grid, `log` for a log scale; `integer` for int options)."""

    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    stronger: str | None = None  # "lower" | "higher": which way the option compresses more (its metadata)

    def _ends(self) -> tuple[Any, Any]:
        """(mildest, strongest): by the option's `stronger` direction when it has one and the values
        are numbers; else the first and last choice (list values mildest first) or low and high."""
        if self.choices:
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.choices)
            if self.stronger is not None and numeric:
                lo, hi = min(self.choices), max(self.choices)
                return (hi, lo) if self.stronger == "lower" else (lo, hi)
            return self.choices[0], self.choices[-1]
        lo, hi = (int(self.low), int(self.high)) if self.integer else (float(self.low), float(self.high))
        return (hi, lo) if self.stronger == "lower" else (lo, hi)

    def mildest(self) -> Any:
        """The least compression (see `_ends`)."""
        return self._ends()[0]

    def strongest(self) -> Any:
        """The most compression (see `_ends`)."""
        return self._ends()[1]

    def describe(self) -> str:
        if self.choices:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        grid = f" step {self.step:g}" if self.step else ""
        return f"[{self.low:g}, {self.high:g}]{grid}{' log' if self.log else ''}"


@dataclass
class PassSpace:
    name: str
    required: bool = True
    domains: dict[str, Domain] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def key(self, option: str) -> str:
        return f"{self.name}.{option}"

    @property
    def use_key(self) -> str:
        return f"{self.name}.use"


@dataclass
class Space:
    passes: list[PassSpace]

    def __post_init__(self) -> None:
        if not self.passes:
            raise BadInputError("the search space is empty: it names no pass")
        if not any(p.domains or not p.required for p in self.passes):
            raise BadInputError("the search space has nothing to search: no option has a domain and no pass is optional")

    def pipeline(self, params: dict[str, Any]) -> str:
        """The pipeline string of one trial's choices (`params` keyed `pass.option`, `pass.use`)."""
        parts = []
        for p in self.passes:
            if not p.required and not params.get(p.use_key, True):
                continue
            opts = dict(p.fixed)
            opts.update({o: params[p.key(o)] for o in p.domains if p.key(o) in params})
            parts.append(_step(p.name, opts))
        return ",".join(parts) if parts else "normalize"

    def alone_at_strongest(self, p: PassSpace) -> str:
        """The pipeline of pass `p` alone, every searched option at its strongest value."""
        return _step(p.name, {**p.fixed, **{o: d.strongest() for o, d in p.domains.items()}})

    def with_exclusions(self, excluded: dict[str, list[str]]) -> Space:
        """A copy where each pass named in `excluded` gains a searched `exclude` option: its own
        (the space's fixed exclude, or none) or that one plus the given node names (the layers the
        warm start's probe found fragile), so the sampler can learn whether leaving them out pays."""
        from onnxcomp.guard import exclude_regex

        out = []
        for p in self.passes:
            names = excluded.get(p.name)
            if not names:
                out.append(p)
                continue
            own = p.fixed.get("exclude")
            fixed = {k: v for k, v in p.fixed.items() if k != "exclude"}
            domains = {**p.domains, "exclude": Domain(choices=(own, exclude_regex(own, names)))}
            out.append(PassSpace(p.name, p.required, domains, fixed))
        return Space(out)

    def describe(self) -> list[str]:
        out = []
        for p in self.passes:
            opts = [f"{o} in {d.describe()}" for o, d in p.domains.items()] + [f"{o}={v}" for o, v in p.fixed.items()]
            out.append(f"{p.name}{'' if p.required else ' (optional)'}: {', '.join(opts) or 'defaults'}")
        return out


def _step(name: str, opts: dict[str, Any]) -> str:
    """One pipeline step, `name{k=v,...}` (options set to None are left to the pass's default)."""
    from onnxcomp.passes.base import _format_value

    body = ",".join(f"{k}={_format_value(v)}" for k, v in opts.items() if v is not None)
    return f"{name}{{{body}}}" if body else name


def default_space(has_data: bool) -> Space:
    """Every pass with searchable options (`option(search=...)`), in DEFAULT_ORDER; passes that need
    data only with data. Optional: each may be left out by a trial."""
    from onnxcomp.passes.base import registered_passes

    passes = registered_passes()
    out = []
    for name in DEFAULT_ORDER:
        cls = passes.get(name)
        if cls is None or (cls.needs_data and not has_data):
            continue
        domains = {}
        for f in cls.Config.fields():
            spec = f.metadata.get("search")
            if spec is not None:
                domains[f.name] = _domain(spec, f.type, f"{name}.{f.name}", f.metadata.get("stronger"))
        fixed = dict(getattr(cls, "search_fixed", {}))
        if domains:
            out.append(PassSpace(name, required=False, domains=domains, fixed=fixed))
    return Space(out)


def load_space(path: str | Path) -> Space:
    """A space from a YAML file (see the module docstring); PipelineSyntaxError naming the bad pass
    or option (with the closest name), BadInputError for an unreadable or empty file."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise BadInputError(f"{p}: cannot read the search space ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise BadInputError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return space_from_mapping(doc, str(p))


def space_from_mapping(doc: Any, where: str = "space") -> Space:
    from onnxcomp.passes.base import get_pass

    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list):
        raise BadInputError(f"{where}: expected a mapping with a 'passes' list")
    out = []
    for k, item in enumerate(doc["passes"]):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise BadInputError(f"{where}: passes[{k}] must be a pass name or one 'name: {{options}}' mapping")
        (name, opts), = item.items()
        cls = get_pass(str(name))  # PipelineSyntaxError with the closest name
        if opts is not None and not isinstance(opts, dict):
            raise BadInputError(f"{where}: {name}: expected a mapping of options, got {opts!r}")
        opts = dict(opts or {})
        required = opts.pop("required", True)
        if not isinstance(required, bool):
            raise BadInputError(f"{where}: {name}.required must be true or false")
        types = {f.name: f.type for f in cls.Config.fields()}
        stronger = {f.name: f.metadata.get("stronger") for f in cls.Config.fields()}
        domains, fixed = {}, {}
        for opt, value in opts.items():
            if opt not in types:
                cls.Config.coerce_option(opt, "", str(name))  # raises with the closest option name
            if isinstance(value, (list, dict)):
                domains[opt] = _domain(value, types[opt], f"{name}.{opt}", stronger[opt])
                for v in domains[opt].choices or (domains[opt].low, domains[opt].high):
                    cls.Config.coerce_option(opt, v, str(name))  # a value the option cannot take: exit 2 now
            else:
                fixed[opt] = cls.Config.coerce_option(opt, value, str(name))
        out.append(PassSpace(str(name), required, domains, fixed))
    return Space(out)


def _domain(spec: Any, typ: Any, where: str, stronger: str | None = None) -> Domain:
    integer = typ in (int, "int")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise BadInputError(f"{where}: an empty list of values")
        return Domain(choices=tuple(spec), stronger=stronger)
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "step", "log"}
        if unknown:
            close = difflib.get_close_matches(sorted(unknown)[0], ["low", "high", "step", "log"], n=1)
            raise PipelineSyntaxError(f"{where}: unknown range key '{sorted(unknown)[0]}'"
                                      + (f"; did you mean '{close[0]}'?" if close else ""))
        try:
            low, high = float(spec["low"]), float(spec["high"])
            step = float(spec["step"]) if spec.get("step") is not None else None
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{where}: a range needs numeric 'low' and 'high'") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise BadInputError(f"{where}: range low={low:g} high={high:g} is empty")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise BadInputError(f"{where}: a log range needs low > 0")
        if step is not None and step <= 0:
            raise BadInputError(f"{where}: step must be positive")
        return Domain(low=low, high=high, step=step, log=log, integer=integer, stronger=stronger)
    raise BadInputError(f"{where}: a domain is a list of values or a {{low, high}} range, got {spec!r}")


def as_dict(space: Space) -> dict:
    return {"passes": [{"name": p.name, "required": p.required, "fixed": p.fixed,
                        "domains": {k: dataclasses.asdict(d) for k, d in p.domains.items()}} for p in space.passes]}
