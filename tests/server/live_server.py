"""A real `camex-server` process on 127.0.0.1 for end-to-end tests, and a /metrics reader.

`live_server(...)` starts `python -m server.cli` on a free port, waits for /ready, yields a
`LiveServer`, and always stops the process it started, by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveServer:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple, float]:
        return scrape(self.base_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@contextmanager
def live_server(tmp_path: Path, *args: str, env: dict | None = None,
                timeout: float = 120.0, port: int | None = None) -> Iterator[LiveServer]:
    port = port or free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
           *args]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, proc, timeout, log_path)
        yield LiveServer(base_url, proc, log_path)
    finally:
        stop(proc)


def scrape(base_url: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from /metrics."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple, float], name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)
