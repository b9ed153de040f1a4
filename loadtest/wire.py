"""A lean HTTP/1.1 client: POST a JSON body on a kept-alive connection and hand each server-sent
event's ``data:`` to a callback the moment its bytes arrive.

Why not httpx for everything: a load generator on the machine it loads takes its CPU from the
server it measures, and streamed tokens are where that adds up. Reading the same camex-server
stream at B=1 on a 2-core Zen 3 VM, CPU per token: async httpx 0.77-0.99 ms (h11, then byte,
text and line decoders per chunk, on the stdlib event loop); a bare ``asyncio.Protocol`` that
only counts events 0.27 ms on the stdlib loop and 0.11-0.13 ms on uvloop; a blocking ``recv``
loop 0.10-0.11 ms. So this client is a protocol that parses in ``data_received`` (no stream
reader, no coroutine per chunk), and `run` prefers uvloop. ``camex-loadtest`` reads plain-HTTP
targets with it (``--client wire``, the default there) and keeps httpx for HTTPS and for
comparisons; the llama.cpp peer harness (``benchmarks/peer_client.py``) uses it too.

What it speaks, and nothing more: HTTP/1.1 without TLS, proxies, redirects or compression
(requests say ``Accept-Encoding: identity``); responses framed by chunked transfer coding,
``Content-Length`` or the connection's close; ``text/event-stream`` bodies of 200 responses as
events (``data:`` lines joined by newlines, an event ended by a blank line, other fields
ignored), any other body whole. A broken response raises `WireError`, a connection that cannot
be opened `ConnectFailed`. Callers check the target is loopback (``loadtest.runner.check_target``).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 1 << 16


class WireError(Exception):
    """The connection closed or the server's bytes are not HTTP/1.1 as this client reads it."""


class ConnectFailed(WireError):
    """The connection could not be opened (refused, unreachable, unresolvable): nothing was sent."""


