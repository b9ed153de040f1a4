"""Monitoring end to end: a real Prometheus (Debian binary) scrapes a live CAMEx server under
a short load, then every dashboard query and every alert expression runs through
Prometheus's HTTP API. None may error, and the core panels must return data.

Both processes bind to 127.0.0.1 on free ports and are always stopped by PID.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import yaml
from .interface_metrics import DEPLOY
from .live_processes import (PrometheusAPI, free_port, prometheus_config, start_prometheus,
                            start_server, stop, wait_http)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "camex-server"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "camex-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Panels that must show data after a short mixed load. The others (e.g. merge-cache
# evictions or failures of a kind that did not happen) may legitimately be empty or zero.
CORE_PANELS = {
    "Request rate by route and status", "Request latency p99 by route", "Errors by reason",
    "Time to first token", "Inter-token latency", "Queue time", "End-to-end latency",
    "Running and waiting requests", "Batch size", "Tokens per second",
    "Classified sequences per second", "Merge cache memory", "Merge cache events",
    "Mean router score per layer and expert", "Engine up", "Build", "Scrape target up",
}


@dataclass
class LiveStack:
    server_url: str
    prom: PrometheusAPI


def substitute(expr: str) -> str:
    """Grafana variables -> what Grafana would send for 'All' over the last minute."""
    return (expr.replace("$__rate_interval", "1m").replace('"$job"', f'"{JOB}"')
            .replace('"$instance"', '".*"'))


def send_load(url: str) -> None:
    """A short mixed load: concurrent generations (so batches form), streams, classification
    (single and batched) and one invalid request (a validation failure)."""
    prompts = [f"the quick brown fox {i}" for i in range(8)]

    def generate(prompt: str) -> None:
        res = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters":
                         {"max_new_tokens": 8, "do_sample": False}}, timeout=60)
        assert res.status_code == 200, res.text

    def stream(prompt: str) -> None:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6}}
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as res:
            assert res.status_code == 200
            lines = list(res.iter_lines())  # read to the end: leaving early is a dropped stream
        assert any(line.startswith("data:") for line in lines)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(generate, prompts))
        list(pool.map(stream, prompts[:3]))
    for inputs in ("hello world", ["a merged expert", "the lazy dog", "numbers 1 2 3"]):
        assert httpx.post(f"{url}/classify", json={"inputs": inputs}, timeout=60).status_code == 200
    bad = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters":
                     {"max_new_tokens": -1}}, timeout=60)
    assert bad.status_code == 422, bad.text


def server_counter(url: str, name: str) -> float:
    """The server's own value of a counter family (e.g. camex_generated_tokens)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(s.value for s in family.samples if s.name == name + "_total")
    raise AssertionError(f"{name} not exposed by the server")


def wait_until_scraped(prom: PrometheusAPI, url: str, timeout_s: float = 30.0) -> None:
    """Until Prometheus holds the server's final token count (the load is fully scraped)."""
    want = server_counter(url, "camex_generated_tokens")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = prom.query(f'sum(camex_generated_tokens_total{{job="{JOB}"}})')
        if got and float(got[0]["value"][1]) >= want > 0:
            time.sleep(3.0)  # a few more 1 s scrapes and rule evaluations
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus never saw camex_generated_tokens_total >= {want}")


@pytest.fixture(scope="module")
def live(tiny_lm_dir, tiny_classifier_dir, prometheus_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("live-prometheus")
    server_port, prom_port = free_port(), free_port()
    server_url = f"http://127.0.0.1:{server_port}"
    server_log = work / "server.log"
    server = start_server(tiny_lm_dir, tiny_classifier_dir, server_port, server_log)
    prometheus = None
    try:
        wait_http(f"{server_url}/ready", server, server_log, timeout_s=180)
        config = prometheus_config(f"127.0.0.1:{server_port}", ALERTS, JOB)
        prometheus = start_prometheus(prometheus_bin, config, work, prom_port)
        prom_url = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom_url}/-/ready", prometheus, work / "prometheus.log", timeout_s=60)
        prom = PrometheusAPI(prom_url)
        wait_until_up(prom)
        send_load(server_url)
        wait_until_scraped(prom, server_url)
        yield LiveStack(server_url, prom)
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(server, grace_s=30.0)


def wait_until_up(prom: PrometheusAPI, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(t["health"] == "up" for t in prom.targets()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"scrape target never up: {prom.targets()}")


def dashboard_targets() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


def test_server_is_scraped(live):
    (target,) = live.prom.targets()
    assert target["health"] == "up", target.get("lastError")
    assert target["labels"]["job"] == JOB


def test_every_dashboard_query_runs_and_core_panels_have_data(live):
    with_data: set[str] = set()
    for title, expr in dashboard_targets():
        result = live.prom.query(substitute(expr))  # raises on any PromQL error
        if result:
            with_data.add(title)
    missing = CORE_PANELS - with_data
    assert not missing, f"core panels without data: {sorted(missing)}"


def test_traffic_is_visible_per_route(live):
    # Raw counter values, not increase(): a labelled counter is born at its first request, so
    # a burst that lands between two scrapes shows no increase, only a value.
    rows = live.prom.query(f'sum by (route, status) (camex_requests_total{{job="{JOB}"}})')
    seen = {(r["metric"]["route"], r["metric"]["status"]) for r in rows
            if float(r["value"][1]) > 0}
    routes = {route for route, _ in seen}
    assert any("generate" in r for r in routes), seen
    assert any("generate_stream" in r for r in routes), seen
    assert any("classify" in r for r in routes), seen
    assert any(status == "422" for _, status in seen), seen
    failures = {r["metric"]["reason"]: float(r["value"][1])
                for r in live.prom.query(f'camex_failures_total{{job="{JOB}"}}')}
    assert failures["validation"] >= 1  # the one invalid request
    assert failures["internal"] == failures["dropped"] == 0, failures


def test_router_scores_are_probabilities(live):
    # Totals since start, not rate(): rate() extrapolates _sum and _count differently.
    rows = live.prom.query("sum by (layer) (camex_router_score_sum)"
                           " / sum by (layer) (camex_router_score_count)")
    assert rows, "no router scores"
    experts = live.prom.query('count by (layer) (camex_router_score_count)')
    num_experts = {r["metric"]["layer"]: float(r["value"][1]) for r in experts}
    # Each routing decision observes one softmax score per expert, so over all of a layer's
    # samples the mean score is exactly 1/E.
    for row in rows:
        layer = row["metric"]["layer"]
        assert float(row["value"][1]) == pytest.approx(1.0 / num_experts[layer], rel=1e-3)


def test_every_alert_expression_runs_and_rules_evaluate(live):
    doc = yaml.safe_load(ALERTS.read_text())
    for rule in (r for g in doc["groups"] for r in g["rules"]):
        live.prom.query(rule["expr"])  # raises on any PromQL error
    loaded = live.prom.rules()
    assert {r["name"] for r in loaded} == {r["alert"] for g in doc["groups"] for r in g["rules"]}
    for r in loaded:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
