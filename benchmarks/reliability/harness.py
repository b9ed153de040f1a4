"""What the reliability scenarios stand on: a server process and its /proc figures, /metrics
scrapes, traffic whose every request is accounted for, and a prober.

Speaks HTTP (httpx) and reads /proc; never imports the server. Every process started here is
stopped by its PID. Traffic is open-loop (Poisson arrivals at a fixed rate, `loadtest.arrivals`)
or closed-loop (N clients back to back) over a mix of four kinds; each request ends as one
`Outcome`: a status code, and for streams whether the stream ended properly (final event),
with an in-stream error, or was cut (a lost request).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout
from loadtest.arrivals import poisson_gaps  # noqa: E402
from loadtest.report import percentile  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from a merged expert router token "
         "layer weight fortune cookie river music city garden letter story number system "
         "people history language energy winter summer bridge forest ocean island").split()
ROUTES = {"generate": "/generate", "stream": "/generate_stream", "classify": "/classify",
          "completions": "/v1/completions"}
SERVER_ROOT: str | None = None  # set by run.py --server-root


# -- the server process ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    started_at: float  # time.monotonic() at Popen

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def rss_mib(self) -> float:
        return int(self.status()["VmRSS"].split()[0]) / 1024

    def threads(self) -> int:
        return int(self.status()["Threads"])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        """The server's access-log records (route, status, duration_ms, ...)."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("msg") == "request":
                    out.append(record)
        return out

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def start_server(args: list[str], log_dir: Path, name: str, port: int | None = None,
                 wait_ready: bool = True, timeout: float = 900.0) -> Server:
    port = port or free_port()
    log_path = log_dir / f"{name}.server.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cwd = ROOT
    if SERVER_ROOT is not None:  # another version's `server` package, for before/after runs:
        cwd = Path(SERVER_ROOT)  # `python -m` puts the working directory first on sys.path
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, port, log_path, time.monotonic())
    if wait_ready:
        wait_until_ready(server, timeout)
    return server


def wait_until_ready(server: Server, timeout: float) -> float:
    """Seconds from process start until /ready is 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               f"{server.log()[-3000:]}")
        try:
            if httpx.get(server.base_url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - server.started_at
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"server not ready after {timeout}s:\n{server.log()[-3000:]}")


def requests_by_route(m: dict[tuple, float]) -> Counter:
    """camex_requests_total as {(route, status): count}."""
    out = Counter()
    for (name, labels), v in m.items():
        if name == "camex_requests_total":
            d = dict(labels)
            out[(d["route"], d["status"])] += int(v)
    return out


def longest_generation(server: Server, prompt_tokens: int = 24) -> int:
    """New tokens that still fit the served LM's window after a short prompt."""
    info = httpx.get(server.base_url + "/info", timeout=30).json()
    return max(8, int(info["max_total_tokens"]) - prompt_tokens)


def metric(m: dict[tuple, float], name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# -- traffic ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """What each kind of request looks like; `mix` weights the kinds."""

    mix: dict[str, float]
    new_tokens: tuple[int, int] = (8, 48)  # uniform, inclusive
    prompt_words: tuple[int, int] = (4, 16)  # with 48 new tokens: within the demo LM's 128
    classify_texts: tuple[int, int] = (1, 8)
    ignore_eos: bool = True  # lengths as asked: the cost of a request is what it says

    def request(self, kind: str, rng: random.Random) -> dict:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*self.prompt_words)))
        n = rng.randint(*self.new_tokens)
        if kind == "classify":
            return {"inputs": [prompt] * rng.randint(*self.classify_texts), "truncate": True}
        if kind == "completions":
            return {"prompt": prompt, "max_tokens": n, "ignore_eos": self.ignore_eos,
                    "stream": rng.random() < 0.5}
        return {"inputs": prompt, "parameters": {"max_new_tokens": n,
                                                 "ignore_eos": self.ignore_eos}}

    def draw(self, rng: random.Random) -> str:
        kinds = list(self.mix)
        return rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]


@dataclass
class Outcome:
    kind: str
    route: str
    status: int | str  # HTTP status, or "lost:<exception>" when no complete answer came
    seconds: float
    stream_end: str | None = None  # "done" | "error:<error_type>" | "cut" (streams only)
    sent_at: float = 0.0

    @property
    def lost(self) -> bool:
        return isinstance(self.status, str) or self.stream_end == "cut"


async def send(session: aiohttp.ClientSession, kind: str, body: dict) -> Outcome:
    route = ROUTES[kind]
    streaming = kind == "stream" or (kind == "completions" and body.get("stream"))
    start = time.monotonic()
    try:
        async with session.post(route, json=body) as r:
            if not streaming or r.status != 200:
                await r.read()
                return Outcome(kind, route, r.status, time.monotonic() - start, sent_at=start)
            end = "cut"
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    end = "done"
                    continue
                event = json.loads(data)
                if "error" in event:
                    end = f"error:{event.get('error_type')}"
                elif event.get("generated_text") is not None or (
                        event.get("choices") and event["choices"][0].get("finish_reason")):
                    end = "done"
            return Outcome(kind, route, 200, time.monotonic() - start, stream_end=end,
                           sent_at=start)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return Outcome(kind, route, f"lost:{type(exc).__name__}", time.monotonic() - start,
                       sent_at=start)


