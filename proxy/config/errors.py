"""The one error a configuration can raise: the message names the file (or "environment") and the key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message names the file and the key."""
