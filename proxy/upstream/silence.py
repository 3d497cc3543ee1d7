"""Whether a deployment has gone silent: a call in flight to it for `silent_after_s` and no answer since it was sent.

A deployment that hangs (accepts, never answers) costs every call sent to it until the first one times out: the
cooldown only knows of failures, which take `attempt_timeout_s` to come. Silence is seen sooner: this process's
calls to a deployment are kept here from the moment each is sent, and any answer from it (a success, an error
status, a 429, a refused or reset connection: anything but our own timeout) covers every call sent before it. The
oldest call sent since the last answer and still in flight says for how long the deployment has been silent.

How long is too long (`threshold`): the upstream's `silent_after_s`, or adaptive, as TCP's retransmission timeout
(RFC 6298): the smoothed answer time plus 4 x its smoothed deviation (gains 1/8 and 1/4 per answer), and at least
twice the smoothed answer time and 0.1 s more than it (a deployment whose answers are very regular has almost no
deviation: a little jitter on a loaded machine must not read as silence), and 1 s until this process has heard the
deployment answer once; never more than `attempt_timeout_s` (an attempt that timed out unanswered is silence too).
A call larger than usual is given longer: the threshold times its size against the usual size (in tokens) of the
calls answered, when larger (`factor`), still capped by `attempt_timeout_s`; its answer time counts per call of the
usual size (but no faster than it took: a large call that took no longer than usual calls, its time a fixed
overhead, does not make the usual calls' threshold shorter). Without it, one client's batch ten times the usual size
was silence at the usual threshold, and the whole fleet steered everyone's calls away from the deployment until the
batch answered. The usual size is smoothed as a geometric mean (gain 1/8 on the logarithm): a plain mean moved an
eighth of the way to each batch, so a client's second 300-input batch in a row was only 8 usual calls, not 300, and
was silence again (as was a batch after one huge call).
One slow answer (a large batch, a new connection) widens it at once and is forgotten over the next few answers; a
decaying maximum was tried first and kept a first call's connection set-up in the threshold for minutes. Under
traffic, answers keep coming from a slow deployment that works, so a slow call is not silence; a lone slow call may
look like it, which only shifts calls to another deployment until it answers (router.py).
"""

from __future__ import annotations

import math

from ..config import UpstreamSettings

SILENT_FLOOR_S = 0.1  # the adaptive threshold's least margin over the smoothed answer time: a busy loop's stalls
DEVIATIONS = 4.0  # the adaptive threshold: the smoothed answer time plus this many smoothed deviations (RFC 6298's K)
GAIN, DEVIATION_GAIN = 0.125, 0.25  # RFC 6298's alpha and beta
COLD_S = 1.0  # the adaptive threshold before any answer was heard (RFC 6298's initial RTO)


class Silence:
    """This process's calls in flight to one deployment, and how long its answers take."""

    __slots__ = ("_next", "_unheard", "deviation", "size", "smoothed")

    def __init__(self) -> None:
        # calls sent since the last answer, still in flight: (send time, size factor), in order
        self._unheard: dict[int, tuple[float, float]] = {}
        self._next = 0
        self.smoothed: float | None = None  # the smoothed answer time of a call of the usual size (None: none yet)
        self.deviation = 0.0  # its smoothed deviation
        self.size: float | None = None  # the usual size of the calls answered, in tokens (smoothed geometric mean)

    def factor(self, tokens: int) -> float:
        """How many calls of the usual size a call of `tokens` is (at least 1)."""
        return 1.0 if self.size is None or tokens <= self.size else tokens / self.size

    def sent(self, now: float, factor: float = 1.0) -> int:
        """A call (`factor` times the usual size) goes out now: its token, for `ended`."""
        self._next += 1
        self._unheard[self._next] = (now, factor)
        return self._next

    def heard(self, took: float, factor: float = 1.0, tokens: int = 0) -> None:
        """The deployment answered this process (after `took` seconds, a call `factor` times the usual size, of
        `tokens`): every call sent before it is covered."""
        self.covered()
        took = max(took, 0.0)
        if factor > 1.0:  # per call of the usual size, but never faster than the raw time says (fixed overheads)
            took = took / factor if self.smoothed is None else max(took / factor, min(took, self.smoothed))
        if tokens > 0:  # smoothed in log space: a large call moves the usual size by a ratio, not by its tokens
            self.size = float(tokens) if self.size is None else self.size * (tokens / self.size) ** GAIN
        if self.smoothed is None:
            self.smoothed, self.deviation = took, took / 2
        else:
            self.deviation += DEVIATION_GAIN * (abs(self.smoothed - took) - self.deviation)
            self.smoothed += GAIN * (took - self.smoothed)

    def covered(self) -> None:
        """The deployment answered (another process: the fleet said so): the calls in flight are covered."""
        self._unheard.clear()

    def ended(self, token: int) -> bool:
        """The call is done; whether nothing was heard from the deployment since it was sent."""
        return self._unheard.pop(token, None) is not None

    def since(self) -> float | None:
        """When the oldest call in flight that no answer has covered was sent (None: none)."""
        return next((sent for sent, _ in self._unheard.values()), None)

    def threshold(self, settings: UpstreamSettings, factor: float = 1.0) -> float:
        """How long a call (`factor` times the usual size) may go unanswered before the deployment is silent (inf:
        never)."""
        fixed = settings.silent_after_s
        if fixed == 0:
            return math.inf
        if fixed is not None:
            after = fixed
        elif self.smoothed is None:
            after = COLD_S
        else:
            after = self.smoothed + max(DEVIATIONS * self.deviation, self.smoothed, SILENT_FLOOR_S)
        return min(after * max(factor, 1.0), settings.attempt_timeout_s)

    def silent(self, settings: UpstreamSettings, now: float) -> float | None:
        """When the first call that makes the deployment silent now was sent: unanswered past its own threshold
        (None: it is not silent)."""
        return next((sent for sent, factor in self._unheard.values()
                     if now - sent >= self.threshold(settings, factor)), None)
