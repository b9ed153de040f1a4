"""The documented no-Docker monitoring recipe (deploy/README.md, `make monitor`): the shipped
Prometheus config and alert rules, run by `deploy/prometheus/run-local.sh` with the Debian
binary, scrape a live camex-server on 127.0.0.1. Both processes are stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from .interface_metrics import DEPLOY
from .live_processes import PrometheusAPI, free_port, start_server, stop, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = DEPLOY / "prometheus" / "run-local.sh"
SHIPPED = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def run_local(prometheus_bin: str, server: str, listen: str, data) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_DATA": str(data), "PROMETHEUS": prometheus_bin}
    log = (data.parent / "run-local.log").open("w")
    return subprocess.Popen([str(SCRIPT), server, listen], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(check, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(what)


def test_generated_config_is_the_shipped_one_with_local_addresses(tmp_path, prometheus_bin):
    data = tmp_path / "prom"
    proc = run_local(prometheus_bin, "127.0.0.1:1", f"127.0.0.1:{free_port()}", data)
    try:
        config = wait_for(lambda: (data / "prometheus.yml").exists() and
                          yaml.safe_load((data / "prometheus.yml").read_text()), "no config")
    finally:
        stop(proc)
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert config["rule_files"] == [str(ALERTS)]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["camex-server"]["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
    for key in ("rule_files", "scrape_configs"):  # everything else is the shipped file's
        config.pop(key), shipped.pop(key)
    assert config == shipped


def test_shipped_config_scrapes_a_local_server(tmp_path, prometheus_bin, tiny_lm_dir,
                                               tiny_classifier_dir):
    server_port, prom_port = free_port(), free_port()
    server_url = f"http://127.0.0.1:{server_port}"
    server_log = tmp_path / "server.log"
    server = start_server(tiny_lm_dir, tiny_classifier_dir, server_port, server_log)
    prometheus = None
    try:
        wait_http(f"{server_url}/ready", server, server_log, timeout_s=180)
        data = tmp_path / "prom"
        prometheus = run_local(prometheus_bin, f"127.0.0.1:{server_port}",
                               f"127.0.0.1:{prom_port}", data)
        prom_url = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom_url}/-/ready", prometheus, tmp_path / "run-local.log", timeout_s=60)
        assert prometheus.poll() is None  # exec: the PID we hold is Prometheus itself
        prom = PrometheusAPI(prom_url)
        assert httpx.post(f"{server_url}/generate", json={"inputs": "hello", "parameters":
                          {"max_new_tokens": 4}}, timeout=60).status_code == 200

        def scraped():
            targets = {t["labels"]["job"]: t for t in prom.targets()}
            return targets if targets.get("camex-server", {}).get("health") == "up" else None

        targets = wait_for(scraped, "camex-server target never up", timeout_s=60)
        assert targets["camex-server"]["scrapeUrl"] == f"{server_url}/metrics"
        # What the dashboard's `job` variable asks for (label_values(camex_build_info, job)).
        build = wait_for(lambda: prom.query('camex_build_info{job="camex-server"}'),
                         "camex_build_info never scraped", timeout_s=60)
        assert build[0]["metric"]["instance"] == f"127.0.0.1:{server_port}"
        rules = wait_for(prom.rules, "alert rules not loaded")
        shipped = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
                   for r in g["rules"]}
        assert {r["name"] for r in rules} == shipped
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(server, grace_s=30.0)


def test_missing_prometheus_says_how_to_install(tmp_path):
    bin_dir = tmp_path / "bin"  # the script's tools, but no prometheus
    bin_dir.mkdir()
    for tool in ("dirname", "grep", "sed", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PROMETHEUS_DATA": str(tmp_path), "PATH": str(bin_dir)}
    env.pop("PROMETHEUS", None)
    res = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 1 and "apt-get install -y prometheus" in res.stderr


def test_documented_grafana_datasource_has_the_uid_the_dashboard_uses():
    """Grafana itself is not available here; what can drift is the README's datasource."""
    import json
    import re

    readme = (DEPLOY / "README.md").read_text()
    body = re.search(r"/api/datasources \\\n\s+-d '(\{.*?\})'", readme, re.S).group(1)
    documented = json.loads(body)
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "camex-serve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                                  "prometheus.yml").read_text())["datasources"][0]
    assert uids == {documented["uid"]} == {provisioned["uid"]}
    assert documented["type"] == provisioned["type"] == "prometheus"
    assert documented["url"] == "http://127.0.0.1:9090"
