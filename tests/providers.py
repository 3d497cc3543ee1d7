"""Shared pieces of the provider tests (issue 20): each provider's strict mock as a real server, the credentials its
clients need (an API key; AWS keys for botocore's chain; a service account whose token endpoint google-auth calls),
and what each kind is: its models, limits and how its mock records the input type and dimensions it was sent.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import Settings
from proxy.mock.providers import (
    PROVIDER_SETTINGS,
    PROVIDER_STATE,
    ProviderMockSettings,
    ProviderModel,
    ProviderState,
    create_provider_app,
)
from proxy.mock.providers.googletoken import Issued
from proxy.mock.providers.googletoken import create_app as create_token_app
from tests.conftest import make_settings

PROVIDER_KEY = "provider-secret-DO-NOT-LEAK-0123456789"
AWS_KEY_ID, AWS_SECRET = "AKIDEXAMPLETEST00001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "eu-west-3"
ADMIN = "admin-secret-for-provider-tests"


@dataclasses.dataclass(frozen=True)
class Kind:
    """One provider kind as the tests see it."""

    kind: str
    model: str  # the proxy's model name (also the provider's, unless upstream_model)
    upstream_model: str
    native: int
    sizes: tuple[int, ...]  # allowed_dimensions
    per_call: int  # inputs per call the proxy may send
    input_types: dict[str, str | None]  # portable -> what the mock must receive
    input_type_setting: str = "optional"
    base_path: str = ""  # what precedes the provider's own path in base_url

    def model_toml(self, upstream: str, **extra: Any) -> str:
        keys = {"dimensions": self.native, "allowed_dimensions": list(self.sizes),
                "input_type": self.input_type_setting, **extra}
        lines = [f'[models."{self.model}"]', *(f"{k} = {orjson.dumps(v).decode()}" for k, v in keys.items()),
                 f'deployments = [{{ upstream = "{upstream}", upstream_model = "{self.upstream_model}" }}]']
        return "\n".join(lines) + "\n"

    def mock_model(self) -> ProviderModel:
        return ProviderModel(max(self.native, *self.sizes), self.sizes, max_inputs=self.per_call,
                             default_dimensions=self.native)


GOOGLE = {"query": "RETRIEVAL_QUERY", "document": "RETRIEVAL_DOCUMENT", "classification": "CLASSIFICATION",
          "clustering": "CLUSTERING"}
COHERE = {"query": "search_query", "document": "search_document", "classification": "classification",
          "clustering": "clustering"}
KINDS = {
    "cohere": Kind("cohere", "embed-v4.0", "embed-v4.0", 1536, (256, 512, 1024, 1536), 96, COHERE, "required"),
    "voyage": Kind("voyage", "voyage-3.5", "voyage-3.5", 1024, (256, 512, 1024, 2048), 1000,
                   {"query": "query", "document": "document", "classification": None, "clustering": None},
                   base_path="/v1"),
    "jina": Kind("jina", "jina-embeddings-v3", "jina-embeddings-v3", 1024, (32, 64, 128, 256, 512, 768, 1024), 2048,
                 {"query": "retrieval.query", "document": "retrieval.passage", "classification": "classification",
                  "clustering": "separation"}, base_path="/v1"),
    "gemini": Kind("gemini", "gemini-embedding-001", "gemini-embedding-001", 3072, (768, 1536, 3072), 100, GOOGLE,
                   base_path="/v1beta"),
    "vertex": Kind("vertex", "text-embedding-005", "text-embedding-005", 768, (128, 256, 512, 768), 250, GOOGLE,
                   base_path="/v1"),
    "bedrock": Kind("bedrock", "titan-v2", "amazon.titan-embed-text-v2:0", 1024, (256, 512, 1024), 1,
                    {}, "none"),
    "bedrock-cohere": Kind("bedrock", "embed-v4.0", "cohere.embed-v4:0", 1536, (256, 512, 1024, 1536), 96, COHERE,
                           "required"),
}


@dataclasses.dataclass
class Mock:
    server: TestServer
    state: ProviderState
    settings: ProviderMockSettings
    spec: Kind
    credentials_file: str = ""  # vertex: the service account's key file
    issued: Issued | None = None  # vertex: what its token endpoint issued

    @property
    def base_url(self) -> str:
        return str(self.server.make_url(self.spec.base_path)).rstrip("/")

    def upstream_toml(self, name: str, **extra: Any) -> str:
        lines = [f"[upstreams.{name}]", f'kind = "{self.spec.kind}"', f'base_url = "{self.base_url}"',
                 "deadline_s = 10.0", "attempt_timeout_s = 5.0", "backoff_base_s = 0.01"]
        if self.spec.kind == "bedrock":
            lines.append(f'region = "{REGION}"')
        elif self.spec.kind == "vertex":
            lines += ['project = "test-project"', 'location = "europe-west4"',
                      f'credentials_file = "{self.credentials_file}"']
        else:
            lines.append('api_key_env = "PROVIDER_KEY"')
        lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


Mocks = Callable[..., Awaitable[Mock]]


def service_account(token_uri: str) -> tuple[dict[str, str], bytes]:
    """A fresh RSA service-account key file's contents (pointing at `token_uri`) and its public key (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    info = {"type": "service_account", "project_id": "test-project", "private_key_id": "test-key-1",
            "private_key": private, "client_email": "proxy@test-project.iam.gserviceaccount.com",
            "client_id": "1234567890", "token_uri": token_uri}
    return info, public


def set_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's chain finds the test keys in the environment and looks nowhere else (no files, no network)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


async def start_mock(servers: list[TestServer], name: str, token_lifetime_s: int = 3600, **options: Any) -> Mock:
    """The provider mock of KINDS[name] as a real server (a Vertex one with its token endpoint and key file)."""
    spec = KINDS[name]
    settings = ProviderMockSettings(api_key=PROVIDER_KEY, models={spec.upstream_model: spec.mock_model()},
                                    aws_keys={AWS_KEY_ID: AWS_SECRET}, region=REGION, **options)
    credentials_file, issued = "", None
    if spec.kind == "vertex":
        issued = Issued("", b"", lifetime_s=token_lifetime_s)
        token_server = TestServer(create_token_app(issued), host="127.0.0.1")
        await token_server.start_server()
        servers.append(token_server)
        info, public = service_account(str(token_server.make_url("/token")))
        issued.client_email, issued.public_key_pem = info["client_email"], public
        settings.issued = issued
        path = Path(tempfile.mkdtemp()) / "service-account.json"
        path.write_text(json.dumps(info))
        credentials_file = str(path)
    app = create_provider_app(spec.kind, settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    servers.append(server)
    return Mock(server, app[PROVIDER_STATE], app[PROVIDER_SETTINGS], spec, credentials_file, issued)


def provider_settings(redis_url: str, upstreams: str, models: str) -> Settings:
    return make_settings("http://127.0.0.1:9/v1", redis_url, upstreams + models + "[redis]\nsocket_timeout_s = 5.0\n",
                         PROVIDER_KEY=PROVIDER_KEY, PROXY_ADMIN_KEY=ADMIN)
