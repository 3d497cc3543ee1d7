"""deploy/: the compose file, Kubernetes manifests, image and scrape config agree on ports, names and secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.config import load
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
