"""deploy/: the compose file, Kubernetes manifests, image and scrape config agree on ports, names and secrets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load
from proxy.config.admission import container_memory_mib, worker_ceiling_mib
from tests.promql import DEPLOY, SCRAPE_CONFIG

METRICS_PORT = "9464"


def _yaml_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _kube() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _yaml_docs(str(path.relative_to(DEPLOY))):
            docs[doc["kind"]] = doc
    return docs


def test_scrape_target_is_the_proxys_metrics_port() -> None:
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    [job] = scrape["scrape_configs"]
    assert job["job_name"] == "embedding-proxy"
    assert job["static_configs"][0]["targets"] == [f"proxy:{METRICS_PORT}"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    command = compose["services"]["proxy"]["command"]
    assert command[command.index("--metrics-port") + 1] == METRICS_PORT
    assert f'"--metrics-port", "{METRICS_PORT}"' in (DEPLOY / "Dockerfile").read_text()


def test_scrape_config_sends_the_metrics_token_compose_sets() -> None:
    [job] = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "metrics-token"}
    token = (SCRAPE_CONFIG.parent / "metrics-token").read_text().strip()
    env = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["proxy"]["environment"]
    assert token and env["PROXY_METRICS_TOKEN"] == token


def test_compose_wires_every_service() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert {"proxy", "redis", "prometheus", "grafana", "mock-upstream"} <= set(services)
    env = services["proxy"]["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:") and env["UPSTREAM_BASE_URL"].startswith("http://mock-upstream:")
    mock = services["mock-upstream"]["command"]
    assert env["UPSTREAM_BASE_URL"] == f"http://mock-upstream:{mock[mock.index('--port') + 1]}/v1"
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "embedding-proxy.yml")
                               .read_text())["providers"]
    assert f"./grafana/dashboards:{providers[0]['options']['path']}:ro" in services["grafana"]["volumes"]
    assert services["proxy"]["stop_grace_period"]  # the workers' graceful stop needs time
    # two stores: the state durable and never evicting, the cache evicting within its maxmemory
    state, cache = services["redis"]["command"], services["redis-cache"]["command"]
    assert state[state.index("--maxmemory-policy") + 1] == "noeviction" and "--appendonly" in state
    assert state[state.index("--appendonly") + 1] == "yes"
    assert cache[cache.index("--maxmemory-policy") + 1] == "allkeys-lru" and "--maxmemory" in cache
    assert env["CACHE_REDIS_URL"] == "redis://redis-cache:6379/0"


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    kube = _kube()
    assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler"} <= set(kube)
    pod = kube["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == ports["metrics"] == METRICS_PORT
    assert container["args"][container["args"].index("--metrics-port") + 1] == METRICS_PORT
    assert {p["targetPort"] for p in kube["Service"]["spec"]["ports"]} <= set(ports)
    # readiness: this process can serve (200 while degraded); liveness: it answers (README "Liveness and readiness")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert kube["Service"]["spec"]["selector"] == kube["Deployment"]["spec"]["selector"]["matchLabels"]
    secret = kube["Secret"]["stringData"]
    assert {"UPSTREAM_API_KEY", "REDIS_URL", "PROXY_ADMIN_KEY", "PROXY_CACHE_SECRET",
            "PROXY_METRICS_TOKEN"} <= set(secret)
    assert all("REPLACE" in v for v in secret.values())  # placeholders only
    # the ConfigMap's config and the image's config are valid proxy configs
    config = tmp_path / "proxy.toml"
    config.write_text(kube["ConfigMap"]["data"]["proxy.toml"])
    load(str(config), env={})
    load(str(DEPLOY / "config" / "proxy.toml"), env={})


# Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^}]*\})*))?\}")


def _interpolate(value: Any, env: dict[str, str], missing: list[str]) -> Any:
    """A value of the parsed file as compose reads it with `env` (the shell's plus deploy/.env; comments are never
    read); each `:?` message of a required variable that is unset or empty goes to `missing`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        given = env.get(name)
        empty = given is None or (op.startswith(":") and given == "")
        if op.endswith("?") and empty:
            missing.append(arg)
            return ""
        if op.endswith("-") and empty:
            return arg
        return given or ""

    return _VAR.sub(one, value)


def _compose(env: dict[str, str]) -> dict[str, Any]:
    """deploy/compose.yaml as `docker compose` reads it; raises ValueError with the messages of the required
    variables `env` lacks, as compose refuses to start."""
    missing: list[str] = []
    doc: dict[str, Any] = _interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), env, missing)
    if missing:
        raise ValueError(missing)
    return doc


def _variables() -> list[re.Match[str]]:
    text = yaml.safe_dump(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), width=1000)
    return list(_VAR.finditer(text))


SECRETS = {"PROXY_ADMIN_KEY": "an-admin-key-from-the-env-file", "GRAFANA_ADMIN_PASSWORD": "a-grafana-password"}


