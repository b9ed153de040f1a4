"""benchmarks/peer_wire.py: the peer harness's HTTP/1.1 client against a scripted server on
127.0.0.1 that sends exactly the bytes each test chooses, split where the test chooses.

- server-sent events arrive whole and in order however the bytes are cut (a byte at a time, a
  chunk boundary inside a line, CRLF line ends, several ``data:`` lines, comments, a last event
  the body ends without a blank line);
- bodies framed by ``Content-Length``, by the connection's close, and error bodies come back
  whole, not as events;
- a kept-alive connection is reused, and reopened once when the server closed it while idle;
- what breaks a response (closed mid-body, a bad chunk size, the callback's own exception)
  raises, and the next request still gets a fresh connection that works.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_wire  # noqa: E402

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class Script:
    """A server answering the n-th request it reads (on any connection) with ``replies[n]``:
    bytes sent in one write, or a list of writes with a short pause between them; ``None``
    closes the connection without answering; a reply ending in ``CLOSE`` closes after it."""
    CLOSE = object()

    def __init__(self, replies: list):
        self.replies, self.requests, self.connections = list(replies), [], 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                if reply is None:
                    break
                writes = reply if isinstance(reply, list) else [reply]
                for w in writes:
                    if w is Script.CLOSE:
                        writer.close()
                        return
                    writer.write(w)
                    await writer.drain()
                    if len(writes) > 1:
                        await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # the test is over and its loop closing
            return
        writer.close()


def serve(replies: list, client):
    """Run `client(conn)` against a `Script` of `replies`; returns (its result, the script)."""
    script = Script(replies)

    async def main():
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = peer_wire.Connection("127.0.0.1", port)
        try:
            return await client(conn)
        finally:
            conn.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main()), script


async def post(conn, events: list | None = None):
    got = [] if events is None else events
    resp = await conn.post("/x", {"a": 1}, got.append)
    return resp, got


def test_events_arrive_whole_however_the_bytes_are_cut():
    body = chunked(b"data: {\"n\": 1}\n\n", b": a comment\r\ndata: line one\r\ndata:line two\r\n",
                   b"\r\nevent: x\ndata: {\"n\"", b": 3}\n\ndata: last")
    whole = SSE_HEAD + body
    byte_at_a_time = [whole[i:i + 1] for i in range(len(whole))]
    for reply in (whole, byte_at_a_time):
        (resp, got), script = serve([reply], post)
        assert resp.status == 200 and resp.events == 4 and resp.body == b""
        assert got == [b'{"n": 1}', b"line one\nline two", b'{"n": 3}', b"last"]
    request = script.requests[0]
    assert request.startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Type: application/json" in request and request.endswith(b'{"a": 1}')


def test_bodies_by_length_by_close_and_errors_come_back_whole():
    length = b"HTTP/1.1 422 Unprocessable\r\ncontent-length: 11\r\n\r\n{\"e\": \"no\"}"
    by_close = [b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nsome ", b"text",
                Script.CLOSE]
    sse_error = (b"HTTP/1.1 503 x\r\ncontent-type: text/event-stream\r\ncontent-length: 6\r\n\r\n"
                 b"data:1")

    async def three(conn):
        return [await post(conn) for _ in range(3)]

    (a, b, c), _ = serve([length, by_close, sse_error], three)
    assert (a[0].status, a[0].body, a[1]) == (422, b'{"e": "no"}', [])
    assert (b[0].status, b[0].body, b[0].keep_alive) == (200, b"some text", False)
    assert (c[0].status, c[0].body, c[1]) == (503, b"data:1", [])  # only a 200 streams events


def test_a_kept_alive_connection_is_reused_and_reopened_once_the_server_closed_it():
    ok = SSE_HEAD + chunked(b"data: 1\n\n")

    async def twice(conn):
        return [await post(conn) for _ in range(2)]

    (a, b), script = serve([ok, ok], twice)
    assert a[1] == b[1] == [b"1"] and script.connections == 1
    # the server reads the second request, then closes without a byte: sent again, answered
    (a, b), script = serve([ok, None, ok], twice)
    assert a[1] == b[1] == [b"1"] and script.connections == 2 and len(script.requests) == 3


def test_a_new_connection_closed_before_a_response_is_not_retried():
    (err, script) = serve([None], lambda conn: catch(post(conn)))
    assert isinstance(err, peer_wire.ClosedBeforeResponse) and len(script.requests) == 1


async def catch(coro):
    try:
        await coro
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    raise AssertionError("no exception")


@pytest.mark.parametrize("reply, message", [
    ([SSE_HEAD + b"9\r\ndata: 1\n\n\r\n5\r\nda", Script.CLOSE], "closed inside the response"),
    (SSE_HEAD + b"zz\r\n", "bad chunk size"),
    (SSE_HEAD + b"3\r\nabcXY", "does not end with CRLF"),
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.x response"),
])
def test_a_broken_response_raises_and_the_next_request_works(reply, message):
    ok = SSE_HEAD + chunked(b"data: 2\n\n")

    async def broken_then_ok(conn):
        return await catch(post(conn)), await post(conn)

    (err, (resp, got)), script = serve([reply, ok], broken_then_ok)
    assert isinstance(err, peer_wire.WireError) and message in str(err)
    assert resp.status == 200 and got == [b"2"] and script.connections == 2


def test_the_callbacks_exception_ends_the_request_and_is_raised():
    ok = SSE_HEAD + chunked(b"data: 1\n\n", b"data: 2\n\n")

    def refuse(data):
        raise ValueError(f"not an event: {data!r}")

    async def refused_then_ok(conn):
        return await catch(conn.post("/x", {}, refuse)), await post(conn)

    (err, (resp, got)), _ = serve([ok, ok], refused_then_ok)
    assert isinstance(err, ValueError) and "b'1'" in str(err)
    assert got == [b"1", b"2"]


def test_run_prefers_uvloop_and_returns_the_result():
    async def which():
        return type(asyncio.get_running_loop()).__module__

    module = peer_wire.run(which())
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert module.startswith("asyncio")
    else:
        assert module.startswith("uvloop")


def tgi_stream(ids: list[int], error_after: int | None = None) -> bytes:
    """What camex-server's /generate_stream sends: one event per token, then the final one."""
    events = []
    for k, i in enumerate(ids):
        if k == error_after:
            events.append(b'data: {"error": "engine stopped", "error_type": "overloaded"}\n\n')
            break
        final = k == len(ids) - 1
        events.append(b'data: {"index": %d, "token": {"id": %d, "text": "t", "logprob": 0.0, '
                      b'"special": false}, "generated_text": %s, "details": %s}\n\n'
                      % (k, i, b'"ttt"' if final else b"null",
                         b'{"finish_reason": "length"}' if final else b"null"))
    return SSE_HEAD + chunked(*events)


@pytest.mark.parametrize("client", ["wire", "httpx"])
def test_both_harness_clients_read_a_tgi_stream_into_the_same_records(client):
    import peer_client
    script = Script([tgi_stream([5, 6, 7]), tgi_stream([8, 9, 10], error_after=1)])

    async def main():
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            return await peer_client.closed_loop(url, peer_client.TgiDialect(), ["a", "b"], 1, 3,
                                                 30.0, client)
        finally:
            server.close()

    result = asyncio.run(main())
    ok, failed = sorted(result.report.records, key=lambda r: r.index)
    assert (ok.ok, ok.output_tokens, ok.finish_reason) == (True, 3, "length")
    assert len(ok.token_times) == 3
    assert ok.token_times == sorted(ok.token_times) and ok.end == ok.token_times[-1]
    assert result.token_ids == {0: [5, 6, 7], 1: [8]}
    assert (failed.ok, failed.failure, failed.output_tokens) == (False, "stream_error", 1)
    assert "overloaded: engine stopped" in failed.error
    assert result.report.run["client"] == client and result.report.run["client_cpu_s"] >= 0
