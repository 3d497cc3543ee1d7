"""`check-config` (issue 15, points 5 and 10): a value that cannot work is refused, naming file, key and range; what
would keep the proxy from serving is a loud WARNING line (`--strict`, for deploy pipelines, exits 1 on any); it says
which upstreams (URLs without credentials) and stores (without passwords) it checked, and checks only the upstreams
some model uses.

Before: `cache.ttl_s = 0` passed, and so did an unset `UPSTREAM_API_KEY` (the pods then never got ready, the reason
only in the probe body) and an unreachable state store, each with exit status 0 and no way to fail a pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

# --- check-config ----------------------------------------------------------------------------------------------


def check_config(tmp_path: Path, config: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "proxy.toml"
    path.write_text(config)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_", "UPSTREAM_", "OTEL_"))}
    return subprocess.run([sys.executable, "-m", "proxy", "--config", str(path), "check-config", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_check_config_refuses_a_cache_ttl_of_zero(tmp_path: Path) -> None:
    done = check_config(tmp_path, "[cache]\nttl_s = 0\n", UPSTREAM_API_KEY="sk-x")
    assert done.returncode == 2, done.stdout
    assert done.stderr == f"config error: {tmp_path / 'proxy.toml'}: cache.ttl_s must be from 1 to 3153600000, not 0\n"
    assert done.stdout == ""


def test_check_config_warns_loudly_about_a_missing_upstream_key_and_strict_fails(tmp_path: Path) -> None:
    done = check_config(tmp_path, "")
    warning = ('WARNING: upstream default: $UPSTREAM_API_KEY is not set (set it, or api_key_env = "" for a server '
               "without a key)")
    assert done.returncode == 0 and done.stderr.startswith(warning), done.stderr
    assert "<" not in done.stdout and f"{tmp_path / 'proxy.toml'}: ok with 1 warning(s); models:" in done.stdout
    assert ("upstream default: openai https://api.openai.com/v1 (key $UPSTREAM_API_KEY NOT SET); models: "
            "text-embedding-3-small, text-embedding-3-large, text-embedding-ada-002") in done.stdout
    strict = check_config(tmp_path, "", "--strict")
    assert strict.returncode == 1 and strict.stderr.startswith(warning)
    assert strict.stderr.endswith("error: 1 warning(s) above, and --strict fails on any\n")
    assert check_config(tmp_path, "", "--strict", UPSTREAM_API_KEY="sk-x").returncode == 0


def test_check_config_strict_fails_on_an_unreachable_state_store_and_shows_no_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://proxy:hunter2@127.0.0.1:{port}/0"
    upstream = "https://svc:s3cret@gateway.example/v1?key=s3cret"
    done = check_config(tmp_path, "", REDIS_URL=url, UPSTREAM_BASE_URL=upstream, UPSTREAM_API_KEY="sk-x")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("WARNING: the state store (REDIS_URL) is unreachable at start-up"), done.stderr
    assert f"state store (REDIS_URL): redis (single) redis://127.0.0.1:{port}/0" in done.stdout
    assert "upstream default: openai https://gateway.example/v1 (key $UPSTREAM_API_KEY set)" in done.stdout
    assert "hunter2" not in done.stdout + done.stderr and "s3cret" not in done.stdout + done.stderr
    strict = check_config(tmp_path, "", "--strict", REDIS_URL=url, UPSTREAM_API_KEY="sk-x")
    assert strict.returncode == 1, strict.stderr
    assert "error: 1 warning(s) above, and --strict fails on any" in strict.stderr


def test_check_config_checks_only_the_upstreams_a_model_uses(tmp_path: Path) -> None:
    """Issue 15, point 10: the built-in default upstream (api.openai.com, $UPSTREAM_API_KEY) is no problem when no
    model uses it."""
    config = ('[upstreams.tei]\nbase_url = "http://tei.internal:8080/v1"\napi_key_env = ""\n'
              '[models.bge]\ndimensions = 384\nupstream_base64 = false\ndeployments = [{ upstream = "tei" }]\n')
    done = check_config(tmp_path, config, "--strict")
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr
    assert "upstream tei: openai http://tei.internal:8080/v1 (no key); models: bge" in done.stdout
    assert "api.openai.com" not in done.stdout
