"""Streamed token events written to the client's socket by the engine's side
(`server.direct_stream`), end to end over HTTP on 127.0.0.1: the bytes a client reads are the
event loop's bytes, chunk for chunk, with the engine in this process or its own; keep-alive
connections carry one stream after another; a reader that stalls gets every byte; a client that
leaves mid-stream is cancelled and counted. Real processes, ended
by PID."""

import json
import socket
import time

import httpx
import pytest

from tests.server.live_server import live_server, value

pytestmark = pytest.mark.e2e
DIRECT = "camex_stream_direct_tokens_total"
ITL_COUNT = "camex_inter_token_latency_seconds_count"
BODIES = [
    {"inputs": "Hello there", "parameters": {"max_new_tokens": 12, "ignore_eos": True}},
    {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 20, "details": True,
                                                     "ignore_eos": True}},
    {"inputs": "A", "parameters": {"max_new_tokens": 16, "do_sample": True, "seed": 7,
                                   "top_k": 20, "ignore_eos": True}},
    {"inputs": "science and animals", "parameters": {"max_new_tokens": 24}},
    # alternatives: every event goes through the event loop
    {"inputs": "Hello", "parameters": {"max_new_tokens": 6, "top_n_tokens": 2}},
]


TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"
# OpenAI streams whose token chunks hold text alone (the sink writes them), then streams the
# route sends itself (several choices, logprobs, usage in every chunk, echo)
MESSAGES = [{"role": "user", "content": "Hello there"}]
OPENAI_PLAIN = [
    ("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 20, "stop": ["the", "e."], "seed": 2,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 20, "stop": ["an", "e "],
                              "temperature": 0.8, "seed": 5}),
]
OPENAI_ROUTED = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "logprobs": 0, "temperature": 0}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "n": 2, "seed": 1,
                         "temperature": 1.0}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "echo": True, "temperature": 0}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "logprobs": True,
                              "temperature": 0}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "seed": 4, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}),
]


@pytest.fixture(scope="module")
def servers(long_lm_dir, tmp_path_factory):
    """The engine in this process (direct writes from its thread), in its own process (from
    the event loop's pipe reader), and the event loop alone (--no-stream-direct)."""
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    base = ("--model", str(long_lm_dir), "--threads", "1", "--chat-template", str(template))
    tmp = tmp_path_factory.mktemp
    with live_server(tmp("in"), *base, "--engine-process", "off") as inproc, \
            live_server(tmp("split"), *base, "--engine-process", "on") as split, \
            live_server(tmp("loop"), *base, "--engine-process", "off",
                        "--no-stream-direct") as loop:
        yield {"in-process": inproc, "engine process": split, "event loop": loop}


def raw_stream(base_url: str, body: dict, *, rcvbuf: int | None = None, stall_s: float = 0.0,
               leave_after: int | None = None) -> tuple[bytes, list[bytes]]:
    """POST /generate_stream on a plain socket: the response head and its body's chunks, the
    chunked framing checked byte by byte. `leave_after`: close once that many chunks arrived."""
    host, port = base_url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    payload = json.dumps(body).encode()
    s.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
              % (host.encode(), port.encode(), len(payload), payload))
    time.sleep(stall_s)
    data, chunks, head = b"", [], None
    try:
        while True:
            got = s.recv(1 << 16)
            if not got:
                break
            data += got
            if head is None and b"\r\n\r\n" in data:
                head, data = data.split(b"\r\n\r\n", 1)
            while head is not None and b"\r\n" in data:
                size_line, rest = data.split(b"\r\n", 1)
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    break
                assert rest[size:size + 2] == b"\r\n", "a chunk not ended by CRLF"
                chunks.append(rest[:size])
                data = rest[size + 2:]
                if size == 0:
                    assert data == b"", "bytes after the last chunk"
                    return head, chunks
            if leave_after is not None and len(chunks) >= leave_after:
                return head, chunks
    finally:
        s.close()
    raise AssertionError(f"the stream ended without its last chunk: {head!r} {data[-200:]!r}")


def events_of(chunks: list[bytes]) -> list[dict]:
    """Each chunk is one SSE event (the last chunk is the empty terminator)."""
    assert chunks[-1] == b""
    out = []
    for chunk in chunks[:-1]:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and \
            chunk.count(b"\n\n") == 1, chunk
        out.append(json.loads(chunk[6:]))
    return out


