"""The method registry: one frozen dataclass of parameters per method, one source of truth for
parsing, validation, the JSON schema and the CLI listing.

A method file declares
    @register("pai")
    @dataclass(frozen=True)
    class PAI(Method):
        alpha: float = param(0.5, "...", min=0.0, max=5.0)
and implements `contribute(ctx) -> Contribution` (and `second_stream()` where it needs one).

**Presets.** Every method takes `preset` ("official" or "paper"), each a complete documented parameter set
(`Method.PRESETS`, with the source of every value): "official" is what the official repository's
evaluation scripts ran for the headline numbers and is the default (the dataclass defaults are exactly
it: tested); "paper" is the paper's text where it differs. Explicit parameters override the preset's
values (`pai:preset=paper,gamma=1`). Lucid's own designs are opt-in parameter values labelled "Lucid's".

`parse_method("pai:alpha=0.3,gamma=1.2")`, `parse_method('{"name": "pai", "params": {"alpha": 0.3}}')`
and `parse_method({"name": ..., "params": {...}})` all go through `build`, which checks every value
with the same code as a direct `PAI(alpha=0.3)` (`__post_init__`). `schema(name)` is generated from
the same fields (type, default, minimum/maximum, enum, description), so CLI and REST cannot drift.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar

from lucid.errors import InputError  # torch-free: the one error contract of every entry point
from mitigation.seam.request import Contribution, RequestContext, SecondStream, check_composition

METHODS: dict[str, type[Method]] = {}
PRESET_NAMES = ("official", "paper")
_EXPLICIT: ContextVar[frozenset[str] | None] = ContextVar("lucid_method_explicit", default=None)


class MethodError(InputError):
    """A caller's mistake naming or parameterising a method (one line, listing what is valid); an
    `InputError`, so every entry point reports it as such (CLI: `lucid: error: ...`, exit 2)."""


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A method parameter: its default, a one-line description, and its valid range or choices."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


# ---------------------------------------------------------------------------------------------- types


def _kind(tp: Any) -> tuple[str, bool]:
    """(base kind, optional) of an annotation: kind in float | int | bool | str | ints."""
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        tp = rest[0]
    if tp is float:
        return "float", optional
    if tp is bool:
        return "bool", optional
    if tp is int:
        return "int", optional
    if tp is str:
        return "str", optional
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (int,):
        return "ints", optional
    raise TypeError(f"unsupported method parameter type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _range_text(f: Field, kind: str) -> str:
    md = f.metadata
    if md.get("choices"):
        return "one of " + ", ".join(md["choices"])
    lo, hi = md.get("min"), md.get("max")
    what = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string", "ints": "integers"}[
        kind
    ]
    if lo is not None and hi is not None:
        return f"{what} in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{what} >= {lo:g}"
    if hi is not None:
        return f"{what} <= {hi:g}"
    return what


def _coerce(method: str, f: Field, tp: Any, value: Any) -> Any:
    """A parameter value from Python, JSON or `k=v` text -> its checked Python value (or MethodError)."""
    kind, optional = _kind(tp)
    expected = _range_text(f, kind) + (" or none" if optional else "")

    def bad() -> MethodError:
        return MethodError(f"{method}: {f.name} must be {expected}, got {value!r}")

    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise bad()
    v: Any
    if kind == "float":
        if isinstance(value, bool):
            raise bad()
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(v):
            raise bad()
    elif kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise bad()
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise bad() from None
    elif kind == "bool":
        if isinstance(value, bool):
            v = value
        elif isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            v = True
        elif isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            v = False
        else:
            raise bad()
    elif kind == "str":
        if not isinstance(value, str):
            raise bad()
        v = value.strip()
    else:  # ints
        items = value.split(",") if isinstance(value, str) else value
        try:
            v = tuple(int(x) for x in items if not (isinstance(x, str) and not x.strip()))
        except (TypeError, ValueError):
            raise bad() from None
        if isinstance(value, (list, tuple)) and any(isinstance(x, bool) or isinstance(x, float) for x in value):
            raise bad()
        if not v:
            raise bad()
    md = f.metadata
    if md.get("choices") and v not in md["choices"]:
        raise bad()
    lo, hi = md.get("min"), md.get("max")
    for x in v if kind == "ints" else ((v,) if kind in ("float", "int") else ()):
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise bad()
    return v


# --------------------------------------------------------------------------------------------- method


@dataclass(frozen=True)
class Preset:
    """A complete parameter set of a method: `values` (every parameter it pins) and `source` (where each
    value comes from: the official repository's file and line, or the paper's section)."""

    values: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class Method:
    """Base of every registered method: a frozen dataclass of parameters (validated on construction).

    Subclasses set `name` (by `@register`), `paper` and `PRESETS` ("official" = the dataclass defaults,
    "paper"), declare parameters with `param`, and implement `contribute`; `second_stream` and
    `prepare_inputs` are optional. `Cls(preset="paper", alpha=...)` takes the preset's value for every
    parameter left at its default; `Cls.from_preset("paper", **overrides)` (and `parse_method`) take it
    for every parameter not given.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, Preset]] = {}

    preset: str = param(
        "official",
        "parameter set: official (the official repository's evaluation scripts) or paper (the paper's text)",
        choices=PRESET_NAMES,
    )

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            object.__setattr__(
                self, f.name, _coerce(self.name or type(self).__name__, f, hints[f.name], getattr(self, f.name))
            )
        preset = self.PRESETS.get(self.preset)
        if preset is None or self.preset == "official":
            return
        explicit = _EXPLICIT.get() or frozenset()
        fmap = {f.name: f for f in fields(self)}
        for k, v in preset.values.items():
            if k not in explicit:
                object.__setattr__(self, k, _coerce(self.name, fmap[k], hints[k], v))

    @classmethod
    def from_preset(cls, preset: str = "official", **overrides: Any) -> Method:
        """The preset's parameter set with `overrides` on top."""
        return cls(preset=preset, **overrides)

    def preset_values(self) -> dict[str, Any]:
        """Every parameter's value under this method's preset, before explicit overrides."""
        base = {f.name: f.default for f in fields(self)}
        if self.preset != "official" and self.preset in self.PRESETS:
            base.update(self.PRESETS[self.preset].values)
        base["preset"] = self.preset
        return base

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        """Rewrite the request's inputs before anything else runs (multi-pass methods, e.g. a refined
        image); the default keeps them."""
        return inputs

    def second_stream(self) -> SecondStream | None:
        """The second stream of rows this method needs (see `mitigation.seam.request`), or None."""
        return None

    def contribute(self, ctx: RequestContext) -> Contribution:
        """What this method adds to the request for `ctx` (static plan, key sets, hook, logits step)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> dict[str, Any]:
        """{"name", "params"}: parses back with `parse_method`."""
        return {
            "name": self.name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params().items()},
        }

    @property
    def label(self) -> str:
        """`name` or `name:k=v,...`: the preset when not official, then the parameters that differ from it."""
        base = self.preset_values()
        changed = [f"preset={self.preset}"] if self.preset != "official" else []
        changed += [
            f"{f.name}={_text(getattr(self, f.name))}"
            for f in fields(self)
            if f.name != "preset" and getattr(self, f.name) != base[f.name]
        ]
        return self.name + (":" + ",".join(changed) if changed else "")


def _text(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def resolve_layers(method: str, explicit: tuple[int, ...] | None, default: list[int], n_layers: int) -> tuple[int, ...]:
    """`explicit` layers (checked against the depth) or the method's rule for this depth."""
    if explicit is None:
        return tuple(default)
    bad = [x for x in explicit if x >= n_layers]
    if bad:
        raise MethodError(f"{method}: layer {bad[0]} is past the text backbone's {n_layers} layers (0..{n_layers - 1})")
    return tuple(sorted(set(explicit)))


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: add a Method subclass to the registry under `name` (duplicates raise)."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} must subclass Method")
        for f in fields(cls):
            _kind(_hints(cls)[f.name])  # unsupported types fail at import, not at a request
            if f.default is MISSING:
                raise TypeError(f"{name}: parameter {f.name!r} needs a default")
            if f.name not in _BASE_FIELDS and hasattr(Method, f.name):
                raise TypeError(f"{name}: parameter {f.name!r} would hide Method.{f.name}; name it otherwise")
        _check_presets(name, cls)
        _record_explicit(cls)
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def given_params() -> frozenset[str]:
    """In a method's `__post_init__`: the parameters its caller gave (the others come from the preset)."""
    return _EXPLICIT.get() or frozenset()


