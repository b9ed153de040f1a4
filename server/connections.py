"""Connection hygiene below HTTP: a header deadline and a cap on open connections.

uvicorn keeps a connection that never finishes its request headers open forever, so a few
hundred half-sent requests (slowloris) exhaust the process's file descriptors and lock out
everyone, probes included. `guarded_protocol` wraps uvicorn's HTTP protocol class so that:

- a connection must deliver complete request headers within `header_timeout_s` of opening
  (or, on a keep-alive connection, of the next request's first byte); otherwise it is closed,
  with `408 Request Timeout` when part of a request had arrived;
- the request's uvicorn cycle is in its ASGI scope (`server.direct_stream`: streams may write
  their token events to the socket themselves);
- at most `max_connections` are open. At the cap, a new connection first evicts the connection
  that has been idle longest (no request in flight: not yet sent headers, or keep-alive idle),
  so half-open sockets cannot crowd out a prober; only when every connection has a request in
  flight is the new one answered `503` (`Connection: close`, `Retry-After: 1`) and closed.

The body deadline (`body_timeout_s`, 408) is enforced per request in `server.middleware`; idle
keep-alive connections close after `keep_alive_s` (uvicorn's `timeout_keep_alive`).
`fit_fd_limit` makes sure the cap is reached before the descriptor limit is. Knows uvicorn's
protocol hooks and nothing about routes.
"""

from __future__ import annotations

import json
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable

from server import direct_stream

log = logging.getLogger("camex.server")
FD_RESERVE = 128  # descriptors kept for everything but client sockets: model files, logs, pipes
# A refused connection is half-closed and drained for up to LINGER_S before it is closed:
# closing a socket with unread request bytes sends a TCP reset, which can destroy the 503
# before the client reads it. At most MAX_LINGERING at once, so a flood cannot use the
# descriptors the cap protects; beyond that a refused connection is closed at once.
LINGER_S = 1.0
MAX_LINGERING = 64


def _raw_response(status: str, message: str, error_type: str, retry_after: int | None) -> bytes:
    body = json.dumps({"error": message, "error_type": error_type},
                      separators=(",", ":")).encode()  # as the app's JSON responses
    head = [f"HTTP/1.1 {status}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY_RESPONSE = _raw_response("503 Service Unavailable", "too many open connections; retry "
                              "shortly", "overloaded", retry_after=1)
HEADER_TIMEOUT_RESPONSE = _raw_response("408 Request Timeout", "request headers were not "
                                        "received in time", "request_timeout", None)


class ConnectionGuard:
    """Shared by every connection of one server: the idle set (oldest first) and the limits.
    `on_close(reason)` counts connections the guard closed (reason: header_timeout,
    evicted, over_capacity)."""

    def __init__(self, max_connections: int, header_timeout_s: float,
                 on_close: Callable[[str], None] = lambda reason: None) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.on_close = on_close
        self.open = 0
        self.lingering = 0  # refused connections being drained before close
        self._idle: OrderedDict[object, None] = OrderedDict()  # insertion = idle since

    def opened(self, conn) -> bool:
        """Register `conn`; False when it must be refused (at the cap, nobody idle)."""
        if self.open >= self.max_connections:
            victim = next(iter(self._idle), None)
            if victim is None:
                self.on_close("over_capacity")
                return False
            victim.close_by_guard("evicted")
        self.open += 1
        self.idle(conn)
        return True

    def idle(self, conn) -> None:
        self._idle.pop(conn, None)
        self._idle[conn] = None

    def busy(self, conn) -> None:
        self._idle.pop(conn, None)

    def closed(self, conn) -> None:
        self._idle.pop(conn, None)
        self.open -= 1


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's httptools protocol class, applying `guard` (its parser callbacks are the
    hooks: headers complete, response complete)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base

    class GuardedHttpProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._counted = False
            self._header_timer = None
            self._partial = False  # bytes of a not yet complete request arrived
            self._refused = self._lingering = False
            if not guard.opened(self):
                self._refuse(transport)
                return
            self._counted = True
            self._arm_header_timer()

        def _refuse(self, transport) -> None:
            """503 and close; half-close and drain first when few others linger."""
            self._refused = True
            transport.write(BUSY_RESPONSE)
            if guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
                transport.close()
                return
            guard.lingering += 1
            self._lingering = True
            transport.write_eof()
            self._header_timer = self.loop.call_later(LINGER_S, transport.close)

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            if self._lingering:
                self._lingering = False
                guard.lingering -= 1
            if self._counted:
                self._counted = False
                guard.closed(self)
            super().connection_lost(exc)

        def eof_received(self):
            if self._refused:  # the client read the 503 and closed its side: done
                self.transport.close()
                return False
            return super().eof_received()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # draining a refused connection: the request is never parsed
            if self._header_timer is None and not self._in_flight():
                self._arm_header_timer()  # keep-alive: the next request's first byte
            self._partial = True
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._partial = False
            guard.busy(self)
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            if cycle is not None and cycle.scope is self.scope:  # (its task has not run yet)
                # streams may write their token events to the socket themselves
                self.scope.setdefault("extensions", {})[direct_stream.SCOPE_KEY] = cycle

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request
            if self._counted and not self.transport.is_closing() and not self._in_flight():
                guard.idle(self)

        def _in_flight(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(guard.header_timeout_s,
                                                      self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._in_flight():
                self.close_by_guard("header_timeout", HEADER_TIMEOUT_RESPONSE
                                    if self._partial else None)

        def close_by_guard(self, reason: str, response: bytes | None = None) -> None:
            if self._counted:
                self._counted = False
                guard.closed(self)
            guard.on_close(reason)
            self._cancel_header_timer()
            if not self.transport.is_closing():
                if response is not None:
                    self.transport.write(response)
                self.transport.close()

    GuardedHttpProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedHttpProtocol


def fit_fd_limit(max_connections: int) -> int:
    """Raise the soft descriptor limit so `max_connections` sockets fit beside FD_RESERVE
    others (up to the hard limit); returns the connection cap that really fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - FD_RESERVE)
        log.warning("max_connections lowered to fit the open-file limit",
                    extra={"max_connections": fitted, "requested": max_connections,
                           "nofile_soft": soft, "nofile_hard": hard})
        return fitted
    return max_connections
