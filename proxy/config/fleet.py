"""What is served and where: the upstreams (`[upstreams.NAME]`), the models (`[models.NAME]`) and the
deployments that place a model on one or more upstreams. Defaults and ranges sit on the fields (ranges.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .providers import Kind
from .ranges import bounded, derived, required


@dataclass(frozen=True)
class UpstreamSettings:
    # "openai": POST {base_url}/embeddings with `Authorization: Bearer`; "azure": POST
    # {base_url}/openai/deployments/{upstream_model}/embeddings?api-version={api_version} with an `api-key` header;
    # "cohere", "voyage", "gemini", "vertex", "bedrock", "jina": the provider's own API (README "Providers").
    kind: Kind = "openai"
    # Left out: the kind's own (README "Providers"); "" for bedrock and vertex: built from region / location.
    base_url: str = "https://api.openai.com/v1"
    # Azure OpenAI's `api-version` (required with kind = "azure").
    api_version: str = ""
    # Name of the environment variable that holds this upstream's key (never put the key itself in a file).
    # Not used by bedrock (the AWS credential chain) and vertex (Google credentials).
    api_key_env: str = "UPSTREAM_API_KEY"
    # bedrock: the AWS region (SigV4 signs for it; the default URL names it).
    region: str = ""
    # vertex: the Google Cloud project and location, and a service-account JSON file (its token_uri is honoured);
    # empty: Application Default Credentials.
    project: str = ""
    location: str = ""
    credentials_file: str = ""
    # One client request may wait this long for the upstream in total, retries included; then 504.
    deadline_s: float = bounded(30.0, 0, above=True)
    # One attempt is abandoned after this long and retried if the deadline allows.
    attempt_timeout_s: float = bounded(10.0, 0, above=True)
    # Retries after the first attempt for connection errors, timeouts, 429 and 5xx.
    max_retries: int = bounded(3, 0)
    # Exponential backoff base; each wait is uniform in [0, base * 2**attempt] (full jitter), capped at 5 s.
    backoff_base_s: float = bounded(0.1, 0)
    # Upstream calls in flight per process; further calls wait (inside their deadline) for a free slot.
    max_concurrency: int = bounded(64, 1)
    # Connections to the upstreams kept per process (0 would mean no limit to aiohttp).
    pool_size: int = bounded(100, 1)
    # This many consecutive failed attempts on one deployment (5xx, timeout, connection error, malformed answer)
    # take it out of rotation for cooldown_s; its first call after that decides whether it is back. A model's only
    # deployment is never taken out: there is nowhere else to send its calls, so they retry as before.
    allowed_fails: int = bounded(3, 1)
    # Also: a 429's pause longer than this is checked by one probe call every cooldown_s; a success ends it.
    cooldown_s: float = bounded(30.0, 0, above=True)
    # A deployment with a call in flight this long and no answer of any kind since that call was sent is silent:
    # other deployments of its model take the calls it would get (a model's only deployment still gets them), one
    # trial call at a time in the fleet goes to it, and an answer ends it (README "Silence"). Left out: adaptive, as
    # TCP's retransmission timeout: its smoothed answer time + 4 x their smoothed deviation, at least 0.1 s (1 s before
    # any answer); 0: never silent. At most attempt_timeout_s counts (an attempt that timed out with no answer since
    # it was sent makes it silent).
    silent_after_s: float | None = bounded(None, 0)
    # A call the upstream's last x-ratelimit-* headers say will not fit may wait this long for the reset (inside
    # its deadline) when no other deployment has room; beyond that the proxy answers 429 itself.
    max_queue_wait_s: float = bounded(10.0, 0)
    # Limits the upstream enforces without announcing them, held fleet-wide (every process of every instance) by
    # reservations in Redis, per deployment: requests and tokens in any minute, calls in flight (0: none). A
    # deployment may set its own; these apply to each deployment of this upstream that sets none.
    rpm: int = bounded(0, 0)
    tpm: int = bounded(0, 0)
    max_in_flight: int = bounded(0, 0)


@dataclass(frozen=True)
class DeploymentSettings:
    """One upstream serving a model: `deployments = [{ upstream = "NAME", ... }]` in the model's table."""

    upstream: str
    # The model name sent upstream (for Azure: the deployment name); empty: the model's `upstream_model`.
    upstream_model: str = ""
    # Share of the model's traffic among the healthy deployments of the same priority.
    weight: float = bounded(1.0, 0, above=True)
    # 0 is preferred; a higher priority gets traffic only while no deployment of a lower one can take the call.
    priority: int = bounded(0, 0)
    # This deployment's own fleet-wide limits (0: its upstream's rpm, tpm, max_in_flight).
    rpm: int = bounded(0, 0)
    tpm: int = bounded(0, 0)
    max_in_flight: int = bounded(0, 0)


