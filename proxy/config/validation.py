"""The values a type cannot check: URLs the upstream client can send to, names that end up in keys, ledger
fields, URLs and metric labels, and tokenizers that load. Each refusal is a ConfigError naming the file and key."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from ..tokens import PUBLISHED_SHA256, TokenizerError, load_hf_tokenizer
from .errors import ConfigError

# An upstream's `api_key_env`: a name the environment can hold.
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def public_url(url: str) -> str:
    """An http(s) or redis URL as logs and `check-config` may show it: no user, password or query (which may
    carry a credential). Anything that is no URL comes back as it is (a cluster's host:port)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "<not a valid URL>"
    if not parts.scheme or not parts.netloc:
        return url.strip()
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{parts.path}"


def check_http_url(url: str, where: str) -> None:
    """Refuse a base URL the upstream client cannot send to; `where` names the file and key (or the variable)."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port beyond 65535 or not a number, a broken IPv6 address
        usable = False
    if not usable:
        raise ConfigError(f"{where} must be an http:// or https:// URL with a host (and a port 1-65535 if any), "
                          f"not {public_url(url)!r}")


# Model names go into ledger fields (`key|model|metric`), key records (`a,b`) and metric labels.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")

# An Azure deployment name goes into the URL's path: nothing that could leave its segment ('/', '..', '?', '%').
AZURE_DEPLOYMENT_RE = re.compile(r"(?!\.+$)[A-Za-z0-9._-]+")


def check_azure_deployment(value: str, key: str, source: str) -> None:
    if not AZURE_DEPLOYMENT_RE.fullmatch(value):
        raise ConfigError(f"{source}: {key}: the Azure deployment name {value!r} must be A-Z, a-z, 0-9, '.', '_' "
                          "and '-', not dots alone (it is part of the URL's path): set upstream_model to the "
                          "deployment's name")


def resolve_tokenizer(value: str, key: str, source: str) -> str:
    """The tokenizer setting with an "hf:" path made absolute (relative paths start at the config file)."""
    if not value.startswith("hf:"):
        if value not in PUBLISHED_SHA256:
            raise ConfigError(f"{source}: {key} must be one of {sorted(PUBLISHED_SHA256)} or \"hf:PATH\", "
                              f"not {value!r}")
        return value
    path = Path(value[3:]).expanduser()
    if not path.is_absolute() and not source.startswith("<"):
        path = Path(source).parent / path
    try:
        load_hf_tokenizer(str(path))
    except TokenizerError as exc:
        raise ConfigError(f"{source}: {key}: {exc}") from exc
    return f"hf:{path}"
