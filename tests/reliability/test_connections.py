"""Connection hygiene against a real server process: half-open sockets (slowloris) are closed
after the header deadline and evicted at the connection cap, so probes still get in; a slow
body is 408; with every connection busy a new one gets a clear 503 and is closed.

Limits are set low (`--max-connections 16`, `--header-timeout-s 1`) so the scenarios take
seconds; benchmarks/reliability runs the same attack at full size.
"""

import socket
import time

import httpx
import pytest

from tests.server.live_server import live_server, value

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]
CAP = 16


@pytest.fixture(scope="module")
def guarded(long_lm_dir, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("conn"), "--model", str(long_lm_dir),
                     "--max-connections", str(CAP), "--header-timeout-s", "1",
                     "--body-timeout-s", "1") as srv:
        yield srv


def half_open(srv, n: int) -> list[socket.socket]:
    """`n` connections that send half a request header and then nothing."""
    port = int(srv.base_url.rsplit(":", 1)[1])
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(s)
    return socks


def answer(s: socket.socket, timeout: float = 10.0) -> bytes:
    """What the server sent before closing (b"" for a plain close)."""
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_slowloris_sockets_cannot_lock_out_probes(guarded):
    before = guarded.metrics()
    socks = half_open(guarded, 3 * CAP)  # three times the cap, all half-open
    try:
        for _ in range(5):  # each probe is a new connection: it evicts an idle half-open one
            with httpx.Client(base_url=guarded.base_url, timeout=5) as probe:
                assert probe.get("/health").status_code == 200
        outcomes = [answer(s) for s in socks]  # every one is closed, none hangs
    finally:
        for s in socks:
            s.close()
    timed_out = [o for o in outcomes if o.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) >= 1 and all(o in (b"",) or o.startswith(b"HTTP/1.1 408")
                                       for o in outcomes)
    m = guarded.metrics()

    def delta(reason):
        return value(m, "camex_connections_closed_total", reason=reason) - \
            value(before, "camex_connections_closed_total", reason=reason)
    assert delta("evicted") + delta("header_timeout") == len(socks)
    assert delta("evicted") >= 2 * CAP  # the cap was reached and held
    assert value(m, "camex_open_connections") <= 2  # this scrape (and a lingering probe)


def test_slow_body_is_408_and_closes_the_connection(guarded):
    port = int(guarded.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: "
                  b"application/json\r\ncontent-length: 100\r\n\r\n{\"inputs\":")
        reply = answer(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
    assert b'"error_type":"request_timeout"' in reply


def test_every_connection_busy_means_503_for_the_next(guarded):
    port = int(guarded.base_url.rsplit(":", 1)[1])
    body = b'{"inputs": "hold", "parameters": {"max_new_tokens": 2000, "ignore_eos": true}}'
    request = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json"
               b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    busy = []
    try:
        for _ in range(CAP):  # CAP connections, each with a request in flight
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            busy.append(s)
        time.sleep(1.0)  # the server parses them: none is idle, so none can be evicted
        deadline = time.monotonic() + 30
        while True:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                reply = answer(s)  # refused at once, without reading the request
            if reply.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
        assert b'"error_type":"overloaded"' in reply
    finally:
        for s in busy:
            s.close()  # the disconnects cancel the generations
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            m = guarded.metrics()
        except httpx.HTTPError:
            continue  # a scrape may still meet the cap for a moment
        if value(m, "camex_running_requests") == 0:
            break
        time.sleep(0.1)
    assert value(m, "camex_connections_closed_total", reason="over_capacity") >= 1
    assert value(m, "camex_running_requests") == 0
