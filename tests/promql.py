"""The queries the deployment ships (Grafana panels, alert rules), and the metric names they use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

# How Grafana fills its variables, for running a panel's query straight against Prometheus ("All" teams: `.*`).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s", "$team": ".*"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (function names, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def substitute(expr: str, team: str | None = None) -> str:
    """`expr` as Grafana would send it, for every team or (`team`) the one team picked in the variable."""
    values = GRAFANA_VARIABLES if team is None else {**GRAFANA_VARIABLES, "$team": team}
    for var, value in values.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def load_dashboard(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def all_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those inside rows included (a collapsed row keeps its panels in `panels`)."""
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def panel_queries(paths: list[Path] = DASHBOARDS) -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every panel."""
    out = []
    for path in paths:
        for panel in all_panels(load_dashboard(path)):
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expr) for every rule."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [(rule.get("alert") or rule["record"], rule["expr"]) for g in doc["groups"] for rule in g["rules"]]


def exported_names(families: list[tuple[str, str]]) -> set[str]:
    """The series names Prometheus sees for (family name, type) pairs from a prometheus_client registry."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
    return {name + suffix for name, kind in families for suffix in suffixes[kind]}