def _record_explicit(cls: type[Method]) -> None:
    """Wrap the dataclass __init__ so that `__post_init__` knows which parameters the caller gave (the
    preset fills the others; `dataclasses.replace` gives them all, so it keeps every value)."""
    init = cls.__init__
    names = [f.name for f in fields(cls)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        token = _EXPLICIT.set(frozenset(names[: len(args)]) | frozenset(kwargs))
        try:
            init(self, *args, **kwargs)
        finally:
            _EXPLICIT.reset(token)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]


_BASE_FIELDS = frozenset(f.name for f in fields(Method))


def _check_presets(name: str, cls: type[Method]) -> None:
    """At import: both presets exist, name only real parameters, and "official" is the dataclass defaults."""
    fmap = {f.name: f for f in fields(cls)}
    missing = [p for p in PRESET_NAMES if p not in cls.PRESETS]
    if missing:
        raise TypeError(f"{name}: PRESETS needs {', '.join(PRESET_NAMES)} (missing {missing[0]})")
    for pname, preset in cls.PRESETS.items():
        unknown = [k for k in preset.values if k not in fmap or k == "preset"]
        if unknown:
            raise TypeError(f"{name}: preset {pname!r} names unknown parameter {unknown[0]!r}")
    for k, v in cls.PRESETS["official"].values.items():
        if fmap[k].default != v:
            raise TypeError(f"{name}: the default of {k!r} ({fmap[k].default!r}) is not the official preset's ({v!r})")


