"""Settings: loaded once from TOML plus the environment into frozen, typed objects.

Unknown keys are refused and every error names the file and the key. Defaults and allowed ranges (ranges.py) sit
next to the fields: a value that cannot work is refused here, naming the range. Secrets come only from the
environment (loader.py names them).

The parts: the settings per concern (settings.py: the whole and the small sections; fleet.py: upstreams, models,
deployments; stores.py: Redis and the cache; limits.py: quotas), how a TOML table becomes one of them (tables.py,
ranges.py), the checks a type cannot make (validation.py) and the loader that puts it together (loader.py). This
module names the public surface: `from proxy.config import Settings, load, ConfigError`.
"""

from __future__ import annotations

from .admission import AdmissionSettings
from .connections import ConnectionSettings
from .errors import ConfigError
from .fleet import DeploymentSettings, ModelSettings, UpstreamSettings, deployments_of
from .loader import DEFAULT_MODELS_TOML, load, parse
from .settings import KeySettings, QuotaSettings, ServerSettings, Settings, UsageSettings
from .stores import CacheSettings, RedisSettings, RedisType
from .validation import AZURE_DEPLOYMENT_RE, ENV_NAME_RE, MODEL_NAME_RE, public_url

__all__ = [
    "AZURE_DEPLOYMENT_RE",
    "DEFAULT_MODELS_TOML",
    "ENV_NAME_RE",
    "MODEL_NAME_RE",
    "AdmissionSettings",
    "CacheSettings",
    "ConfigError",
    "ConnectionSettings",
    "DeploymentSettings",
    "KeySettings",
    "ModelSettings",
    "QuotaSettings",
    "RedisSettings",
    "RedisType",
    "ServerSettings",
    "Settings",
    "UpstreamSettings",
    "UsageSettings",
    "deployments_of",
    "load",
    "parse",
    "public_url",
]
