"""Which deployment takes a call: weighted choice among the healthy ones of the lowest priority, with room.

A deployment is one upstream serving one model. Health is passive, after Envoy's outlier detection: `allowed_fails`
consecutive failed attempts (5xx, timeout, connection error, malformed answer, refused credentials) take it out for
`cooldown_s`; after that its first call decides (one more failure: out again; a success: healthy). A model's only
deployment is never taken out, as Envoy never ejects past its max-ejection share: its calls retry as before. An
upstream 429 is not a failure: it pauses the deployment until the reset the upstream named. Lower `priority`
numbers win; a higher one gets calls only while no deployment of a lower one can take them now.

A pause longer than the deployment's `cooldown_s` (a huge `Retry-After`, a far reset) is checked by a probe: once
`cooldown_s` has passed since the 429 (or since the last probe), the next call that wants the deployment is let
through to it as the probe, one at a time per deployment, whatever its rate-limit headers last said; a success (or
an upstream 4xx about the call's input: an answer, not a 429) ends the pause, a failure leaves it and the next probe
is due `cooldown_s` later. Calls that are not the probe see the pause as before.

A silent deployment (silence.py: a call in flight to it for `silent_after_s` and no answer of any kind since that
call was sent) is avoided softly: a call goes to any other deployment that can take it now, and only when none can
to the silent one (a model's only deployment, or every one silent, still gets its calls). Silent, its next call is a
trial, one at a time in the fleet, claimed as a pause's probe is (the call found silent counts as the trial in
flight until its attempt timeout ends, plus a second); any answer from it ends the silence, a trial that fails
delays the next by `cooldown_s`, and a cooldown that starts takes its place. So a deployment that starts hanging
gets the calls sent to it before its first call is found silent, then one at a time, not every call sent before
its first timeout.

With a shared store (sharing.py) the health is the fleet's: each event this process books is booked in Redis too,
and the fleet's state of a deployment, from any process, replaces this process's copy as it arrives (`apply`): a
streak, a cooldown, a pause, a silence or a probe in flight seen anywhere counts here. While Redis is down each
process goes by its own view.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from ..config import DeploymentSettings, Settings, UpstreamSettings, deployments_of
from .http import MAX_RETRY_AFTER_S, Target
from .kinds import Auth, Translator, translator
from .pacing import Budget
from .sharing import PROBE_HOLD_MARGIN_S, HealthSharing
from .silence import Silence

log = logging.getLogger("proxy.upstream")
TRIAL_WAIT_S = 0.05  # a call that waits for a trial in flight here looks again after this (its answer may be in)


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
    probe_at: float = 0.0  # monotonic; while paused, from then on one call may go as a probe
    probing: bool = False  # a probe is in flight (this process)
    # A cooldown ended and no call has answered since: its next call is a trial, one at a time in the fleet (a
    # probe, as a pause's); the others treat it as cooling down while the trial is in flight (here or elsewhere).
    half_open: bool = False
    # Silent (silence.py), here or in the fleet, and no answer since: avoided softly; its next call is a trial.
    silent: bool = False
    silence: Silence = field(default_factory=Silence)  # this process's calls in flight to it and their answers
    silences: int = 0  # times this process found it silent
    steered: int = 0  # calls this process sent elsewhere because it was silent
    last_error: str = ""  # the kind of its last failure (metrics' upstream error kinds)
    last_error_at: float = 0.0
    cooldowns: int = 0
    budget: Budget = field(default_factory=Budget)
    limits: tuple[int, int, int] = (0, 0, 0)  # rpm, tpm, max_in_flight held fleet-wide (limiting.py; 0: none)
    limited_until: float = 0.0  # monotonic; the fleet's reservation said the next call fits from then on
    # A refusal for tokens says so of calls as large as the one refused only: smaller ones may fit now (`limited`).
    tokens_limited: tuple[float, int] = (0.0, 0)  # (until, tokens): a call of at least `tokens` fits from then on
    # Its calls are reserved in the fleet's store, which holds the announced budget for all processes: this
    # process's own copy of it (`budget`) no longer decides when a call may go (limiting.py).
    fleet_paced: bool = False
    kind: Translator | None = None  # its provider kind (kinds/); None: OpenAI's
    auth: Auth | None = None  # signs each call (bedrock) or adds a fresh token (vertex)

    def down_for(self, now: float) -> float:
        until = max(self.cool_until, self.paused_until)
        if self.trial_held(now):  # its cooldown's trial is in flight: the others wait for its answer
            until = max(until, self.probe_at, now + TRIAL_WAIT_S)
        return until - now

    def cooling(self, now: float) -> bool:
        return self.cool_until > now or self.trial_held(now)

    def rate_wait(self, tokens: int, now: float) -> float:
        """Seconds until a call of `tokens` fits its rate limits: the fleet's reservation's when it is reserved
        there, else its upstream's headers as this process heard them (pacing.py)."""
        until, large = self.tokens_limited
        fleet = max(self.limited_until, until if tokens >= large else 0.0)
        return max(0.0 if self.fleet_paced else self.budget.wait(tokens, now), fleet - now)

    def limited(self, until: float, now: float, tokens: int | None = None) -> None:
        """The fleet's reservation refused a call until `until` (monotonic): any call, or for tokens (`tokens`: the
        refused call's) calls of at least as many (one team's large request must not hold up the others' small
        ones, which the reservation may still take)."""
        if tokens is None:
            self.limited_until = max(self.limited_until, until)
            return
        before, large = self.tokens_limited
        self.tokens_limited = (max(before, until), min(large, tokens)) if before > now else (until, tokens)

    def trial_held(self, now: float) -> bool:
        return self.half_open and (self.probing or self.probe_at > now)

    def probe_due(self, now: float) -> bool:
        """Paused, silent or past a cooldown (not cooling down), its next probe is due, and no probe is in flight."""
        return (not self.probing and self.cool_until <= now and now >= self.probe_at
                and (now < self.paused_until or self.half_open or self.silent))


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
        self.share = HealthSharing()  # the fleet's copy of the health, when the app wires one (sharing.py)
        self.on_steered: Callable[[Deployment], None] | None = None  # a call went elsewhere: `d` was silent
        self.models: dict[str, list[Deployment]] = {}
        for model, spec in settings.models.items():
            configured = deployments_of(spec)
            self.models[model] = [self._deployment(settings, model, d, solo=len(configured) == 1)
                                  for d in configured]

    @staticmethod
    def _deployment(settings: Settings, model: str, d: DeploymentSettings, *, solo: bool) -> Deployment:
        up = settings.upstreams[d.upstream]
        name = settings.upstream_model(model, d)
        kind = translator(up.kind)
        target = kind.target(up, name, settings.upstream_api_keys.get(d.upstream, ""))
        return Deployment(model, d.upstream, name, d.weight, d.priority, up, target, solo, kind=kind,
                          auth=kind.auth(up), limits=(d.rpm or up.rpm, d.tpm or up.tpm,
                                                      d.max_in_flight or up.max_in_flight))

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
        shy: list[Deployment] = []  # silent, no trial due: only when no other can take the call now
        waiting: list[Choice] = []
        for d in self.models[model]:
            if d.upstream in exclude:
                continue
            # silence is found by each call's own timer (attempt.py `_watch`), which looks again after a stalled
            # loop; looking here too took a deployment whose answer was waiting to be read for silent
            if d.probe_due(now):
                ready.append(d)  # its pause's probe is due: the call that takes it is the probe (FleetClient)
                continue
            down = d.down_for(now)
            if down > 0:
                cooling = d.cooling(now)
                waiting.append(Choice(None, down, not cooling, math.inf if cooling else d.settings.max_queue_wait_s))
                continue
            wait = d.rate_wait(tokens, now)
            if wait > 0:
                waiting.append(Choice(None, wait, True, d.settings.max_queue_wait_s))
            else:
                (shy if d.silent else ready).append(d)
        if ready:
            for d in shy:
                d.steered += 1
                if self.on_steered is not None:
                    self.on_steered(d)
        else:
            ready = shy
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

    def notice(self, d: Deployment, now: float, ended: float | None = None, size: float = 1.0) -> None:
        """Whether `d` has gone silent by this process's calls to it (silence.py): one in flight, or one sent at
        `ended` (`size` times the usual size) that just ended (timed out) with nothing heard from `d` since it was
        sent."""
        if d.silent:
            return
        since = d.silence.silent(d.settings, now)
        if since is None and ended is not None and now - ended >= d.silence.threshold(d.settings, size):
            since = ended
        if since is not None:
            self.hush(d, since, now)

    def hush(self, d: Deployment, since: float, now: float) -> None:
        """`d` has been silent since its call sent at `since`: that call counts as its trial in flight until its
        attempt timeout ends (plus the probe hold's margin); told to the fleet. Not for a model's only deployment
        (nowhere else to go) nor one cooling down or past a cooldown (its trial rules govern)."""
        if d.silent or d.solo or d.cooling(now) or d.half_open:
            return
        d.silent = True
        d.silences += 1
        d.probe_at = max(d.probe_at, since + d.settings.attempt_timeout_s + PROBE_HOLD_MARGIN_S)
        self.share.tell(d, "silent", d.probe_at - now)
        log.warning("upstream %s (model %s) is silent: a call in flight for %.2fs and no answer since; other "
                    "deployments take its calls until it answers", d.upstream, d.model, now - since)

    def apply(self, model: str, upstream: str, fails: int, cool_in: float, paused_in: float, probe_in: float,
              held_in: float, now: float, silent: bool = False) -> None:
        """The fleet's state of a deployment (seconds from `now`; <= 0: not so; a cooldown < 0: it ended, and no
        call has answered since: its next call is a trial; `silent`: found silent and no answer since) replaces this
        process's copy; a probe or trial held elsewhere (`held_in`) defers this process's until it is done. Each time
        is cut to what this process's settings allow (a far time in the store, from a clock that jumped or anyone who
        can write there, never takes a deployment out for longer), and a model's only deployment is never cooled
        down (nor silent)."""
        for d in self.models.get(model, ()):
            if d.upstream != upstream:
                continue
            up = d.settings
            cool_in = 0.0 if d.solo else min(cool_in, up.cooldown_s)
            if cool_in > 0 and not d.cooling(now):
                log.warning("upstream %s (model %s) is cooling down for %.1fs: failed calls in a row in the fleet",
                            upstream, model, cool_in)
            d.fails = min(max(fails, 0), up.allowed_fails)
            d.cool_until = now + cool_in if cool_in > 0 else 0.0
            d.half_open = cool_in != 0
            if d.silent and not silent:  # it answered somewhere: the calls here are covered too
                d.silence.covered()
            d.silent = silent and not d.solo
            d.paused_until = now + min(paused_in, MAX_RETRY_AFTER_S) if paused_in > 0 else 0.0
            due = min(max(probe_in, held_in), max(up.cooldown_s, up.attempt_timeout_s + PROBE_HOLD_MARGIN_S))
            d.probe_at = now + due if due > 0 else 0.0

    @staticmethod
    def heard(d: Deployment) -> None:
        """`d` answered: a silence ends, and so does the silent call's hold on its next trial (a trial in flight
        ends as it does)."""
        if d.silent and not d.probing:
            d.probe_at = 0.0
        d.silent = False

    @staticmethod
    def succeeded(d: Deployment, now: float = 0.0) -> None:
        d.fails = 0
        Router.heard(d)
        if d.cool_until <= now:  # answered after its cooldown: back (an answer during it ends nothing)
            d.half_open = False

    @staticmethod
    def failed(d: Deployment, kind: str, now: float, retry_after: float | None = None, heard: bool = True) -> bool:
        """Book a failed attempt (`heard`: the deployment answered, which ends a silence; a timeout did not); True
        when it started a cooldown."""
        d.last_error, d.last_error_at = kind, now
        if heard:
            Router.heard(d)
        if kind == "rate_limited":
            pause = max(retry_after or 0.0, d.budget.reset_in(now) or 0.0)
            d.paused_until = max(d.paused_until, now + pause)
            d.probe_at = now + d.settings.cooldown_s  # a longer pause is checked by a probe then
            return False
        d.fails += 1
        allowed = d.settings.allowed_fails
        if d.solo or d.fails < allowed:
            return False
        d.cool_until = now + d.settings.cooldown_s
        d.fails = allowed - 1  # after the cooldown, its first call decides: one trial at a time (probe_due)
        d.half_open = True
        d.silent = False  # the cooldown and its trial take the silence's place
        d.cooldowns += 1
        return True

    @staticmethod
    def probe_started(d: Deployment, until: float = 0.0) -> None:
        """A call goes to `d`, paused or past a cooldown, as its probe (`d.probe_due` was true) until `until` at
        most: no other probe until it is done."""
        d.probing = True
        d.probe_at = max(d.probe_at, until)

    @staticmethod
    def probe_done(d: Deployment, ok: bool | None, now: float) -> bool:
        """`d`'s probe succeeded (`ok`), failed, or has no outcome (None: cancelled; the next call may probe at
        once). True when it ended the pause or the cooldown's trial."""
        d.probing = False
        if ok:
            d.paused_until = d.probe_at = 0.0
            d.half_open = d.cool_until > now
            d.silent = False
            return True
        d.probe_at = min(d.probe_at, now) if ok is None else max(d.probe_at, now + d.settings.cooldown_s)
        return False