def test_compose_requires_its_secrets_and_has_no_default_ones() -> None:
    with pytest.raises(ValueError) as refused:  # nothing set: compose refuses to start, naming both
        _compose({})
    messages = refused.value.args[0]
    assert len(messages) == 2 and all("deploy/.env" in m for m in messages), messages
    assert [m.split()[1] for m in messages] == ["PROXY_ADMIN_KEY", "GRAFANA_ADMIN_PASSWORD"]
    with pytest.raises(ValueError):  # set but empty (an .env copied and not filled in) is refused too
        _compose({"PROXY_ADMIN_KEY": "", "GRAFANA_ADMIN_PASSWORD": "x"})
    services = _compose(SECRETS)["services"]
    assert services["proxy"]["environment"]["PROXY_ADMIN_KEY"] == SECRETS["PROXY_ADMIN_KEY"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    # no secret-looking variable falls back to a value of the file's own
    defaults = {m.group(1) for m in _variables() if (m.group(2) or "").endswith("-")}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in defaults  # read, and found
    assert not {v for v in defaults if re.search("KEY|PASSWORD|SECRET|TOKEN", v)}, defaults
    # the example env file names exactly the required variables, with no value to forget to change
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example == {name: "" for name in SECRETS}
    assert "deploy/.env" in (DEPLOY.parent / ".gitignore").read_text().split()


def test_compose_publishes_ports_on_loopback_and_restarts_services() -> None:
    services = _compose(SECRETS)["services"]
    published = {(name, port) for name, s in services.items() for port in s.get("ports", [])}
    assert {name for name, _ in published} >= {"proxy", "prometheus", "grafana", "alertmanager"}
    for name, port in published:
        assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", str(port)), (name, port)
    for name, s in services.items():  # `serve` exits 1 when a worker dies: compose restarts the set
        assert s.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_alerts_reach_an_alertmanager() -> None:
    services = _compose(SECRETS)["services"]
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    [target] = scrape["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    manager = services[host]
    assert f"127.0.0.1:{port}:{port}" in manager["ports"]
    assert "./alertmanager:/etc/alertmanager:ro" in manager["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in manager["command"]
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(r["receiver"] in receivers for r in routes)
    assert "alerts.yml" in scrape["rule_files"]


def test_the_cache_sizing_comment_uses_the_measured_entry_size() -> None:
    """The compose file's sizing comment agrees with the README's measured bytes per entry (its "Entry size"
    table) and with the cache store's maxmemory."""
    readme = (DEPLOY.parent / "README.md").read_text()
    measured = re.search(r"\| 1536 \(`text-embedding-3-small`, `ada-002`\) \| [\d,]+ B \| ([\d,]+) \|", readme)
    assert measured is not None
    per_entry = int(measured.group(1).replace(",", ""))
    text = " ".join(line.strip(" #") for line in (DEPLOY / "compose.yaml").read_text().splitlines())
    assert f"{per_entry:,} bytes for 1536 dimensions" in text
    kept = re.search(r"1 GB keeps about ([\d,]+) 1536-d entries", text)
    assert kept is not None
    cache = _compose(SECRETS)["services"]["redis-cache"]["command"]
    assert cache[cache.index("--maxmemory") + 1] == "1gb"
    expected = 2**30 / (per_entry * 1.1)  # README "Sizing the cache store": about 10% allocator overhead
    assert abs(int(kept.group(1).replace(",", "")) - expected) / expected < 0.02, (kept.group(1), expected)
def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_pod_memory_limit_fits_its_workers_and_their_budget(tmp_path: Path) -> None:
    """README "Overload and memory": the pod's limit holds the parent, each worker at its ceiling (the process, the
    in-process tier, the admission budget) and the in-memory metrics directory; the image's config has the same
    budget and tier as the ConfigMap's."""
    kube = _kube()
    pod = kube["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    workers = int(container["args"][container["args"].index("--workers") + 1])
    limit = _mib(container["resources"]["limits"]["memory"])
    [tmp] = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"]["medium"] == "Memory"  # so it counts against the pod's memory
    config = tmp_path / "proxy.toml"
    config.write_text(kube["ConfigMap"]["data"]["proxy.toml"])
    settings = load(str(config), env={})
    image = load(str(DEPLOY / "config" / "proxy.toml"), env={})
    assert (image.admission, image.cache.local_max_mb) == (settings.admission, settings.cache.local_max_mb)
    budget, local = settings.admission.budget_mb, settings.cache.local_max_mb
    assert budget > 0 and settings.admission.return_memory
    need = container_memory_mib(workers, local, budget, _mib(tmp["emptyDir"]["sizeLimit"]))
    assert (workers, limit, round(need)) == (2, 1024, 865)  # the figures in the README and the manifests
    assert need <= limit * 0.9  # room for what was not measured
    assert worker_ceiling_mib(local, budget) <= 512  # issue 21: one worker's ceiling at most 512 MiB
