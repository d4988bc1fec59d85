"""What every config shares: validation (``_check``), help text (``_help``), and the JSON round
trip (``to_dict``, ``from_dict``) that saves a config next to the weights it built."""

from __future__ import annotations

import types
from dataclasses import MISSING, asdict, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# --- JSON round trip -------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value has a field's type (int for float is fine; bool is not a number)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def from_dict(cls: type, data: dict[str, Any], what: str | None = None) -> Any:
    """Build a config dataclass from a saved dict, refusing unknown keys with a clear message.
    A field missing from the dict takes the class's ``SAVED_WITHOUT`` value when it has one (what
    runs saved before the field existed did: their resume must not change), else its default."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}")
    hints = get_type_hints(cls)
    kwargs = {}
    saved_without = getattr(cls, "SAVED_WITHOUT", {})
    for f in fields(cls):
        if f.name not in data:
            if f.name in saved_without:  # a file written before the field existed
                kwargs[f.name] = saved_without[f.name]
                continue
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{what}: missing field {f.name!r}")
            continue
        value = data[f.name]
        sub = hints[f.name]
        if isinstance(sub, type) and hasattr(sub, "__dataclass_fields__"):
            value = from_dict(sub, value, f"{what}.{f.name}")
        elif not _fits(value, sub):
            raise ConfigError(f"{what}: {f.name} must be {_describe(sub)}, got "
                              f"{type(value).__name__} {value!r}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a value of the wrong JSON type reaching a comparison
        raise ConfigError(f"{what}: {e}") from None
