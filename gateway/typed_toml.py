"""TOML tables → frozen dataclasses, checked against the dataclasses' type hints.

Supports str, int, float (ints accepted, never nan or inf), bool, Literal, tuple[X, ...],
dict[str, X] and nested dataclasses. Unknown keys are errors (a typo must not silently
become a default), and each dataclass may add its own checks with ``problems() ->
Iterator[(key, message)]``. A value of the wrong type is described, never repeated: it may
be a secret (a Redis URL with its password, a key) in the wrong place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message says where and why."""


def build(cls: type[T], data: Any, source: str, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from a TOML table, or a ``ConfigError`` naming
    ``source`` and the key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or '<top>'}: expected a table, got {_described(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: {_join(where, key)}: unknown key (known: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], source, _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {_join(where, name)}: required key is missing")
    obj = cls(**values)
    for key, message in getattr(obj, "problems", lambda: ())():
        raise ConfigError(f"{source}: {_join(where, key)}: {message}")
    return obj


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value  # checked by whoever consumes it (a plugin's own options)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, where)  # type: ignore[arg-type]
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {where}: expected one of {list(choices)}, got "
                              f"{_described(value, short=True)}")
        return value
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {_described(value)}")
        return tuple(_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        item = get_args(hint)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a table, got {_described(value)}")
        return {k: _convert(item, v, source, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where}: expected a number, got {_described(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {where}: expected a number, got {value}")
        return float(value)
    expected = {str: "a string", int: "an integer", bool: "true or false"}.get(hint)
    if expected is None:
        raise TypeError(f"config field {where}: the loader does not support {hint!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {where}: expected {expected}, got {_described(value)}")
    return value


def _described(value: Any, short: bool = False) -> str:
    """A value of the wrong type as an error says it: numbers and booleans as they are, a
    string only when ``short`` (a choice misspelt), anything else by its kind."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if short and len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "a list"
    return "a table" if isinstance(value, dict) else type(value).__name__


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
