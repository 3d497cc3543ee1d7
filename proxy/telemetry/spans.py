"""What the proxy's code holds of a trace, whether tracing is on or off: the span interfaces and the no-op tracing.

otel.py implements them with the SDK; tracing.py chooses which one a process gets. Nothing here imports
another part of the proxy: an upstream attempt's span reads the attempt's deployment through `UpstreamTarget`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class _Kind(Protocol):
    @property
    def kind(self) -> str: ...


class UpstreamTarget(Protocol):
    """What an upstream attempt's span names of its deployment (proxy/upstream/router.py's Deployment)."""

    @property
    def model(self) -> str: ...

    @property
    def upstream(self) -> str: ...

    @property
    def upstream_model(self) -> str: ...

    @property
    def settings(self) -> _Kind: ...

    @property
    def target(self) -> tuple[Any, ...]: ...


class Span(Protocol):
    """What the proxy's code does with a span, whether tracing is on or off."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def is_recording(self) -> bool: ...

    def fail(self, error_type: str) -> None: ...

    def update_name(self, name: str) -> None: ...


class SpanScope(Protocol):
    """A span that is the current one inside a `with` block (its children's parent), ended at the block's end;
    an exception leaving the block marks it failed with the exception's error code or class, not its message."""

    def __enter__(self) -> Span: ...

    def __exit__(self, *exc: Any) -> None: ...


class _NoSpan:
    """Tracing off: a scope that is its own span and does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def is_recording(self) -> bool:
        return False

    def fail(self, error_type: str) -> None:
        return None

    def update_name(self, name: str) -> None:
        return None


NO_SPAN = _NoSpan()


class Tracing:
    """Tracing off: every span is NO_SPAN. proxy/telemetry/otel.py's OtelTracing is the same interface, on."""

    enabled = False

    def span(self, name: str) -> SpanScope:
        """A child of the current span (cache read, quota charge)."""
        return NO_SPAN

    def server_span(self, method: str, route: str | None, path: str, headers: Mapping[str, str]) -> SpanScope:
        """One request's span, continuing the client's W3C `traceparent` when it sent one; `route` is the matched
        route's template (None: no route matched)."""
        return NO_SPAN

    def upstream_span(self, deployment: UpstreamTarget, inputs: int) -> SpanScope:
        """One upstream attempt (a CLIENT span); `upstream_headers` gives the headers that carry it upstream."""
        return NO_SPAN

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers` plus the current span's `traceparent` (a copy: the deployment's own dict is shared)."""
        return headers

    def origin(self) -> object:
        """The caller's trace context, for a micro-batched call made later in another task (see `merged_call`)."""
        return None

    def merged_call(self, origins: Sequence[object]) -> SpanScope:
        """Around one upstream call carrying the inputs of the callers whose `origin`s are given: its spans are
        children of the first sampled caller's span, linked to the others'."""
        return NO_SPAN

    async def shutdown(self) -> None:
        """Export what is queued, within a bound (at the app's cleanup)."""

    def close(self) -> None:
        """Stop now, before any span was made (`check`'s trial start)."""


NO_TRACING = Tracing()
