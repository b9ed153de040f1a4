"""Real processes for the live monitoring test: the CAMEx server and a Prometheus that scrapes
it, both bound to 127.0.0.1 on free ports, plus a small client for Prometheus's HTTP API.

Whoever starts a process here stops it with `stop()` (terminate, then kill after a grace
period), by PID only. Nothing here knows what the dashboard or the alerts contain.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early (with the log) if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


def start_server(lm_dir: Path, clf_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "--model", str(lm_dir), "--classifier",
           str(clf_dir), "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "4"]
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(cmd, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT)


def prometheus_config(target: str, rule_file: Path, job: str) -> dict:
    """Scrape `target` every second and evaluate the shipped alert rules every second."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
    }


def start_prometheus(binary: str, config: dict, workdir: Path, port: int) -> subprocess.Popen:
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    cmd = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]
    return subprocess.Popen(cmd, cwd=workdir, stdout=log.open("w"), stderr=subprocess.STDOUT)


@dataclass
class PrometheusAPI:
    base_url: str  # http://127.0.0.1:PORT

    def _get(self, path: str, **params) -> dict:
        res = httpx.get(self.base_url + path, params=params, timeout=10.0)
        body = res.json()
        if res.status_code != 200 or body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {res.status_code} {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant vector result; raises PromQLError when Prometheus rejects the query."""
        data = self._get("/api/v1/query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict]:
        return [r for g in self._get("/api/v1/rules")["groups"] for r in g["rules"]]


class PromQLError(RuntimeError):
    pass
