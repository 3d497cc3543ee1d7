"""The Grafana dashboards and alert rules in deploy/: loadable by Grafana, and using only metrics the proxy exports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.telemetry.metrics import Metrics
from tests.promql import (
    DASHBOARDS,
    DEPLOY,
    alert_rules,
    all_panels,
    exported_names,
    load_dashboard,
    metric_names,
    panel_queries,
    substitute,
)

DATASOURCE_UID = "prometheus"  # provisioned in deploy/grafana/provisioning/datasources


def _exported() -> set[str]:
    families = [(f.name, f.type) for f in Metrics(models=["m"]).registry.collect()]
    return exported_names(families) | {"up"}


def test_there_are_two_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} == {"overview.json", "usage.json"}
    assert len({load_dashboard(p)["uid"] for p in DASHBOARDS}) == 2


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_what_grafana_needs(path: Path) -> None:
    doc = load_dashboard(path)
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    assert_unique_panel_ids(doc)
    panels = [p for p in all_panels(doc) if p["type"] != "row"]

    variables = {v["name"]: v for v in doc["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == DATASOURCE_UID
    team = variables["team"]
    assert team["type"] == "query" and team["includeAll"] and team["multi"] and team["allValue"] == ".*"
    assert team["datasource"]["uid"] == "${datasource}"
    assert "embedding_proxy_requests_total" in team["query"]["query"]

    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["x"] + grid["w"] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            substitute(target["expr"])  # only variables Grafana defines
    # every panel that can be filtered by team is
    team_metrics = ("embedding_proxy_tokens_total", "embedding_proxy_requests_total", "embedding_proxy_quota_")
    for panel in panels:
        for target in panel["targets"]:
            if any(m in target["expr"] for m in team_metrics):
                assert 'team=~"$team"' in target["expr"], (path.name, panel["title"])


def assert_unique_panel_ids(doc: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(doc)]  # rows and the panels inside them too: Grafana needs them all unique
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), ids


def test_panels_inside_rows_are_read_and_checked(tmp_path: Path) -> None:
    doc = {"panels": [
        {"id": 1, "type": "stat", "title": "top", "targets": [{"expr": "up"}]},
        {"id": 2, "type": "row", "title": "collapsed", "collapsed": True, "panels": [
            {"id": 3, "type": "timeseries", "title": "inside", "targets": [{"expr": "embedding_proxy_x_total"}]},
        ]},
    ]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    assert panel_queries([path]) == [("d.json", "top", "up"), ("d.json", "inside", "embedding_proxy_x_total")]
    assert_unique_panel_ids(doc)
    doc["panels"][1]["panels"][0]["id"] = 1
    with pytest.raises(AssertionError):
        assert_unique_panel_ids(doc)


def test_panel_details_grafana_shows() -> None:
    panels = {p["title"]: p for path in DASHBOARDS for p in all_panels(load_dashboard(path)) if p["type"] != "row"}
    headroom = next(p for t, p in panels.items() if t.startswith("Quota headroom"))
    assert headroom["type"] == "bargauge"
    assert headroom["fieldConfig"]["defaults"].items() >= {"unit": "percentunit", "min": 0, "max": 1}.items()
    assert "embedding_proxy_quota_window_end_timestamp_seconds" in headroom["targets"][0]["expr"]
    # a stat with nothing to count shows 0, not "No data"
    assert panels["Quota rejections in range"]["targets"][0]["expr"].endswith(" or vector(0)")
    # request latency percentiles leave fast 4xx refusals out
    latency = [t["expr"] for title, p in panels.items() if title.startswith("Request latency") for t in p["targets"]]
    assert latency and all('status_class!="4xx"' in e for e in latency)
    # cost and savings per model, and up{} counts instances (scrape targets), not worker processes
    per_model = [t["expr"] for p in panels.values() for t in p["targets"] if "sum by (model)" in t["expr"]]
    assert any("upstream_cost_usd" in e for e in per_model) and any("cache_saved_usd" in e for e in per_model)
    assert any("instances" in t for t, p in panels.items() if "up{" in p["targets"][0]["expr"])


def test_overlapping_panels_are_absent() -> None:
    for path in DASHBOARDS:
        cells: set[tuple[int, int]] = set()
        for panel in load_dashboard(path)["panels"]:  # top level: a collapsed row's panels are laid out apart
            g = panel["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, (path.name, panel["title"])
            cells |= mine


def test_every_query_uses_exported_metrics() -> None:
    exported = _exported()
    queries: list[tuple[str, str]] = [(f"{d}: {t}", e) for d, t, e in panel_queries()]
    queries += [(f"alert {name}", expr) for name, expr in alert_rules()]
    assert len(queries) > 30
    for where, expr in queries:
        names = metric_names(substitute(expr))
        assert names, where
        assert names <= exported, f"{where}: unknown metrics {sorted(names - exported)}"


def test_metric_name_extraction() -> None:
    expr = ('sum by (team, le) (rate(embedding_proxy_x_bucket{team=~"a|b", le!="sum"}[5m])) '
            '/ ignoring(status_class) group_left max(up{job="embedding-proxy"} offset 1h) and on() vector(1)')
    assert metric_names(expr) == {"embedding_proxy_x_bucket", "up"}


def test_dashboards_are_generated_from_the_script() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboards", DEPLOY / "grafana" / "build_dashboards.py")
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, doc in module.DASHBOARDS.items():
        committed = (DEPLOY / "grafana" / "dashboards" / name).read_text()
        assert committed == module.render(doc), f"{name} is stale: run python deploy/grafana/build_dashboards.py"


def test_provisioned_datasource_has_the_dashboards_uid() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == [DATASOURCE_UID]


def test_alert_rules_cover_the_operator_concerns() -> None:
    names = {name for name, _ in alert_rules()}
    assert {"EmbeddingProxyDown", "EmbeddingProxyUpstreamErrorRatio", "EmbeddingProxyUpstreamSlow",
            "EmbeddingProxyCacheFailing", "EmbeddingProxyQuotaRejectionsSurging"} <= names


def _team_labelled() -> set[str]:
    """The series names whose metric has a `team` label: the ones a panel can show per team."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = Metrics(models=["m"])
    families = [(c._name, c._type) for c in vars(metrics).values()
                if isinstance(c, MetricWrapperBase) and "team" in c._labelnames]
    return exported_names(families)


