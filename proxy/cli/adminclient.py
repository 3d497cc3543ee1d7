"""The command line as a client of a running proxy's admin API (`embedding-proxy upstreams`).

A request that carries the admin key goes to the URL the operator gave and nowhere else. urllib's default opener
follows 30x answers and copies `Authorization` to whatever host the `Location` names (https to http included), so
this opener has no redirect handler: a 30x is an error that names the `Location`, and the key never leaves for
another address. Every failure is a `CommandFailed` with one line to print.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from email.message import Message
from typing import IO, Any

import orjson

from .failures import CommandFailed


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Replaces urllib's redirect handler: returning None makes urllib raise the 30x as an HTTPError."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects())


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def get_json(base: str, path: str, admin_key: str, *, timeout_s: float = 10.0) -> Any:
    """GET `base` + `path` with the admin key and return its JSON; CommandFailed (exit 1, or 2 for a bad URL)."""
    url = base.rstrip("/") + path
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {admin_key}",
                                                         "X-Admin-Client": "cli"})  # the audit log's `how`
    except ValueError as exc:  # not a URL at all
        raise CommandFailed(f"--url {base!r} is not an http(s) URL: {exc}", 2) from exc
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            location = exc.headers.get("Location")
            where = f" redirecting to {_one_line(location)}" if location else ""
            raise CommandFailed(f"{url} answered {exc.code}{where}; not followed, so that the admin key goes only "
                                "to the address given: point --url at the proxy itself") from None
        detail = _one_line(exc.read()[:300].decode(errors="replace"))
        raise CommandFailed(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandFailed(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except http.client.HTTPException as exc:  # an answer that is not HTTP (BadStatusLine, ...)
        raise CommandFailed(f"{url} did not answer HTTP: {type(exc).__name__}") from None
    except ValueError as exc:  # a malformed URL urllib only finds out about when it connects ("http://[::1")
        raise CommandFailed(f"--url {base!r} is not a valid URL: {exc}", 2) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise CommandFailed(f"{url} did not answer JSON: is it embedding-proxy?") from None
