"""Key names beside key ids in a usage report by key: the ledger holds ids only (a name may change with a key's
record; the ledger's fields never do), so a report by key reads the names of the keys it lists when it is made."""

from __future__ import annotations

from typing import Any

from .keys import KeyStore


async def name_keys(keystore: KeyStore, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with a `key` gets `key_name`: the key's name ("" when it has none), or None when its record is
    gone or unreadable. Only the keys in the rows are read (two round trips), never every key in the store. The
    team is the row's own `team`: a key's usage is written under its team, and a key never changes team."""
    ids = {row["key"] for row in rows if "key" in row}
    records = await keystore.records(sorted(ids)) if ids else {}
    for row in rows:
        if "key" in row:
            record = records.get(row["key"])
            row["key_name"] = None if record is None else record.name
    return rows
