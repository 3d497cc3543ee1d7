"""One request on its way through the phases: what each phase reads and what it leaves for the next.

A plain record, so that a test can build one by hand and run a single phase on it. The phases fill it in order:
digest (`inputs`, `cacheable`), the tier read (`found`, `misses`, `epoch`, `readable`), counting (`counts`), the
misses (`own`), and the settlement reads it all. Indices (`misses`, positions) point into `inputs.keys`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..accounts.keys import KeyRecord
from ..accounts.quota import Ticket
from ..config import ModelSettings
from ..stores.cache import Entry
from .digest import Unique
from .outcome import Trace
from .request import EmbeddingRequest


@dataclass(slots=True, eq=False)
class Job:
    req: EmbeddingRequest
    key: KeyRecord
    spec: ModelSettings  # the model's settings
    ticket: Ticket | None  # the quota reservation, when the key or its team has limits
    trace: Trace
    at: float  # when the request started (its ticket's time: quotas and ledger agree on the day)
    inputs: Unique  # each distinct input once, with its cache key
    cacheable: bool  # false while the shared cache secret is unknown: nothing is read from or written to a tier
    found: list[Entry | None] = field(default_factory=list)  # per unique input: its entry, once known
    misses: list[int] = field(default_factory=list)  # unique inputs no tier had
    epoch: int = 0  # the in-flight table's release epoch before the cache read
    readable: bool = False  # the shared tier may be read (false once it failed this request: no second read)
    counts: list[int] = field(default_factory=list)  # per unique input: its tokens
    own: dict[str, asyncio.Future[Entry]] = field(default_factory=dict)  # its own upstream calls: billed to it
    # Set when it gave up (cancelled): its calls not sent yet are then not sent, unless another request shares them.
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if not self.found:
            self.found = [None] * len(self.inputs.keys)

    @property
    def keys(self) -> list[str]:
        return self.inputs.keys

    @property
    def dims(self) -> int:
        """The vector width the answer has (the request's `dimensions`, or the model's)."""
        return self.req.dimensions or self.spec.dimensions

    @property
    def team(self) -> str:
        return self.key.team
