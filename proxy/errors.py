"""The proxy's error hierarchy and the one table that turns it into OpenAI's error JSON.

Every failure a client can see is a `ProxyError`; library exceptions are caught in the module that talks to the
library (upstream.py, the stores) and re-raised as one of these.
"""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.headers: dict[str, str] = {}  # extra response headers (x-ratelimit-* on 429)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(ProxyError):
    """The client sent its request too slowly (headers past their deadline, a body below the minimum rate)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class KeyNotActive(ProxyError):
    """An operation that needs a working key (rotation) was asked of a revoked or expired one."""

    status = 409
    type = "invalid_request_error"
    code = "key_not_active"


class KeyChanged(KeyNotActive):
    """A rotation lost a race: the key was rotated or revoked between the rotation's read and its write."""

    code = "key_changed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class TokensRateLimited(RateLimited):
    """Over a tokens-per-minute limit: OpenAI's error type is then `tokens`."""

    type = "tokens"


class QuotaExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamBadGateway(ProxyError):
    """The upstream failed, answered with an error, or answered with something we refuse to trust.

    `kind` (metrics only; clients always see code `upstream_error`): `bad_gateway` (an error status or an answer
    we refuse), `auth` (the upstream refused the proxy's credentials), `connect` (no connection, or it dropped)."""

    status = 502
    type = "server_error"
    code = "upstream_error"

    def __init__(
        self, message: str, *, kind: str = "bad_gateway", param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, param=param, retry_after=retry_after)
        self.kind = kind


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class Overloaded(ProxyError):
    """This process has no room for the request now (the admission budget, README "Overload"): retry shortly."""

    status = 503
    type = "server_error"
    code = "overloaded"