class ClosedBeforeResponse(WireError):
    """The connection closed before a byte of the response: on a kept-alive connection, the
    server closed it while idle, and the request may be sent again on a new one."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-case
    body: bytes = b""  # the whole body, unless it was handed out as events
    events: int = 0  # events handed to the callback
    keep_alive: bool = True  # the server leaves the connection open for the next request


@dataclass
class _Framing:
    """Where the parser is in one response."""
    response: Response | None = None
    state: str = "head"  # head | size | data | trailer | length | close | done
    left: int = 0  # bytes still to come of this chunk, or of a Content-Length body
    sse: bool = False  # a 200 text/event-stream body: handed out event by event
    rest: bytes = b""  # an SSE line not yet ended
    data: list[bytes] = field(default_factory=list)  # the current event's data lines
    parts: list[bytes] = field(default_factory=list)  # a whole body's pieces


class _Protocol(asyncio.Protocol):
    """Parses one response at a time as its bytes arrive; `waiter` gets the `Response` once its
    body has ended, or the error that stopped it (also one the event callback raised)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.on_event: Callable[[bytes], None] = lambda data: None
        self.frame = _Framing(state="done")

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.frame.state == "close":  # a body that ends when the connection does
            try:
                self._finish()
            except Exception as e:  # noqa: BLE001 - the event callback's, for the waiter
                self._fail(e)
        elif self.frame.state == "head" and not self.buf:
            self._fail(ClosedBeforeResponse("connection closed before a response"))
        elif self.frame.state != "done":
            self._fail(WireError(f"connection closed inside the response ({self.frame.state})"))

    def start(self, on_event: Callable[[bytes], None]) -> asyncio.Future:
        self.buf.clear()
        self.frame, self.on_event = _Framing(), on_event
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.frame.state == "done":  # bytes nobody asked for: the connection is not reusable
            self.transport.close()
            return
        self.buf += data
        try:
            self._parse()
        except Exception as e:  # noqa: BLE001 - the waiter re-raises it in the caller
            self._fail(e)

    def _parse(self) -> None:
        f, buf = self.frame, self.buf
        while True:
            if f.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise WireError("response head too long")
                    return
                head = bytes(buf[:end]).decode("latin-1")
                del buf[:end + 4]
                self._head(head)
            elif f.state in ("size", "trailer"):
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[:end + 2]
                if f.state == "trailer":
                    if not line:
                        return self._finish()
                    continue  # a trailer field, unused
                try:
                    f.left = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise WireError(f"bad chunk size line {line[:40]!r}") from None
                f.state = "data" if f.left else "trailer"
            elif f.state == "data":
                if len(buf) < f.left + 2:
                    return
                if buf[f.left:f.left + 2] != b"\r\n":
                    raise WireError("a chunk does not end with CRLF")
                piece = bytes(buf[:f.left])
                del buf[:f.left + 2]
                f.state = "size"
                self._body(piece)
            elif f.state in ("length", "close"):
                if not buf:
                    return
                take = len(buf) if f.state == "close" else min(f.left, len(buf))
                piece = bytes(buf[:take])
                del buf[:take]
                f.left -= take
                self._body(piece)
                if f.state == "length" and not f.left:
                    return self._finish()
            else:
                return

    def _head(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise WireError(f"not an HTTP/1.x response: {status_line[:80]!r}")
        status = int(rest[:3])
        if 100 <= status < 200:  # an interim response; the real one follows
            return
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        f = self.frame
        conn = headers.get("connection", "").lower()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if chunked else headers.get("content-length")
        f.response = Response(status, headers, keep_alive=(
            (chunked or length is not None) and conn != "close"
            and (version == "HTTP/1.1" or conn == "keep-alive")))
        f.sse = status == 200 and headers.get("content-type", "").startswith("text/event-stream")
        if chunked:
            f.state = "size"
        elif length is not None:
            f.left = int(length)
            f.state = "length"
            if not f.left:
                self._finish()
        else:
            f.state = "close"

    def _body(self, piece: bytes) -> None:
        f = self.frame
        if not f.sse:
            f.parts.append(piece)
            return
        *lines, f.rest = (f.rest + piece).split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if f.data:
                    self._event()
            elif line.startswith(b"data:"):
                f.data.append(line[6:] if line[5:6] == b" " else line[5:])

    def _event(self) -> None:
        f = self.frame
        data, f.data = b"\n".join(f.data), []
        f.response.events += 1
        self.on_event(data)

    def _finish(self) -> None:
        f = self.frame
        if f.sse:
            self._body(b"\n\n" if f.rest else b"\n")  # an event the body ended without a blank line
        f.state = "done"
        f.response.body = b"".join(f.parts)
        if not f.response.keep_alive or self.buf:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(f.response)

    def _fail(self, exc: Exception) -> None:
        self.frame.state = "done"
        if self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


class Connection:
    """One kept-alive connection to ``host:port``, opened on first use and again after the server
    closed it; one request at a time (a closed-loop worker's). `headers` go with every request
    (e.g. ``Authorization``)."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._fields = (f"Host: {authority}\r\nAccept: */*\r\nAccept-Encoding: identity\r\n"
                      f"Content-Type: application/json\r\n{extra}")
        self._protocol: _Protocol | None = None

    async def post(self, path: str, payload: dict,
                   on_event: Callable[[bytes], None] = lambda data: None) -> Response:
        """``POST path`` with `payload` as JSON; returns once the response's body has ended.
        A 200 ``text/event-stream`` body goes to `on_event` event by event as it arrives (an
        exception it raises ends the request and is raised here); any other body is in
        ``Response.body``."""
        body = json.dumps(payload).encode()
        request = (f"POST {path} HTTP/1.1\r\n{self._fields}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        reused = self._usable()
        try:
            return await self._exchange(request, on_event)
        except ClosedBeforeResponse:
            if not reused:
                raise
        self.close()  # the server had closed the idle connection: once more on a new one
        return await self._exchange(request, on_event)

    def _usable(self) -> bool:
        p = self._protocol
        return p is not None and not p.lost and p.frame.state == "done" and (
            p.frame.response is None or p.frame.response.keep_alive)

    async def _exchange(self, request: bytes, on_event: Callable[[bytes], None]) -> Response:
        if not self._usable():
            self.close()
            loop = asyncio.get_running_loop()
            try:
                _, self._protocol = await loop.create_connection(_Protocol, self.host, self.port)
            except OSError as e:
                raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e}") from e
        protocol = self._protocol
        waiter = protocol.start(on_event)
        protocol.transport.write(request)
        try:
            return await waiter
        except BaseException:
            self.close()  # a failed or cancelled response leaves the connection unusable
            raise

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


def run(main: Coroutine):
    """Run `main` on uvloop where it is installed (a wake-up per streamed token costs about half
    the CPU of the stdlib loop's on a small VM, see the module docstring), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
