"""The Grafana dashboard's queries, with template variables substituted as Grafana would."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "evalstream.json"


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    legend: str
    instant: bool


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def queries(dashboard: dict[str, Any] | None = None) -> list[Query]:
    dash = dashboard or load()
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append(
                Query(p["title"], t["refId"], t["expr"], t.get("legendFormat", ""), bool(t.get("instant")))
            )
    return out


def variables(dashboard: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    dash = dashboard or load()
    return {v["name"]: v for v in dash["templating"]["list"]}


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """Replace $var / ${var} the way Grafana does for Prometheus (multi-values become a|b regexes)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    for name, value in values.items():
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
    if "$" in expr.replace("$labels", ""):
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr


def label_values_query(definition: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition.strip())
    if m is None:
        raise ValueError(f"not a label_values query: {definition!r}")
    return m.group(1), m.group(2)
