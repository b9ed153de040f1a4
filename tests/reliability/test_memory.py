"""Memory after classification bursts: a real server, bursts of concurrent /classify calls far
beyond its capacity; between bursts its resident memory returns to within 10 % of the level
before the first burst, and the thread count does not grow with the number of clients.

What it guards: every thread that mallocs gets its own glibc arena, and an arena keeps what it
held. With a thread per in-flight call (anyio's pool, up to 40) RSS grew 2.5x and stayed
there; the classify queue's few threads plus `malloc_trim` when it goes idle give it back
(server.isolation). The scenario is sized to take ~30 s on 2 cores.
"""

import asyncio
import time

import httpx
import pytest

from tests.reliability.conftest import LONG_TEXT
from tests.server.live_server import live_server

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]
CLIENTS, TEXTS, BURST_S = 48, 32, 8.0


def proc_status(pid: int) -> tuple[float, int]:
    """(resident MiB, threads) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


async def burst(base_url: str, seconds: float) -> dict:
    stop = time.monotonic() + seconds
    codes: dict = {}
    body = {"inputs": [LONG_TEXT] * TEXTS, "truncate": True}
    limits = httpx.Limits(max_connections=CLIENTS + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def one_client():
            while time.monotonic() < stop:
                r = await client.post("/classify", json=body)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 429:
                    await asyncio.sleep(0.1)
        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return codes


def test_rss_returns_after_classify_bursts(wide_classifier_dir, tmp_path):
    with live_server(tmp_path, "--classifier", str(wide_classifier_dir), "--threads", "1",
                     "--queue-timeout-s", "60") as srv:
        pid = srv.proc.pid
        time.sleep(2.0)
        rss0, threads0 = proc_status(pid)
        for _ in range(2):
            codes = asyncio.run(burst(srv.base_url, BURST_S))
            assert codes.get(200, 0) > 0 and set(codes) <= {200, 429}, codes
            peak_threads = proc_status(pid)[1]
            deadline = time.monotonic() + 15
            while proc_status(pid)[0] > 1.10 * rss0 and time.monotonic() < deadline:
                time.sleep(0.5)
            rss, threads = proc_status(pid)
            assert rss <= 1.10 * rss0, f"RSS {rss:.0f} MiB after a burst vs {rss0:.0f} before"
            # no thread per client: the classify workers (2), ops (2) and stats readers (2)
            assert max(peak_threads, threads) <= threads0 + 6, (threads0, peak_threads)