def _rows(doc: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(row, its panels) in order: a row owns the top-level panels after it, up to the next row."""
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for panel in doc["panels"]:
        if panel["type"] == "row":
            out.append((panel, list(panel.get("panels", []))))
        else:
            assert out, f"{panel['title']} is above the first row"
            out[-1][1].append(panel)
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_follows_the_team_variable_or_says_it_is_global(path: Path) -> None:
    """A panel that reads a metric with a team label filters every selector of it by `team=~"$team"`; a panel
    whose metrics have none says, in its title and description, that it shows all teams; so does its row."""
    team_labelled = _team_labelled()
    assert {"embedding_proxy_requests_total", "embedding_proxy_tokens_total",
            "embedding_proxy_quota_limit"} <= team_labelled
    rows = _rows(load_dashboard(path))
    assert len(rows) >= 3, "panels grouped in rows"
    for row, panels in rows:
        assert panels, row["title"]
        for panel in panels:
            exprs = [t["expr"] for t in panel["targets"]]
            per_team = False
            for expr in exprs:
                for name in metric_names(substitute(expr)) & team_labelled:
                    selectors = re.findall(rf"\b{name}\b(\{{[^}}]*\}})?", expr)
                    assert selectors and all('team=~"$team"' in s for s in selectors), (panel["title"], expr)
                    per_team = True
            where = (path.name, panel["title"])
            if per_team:
                assert "all teams" not in panel["title"] and "per team" in row["title"], where
                assert panel["description"] == "Follows the team variable.", where
            else:
                assert panel["title"].endswith("all teams)") and "all teams" in row["title"], where
                assert "team variable does not filter this panel" in panel["description"], where


def _measures(expr: str) -> str:
    """What a query measures, by its metric: seconds (a latency's buckets or sum), dollars, or a count or rate."""
    if re.search(r"_seconds_(bucket|sum)\b", expr):
        return "s"
    if "_usd_total" in expr:
        return "currencyUSD"
    return "count"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_units_fit_what_each_panel_measures(path: Path) -> None:
    """One kind of quantity per panel (no count rate beside seconds under one unit), and the unit that says it."""
    counts = {"short", "reqps", "ops", "percentunit"}
    for panel in all_panels(load_dashboard(path)):
        if panel["type"] == "row":
            continue
        kinds = {_measures(t["expr"]) for t in panel["targets"]}
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert len(kinds) == 1, (panel["title"], kinds)
        [kind] = kinds
        assert unit == kind if kind != "count" else unit in counts, (panel["title"], kind, unit)
        if re.search(r"\b(ratio|share|headroom)\b", panel["title"], re.I):
            assert unit == "percentunit", panel["title"]
        if all("rate(" in t["expr"] and " / " not in t["expr"] and "histogram_quantile" not in t["expr"]
               for t in panel["targets"]) and panel["type"] == "timeseries" and kind == "count":
            assert unit in ("reqps", "ops", "short"), panel["title"]  # per second
