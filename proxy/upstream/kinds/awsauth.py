"""AWS Signature V4 for Bedrock, by botocore: its signer (SigV4Auth, service "bedrock") and its credential chain
(environment, shared config and credentials files with AWS_PROFILE, web identity, container and instance
credentials). No hand-written crypto.

The chain is resolved once, in a thread (it may read files or call an endpoint); credentials that expire (web
identity, assumed roles, the instance's) are refreshed by botocore, in a thread, when it says they are due. Each is
one thread at a time, shared by every call that needs it meanwhile (singleflight.py); a call whose attempt time runs
out while it waits gives up alone (attempt.py), so a stalled credential endpoint holds one thread. Calls wait for a
refresh only in botocore's mandatory window (the credentials expire within 10 minutes): before it (its advisory
window, from 15 minutes) they sign with the credentials held while the refresh runs, as botocore's own threads do.
Signing itself is a few HMACs over the call's body and headers, done inline for each call. Credentials that
cannot be had fail the attempt as Vertex's tokens do: an endpoint that fails or cannot be reached may pass on
another try (502, `connect`), credentials AWS refuses (STS) are the proxy's own fault (502, `auth`); either way the
call fails over.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import yarl

from ...errors import UpstreamBadGateway
from ...singleflight import SingleFlight
from ..http import RetryableError

SERVICE = "bedrock"


class SigV4:
    def __init__(self, region: str) -> None:
        self._region = region
        self._credentials: Any = None
        self._held: Any = None  # the frozen credentials last had (ReadOnlyCredentials)
        self._work: SingleFlight[str, Any] = SingleFlight()

    async def headers(self, url: yarl.URL, payload: bytes, headers: dict[str, str]) -> dict[str, str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="POST", url=str(url), data=payload, headers=headers)
        SigV4Auth(await self._frozen(), SERVICE, self._region).add_auth(request)
        return dict(request.headers.items())

    def rejected(self, sent: dict[str, str]) -> bool:
        """A refused signature: botocore refreshes expiring credentials itself, so another try would not help."""
        return False

    async def _frozen(self) -> Any:
        """The credentials to sign with now (botocore's ReadOnlyCredentials)."""
        if self._credentials is None:
            self._credentials = await self._work.run("resolve", functools.partial(asyncio.to_thread, _resolve))
        creds = self._credentials
        refresh_needed = getattr(creds, "refresh_needed", None)
        if refresh_needed is None or not refresh_needed():  # static, or not yet in botocore's refresh window
            self._held = creds.get_frozen_credentials()  # no network call then
            return self._held
        refresh = functools.partial(self._refreshed, creds)
        # botocore's advisory window: a refresh is attempted, but the credentials held still have minutes left and
        # botocore lets everyone else sign with them meanwhile; only in its mandatory window (its
        # `_mandatory_refresh_timeout`, 10 minutes unless a provider set another) must calls wait for it.
        if self._held is not None and not refresh_needed(getattr(creds, "_mandatory_refresh_timeout", 600)):
            self._work.start("refresh", refresh)
            return self._held
        return await self._work.run("refresh", refresh)

    async def _refreshed(self, creds: Any) -> Any:
        self._held = await asyncio.to_thread(_fetched, creds.get_frozen_credentials)  # it refreshes (a network call)
        return self._held


def _resolve() -> Any:
    import botocore.session

    credentials = _fetched(botocore.session.Session().get_credentials)
    if credentials is None:
        raise UpstreamBadGateway("No AWS credentials for Bedrock: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                 "AWS_PROFILE, or a web identity (README \"Providers\").", kind="auth")
    return credentials


def _fetched(get: Any) -> Any:
    """`get()`: botocore fetching credentials (resolving its chain, or refreshing expiring ones), its failures told
    as the attempt's."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return get()
    except ClientError as exc:  # STS refused the role or the web identity: the proxy's credentials are wrong
        raise UpstreamBadGateway(f"AWS refused the proxy's credentials ({type(exc).__name__}).", kind="auth") from None
    except BotoCoreError as exc:  # a credential endpoint that failed or could not be reached: worth another try
        raise RetryableError(UpstreamBadGateway(f"Could not get AWS credentials ({type(exc).__name__}).",
                                                kind="connect")) from None
