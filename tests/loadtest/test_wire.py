"""loadtest/wire.py: the lean HTTP/1.1 client against a scripted server on 127.0.0.1 that sends
exactly the bytes each test chooses, split where the test chooses (``tests/wire_script.py``).

- server-sent events arrive whole and in order however the bytes are cut (a byte at a time, a
  chunk boundary inside a line, CRLF line ends, several ``data:`` lines, comments, a last event
  the body ends without a blank line);
- bodies framed by ``Content-Length``, by the connection's close, and error bodies come back
  whole, not as events;
- a kept-alive connection is reused, and reopened once when the server closed it while idle;
- what breaks a response (closed mid-body, a bad chunk size, the callback's own exception)
  raises, and the next request still gets a fresh connection that works;
- extra headers (``Authorization``) go with every request; a connection that cannot be opened
  raises ``ConnectFailed`` (which camex-loadtest records as ``connect_error``).
"""
from __future__ import annotations

import asyncio

import pytest

from loadtest import wire
from tests.wire_script import SSE_HEAD, Script, chunked


def serve(replies: list, client, headers: dict[str, str] | None = None):
    """Run `client(conn)` against a `Script` of `replies`; returns (its result, the script)."""
    script = Script(replies)

    async def main():
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = wire.Connection("127.0.0.1", port, headers)
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
    assert isinstance(err, wire.ClosedBeforeResponse) and len(script.requests) == 1


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
    assert isinstance(err, wire.WireError) and message in str(err)
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

    module = wire.run(which())
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert module.startswith("asyncio")
    else:
        assert module.startswith("uvloop")


def test_extra_headers_go_with_every_request():
    ok = SSE_HEAD + chunked(b"data: 1\n\n")

    async def twice(conn):
        return [await post(conn) for _ in range(2)]

    _, script = serve([ok, ok], twice, {"Authorization": "Bearer sk-x"})
    assert len(script.requests) == 2 and script.connections == 1
    assert all(b"\r\nAuthorization: Bearer sk-x\r\n" in r for r in script.requests)


def test_a_connection_that_cannot_open_raises_connect_failed():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens there now
        return await catch(post(wire.Connection("127.0.0.1", port)))

    err = asyncio.run(main())
    assert isinstance(err, wire.ConnectFailed) and isinstance(err, wire.WireError)
    assert "cannot connect to 127.0.0.1" in str(err)
