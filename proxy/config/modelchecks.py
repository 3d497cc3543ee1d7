"""A model's settings against the providers that serve it (providers.py): the portable `input_type`, the sizes
`dimensions` may take, and what one call may carry. Each refusal is a ConfigError naming the file and the key."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError
from .fleet import ModelSettings, UpstreamSettings
from .providers import DEFAULT_BASE_URLS, MAX_INPUTS, MAX_TOKENS, NEEDS_INPUT_TYPE, family, takes_input_type

# A Bedrock region or a Vertex location goes into a host name: letters, digits and dashes only.
_REGION_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def provider_upstream(name: str, u: UpstreamSettings, raw: dict[str, Any], source: str) -> UpstreamSettings:
    """An upstream of a provider kind as it will be called: `base_url` the provider's own when left out or empty
    (Bedrock's from `region`, Vertex's from `location`), and no API key for bedrock and vertex (they sign, or
    carry tokens: their credentials come from AWS's and Google's chains)."""
    where = f"{source}: upstreams.{name}"
    changes: dict[str, Any] = {}
    for key, kind in (("region", "bedrock"), ("project", "vertex"), ("location", "vertex")):
        if u.kind == kind and not getattr(u, key):
            raise ConfigError(f"{where}.{key} is required with kind = \"{kind}\"")
    for key in ("region", "location"):
        if getattr(u, key) and not _REGION_RE.fullmatch(getattr(u, key)):
            raise ConfigError(f"{where}.{key} must be lower-case letters, digits and dashes (us-east-1), "
                              f"not {getattr(u, key)!r}")
    if u.kind in ("bedrock", "vertex"):
        if raw.get("api_key_env"):
            raise ConfigError(f"{where}.api_key_env: kind = \"{u.kind}\" takes no API key (README \"Providers\")")
        changes["api_key_env"] = ""
    if not raw.get("base_url"):
        if u.kind == "bedrock":
            changes["base_url"] = f"https://bedrock-runtime.{u.region}.amazonaws.com"
        elif u.kind == "vertex":
            host = "aiplatform.googleapis.com" if u.location == "global" else f"{u.location}-aiplatform.googleapis.com"
            changes["base_url"] = f"https://{host}/v1"
        else:
            changes["base_url"] = DEFAULT_BASE_URLS[u.kind]
    return dataclasses.replace(u, **changes)


def check_model_providers(m: ModelSettings, raw: dict[str, Any], served_by: Sequence[tuple[str, str]], where: str,
                          source: str) -> ModelSettings:
    """`m` with its provider families set and its batch limits within theirs; `served_by` is (kind, upstream
    model) per deployment, `raw` the model's table as written (which limits it set itself)."""
    families = tuple(dict.fromkeys(family(kind, name) for kind, name in served_by))
    _check_input_type(m, families, where, source)
    _check_dimensions(m, where, source)
    changes: dict[str, Any] = {"families": families}
    for key, table in (("max_batch_items", MAX_INPUTS), ("max_batch_tokens", MAX_TOKENS)):
        limits = [(table[f], f) for f in families if f in table]
        if not limits:
            continue
        most, fam = min(limits)
        if key not in raw:
            changes[key] = min(getattr(m, key), most)
        elif getattr(m, key) > most:
            raise ConfigError(f"{source}: {where}.{key} must be at most {most}: one {fam} call carries no more")
    return dataclasses.replace(m, **changes)


def _check_input_type(m: ModelSettings, families: Sequence[str], where: str, source: str) -> None:
    if m.input_type == "none":
        if m.default_input_type:
            raise ConfigError(f"{source}: {where}.default_input_type needs input_type = \"required\" or "
                              "\"optional\"")
        if needing := [f for f in families if f in NEEDS_INPUT_TYPE]:
            raise ConfigError(f"{source}: {where}.input_type: {needing[0]} needs an input type on every call: set "
                              "input_type = \"required\" (and default_input_type for requests that send none)")
        return
    if refusing := [f for f in families if not takes_input_type(f)]:
        raise ConfigError(f"{source}: {where}.input_type must be \"none\": its {refusing[0]} deployment has no "
                          "input type")
    if m.input_type == "optional" and not m.default_input_type and (
            needing := [f for f in families if f in NEEDS_INPUT_TYPE]):
        raise ConfigError(f"{source}: {where}.input_type: {needing[0]} needs an input type on every call: set "
                          "input_type = \"required\" or a default_input_type")


def _check_dimensions(m: ModelSettings, where: str, source: str) -> None:
    sizes = m.allowed_dimensions
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"{source}: {where}.allowed_dimensions lists a size twice")
