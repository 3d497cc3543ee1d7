"""Which deployment takes a call: weighted choice among the healthy ones of the lowest priority, with room.

A deployment is one upstream serving one model. Health is passive, after Envoy's outlier detection: `allowed_fails`
consecutive failed attempts (5xx, timeout, connection error, malformed answer, refused credentials) take it out for
`cooldown_s`; after that its first call decides (one more failure: out again; a success: healthy). A model's only
deployment is never taken out, as Envoy never ejects past its max-ejection share: its calls retry as before. An
upstream 429 is not a failure: it pauses the deployment until the reset the upstream named. Lower `priority`
numbers win; a higher one gets calls only while no deployment of a lower one can take them now.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ..config import DeploymentSettings, Settings, UpstreamSettings, deployments_of
from .http import Target
from .kinds import make_target
from .pacing import Budget


@dataclass(eq=False)
class Deployment:
    model: str
    upstream: str  # the [upstreams.NAME] it calls: its label in metrics, logs and /admin/upstreams
    upstream_model: str
    weight: float
    priority: int
    settings: UpstreamSettings
    target: Target
    solo: bool  # the model's only deployment: never cooled down
    fails: int = 0  # consecutive failed attempts
    cool_until: float = 0.0  # monotonic; taken out for failures until then
    paused_until: float = 0.0  # monotonic; the upstream's 429 asked to wait until then
    last_error: str = ""  # the kind of its last failure (metrics' upstream error kinds)
    last_error_at: float = 0.0
    cooldowns: int = 0
    budget: Budget = field(default_factory=Budget)

    def down_for(self, now: float) -> float:
        return max(self.cool_until, self.paused_until) - now

    def cooling(self, now: float) -> bool:
        return self.cool_until > now


@dataclass(frozen=True, slots=True)
class Choice:
    deployment: Deployment | None
    # Nothing can take the call now: how long until one can (inf: never within reason) and whether that is a
    # rate limit (bounded by max_queue_wait_s) or a cooldown (bounded by the deadline alone).
    wait: float = math.inf
    rate_limited: bool = False
    max_wait: float = math.inf


class Router:
    def __init__(self, settings: Settings, rng: random.Random) -> None:
        self._rng = rng
        self.models: dict[str, list[Deployment]] = {}
        for model, spec in settings.models.items():
            configured = deployments_of(spec)
            self.models[model] = [self._deployment(settings, model, d, solo=len(configured) == 1)
                                  for d in configured]

    @staticmethod
    def _deployment(settings: Settings, model: str, d: DeploymentSettings, *, solo: bool) -> Deployment:
        up = settings.upstreams[d.upstream]
        name = settings.upstream_model(model, d)
        target = make_target(up, name, settings.upstream_api_keys.get(d.upstream, ""))
        return Deployment(model, d.upstream, name, d.weight, d.priority, up, target, solo)

    def deployments(self) -> Iterable[Deployment]:
        for deps in self.models.values():
            yield from deps

    def choose(
        self, model: str, tokens: int, now: float, avoid: Collection[str] = (), exclude: Collection[str] = (),
    ) -> Choice:
        """A deployment that can take a call of `tokens` now, preferring ones not in `avoid` (tried already) and
        never one in `exclude`; else the shortest admissible wait (a rate limit's within max_queue_wait_s, any
        cooldown's)."""
        ready: list[Deployment] = []
        waiting: list[Choice] = []
        for d in self.models[model]:
            if d.upstream in exclude:
                continue
            down = d.down_for(now)
            if down > 0:
                cooling = d.cooling(now)
                waiting.append(Choice(None, down, not cooling, math.inf if cooling else d.settings.max_queue_wait_s))
                continue
            wait = d.budget.wait(tokens, now)
            if wait > 0:
                waiting.append(Choice(None, wait, True, d.settings.max_queue_wait_s))
            else:
                ready.append(d)
        if not ready:
            fits = [c for c in waiting if c.wait <= c.max_wait]
            return min(fits or waiting, key=lambda c: c.wait, default=Choice(None))
        fresh = [d for d in ready if d.upstream not in avoid] or ready
        top = min(d.priority for d in fresh)
        pool = [d for d in fresh if d.priority == top]
        if len(pool) == 1:
            return Choice(pool[0], 0.0)
        point = self._rng.random() * sum(d.weight for d in pool)
        for d in pool:
            point -= d.weight
            if point < 0:
                return Choice(d, 0.0)
        return Choice(pool[-1], 0.0)

    @staticmethod
    def succeeded(d: Deployment) -> None:
        d.fails = 0

    @staticmethod
    def failed(d: Deployment, kind: str, now: float, retry_after: float | None = None) -> bool:
        """Book a failed attempt; True when it started a cooldown."""
        d.last_error, d.last_error_at = kind, now
        if kind == "rate_limited":
            pause = max(retry_after or 0.0, d.budget.reset_in(now) or 0.0)
            d.paused_until = max(d.paused_until, now + pause)
            return False
        d.fails += 1
        allowed = d.settings.allowed_fails
        if d.solo or d.fails < allowed:
            return False
        d.cool_until = now + d.settings.cooldown_s
        d.fails = allowed - 1  # after the cooldown, its first call decides
        d.cooldowns += 1
        return True