def client(base_url: str, timeout: float = 300.0) -> aiohttp.ClientSession:
    """aiohttp rather than httpx for the traffic: at hundreds of requests in flight httpx's
    connection pool (its bookkeeping grows with the square of the queued requests) made the
    load generator, not the server, the bottleneck on 2 cores."""
    return aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=0))


async def open_loop(base_url: str, workload: Workload, rate: float, seconds: float,
                    seed: int = 0) -> list[Outcome]:
    """Poisson arrivals at `rate`/s for `seconds`; waits for every request to end."""
    rng = random.Random(seed)
    n = max(1, int(rate * seconds))
    gaps = poisson_gaps(rate, n, np.random.default_rng(seed))
    tasks = []
    async with client(base_url) as session:
        start = time.monotonic()
        offset = 0.0
        for gap in gaps:
            offset += float(gap)
            if offset > seconds:
                break
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = workload.draw(rng)
            tasks.append(asyncio.create_task(send(session, kind,
                                                  workload.request(kind, rng))))
        return list(await asyncio.gather(*tasks))


async def closed_loop(base_url: str, workload: Workload, clients: int, seconds: float,
                      seed: int = 0) -> list[Outcome]:
    """`clients` workers sending back to back for `seconds`."""
    out: list[Outcome] = []
    stop = time.monotonic() + seconds

    async with client(base_url) as session:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop:
                kind = workload.draw(rng)
                o = await send(session, kind, workload.request(kind, rng))
                out.append(o)
                if o.status == 429:
                    await asyncio.sleep(0.05)
        await asyncio.gather(*(worker(i) for i in range(clients)))
    return out


class Probes:
    """Probe requests sent every `interval` s from a separate process while something else
    runs, each on a new connection, as a kubelet probes: their latency is the server's, not
    that of this process's busy event loop."""

    def __init__(self, base_url: str, interval: float, paths: tuple[str, ...]) -> None:
        self.samples: list[tuple[str, int | str, float]] = []
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "probe", base_url, str(interval), *paths],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)

    def stop(self) -> None:
        out, _ = self._proc.communicate(input="stop\n", timeout=60)
        for line in out.splitlines():
            path, status, seconds = json.loads(line)
            self.samples.append((path, status, seconds))

    def summary(self) -> dict:
        lat = [s for _, _, s in self.samples]
        return {"probes": len(self.samples),
                "not_200": sum(status != 200 for _, status, _ in self.samples),
                "max_s": round(max(lat), 3) if lat else None,
                "p99_s": round(percentile(lat, 99), 3) if lat else None}


def probe_main(base_url: str, interval: float, paths: list[str]) -> None:
    """The probing process: until a line arrives on stdin, GET each path every `interval`
    s on a fresh connection; one JSON line [path, status, seconds] per probe on stdout."""
    import select

    while not select.select([sys.stdin], [], [], 0)[0]:
        for path in paths:
            start = time.monotonic()
            try:
                status: int | str = httpx.get(base_url + path, timeout=10).status_code
            except httpx.HTTPError as exc:
                status = f"lost:{type(exc).__name__}"
            print(json.dumps([path, status, round(time.monotonic() - start, 4)]), flush=True)
        time.sleep(interval)


async def with_probes(coro, base_url: str, interval: float = 0.5,
                      paths: tuple[str, ...] = ("/health", "/ready")):
    """Run `coro` while probing; returns (its result, Probes)."""
    probes = Probes(base_url, interval, paths)
    try:
        return await coro, probes
    finally:
        probes.stop()


def summarise(outcomes: list[Outcome]) -> dict:
    """Counts by kind and status, lost requests, latency percentiles per kind."""
    by = Counter(f"{o.kind}:{o.status}" + (f":{o.stream_end}" if o.stream_end else "")
                 for o in outcomes)
    lat = {}
    for kind in sorted({o.kind for o in outcomes}):
        ok = [o.seconds for o in outcomes if o.kind == kind and o.status == 200]
        if ok:
            lat[kind] = {"p50_s": round(percentile(ok, 50), 3),
                         "p99_s": round(percentile(ok, 99), 3)}
    return {"requests": len(outcomes), "lost": sum(o.lost for o in outcomes),
            "by_kind_status": dict(sorted(by.items())), "latency_ok": lat}


def client_counts(outcomes: list[Outcome]) -> Counter:
    """{(route, status): count} as the server should have counted them."""
    return Counter((o.route, str(o.status)) for o in outcomes if not isinstance(o.status, str))


def settle(server: Server, timeout: float = 120.0) -> float:
    """Wait until nothing runs or waits; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        m = server.metrics()
        if metric(m, "camex_running_requests") == 0 and metric(m, "camex_waiting_requests") == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError("the server never went idle")


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    probe_main(sys.argv[2], float(sys.argv[3]), sys.argv[4:])
