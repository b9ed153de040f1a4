"""Streamed tokens written to the client's socket by the thread that produced them.

Over HTTP/1.1 each SSE event of a stream is one chunk (`<hex length>\\r\\n<event>\\r\\n`) on the
connection's socket. Sent the usual way, every token wakes the event loop: the engine publishes
the event, the loop wakes the stream's generator, which formats it and hands it through Starlette
and uvicorn to the transport. That costs the loop ~0.2-0.6 ms of CPU per token on a small VM
(docs/DESIGN.md §4), and a machine whose cores all compute takes it from the threads computing
the next token.

A `SocketSink` takes a stream's token events on the thread that publishes them instead (the
engine thread, or the loop's own pipe reader when the engine has a process of its own:
`RequestHandle._publish`), formats each with the route's function and writes the chunk with one
non-blocking `write`. The loop is not woken until the sink stops, which it does
- at an event the route's function leaves to the route (the last one, which carries the result;
  alternatives; a logprob JSON cannot hold),
- when the socket takes only part of a chunk (a slow reader): the rest, and every event after it,
  go through the transport, whose buffering and flow control apply,
- when the write fails (the client left): the route finds out as it always did.

It attaches only when nothing else is in flight on the connection: the response head sent, the
transport's buffer empty, not closing, not TLS. It writes to a duplicate of the connection's
descriptor, closed when the stream ends: if uvicorn closes its own meanwhile, that number may be
reused by a new connection at once, which must never receive another client's tokens.
Knows uvicorn's request cycle (`server.connections` puts it in the ASGI scope) and no routes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# the ASGI scope's extension holding uvicorn's RequestResponseCycle (server.connections)
SCOPE_KEY = "camex.http_cycle"


class SocketSink:
    """A `camex_runtime.engine.request.EventSink` writing SSE chunks to one response's socket.

    `line(position, event)` is the SSE text of the event at `position` of the request's events,
    or None to leave that event, and all after it, to the route. After the hand-over the
    stream (`server.generation.GenerationRun.stream`) asks `sent(position)` for each event and
    calls `flush()` at the last one sent here (it writes the part of a chunk the socket did not
    take)."""

    def __init__(self, cycle, line: Callable[[int, object], str | None],
                 on_close: Callable[[int], None] | None = None) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._line = line
        self._on_close = on_close
        self._fd: int | None = None
        self.start = self.end = 0  # the events written here: [start, end)
        self.times: list[float] = []  # when each was written (time.monotonic())
        self.remainder = b""  # the part of the last chunk the socket did not take
        self.error: OSError | None = None

    @classmethod
    def for_request(cls, scope, line: Callable[[int, object], str | None],
                    on_close: Callable[[int], None] | None = None) -> SocketSink | None:
        """A sink for this request's response, or None where it cannot work (not served by
        our uvicorn protocol, TLS, no socket)."""
        cycle = scope.get("extensions", {}).get(SCOPE_KEY)
        transport = getattr(cycle, "transport", None)
        if transport is None or transport.get_extra_info("sslcontext") is not None or \
                transport.get_extra_info("socket") is None:
            return None
        return cls(cycle, line, on_close)

    # -- EventSink (under the request handle's lock) ---------------------------------------
    def attach(self, start: int) -> bool:
        cycle, transport = self._cycle, self._transport
        if not cycle.response_started or cycle.response_complete or cycle.disconnected or \
                cycle.chunked_encoding is not True or transport.is_closing() or \
                transport.get_write_buffer_size():
            return False
        if self._fd is None:
            try:
                self._fd = os.dup(transport.get_extra_info("socket").fileno())
            except (OSError, AttributeError, ValueError):
                return False
        self.start = self.end = start
        return True

    def take(self, events: list, finished: bool) -> bool:
        while self.end < len(events):
            line = self._line(self.end, events[self.end])
            if line is None:
                return False
            body = line.encode()
            chunk = b"%x\r\n%b\r\n" % (len(body), body)
            try:
                written = os.write(self._fd, chunk)
            except BlockingIOError:  # the socket's buffer is full: the transport queues it
                return False
            except OSError as exc:  # the client left (EPIPE, ECONNRESET)
                self.error = exc
                return False
            self.times.append(time.monotonic())
            self.end += 1
            if written < len(chunk):
                self.remainder = chunk[written:]
                return False
        return not finished

    # -- the route, on its event loop, once the sink stopped --------------------------------
    def sent(self, position: int) -> bool:
        return self.start <= position < self.end

    def flush(self) -> None:
        """Write what the socket did not take of the last chunk (through the transport)."""
        if self.remainder and not self._transport.is_closing():
            self._transport.write(self.remainder)
        self.remainder = b""

    def close(self) -> None:
        """The stream ended (the sink is detached by then): close the duplicate descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._on_close is not None:
                self._on_close(self.end - self.start)
