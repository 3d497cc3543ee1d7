"""OAuth access tokens for Vertex AI, from google-auth: a service-account JSON file (its `token_uri` honoured) or
Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, workload identity, the metadata server).

google-auth is synchronous: loading the credentials and each refresh run in a thread, one at a time, shared by
every call that needs the token meanwhile (singleflight.py): a call whose attempt time runs out while it waits gives
up alone (attempt.py) and the refresh goes on for the others, so a stalled token endpoint holds one thread. A token is
refreshed before it expires: google-auth counts a token as no longer valid some minutes ahead of its expiry (its
refresh threshold), so a call never carries one that may expire on the way. A token Google refuses with a 401
anyway (revoked, or this host's clock runs behind Google's) is dropped: the call is tried again with a new one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import yarl

from ...errors import UpstreamBadGateway
from ...singleflight import SingleFlight
from ..http import RetryableError

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class GoogleToken:
    def __init__(self, credentials_file: str) -> None:
        self._file = credentials_file
        self._credentials: Any = None
        self._renewal: SingleFlight[str, None] = SingleFlight()
        self._rejected: str | None = None  # a token Google answered 401 to while google-auth still counts it valid

    async def headers(self, url: yarl.URL, payload: bytes, headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "Authorization": f"Bearer {await self.token()}"}

    async def token(self) -> str:
        creds = self._credentials
        if creds is None or not creds.valid or creds.token == self._rejected:
            await self._renewal.run("token", self._renew)  # one refresh for the calls that found it stale together
            creds = self._credentials
        return str(creds.token)

    async def _renew(self) -> None:
        if self._credentials is None:
            self._credentials = await asyncio.to_thread(self._load)
        if not self._credentials.valid or self._credentials.token == self._rejected:
            await asyncio.to_thread(self._refresh, self._credentials)
            self._rejected = None

    def rejected(self, sent: dict[str, str]) -> bool:
        """Google refused the token a call carried (revoked, or this host's clock runs behind): the next call
        takes a new one, one refresh for all the calls refused together. True: another try may succeed."""
        creds = self._credentials
        if creds is None or sent.get("Authorization") != f"Bearer {creds.token}":
            return False  # refreshed already since that call left: its retry carries the new token
        self._rejected = creds.token
        return True

    def _load(self) -> Any:
        import google.auth
        from google.auth import exceptions
        from google.oauth2 import service_account

        try:
            if self._file:
                return service_account.Credentials.from_service_account_file(self._file, scopes=SCOPES)
            credentials, _ = google.auth.default(scopes=SCOPES)
            return credentials
        except (OSError, ValueError, exceptions.GoogleAuthError) as exc:
            raise UpstreamBadGateway(f"No Google credentials for Vertex AI ({type(exc).__name__}).",
                                     kind="auth") from None

    @staticmethod
    def _refresh(credentials: Any) -> None:
        import urllib3
        from google.auth import exceptions
        from google.auth.transport.urllib3 import Request

        try:
            credentials.refresh(Request(urllib3.PoolManager(timeout=10.0, retries=False)))
        except exceptions.TransportError as exc:  # the token endpoint could not be reached: worth another try
            raise RetryableError(UpstreamBadGateway(f"Could not get a Google access token ({type(exc).__name__}).",
                                                    kind="connect")) from None
        except exceptions.GoogleAuthError as exc:  # refused: the credentials are wrong
            raise UpstreamBadGateway(f"Google refused the proxy's credentials ({type(exc).__name__}).",
                                     kind="auth") from None
        except (TypeError, ValueError) as exc:  # a 200 that is no token (not JSON: a proxy's page): another try may do
            raise RetryableError(UpstreamBadGateway(
                f"Google's token endpoint answered no token ({type(exc).__name__}).", kind="connect")) from None
