"""CSV cells that a spreadsheet opens as text, never as a formula (OWASP, "CSV Injection").

A key's name, an SSO subject or email is whatever its author typed: `=HYPERLINK(...)` or `=cmd|' /C calc'!A0` in a
usage export by key would run as a formula in the spreadsheet of whoever opens it. A text cell that starts with
`=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'` (the spreadsheet shows the rest, as text); numbers
are written as they are. A carriage return in text becomes a line feed, in a quoted cell (below).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutral(value: Any) -> Any:
    """The value, or for text a spreadsheet would take for a formula, that text after a `'`; a carriage return in
    text becomes a line feed (Python's csv quotes a cell with `\n` but not one with a lone `\r` when rows end in
    `\n`: a key named `x\r=cmd` started a row of its own in a spreadsheet)."""
    if not isinstance(value, str):
        return value
    text = "'" + value if value.startswith(FORMULA_START) else value
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class SafeDictWriter(csv.DictWriter):  # type: ignore[type-arg]
    """csv.DictWriter whose text cells are `neutral`."""

    def writerow(self, rowdict: Mapping[str, Any]) -> Any:
        return super().writerow({k: neutral(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)
