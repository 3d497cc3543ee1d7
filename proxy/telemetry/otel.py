"""Tracing on: the OpenTelemetry SDK, exporting over OTLP/HTTP (imported only when tracing is configured).

tracingconfig.py has checked every OTEL_* variable the SDK reads before this module is imported. The exporter
reads its own (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE), the resource
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (service.name defaults to embedding-proxy here); the sampler and the
OTEL_BSP_* batching values are handed over from the checked config.

Each process has its own TracerProvider, never the global one. Spans leave through a BatchSpanProcessor's thread,
so a slow or unreachable collector never holds up a request. Its queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE); the
SDK drops silently when it is full, so the bound is kept here in front of it, and every span that is not exported
is counted in embedding_proxy_trace_spans_dropped_total: queue full, export failed, or still queued or inside an
unfinished export at shutdown. Only W3C `traceparent`/`tracestate` are read from clients and sent upstream (never
baggage), and a `tracestate` only when it is valid and within W3C's limits.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from ..errors import ProxyError
from .metrics import Metrics
from .spans import NO_SPAN, Span, SpanScope, Tracing, UpstreamTarget
from .tracingconfig import OtelConfig

log = logging.getLogger("proxy.tracing")
# At shutdown, queued spans get this long to leave; then the process goes on stopping (well inside the workers'
# 30 s stop timeout and the orchestrators' grace periods).
SHUTDOWN_S = 5.0
DROP_REASONS = ("queue_full", "export_failed", "shutdown")
_PROPAGATOR = TraceContextTextMapPropagator()
# A client's `tracestate` (W3C Trace Context, section 3.3): checked here because the SDK's parser logs an invalid
# member verbatim, so any client could write its own text into the proxy's log with each request. Over the limits
# (32 members, the 512 characters every vendor must pass on) it is not passed on either.
_TS_KEY = r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
_TS_MEMBER = re.compile(rf"({_TS_KEY})=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{{0,255}}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TS_MAX_MEMBERS, _TS_MAX_CHARS = 32, 512
# Around a micro-batched upstream call: links to the callers' spans other than its parent's, and how many callers.
_MERGED: contextvars.ContextVar[tuple[list[Link], int] | None] = contextvars.ContextVar("merged_call", default=None)


def error_type(exc: BaseException) -> str:
    """The `error.type` of an exception: the proxy's error code, or the class name (never the message, which
    may quote an input)."""
    if isinstance(exc, ProxyError) and exc.code:
        return exc.code
    return type(exc).__name__


class _Scope:
    """A started span, current inside the `with` block and ended at its end."""

    __slots__ = ("_parent", "_span", "_token")

    def __init__(self, span: trace.Span, parent: Context | None = None) -> None:
        self._span, self._parent = span, parent
        self._token: object = None

    def __enter__(self) -> _Scope:
        self._token = otel_context.attach(trace.set_span_in_context(self._span, self._parent))
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(error_type(exc))
        otel_context.detach(self._token)  # type: ignore[arg-type]
        self._span.end()

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def is_recording(self) -> bool:
        return self._span.is_recording()

    def fail(self, error_type: str) -> None:
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR))

    def update_name(self, name: str) -> None:
        self._span.update_name(name)


class _Merged:
    """The trace context of a micro-batched upstream call, made in whichever task dispatched it."""

    __slots__ = ("_callers", "_contexts", "_tokens")

    def __init__(self, contexts: list[Context], callers: int) -> None:
        self._contexts, self._callers = contexts, callers
        self._tokens: tuple[object, contextvars.Token[Any]] | None = None

    def __enter__(self) -> Span:
        spans = [trace.get_current_span(c).get_span_context() for c in self._contexts]
        # A sampled parent, when any caller is sampled: under ratio sampling the call is then recorded.
        parent = next((i for i, s in enumerate(spans) if s.trace_flags.sampled), 0)
        links = [Link(s) for i, s in enumerate(spans) if i != parent and s.is_valid]
        self._tokens = (otel_context.attach(self._contexts[parent]), _MERGED.set((links, self._callers)))
        return NO_SPAN

    def __exit__(self, *exc: object) -> None:
        assert self._tokens is not None
        attached, merged = self._tokens
        _MERGED.reset(merged)
        otel_context.detach(attached)  # type: ignore[arg-type]


class _Queue:
    """The export queue's bound, kept in front of the BatchSpanProcessor (whose own bound drops silently), and the
    count of spans that were not exported. Spans come in on the event loop and leave on the export thread."""

    def __init__(self, size: int, metrics: Metrics) -> None:
        self.size = size
        self.pending = 0  # handed to the batch processor and not yet taken by an export
        self.exporting = 0  # inside an export that has not returned
        self.closed = False  # after `abandon`: what is still pending or exporting was counted then
        self._lock = threading.Lock()
        self._dropped = {reason: metrics.child(metrics.trace_spans_dropped, reason) for reason in DROP_REASONS}

    def admit(self) -> bool:
        with self._lock:
            reason = "shutdown" if self.closed else "queue_full" if self.pending >= self.size else None
            if reason is None:
                self.pending += 1
        if reason is not None:
            self.drop(reason, 1)
        return reason is None

    def taken(self, count: int) -> None:
        with self._lock:
            if not self.closed:
                self.pending = max(0, self.pending - count)
                self.exporting += count

    def exported(self, count: int, ok: bool) -> None:
        with self._lock:
            if self.closed:
                return  # counted by `abandon` already
            self.exporting = max(0, self.exporting - count)
        if not ok:
            self.drop("export_failed", count)

    def drop(self, reason: str, count: int) -> None:
        self._dropped[reason].inc(count)  # prometheus-client counters are thread-safe

    def abandon(self) -> int:
        """At shutdown: what is still queued, or inside an export that has not returned (its thread dies with the
        process), is dropped."""
        with self._lock:
            left, self.pending, self.exporting, self.closed = self.pending + self.exporting, 0, 0, True
        if left:
            self.drop("shutdown", left)
        return left


class _CountingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, queue: _Queue) -> None:
        self._inner, self._queue = inner, queue

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._queue.taken(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:
            log.exception("trace export failed")
            result = SpanExportResult.FAILURE
        self._queue.exported(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    def __init__(self, inner: BatchSpanProcessor, queue: _Queue) -> None:
        self._inner, self._queue = inner, queue

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return  # the batch processor exports sampled spans only
        if self._queue.admit():
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _resource() -> Resource:
    found = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    ours: dict[str, str | int] = {"process.pid": os.getpid()}  # tells `serve --workers` workers apart
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        ours["service.name"] = "embedding-proxy"
    if "service.version" not in found.attributes:
        ours["service.version"] = __version__
    return found.merge(Resource(ours))


def _sampler(config: OtelConfig) -> sampling.Sampler:
    if config.sampler == "traceidratio":
        return sampling.TraceIdRatioBased(config.ratio)
    if config.sampler == "parentbased_traceidratio":
        return sampling.ParentBasedTraceIdRatio(config.ratio)
    fixed: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.DEFAULT_ON, "parentbased_always_off": sampling.DEFAULT_OFF,
    }
    return fixed[config.sampler]


def _w3c_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What the propagator reads of a request's headers: `traceparent`, and `tracestate` when it is valid and
    within the limits (else dropped, quietly: a client's invalid tracestate is not worth a log line)."""
    carrier: dict[str, str] = {}
    parent = headers.get("traceparent")
    if parent is None:
        return carrier
    carrier["traceparent"] = parent
    state = headers.get("tracestate")
    if state is None or len(state) > _TS_MAX_CHARS:
        return carrier
    keys: set[str] = set()
    for member in state.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        match = _TS_MEMBER.fullmatch(member)
        if match is None or match[1] in keys or len(keys) == _TS_MAX_MEMBERS:
            return carrier
        keys.add(match[1])
    carrier["tracestate"] = state
    return carrier


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, config: OtelConfig, metrics: Metrics) -> None:
        self.queue = _Queue(config.queue_size, metrics)
        batch = BatchSpanProcessor(
            _CountingExporter(OTLPSpanExporter(), self.queue), max_queue_size=config.queue_size,
            schedule_delay_millis=config.schedule_delay_ms, max_export_batch_size=config.batch_size,
            export_timeout_millis=config.export_timeout_ms)
        # shutdown_on_exit=False: the app shuts it down within SHUTDOWN_S; the SDK's exit hook could wait 30 s
        self.provider = TracerProvider(sampler=_sampler(config), resource=_resource(), shutdown_on_exit=False)
        self.provider.add_span_processor(_BoundedProcessor(batch, self.queue))
        self._tracer = self.provider.get_tracer("embedding-proxy", __version__)
        self.endpoint = config.endpoint

    def span(self, name: str) -> SpanScope:
        return _Scope(self._tracer.start_span(name))

    def server_span(self, method: str, route: str | None, path: str, headers: Mapping[str, str]) -> SpanScope:
        parent = _PROPAGATOR.extract(_w3c_headers(headers))
        attrs: dict[str, Any] = {"http.request.method": method}
        if route is not None:  # an unmatched path is the client's text: left out
            attrs["http.route"], attrs["url.path"] = route, path
        span = self._tracer.start_span(f"{method} {route}" if route else method, context=parent,
                                       kind=SpanKind.SERVER, attributes=attrs)
        return _Scope(span, parent)

    def upstream_span(self, deployment: UpstreamTarget, inputs: int) -> SpanScope:
        d = deployment
        links, callers = _MERGED.get() or ([], 1)
        url = d.target[0]
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "embeddings", "gen_ai.request.model": d.upstream_model,
            "server.address": url.host or "", "server.port": url.port or 0, "http.request.method": "POST",
            "embedding_proxy.model": d.model, "embedding_proxy.upstream": d.upstream,
            "embedding_proxy.upstream.kind": d.settings.kind, "embedding_proxy.upstream.inputs": inputs,
            "embedding_proxy.upstream.callers": callers,
        }
        span = self._tracer.start_span(f"embeddings {d.upstream_model}", kind=SpanKind.CLIENT, attributes=attrs,
                                       links=links)
        return _Scope(span)

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        out = dict(headers)
        _PROPAGATOR.inject(out)
        return out

    def origin(self) -> object:
        return otel_context.get_current()

    def merged_call(self, origins: Sequence[object]) -> SpanScope:
        contexts = [o for o in origins if isinstance(o, Context)]
        return _Merged(contexts, len(origins)) if contexts else NO_SPAN

    def close(self) -> None:
        self.provider.shutdown()

    async def shutdown(self) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                self.provider.shutdown()
            finally:
                done.set()

        # a daemon thread: an export stuck on a hung collector must not keep the process from exiting
        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        if not await asyncio.to_thread(done.wait, SHUTDOWN_S):
            log.warning("trace export did not finish within %gs at shutdown", SHUTDOWN_S)
        if left := self.queue.abandon():
            log.warning("%d trace spans were not exported at shutdown", left)
