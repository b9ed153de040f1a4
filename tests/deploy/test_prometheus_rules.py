"""Prometheus config and alert rules: promtool checks, promtool unit tests, and coverage of
every alert by a firing and a not-firing unit-test case."""

from __future__ import annotations

import subprocess

import yaml
from .interface_metrics import (DEPLOY, PROMETHEUS_SERIES, interface_metrics, metrics_in,
                                series_index)

PROM = DEPLOY / "prometheus"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=PROM, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_config(promtool):
    res = run([promtool, "check", "config", "prometheus.yml"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout  # the alerts are wired into the config


def test_promtool_check_rules(promtool):
    res = run([promtool, "check", "rules", "alerts.yml"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass(promtool):
    res = run([promtool, "test", "rules", "alerts_test.yml"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_firing_and_quiet_cases():
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no quiet case"


def test_required_alerts_exist_with_severity_and_runbook_text():
    rules = {r["alert"]: r for r in alert_rules()}
    required = {"CamexQueueGrowing", "CamexTimeToFirstTokenP99High", "CamexHighErrorRate",
                "CamexMergeCacheThrashing", "CamexRouterCollapse"}
    assert required <= rules.keys()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_router_collapse_uses_score_sum_and_count():
    expr = {r["alert"]: r["expr"] for r in alert_rules()}["CamexRouterCollapse"]
    assert metrics_in(expr) == {"camex_router_score_sum", "camex_router_score_count"}


def test_alerts_only_use_interface_metrics():
    known = set(series_index(interface_metrics())) | PROMETHEUS_SERIES
    for rule in alert_rules():
        unknown = metrics_in(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} uses metrics outside INTERFACES §3: {unknown}"


def test_unit_tests_catch_a_broken_rule(promtool, tmp_path):
    """The unit tests are not vacuous: raising a threshold out of reach makes them fail."""
    broken = (PROM / "alerts.yml").read_text().replace("camex_engine_up == 0",
                                                       "camex_engine_up == 5")
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text((PROM / "alerts_test.yml").read_text())
    res = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "CamexEngineDown" in res.stdout + res.stderr