def get(name: str) -> type[Method]:
    """The registered class for `name` (MethodError listing the valid names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def names() -> list[str]:
    return sorted(METHODS)


def build(name: str, raw: Mapping[str, Any] | None = None) -> Method:
    """A method from its name and raw parameter values (strings from `k=v` or JSON values)."""
    cls = get(name)
    raw = dict(raw or {})
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise MethodError(f"{name}: unknown parameter {unknown[0]!r}; valid: {', '.join(valid)}")
    hints = _hints(cls)
    fmap = {f.name: f for f in fields(cls)}
    values = {k: _coerce(name, fmap[k], hints[k], v) for k, v in raw.items()}
    preset = values.pop("preset", "official")
    return cls.from_preset(preset, **values)


def _parse_kv(name: str, text: str) -> dict[str, str]:
    """ "a=1,b=2,3" -> {"a": "1", "b": "2,3"}: a comma-separated token without '=' continues the
    previous value (lists such as layers=1,2,3)."""
    out: dict[str, str] = {}
    last = None
    for token in text.split(","):
        if "=" in token:
            k, v = token.split("=", 1)
            k = k.strip()
            if not k:
                raise MethodError(f"{name}: expected key=value, got {token!r}")
            if k in out:
                raise MethodError(f"{name}: parameter {k!r} is given twice")
            out[k] = v.strip()
            last = k
        elif last is not None:
            out[last] += "," + token.strip()
        elif token.strip():
            raise MethodError(f"{name}: expected key=value after '{name}:', got {token!r}")
    return out


def parse_method(spec: str | Mapping[str, Any] | Method) -> Method:
    """A method from `name`, `name:k=v,...`, a JSON object string, or a {"name", "params"} mapping."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, Mapping):
        return _from_json(spec)
    if not isinstance(spec, str):
        raise MethodError(f'a method is \'name[:k=v,...]\' or {{"name": ..., "params": {{...}}}}, got {spec!r}')
    text = spec.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MethodError(f"method JSON does not parse: {e.msg} at character {e.pos}") from None
        return _from_json(data)
    name, _, rest = text.partition(":")
    name = name.strip()
    get(name)
    return build(name, _parse_kv(name, rest) if rest.strip() else {})


def _from_json(data: Any) -> Method:
    if not isinstance(data, Mapping):
        raise MethodError(f'method JSON must be an object {{"name": ..., "params": {{...}}}}, got {data!r}')
    extra = sorted(set(data) - {"name", "params"})
    if extra:
        raise MethodError(f"method JSON has unknown key {extra[0]!r}; valid: name, params")
    name = data.get("name")
    if not isinstance(name, str):
        raise MethodError(f"method JSON needs a string 'name'; valid: {', '.join(sorted(METHODS))}")
    params = data.get("params", {})
    if not isinstance(params, Mapping):
        raise MethodError(f"{name}: 'params' must be an object, got {params!r}")
    return build(name, params)


