"""One upstream call across its attempts: its deadline and retries, and what follows a failed attempt.

The fleet client (client.py) loops: choose a deployment, maybe wait, attempt. This module holds what the loop
remembers between attempts and the decisions made from it, without I/O, so each can be read (and tested) alone:
- whether the call may wait for a deployment to be able to take it (`may_wait`): within the deadline, and a rate
  limit's waits within `max_queue_wait_s` for the whole call, not each; else the refusal (`refusal`: 429 or 503 with
  Retry-After, or the last attempt's error);
- after a failed attempt, with the deployment chosen next (`after_failure`): a failover to one not tried yet, at
  once; a retry at once of one the call waited for to come back (a wait that ends without a call would be for
  nothing); else a retry of the same ones after a backoff (the upstream's Retry-After, or jittered exponential from
  `backoff_base_s`, at most 5 s), while `max_retries` last and the backoff ends before the deadline; else the last
  error;
- a failed attempt's outcome (`failed`): a final one (refused credentials, other statuses) takes the deployment
  out of this call, and ends the call when it is the client's input (400) or the model's only deployment.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from ..errors import InvalidRequest, ProxyError, RateLimited, ServiceUnavailable
from .failures import Failure
from .router import Choice, Deployment

MAX_BACKOFF_S = 5.0

Step = Literal["failover", "retry", "backoff"]


@dataclass(slots=True)
class CallState:
    deadline: float
    retries: int  # retries left
    tried: dict[str, int] = field(default_factory=dict)  # upstream -> attempts in this call
    refused: set[str] = field(default_factory=set)  # deployments that refused this call for good (credentials)
    error: ProxyError | None = None  # the last attempt's
    retry_after: float | None = None  # the last attempt's
    previous: Deployment | None = None  # the last attempt's
    # A wait for a deployment to come back (or for a rate limit's reset) is followed by an attempt, retries left or
    # not. A backoff's retry was counted before its sleep: the deployment chosen after it is attempted as it is.
    waited: bool = False
    backed_off: bool = False
    rate_waited: float = 0.0  # max_queue_wait_s bounds this call's waits for rate limits in all, not each

    @property
    def attempts(self) -> int:
        return sum(self.tried.values())

    def may_wait(self, choice: Choice, now: float) -> bool:
        """No deployment can take the call now (`choice`): whether it may wait for the first that can."""
        max_wait = choice.max_wait - self.rate_waited if choice.rate_limited else choice.max_wait
        return not (choice.wait > max_wait or choice.wait >= self.deadline - now)

    def waited_for(self, choice: Choice) -> None:
        if choice.rate_limited:
            self.rate_waited += choice.wait
        self.waited = True

    def after_failure(self, d: Deployment, now: float, rng: random.Random) -> tuple[Step, float]:
        """The last attempt failed and `d` is chosen next: a failover or a retry at once, or a backoff (and how
        long) before choosing again; raises the last error when the call gives up (see the module's doc)."""
        error = self.error
        assert error is not None and self.previous is not None
        if d.upstream not in self.tried:
            return "failover", 0.0
        if self.waited:  # it came back: try it
            self.retries = max(self.retries - 1, 0)
            return "retry", 0.0
        # every deployment that can take the call has failed it: a retry, after a backoff
        if self.retries == 0:
            raise error
        self.retries -= 1
        used = max(d.settings.max_retries - self.retries - 1, 0)
        wait = self.retry_after if self.retry_after is not None else rng.uniform(
            0, min(MAX_BACKOFF_S, d.settings.backoff_base_s * 2**used))
        if wait >= self.deadline - now:  # no use waiting past the deadline: fail now
            raise error
        return "backoff", wait

    def failed(self, d: Deployment, failure: Failure) -> None:
        """Remember `d`'s failed attempt; raises its error when it ends the call (see the module's doc)."""
        self.previous, self.error, self.retry_after = d, failure.error, failure.retry_after
        if failure.final:
            if isinstance(failure.error, InvalidRequest) or d.solo:
                raise failure.error
            self.refused.add(d.upstream)


def refusal(model: str, choice: Choice, error: ProxyError | None) -> ProxyError:
    """The answer when no deployment can take the call within its deadline (or the queue wait)."""
    if math.isinf(choice.wait):
        return error or ServiceUnavailable(f"No upstream deployment of '{model}' can take the call.")
    if choice.rate_limited:
        return RateLimited(
            f"Every upstream deployment of '{model}' is at its rate limit for {choice.wait:.1f}s more; "
            "please retry after that.", retry_after=choice.wait)
    return ServiceUnavailable(
        f"Every upstream deployment of '{model}' is cooling down after failures for {choice.wait:.1f}s more; "
        "please retry after that.", retry_after=choice.wait)