@dataclass(frozen=True)
class ModelSettings:
    # Native vector size; answers of any other size are refused and never cached.
    dimensions: int = required(1)
    # Whether clients may ask for `dimensions` (text-embedding-3 and later).
    supports_dimensions: bool = False
    # Which `[upstreams.NAME]` serves this model.
    upstream: str = "default"
    # The model name sent upstream (for example an Azure deployment name); defaults to the model's own name.
    upstream_model: str = ""
    # Tokenizer for local counts: "cl100k_base" (exact for OpenAI embedding models) or "hf:PATH" (a Hugging Face
    # tokenizer.json, for self-hosted models).
    tokenizer: str = "cl100k_base"
    # With an "hf:" tokenizer: whether the server's `usage` counts the special tokens ([CLS], [SEP]) the tokenizer
    # adds. TEI and vLLM do (true); Infinity does not (false).
    count_special_tokens: bool = True
    # Ask the upstream for base64 so vectors stay float32-exact; false for upstreams that only speak float.
    upstream_base64: bool = True
    # What one upstream request may carry; misses are split into as few requests as these allow.
    max_batch_items: int = bounded(2048, 1)
    max_batch_tokens: int = bounded(300_000, 1)
    # Misses of concurrent requests share upstream calls (README "Micro-batching"); false: each request's misses go
    # in calls of their own, as before micro-batching.
    micro_batching: bool = True
    # Client limits, checked before anything goes upstream (400 when exceeded).
    max_input_tokens: int = bounded(8192, 1)
    max_request_tokens: int = bounded(300_000, 1)
    # What the upstream charges, in USD per million tokens: prices the usage ledger and the cache's savings.
    price_per_million_tokens: float = bounded(0.0, 0)
    # The portable `input_type` (query, document, classification, clustering; README "Providers"): "required"
    # (a request without one takes default_input_type, or is refused), "optional" (sent when given, or the
    # default), "none" (refused: 400). Part of the cache key.
    input_type: Literal["required", "optional", "none"] = "none"
    default_input_type: Literal["", "query", "document", "classification", "clustering"] = ""
    # The sizes `dimensions` may take (empty: 1 to `dimensions`, when supports_dimensions); set, the model takes
    # `dimensions` and any other size is refused before anything goes upstream. They may exceed the native
    # (default) size where the provider allows it (Voyage: 2048 over a default of 1024).
    allowed_dimensions: tuple[int, ...] = bounded((), 1)
    # Over-long inputs: false asks every provider to refuse them (400), true lets the provider truncate them (Cohere
    # truncate END, Voyage truncation, Vertex autoTruncate, Jina truncate).
    provider_truncation: bool = False
    # Part of every cache key of this model: bump it when the model behind the name changes.
    cache_revision: str = ""
    # Where the model is served (see deployments_of); empty: `upstream` (with `upstream_model`) alone.
    deployments: tuple[DeploymentSettings, ...] = ()
    # Set by the loader, not in the file: the provider families of its deployments (config/providers.py).
    families: tuple[str, ...] = derived(())

    @property
    def takes_dimensions(self) -> bool:
        return self.supports_dimensions or bool(self.allowed_dimensions)

    @property
    def openai_only(self) -> bool:
        """Served by OpenAI-API upstreams only: `input_type` is an unknown argument there, token ids pass."""
        return all(f in ("openai", "azure") for f in self.families)


def deployments_of(spec: ModelSettings) -> tuple[DeploymentSettings, ...]:
    """Where a model is served: its `deployments`, or the one its `upstream` names."""
    return spec.deployments or (DeploymentSettings(spec.upstream, spec.upstream_model),)
