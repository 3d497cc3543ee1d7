"""The allowed range of each numeric setting, declared on the field itself: `ttl_s: int = bounded(3600, low=1)`.

tables.py checks every value against its field's range when it loads a file, so a value that cannot work (a cache
entry that expires at once, a timeout of 0, a pool of no connections) is refused at start-up and by `check-config`
with one line naming the file, the key and the range, instead of failing on every request later.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_RANGE = "range"
_DERIVED = "derived"


@dataclass(frozen=True, slots=True)
class Range:
    low: float
    high: float = math.inf
    above: bool = False  # true: `low` itself is refused (more than low)

    def __contains__(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        low = f"above {_number(self.low)}" if self.above else f"at least {_number(self.low)}"
        if math.isinf(self.high):
            return low
        if not self.above:
            return f"from {_number(self.low)} to {_number(self.high)}"
        return f"{low} and at most {_number(self.high)}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounded(default: T, low: float, high: float = math.inf, *, above: bool = False) -> T:
    """A dataclass field with `default` whose values must lie in the range (see Range)."""
    return field(default=default, metadata={_RANGE: Range(low, high, above)})


def required(low: float, high: float = math.inf, *, above: bool = False) -> Any:
    """A dataclass field without a default whose values must lie in the range."""
    return field(metadata={_RANGE: Range(low, high, above)})


def derived(default: T) -> T:
    """A field the loader sets from the rest of the file, never read from it (an unknown key there); not compared."""
    return field(default=default, compare=False, metadata={_DERIVED: True})


def is_derived(f: Field[Any]) -> bool:
    return bool(f.metadata.get(_DERIVED))


def range_of(f: Field[Any]) -> Range | None:
    found = f.metadata.get(_RANGE)
    return found if isinstance(found, Range) else None
