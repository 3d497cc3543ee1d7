"""What the embeddings path hands back: the answer's content (`Outcome`) and the request's story (`Trace`).

Kept apart from the phases so that the HTTP layer (the response, the access line) reads them without knowing how
they were produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..accounts.quota import Ticket
from ..stores.cache import Entry


@dataclass(frozen=True, slots=True)
class Outcome:
    entries: list[Entry]  # one per unique input
    positions: list[int]  # input position -> index into entries
    prompt_tokens: int  # every input, as the upstream would count them
    billed_tokens: int  # tokens this request itself sent upstream
    cache: Literal["hit", "miss", "partial"]
    ticket: Ticket | None = None  # the quota reservation, when the key or its team has limits
    keys: Sequence[str] = ()  # the cache key of each entry

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.billed_tokens


@dataclass(slots=True)
class Trace:
    """What one request did, for its access line and metrics; filled in as it goes, so a failed request has it
    too. (Outcome holds what the answer needs.)"""

    inputs: int = 0
    cache_hits: int = 0  # unique inputs served without an upstream call of its own (cache, or another's call)
    upstream_inputs: int = 0  # unique inputs this request sent upstream
    upstream_s: float = 0.0  # time it waited for upstream answers (its own calls or shared ones)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # What its own upstream calls' failed attempts may have cost (FleetClient's `on_lost`): the usage of answers
    # the proxy refused, and the local counts of attempts sent and never answered (or answered unreadably).
    failed_tokens: int = 0
    unconfirmed_tokens: int = 0

    def lost(self, column: str, tokens: int) -> None:
        if column == "failed":
            self.failed_tokens += tokens
        else:
            self.unconfirmed_tokens += tokens
