"""A TOML table into a frozen dataclass, strictly: unknown keys refused, types checked (an int is a float, a bool
is no int), numbers finite and in their field's range (ranges.py), required fields present. Every error names
the file and the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from .errors import ConfigError
from .ranges import is_derived, range_of


def build_table(cls: type[Any], raw: Any, where: str, source: str) -> Any:
    """`raw`, the TOML table `[where]` of `source`, as an instance of the dataclass `cls`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not is_derived(f)]  # derived ones: set by the loader
    names = {f.name for f in fields}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{source}: unknown key {where}.{sorted(unknown)[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for f in fields:
        if f.name in raw:
            value = values[f.name] = check_value(hints[f.name], raw[f.name], f"{where}.{f.name}", source)
            allowed = range_of(f)
            if allowed is not None and not all(v in allowed for v in (value if isinstance(value, tuple) else [value])):
                raise ConfigError(f"{source}: {where}.{f.name} must be {allowed}, not {raw[f.name]!r}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {where}.{f.name} is required")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: [{where}] {exc}") from exc


def check_value(hint: Any, value: Any, key: str, source: str) -> Any:
    """`value` if it is of the type `hint` (a float for an int); also used for environment variables."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # `int | None`: TOML has no null, so a present value is the other type
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:  # `tuple[int, ...]`: a TOML array of that type
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be an array, not {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(check_value(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{source}: {key} must be one of {typing.get_args(hint)}, not {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {getattr(hint, '__name__', hint)}, not {value!r}")
    if hint is float and not math.isfinite(value):  # TOML has nan and inf; no setting means either
        raise ConfigError(f"{source}: {key} must be a finite number, not {value!r}")
    return value  # a number's range is its field's (ranges.py), checked by build_table


def build_tables(raw: Any, key: str, cls: type[Any], source: str) -> dict[str, Any]:
    """A table of tables (`[upstreams.NAME]`, `[teams.NAME]`): each one a `cls`, by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{key}] must be a table of tables")
    return {name: build_table(cls, body, f"{key}.{name}", source) for name, body in raw.items()}