def parse_methods(specs: Any) -> tuple[Method, ...]:
    """Several methods, composed in order: a list of specs, or one JSON array string. Compositions that can
    be refused without a model (a method twice, second streams that conflict) raise CompositionError here."""
    if isinstance(specs, str) and specs.strip().startswith("["):
        try:
            specs = json.loads(specs)
        except json.JSONDecodeError as e:
            raise MethodError(f"methods JSON does not parse: {e.msg} at character {e.pos}") from None
    if isinstance(specs, (str, Mapping, Method)):
        specs = [specs]
    methods = tuple(parse_method(s) for s in specs)
    check_composition(methods)
    return methods


# --------------------------------------------------------------------------------------------- schema


def _doc(cls: type) -> tuple[str, str]:
    doc = (cls.__doc__ or "").strip()
    first = doc.split("\n\n")[0]
    return " ".join(first.split()), doc


def _field_schema(f: Field, tp: Any) -> dict[str, Any]:
    kind, optional = _kind(tp)
    md = f.metadata
    base: dict[str, Any] = {
        "float": {"type": "number"},
        "int": {"type": "integer"},
        "bool": {"type": "boolean"},
        "str": {"type": "string"},
        "ints": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    }[kind]
    target = base["items"] if kind == "ints" else base
    if md.get("min") is not None:
        target["minimum"] = md["min"]
    if md.get("max") is not None:
        target["maximum"] = md["max"]
    if md.get("choices"):
        base["enum"] = list(md["choices"])
    out: dict[str, Any] = {"anyOf": [base, {"type": "null"}]} if optional else dict(base)
    default = f.default
    out["default"] = list(default) if isinstance(default, tuple) else default
    out["description"] = md.get("help", "")
    return out


def presets_json(cls: type[Method]) -> dict[str, Any]:
    """Per preset: every parameter's value (the complete set) and the source of the values."""
    out = {}
    for pname in PRESET_NAMES:
        values = cls.from_preset(pname).params()
        out[pname] = {
            "values": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k != "preset"},
            "source": cls.PRESETS[pname].source,
        }
    return out


def schema(name: str) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of `name`'s parameters, from its dataclass."""
    cls = get(name)
    hints = _hints(cls)
    summary, _ = _doc(cls)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": name,
        "description": summary,
        "x-paper": cls.paper,
        "x-presets": presets_json(cls),
        "type": "object",
        "properties": {f.name: _field_schema(f, hints[f.name]) for f in fields(cls)},
        "additionalProperties": False,
    }


def request_schema() -> dict[str, Any]:
    """The schema of one method in a request: {"name": ..., "params": {...}}, one branch per method."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "oneOf": [
            {
                "type": "object",
                "properties": {"name": {"const": n}, "params": {k: v for k, v in schema(n).items() if k != "$schema"}},
                "required": ["name"],
                "additionalProperties": False,
            }
            for n in names()
        ],
    }


def describe() -> list[dict[str, Any]]:
    """For listings: per method its name, summary, paper and parameters (type, default, range, help)."""
    rows = []
    for n in names():
        cls = METHODS[n]
        hints = _hints(cls)
        params = []
        for f in fields(cls):
            kind, optional = _kind(hints[f.name])
            params.append(
                {
                    "name": f.name,
                    "type": kind + (" | none" if optional else ""),
                    "default": f.default,
                    "range": _range_text(f, kind),
                    "help": f.metadata.get("help", ""),
                }
            )
        rows.append(
            {"name": n, "summary": _doc(cls)[0], "paper": cls.paper, "params": params, "presets": presets_json(cls)}
        )
    return rows


#: The method set of no method: the column every other set is compared with.
BASELINE = "baseline"


def parse_method_set(text: str | tuple | list) -> tuple[str, list[dict]]:
    """'baseline' -> ('baseline', []); 'paint:heads=uniform+vhr' -> (label, [to_json, ...]); a list or
    tuple of method specs (any form `parse_methods` takes) is one composed set."""
    if isinstance(text, (tuple, list)):
        methods = parse_methods(list(text))
        if not methods:
            return BASELINE, []
        return "+".join(m.label for m in methods), [m.to_json() for m in methods]
    text = text.strip()
    if text in ("", BASELINE):
        return BASELINE, []
    methods = parse_methods([p for p in text.split("+") if p.strip()])
    return "+".join(m.label for m in methods), [m.to_json() for m in methods]
