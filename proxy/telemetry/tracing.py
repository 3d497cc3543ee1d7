"""OpenTelemetry traces: off unless an OTLP endpoint is configured with the standard OTEL_* variables.

Off (the default), the app holds NO_TRACING: nothing of OpenTelemetry is imported, no middleware is added, and the
places that would make a span (the cache read, the quota charges, each upstream attempt) get one shared no-op
object from a method call, so the hot path holds no SDK object. On, `start` returns otel.py's implementation
(the SDK, exported over OTLP/HTTP by a background thread; one provider per process, so per `serve --workers`
worker). The attribute names live here, in one place; spans never carry an input, a key or an error message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from . import tracingconfig
from .spans import NO_SPAN, NO_TRACING, Span, SpanScope, Tracing, UpstreamTarget

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["NO_SPAN", "NO_TRACING", "Span", "SpanScope", "Tracing", "UpstreamTarget", "check", "server_attributes",
           "start", "traces_endpoint"]

log = logging.getLogger("proxy.tracing")
_NS = "embedding_proxy."
# The gateway's own attributes of a request's server span.
TEAM, KEY_ID, REQUEST_ID = _NS + "team", _NS + "key_id", _NS + "request_id"
INPUTS, CACHE, CACHE_HITS = _NS + "inputs", _NS + "cache", _NS + "cache_hits"
UPSTREAM_INPUTS, CACHED_TOKENS = _NS + "upstream_inputs", _NS + "cached_tokens"


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    """Where spans go (scheme, host, port and path only: no credentials), or None when tracing is off.

    On when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set, unless OTEL_SDK_DISABLED is
    true or OTEL_TRACES_EXPORTER is `none`. Raises ConfigError naming the variable for what the proxy cannot do
    (another exporter or protocol than OTLP over HTTP/protobuf, the `otel` extra not installed) and for every
    OTEL_* value the SDK would refuse or replace (proxy/telemetry/tracingconfig.py)."""
    config = tracingconfig.read(env)
    return None if config is None else config.endpoint


def start(env: Mapping[str, str], metrics: Metrics) -> Tracing:
    """NO_TRACING, or this process's tracer provider when an endpoint is configured (see `traces_endpoint`)."""
    config = tracingconfig.read(env)
    if config is None:
        return NO_TRACING
    tracing = _otel(config, metrics)
    ratio = f" {config.ratio:g}" if config.sampler in tracingconfig.RATIO_SAMPLERS else ""
    log.info("traces: OTLP/HTTP to %s, sampler %s%s", config.endpoint, config.sampler, ratio)
    return tracing


def check(env: Mapping[str, str]) -> str | None:
    """`traces_endpoint`, and with tracing on the SDK's objects built and shut down again, exporting nothing: what
    would stop a worker's start stops `check-config` and `serve` first."""
    config = tracingconfig.read(env)
    if config is None:
        return None
    from .metrics import Metrics

    _otel(config, Metrics()).close()
    return config.endpoint


def _otel(config: tracingconfig.OtelConfig, metrics: Metrics) -> Tracing:
    try:
        from .otel import OtelTracing  # the SDK is imported only here

        return OtelTracing(config, metrics)
    except Exception as exc:  # what tracingconfig did not foresee: one config error, not a worker's traceback
        raise ConfigError(f"OpenTelemetry could not start with these OTEL_* variables: {type(exc).__name__}: "
                          f"{exc}") from None


def server_attributes(
    *, status: int, request_id: str, team: str | None, key_id: str | None, model: str | None,
    encoding_format: str | None, dimensions: int | None, inputs: int, cache_hits: int, upstream_inputs: int,
    prompt_tokens: int, cached_tokens: int, cache: str,
) -> dict[str, Any]:
    """A request's server-span attributes once it is answered: HTTP's, then for an embeddings request the GenAI
    semantic conventions' and the gateway's own. Counts and tokens are set for answered (200) requests only."""
    attrs: dict[str, Any] = {"http.response.status_code": status, REQUEST_ID: request_id}
    if team is not None and key_id is not None:
        attrs[TEAM], attrs[KEY_ID] = team, key_id
    if model is None:
        return attrs
    attrs["gen_ai.operation.name"] = "embeddings"
    attrs["gen_ai.request.model"] = model
    if encoding_format is not None:
        attrs["gen_ai.request.encoding_formats"] = [encoding_format]
    if dimensions is not None:
        attrs["gen_ai.embeddings.dimension.count"] = dimensions
    if status == 200:
        attrs["gen_ai.usage.input_tokens"] = prompt_tokens
        attrs[INPUTS], attrs[CACHE_HITS], attrs[UPSTREAM_INPUTS] = inputs, cache_hits, upstream_inputs
        attrs[CACHED_TOKENS], attrs[CACHE] = cached_tokens, cache
    return attrs