def test_clients_read_the_event_loops_bytes(servers):
    before = {name: srv.metrics() for name, srv in servers.items()}
    bodies = {}
    for name, srv in servers.items():
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:  # one connection
            for i, body in enumerate(BODIES):
                with client.stream("POST", "/generate_stream", json=body) as r:
                    assert r.status_code == 200 and \
                        r.headers["content-type"].startswith("text/event-stream")
                    bodies[name, i] = r.read()
    for i in range(len(BODIES)):
        assert bodies["in-process", i] == bodies["event loop", i]
        assert bodies["engine process", i] == bodies["event loop", i]
    counts = []
    for i in range(len(BODIES)):
        events = [json.loads(x[5:]) for x in bodies["event loop", i].decode().split("\n\n") if x]
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        counts.append(len(events))
    streamed = sum(counts[:-1])  # the last request asks for alternatives
    for name, srv in servers.items():
        after = srv.metrics()
        direct = value(after, DIRECT) - value(before[name], DIRECT)
        if name == "event loop":
            assert direct == 0
        else:  # never a stream's first or last event; the tiny model's tokens come so fast
            # that the event loop may send several itself before it first waits and hands over
            assert 0 < direct <= streamed - 2 * len(counts[:-1]), name
        # every gap between tokens is measured, whoever wrote the tokens
        assert value(after, ITL_COUNT) - value(before[name], ITL_COUNT) == \
            sum(n - 1 for n in counts)


def test_each_event_is_one_chunk_on_the_wire(servers):
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 30, "ignore_eos": True}}
    got = {}
    for name, srv in servers.items():
        head, chunks = raw_stream(srv.base_url, body)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        got[name] = events_of(chunks)
    assert len(got["event loop"]) == 30
    assert got["in-process"] == got["event loop"] == got["engine process"]


@pytest.mark.parametrize("name", ["in-process", "engine process"])
def test_a_reader_that_stalls_gets_every_byte(servers, name):
    """The client reads nothing for a while through a small receive buffer. Whether the
    server's socket buffer fills (the sink's write comes back short and the event loop's
    transport carries the rest) is the kernel's call, as its send buffers grow on their own;
    the short write itself is tested on a socket whose buffer the test sets
    (tests/server/test_direct_stream.py). Either way every byte arrives, in order."""
    srv, n = servers[name], 1500
    body = {"inputs": "stall", "parameters": {"max_new_tokens": n, "ignore_eos": True}}
    _, chunks = raw_stream(srv.base_url, body, rcvbuf=4096, stall_s=3.0)
    events = events_of(chunks)
    assert [e["index"] for e in events] == list(range(1, n + 1))
    assert events[-1]["details"] is None and events[-1]["generated_text"] == \
        "".join(e["token"]["text"] for e in events)
    _, again = raw_stream(servers["event loop"].base_url, body)
    assert events == events_of(again)


@pytest.mark.parametrize("name", ["in-process", "engine process"])
def test_a_client_that_leaves_mid_stream_is_cancelled(servers, name):
    """Whether the sink holds the stream when the client leaves depends on the pace (the tiny
    model's tokens may come faster than the event loop ever waits); a reader cancelled while
    its sink is attached is tests/runtime/test_event_sink.py's, a write to a reset connection
    tests/server/test_direct_stream.py's."""
    srv = servers[name]
    before = srv.metrics()
    body = {"inputs": "leave", "parameters": {"max_new_tokens": 1800, "ignore_eos": True}}
    head, chunks = raw_stream(srv.base_url, body, leave_after=5)
    assert head.startswith(b"HTTP/1.1 200") and len(chunks) >= 5
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = srv.metrics()
        if value(m, "camex_failures_total", reason="dropped") == \
                value(before, "camex_failures_total", reason="dropped") + 1 and \
                value(m, "camex_running_requests") == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the stream the client left was not cancelled")
    # the server goes on: the next stream on a new connection is whole and right
    body = {"inputs": "after", "parameters": {"max_new_tokens": 10, "ignore_eos": True}}
    assert events_of(raw_stream(srv.base_url, body)[1]) == \
        events_of(raw_stream(servers["event loop"].base_url, body)[1])


def openai_events(srv, path: str, body: dict) -> list:
    """A streamed OpenAI response's events, without what differs per response (id, created),
    grouped by choice."""
    with httpx.stream("POST", srv.base_url + path, json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        out = []
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert event.pop("id").startswith(("cmpl-", "chatcmpl-"))
                event.pop("created")
                out.append(event)
            elif line:
                assert line == "data: [DONE]"
        # several choices interleave as their tokens come: each choice's events in order
        return sorted(out, key=lambda e: e["choices"][0]["index"] if e["choices"] else 1 << 30)


def test_openai_streams_read_the_same_and_plain_ones_go_direct(servers):
    for requests, plain in ((OPENAI_PLAIN, True), (OPENAI_ROUTED, False)):
        before = {name: value(srv.metrics(), DIRECT) for name, srv in servers.items()}
        answers = {name: [openai_events(srv, path, body) for path, body in requests]
                   for name, srv in servers.items()}
        assert answers["in-process"] == answers["event loop"]
        assert answers["engine process"] == answers["event loop"]
        assert all(len(events) >= 3 for events in answers["event loop"])
        for name, srv in servers.items():
            direct = value(srv.metrics(), DIRECT) - before[name]
            assert (direct > 0) == (plain and name != "event loop"), (name, plain, direct)
