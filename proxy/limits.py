"""Quota limits of a team or a key. None means unlimited."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

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
        return cls(**{f.name: int(raw[f.name]) if raw.get(f.name) else None for f in fields(cls)})


UNLIMITED = Limits()
