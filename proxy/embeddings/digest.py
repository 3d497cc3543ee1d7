"""Phase 1, digest and de-duplicate: every input's cache key, and each distinct input once.

A key is the namespace (shared, or the team's under `cache.scope = "team"`) followed by a keyed content hash of the
model, its revision and purge generation, the dimensions, the input kind and input type, and the input
(stores/rediskeys.py). While the shared cache secret is unknown (Redis down at start), inputs are hashed with a
secret of this process only: de-duplication and coalescing still work, and nothing hashed with it is read from or
written to a tier.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..stores.cache import EmbeddingCache
from ..stores.generations import CacheGenerations
from ..stores.guard import StoreUnavailable
from ..stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from .request import EmbeddingRequest


@dataclass(frozen=True, slots=True)
class Unique:
    """A request's inputs, each distinct one once, in the order first seen."""

    keys: list[str]  # the cache key of each unique input
    items: list[str | list[int]]  # the unique inputs themselves
    positions: list[int]  # input position -> index into keys
    index: dict[str, int]  # cache key -> index into keys


def dedupe(inputs: Sequence[Any], namespace: str, digest: Callable[[Any], str]) -> Unique:
    """Key every input as `namespace + digest(input)`; equal keys are one unique input."""
    index: dict[str, int] = {}
    positions: list[int] = []
    items: list[str | list[int]] = []
    for item in inputs:
        idx = index.setdefault(namespace + digest(item), len(index))
        if idx == len(items):
            items.append(item)
        positions.append(idx)
    return Unique(list(index), items, positions, index)


class Digester:
    def __init__(self, settings: Settings, cache: EmbeddingCache, generations: CacheGenerations) -> None:
        self._settings = settings
        self._cache = cache
        self._generations = generations
        self._keys = RedisKeys(settings.cache.key_prefix)
        self._fallback_seed = seed_from_secret(secrets.token_urlsafe(32))

    async def digest(self, req: EmbeddingRequest, team: str) -> tuple[Unique, bool]:
        """The request's unique inputs and whether they may be cached (false: keyed with the fallback secret)."""
        spec = self._settings.models[req.model]
        scope_team = team if self._settings.cache.scope == "team" else None
        seed, cacheable, generation = await self._seed(req.model, scope_team)
        builder = DigestBuilder(seed, req.model, req.dimensions, req.kind, spec.cache_revision, generation,
                                req.input_type)
        digest: Callable[[Any], str] = builder.text if req.kind == "s" else builder.tokens
        return dedupe(req.inputs, self._keys.cache_namespace(scope_team), digest), cacheable

    async def _seed(self, model: str, scope_team: str | None) -> tuple[int, bool, str]:
        """The hash seed, whether it is the shared one, and the model's purge generation."""
        try:
            seed = await self._cache.seed()
            # in memory: a Redis read only until the generations have been read once
            generation = self._generations.token(model, scope_team)
            if generation is None:
                generation = await self._generations.token_now(model, scope_team)
        except StoreUnavailable:
            return self._fallback_seed, False, ""
        return seed, True, generation
