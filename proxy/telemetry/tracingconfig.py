"""The OTEL_* variables behind the proxy's tracing, read and checked without importing OpenTelemetry.

The SDK reads its variables itself when a worker starts tracing, and what it cannot use it either raises on (the
worker dies with a traceback after `check-config` said ok) or replaces after a log line (a sampler typo samples
every request; a malformed header is logged, credential and all, and dropped). So each variable the SDK reads is
checked here first: `check-config` and `serve` refuse what it would not honour with one line naming the variable,
and never quote a header's value. The batching values are handed to the SDK from here (proxy/telemetry/otel.py).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..config import ConfigError

_TRUE = frozenset({"true", "1", "yes", "on"})
# The names TracerProvider takes from OTEL_TRACES_SAMPLER (opentelemetry.sdk.trace.sampling's _KNOWN_SAMPLERS;
# tests/test_break_otel.py keeps the two lists equal). Anything else the SDK replaces with parentbased_always_on.
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
# Span limits: the SDK raises at `import opentelemetry.sdk.trace` (or TracerProvider()) unless each is a
# non-negative integer or "unset"; a variable set but empty counts as set.
SPAN_LIMITS = ("OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
               "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
               "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT")
# OTEL_EXPORTER_OTLP_HEADERS as the SDK parses it (opentelemetry.util.re, liberal): name=value members separated
# by commas; a name is a token, a value printable ASCII without '"', ',', ';' or '\' (those are URL-encoded).
_HEADER = re.compile(r"[ \t]*([\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+)[ \t]*=[ \t]*"
                     r"([\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*)[ \t]*")
_HEADER_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")


@dataclass(frozen=True)
class OtelConfig:
    """What the proxy hands the SDK; the exporter's other variables (headers, timeout...) it reads itself."""

    endpoint: str  # the traces URL without credentials or query, for the logs
    sampler: str  # one of SAMPLERS
    ratio: float  # for the ratio samplers
    queue_size: int  # OTEL_BSP_MAX_QUEUE_SIZE
    batch_size: int  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE, at most queue_size
    schedule_delay_ms: int  # OTEL_BSP_SCHEDULE_DELAY
    export_timeout_ms: int  # OTEL_BSP_EXPORT_TIMEOUT


def read(env: Mapping[str, str]) -> OtelConfig | None:
    """None when tracing is off: no OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, or OTEL_SDK_DISABLED true, or
    OTEL_TRACES_EXPORTER `none`. Raises ConfigError naming the variable for what the proxy or the SDK cannot do."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE or exporter == "none" or not (traces or base):
        return None
    if exporter not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: the proxy exports traces with OTLP only ('otlp')")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigError(f"{name}={protocol!r}: the proxy exports traces over OTLP/HTTP only "
                                  "('http/protobuf'; a collector's OTLP/HTTP port is usually 4318)")
            break
    endpoint = _endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if traces else "OTEL_EXPORTER_OTLP_ENDPOINT",
                         traces or base.rstrip("/") + "/v1/traces")
    _check_headers(env)
    _check_exporter(env)
    for name in SPAN_LIMITS:
        if name in env and env[name].strip().lower() != "unset":
            _integer(env, name, 0, 0)
    sampler, ratio = _sampler(env)
    queue = _integer(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1)
    config = OtelConfig(
        endpoint, sampler, ratio, queue_size=queue,
        # a queue smaller than the SDK's default batch (512) is reasonable: the batch is capped rather than refused
        batch_size=min(_integer(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1), queue),
        schedule_delay_ms=_integer(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, 1),
        export_timeout_ms=_integer(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000, 0),
    )
    if importlib.util.find_spec("opentelemetry.sdk") is None or importlib.util.find_spec(
            "opentelemetry.exporter.otlp.proto.http") is None:
        raise ConfigError("an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT) but the OpenTelemetry packages "
                          "are not installed: pip install 'embedding-proxy[otel]'")
    return config


def _endpoint(name: str, url: str) -> str:
    """The URL without credentials or query (for the logs), or ConfigError naming the variable without its value
    when it is no http(s) URL the exporter can send to."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "http://[::1", a port beyond 65535 or not a number
        raise ConfigError(f"{name}: not a valid URL (a bracketed IPv6 address and a port 1-65535 are what it "
                          "can hold)") from None
    host = parts.hostname or ""
    safe = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}{parts.path}"
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{name}: the OTLP traces endpoint {safe!r} is not an http(s) URL")
    if port == 0:
        raise ConfigError(f"{name}: port 0 cannot be sent to (a port 1-65535)")
    return safe


def _check_headers(env: Mapping[str, str]) -> None:
    """The exporter's headers: the SDK logs a member it cannot parse (a credential, typically) and drops it."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
    name = "OTEL_EXPORTER_OTLP_TRACES_HEADERS" if traces else "OTEL_EXPORTER_OTLP_HEADERS"
    members = _HEADER_SEPARATOR.split(traces or env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    for i, member in enumerate(members, 1):
        if not member.strip():
            continue
        match = _HEADER.fullmatch(member.strip())
        # a URL-encoded CR, LF or other control character would make every export fail with the value in its error
        if match is None or not unquote(match[2]).isprintable():
            raise ConfigError(f"{name}: member {i} is not name=value (members are separated by ','; in a value, "
                              "',', ';', '\"', '\\' and control characters must be URL-encoded, e.g. ';' as %3B); "
                              "the value is not shown here")


def _check_exporter(env: Mapping[str, str]) -> None:
    """Timeout and compression: the SDK falls back to 10 s and no compression after a warning."""
    for suffix in ("TIMEOUT", "COMPRESSION"):
        traces = env.get(f"OTEL_EXPORTER_OTLP_TRACES_{suffix}")
        name = f"OTEL_EXPORTER_OTLP_TRACES_{suffix}" if traces else f"OTEL_EXPORTER_OTLP_{suffix}"
        value = (traces or env.get(name, "")).strip()
        if not value:
            continue
        if suffix == "COMPRESSION":
            if value.lower() not in ("none", "gzip", "deflate"):
                raise ConfigError(f"{name}={value!r}: one of none, gzip, deflate")
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"{name}={value!r}: a number of seconds above 0 (the whole export with its retries)")


def _sampler(env: Mapping[str, str]) -> tuple[str, float]:
    """OTEL_TRACES_SAMPLER and _ARG: the SDK replaces what it cannot use with sampling every request."""
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r}: one of {', '.join(SAMPLERS)} (a ratio goes in "
                          "OTEL_TRACES_SAMPLER_ARG)")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if sampler not in RATIO_SAMPLERS or not arg:
        return sampler, 1.0  # the specification's default ratio; other samplers take no argument
    try:
        ratio = float(arg)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: the {sampler} sampler's ratio is a number from 0 to 1 "
                          "(0.05 records 5% of traces)")
    return sampler, ratio


def _integer(env: Mapping[str, str], name: str, default: int, least: int) -> int:
    raw = env.get(name)
    if raw is None or (not raw.strip() and name not in SPAN_LIMITS):
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = least - 1
    if value < least:
        what = "a whole number" + (f" of at least {least}" if least else " of 0 or more")
        raise ConfigError(f"{name}={raw!r}: {what}" + (" or 'unset'" if name in SPAN_LIMITS else ""))
    return value
