"""Quota limits of a team or a key (None means unlimited), and the UTC windows they count in."""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .ranges import bounded

TEAM_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # fullmatch only: `$` also matches before a final newline


def check_team(team: str) -> str:
    if not TEAM_RE.fullmatch(team):
        raise ValueError("team names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting alphanumeric")
    return team


# name -> (counter metric, window): every limit counts requests or tokens in a fixed UTC window.
LIMIT_WINDOWS = {
    "rpm": ("req", "minute"),
    "tpm": ("tok", "minute"),
    "tokens_per_day": ("tok", "day"),
    "tokens_per_month": ("tok", "month"),
}


# The largest limit: counted exactly by the quota scripts (Lua numbers are doubles), and a 64-bit integer in JSON
# (the admin API, the console). A larger one (a typo, or "effectively unlimited") is refused wherever it is set.
MAX_LIMIT = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    # In a config file each is at least 1 (omitted: unlimited); at run time 0 or less clears it (see `merged`).
    rpm: int | None = bounded(None, 1, MAX_LIMIT)  # requests per minute
    tpm: int | None = bounded(None, 1, MAX_LIMIT)  # tokens per minute
    tokens_per_day: int | None = bounded(None, 1, MAX_LIMIT)
    tokens_per_month: int | None = bounded(None, 1, MAX_LIMIT)

    def items(self) -> list[tuple[str, int]]:
        """The limits that are set, as (name, value)."""
        return [(name, v) for name in LIMIT_WINDOWS if (v := getattr(self, name)) is not None]

    def __bool__(self) -> bool:
        """Whether any limit is set (checked on every request: no loop over dataclass fields)."""
        return not (self.rpm is None and self.tpm is None and self.tokens_per_day is None
                    and self.tokens_per_month is None)

    def to_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def merged(self, changes: Mapping[str, int | None]) -> Limits:
        """These limits with `changes` applied; a value of 0 or less in `changes` clears a limit."""
        values: dict[str, Any] = self.to_dict()
        for name, value in changes.items():
            if name not in values:
                raise ValueError(f"unknown limit {name!r}")
            values[name] = value if value is None or value > 0 else None
        return Limits(**values)

    def to_redis(self) -> dict[str, str]:
        return {name: "" if v is None else str(v) for name, v in self.to_dict().items()}

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> Limits:
        """As stored; a value above MAX_LIMIT (stored before it was refused) reads as MAX_LIMIT."""
        return cls(**{f.name: min(int(raw[f.name]), MAX_LIMIT) if raw.get(f.name) else None for f in fields(cls)})


UNLIMITED = Limits()


def window(kind: str, now: float) -> tuple[str, float]:
    """The id of the UTC window of `kind` (minute, day, month) that holds `now`, and when it ends."""
    if kind == "minute":
        start = int(now // 60)
        return f"m{start}", (start + 1) * 60.0
    t = time.gmtime(now)
    if kind == "day":
        return f"d{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}", (int(now // 86400) + 1) * 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"mo{t.tm_year:04d}{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))
