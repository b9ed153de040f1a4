"""Grafana dashboard and provisioning: structure, generator sync, metric names from
INTERFACES §3, and PromQL syntax (promtool parses every query as a recording rule)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from .interface_metrics import (COMMON_LABELS, DEPLOY, PROMETHEUS_SERIES, grouping_labels,
                               interface_metrics, metrics_in, series_index)

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "camex-serve.json"
# What an operator must see (docs/DESIGN.md §7); each must be answered by some panel title.
TOPICS = ["request rate", "request latency", "time to first token", "inter-token latency",
          "running and waiting", "batch size", "tokens per second", "merge cache hit",
          "merge cache events", "merge cache memory", "router score", "errors by reason"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def substitute(expr: str, window: str = "1m") -> str:
    """Grafana variables -> concrete values, as Grafana would send the query."""
    return (expr.replace("$__rate_interval", window).replace('"$job"', '"camex-server"')
            .replace('"$instance"', '".*"'))


def test_committed_json_matches_generator():
    spec = importlib.util.spec_from_file_location("dashboard_gen", GRAFANA / "dashboard.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen  # dataclasses look their module up while the class is built
    spec.loader.exec_module(gen)
    assert DASHBOARD.read_text() == gen.render(), "run: python deploy/grafana/dashboard.py"


def test_every_panel_has_a_query_and_unique_id():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in query_panels():
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), f"{p['title']} {t['refId']}: empty query"
            assert t["datasource"]["uid"] == "prometheus"


def test_panels_fit_the_grid():
    for p in dashboard()["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]


def test_dashboard_covers_every_required_topic():
    titles = " | ".join(p["title"].lower() for p in query_panels())
    missing = [t for t in TOPICS if t not in titles]
    assert not missing, f"no panel for {missing}"


def test_queries_only_reference_interface_metrics_and_their_labels():
    index = series_index(interface_metrics())
    for p in query_panels():
        for t in p["targets"]:
            names = metrics_in(t["expr"])
            assert names, f"{p['title']}: no metric in {t['expr']}"
            unknown = names - set(index) - PROMETHEUS_SERIES
            assert not unknown, f"{p['title']}: {unknown} not in INTERFACES §3"
            allowed = set(COMMON_LABELS)
            for n in names & set(index):
                allowed |= index[n].labels
            extra = grouping_labels(t["expr"]) - allowed
            assert not extra, f"{p['title']}: groups by unknown labels {extra}"


def test_metric_reader_rejects_unknown_names():
    """The name check above can fail: a typo'd metric is reported as unknown."""
    assert metrics_in('sum(rate(camex_request_total{job="x"}[1m]))') == {"camex_request_total"}
    assert "camex_request_total" not in series_index(interface_metrics())


def test_every_query_parses(promtool, tmp_path):
    rules = [{"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": substitute(t["expr"])}
             for p in query_panels() for t in p["targets"]]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_provisioning_points_at_the_dashboard_and_datasource():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == ["prometheus"]
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/camex.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts


@pytest.mark.parametrize("variable", ["job", "instance"])
def test_variables_are_defined(variable):
    names = [v["name"] for v in dashboard()["templating"]["list"]]
    assert variable in names
