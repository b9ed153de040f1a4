"""`server.direct_stream.SocketSink` on real TCP sockets over 127.0.0.1 and a real event-loop
transport (uvloop, as the server runs, and asyncio's): whatever the socket takes, the bytes the
client reads are every chunk once, in order; a short write leaves its rest to the transport; a
closed peer stops the sink; it never writes to a descriptor number uvicorn gave up; it attaches
only when nothing else is in flight. (End to end through the server:
tests/e2e/test_stream_direct.py.)"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import uvloop

from server import direct_stream
from server.direct_stream import SocketSink

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@dataclass
class Ev:
    text: str
    finish_reason: str | None = None


def line(position: int, ev: Ev) -> str | None:
    return None if ev.finish_reason else f"data: {position}:{ev.text}\n\n"


def chunk(text: str) -> bytes:
    body = text.encode()
    return b"%x\r\n%b\r\n" % (len(body), body)


def run(loop_name: str, coro_fn):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


async def connected(sndbuf: int | None = None, rcvbuf: int | None = None):
    """(server-side transport, its cycle stand-in, the client's socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    if sndbuf:
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        asyncio.Protocol, server_sock)
    cycle = SimpleNamespace(transport=transport, response_started=True, response_complete=False,
                            disconnected=False, chunked_encoding=True)
    return transport, cycle, client


async def read_exactly(client: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    client.setblocking(False)
    data = b""
    while len(data) < n:
        got = await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 10)
        assert got, f"the connection closed after {len(data)} of {n} bytes"
        data += got
    return data


async def client_reads(client: socket.socket, events, first: int) -> None:
    """The client reads every event's chunk from position `first` on, once, in order."""
    expected = b"".join(chunk(line(first + i, ev) or "final") for i, ev in enumerate(events))
    assert await read_exactly(client, len(expected)) == expected


async def route_takes_over(sink: SocketSink, transport, events) -> None:
    """What the route does once the sink stopped: the rest of the short chunk, then every
    event after the sink's through the transport (as uvicorn's send would)."""
    sink.flush()
    for i in range(sink.end, len(events)):
        transport.write(chunk(line(i, events[i]) or "final"))
        await asyncio.sleep(0)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_short_write_leaves_the_rest_to_the_transport(loop_name, monkeypatch):
    events = [Ev(f"token {i} " * 5) for i in range(12)] + [Ev("end", "length")]
    real_write, calls = os.write, []

    def short_fifth(fd, data):  # the socket takes 7 bytes of the 5th chunk
        calls.append(len(data))
        return real_write(fd, data[:7] if len(calls) == 5 else data)
    monkeypatch.setattr(direct_stream.os, "write", short_fifth)

    async def main():
        transport, cycle, client = await connected()
        sink = SocketSink(cycle, line)
        assert sink.attach(2)  # two events went out through the loop before the hand-over
        assert sink.take(events[:4], False)  # it keeps taking ...
        assert not sink.take(events, False)  # ... until the socket takes part of a chunk
        assert (sink.start, sink.end, len(sink.times)) == (2, 7, 5)
        assert sink.remainder == chunk(line(6, events[6]))[7:]
        await route_takes_over(sink, transport, events)
        await client_reads(client, events[2:], 2)
        for end in (sink, transport, client):
            end.close()
    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_full_socket_refuses_and_every_byte_still_arrives_once(loop_name):
    """Small buffers on both ends (set, so the kernel does not grow them) and a client that
    reads nothing: the sink's writes come back short or refused; once the client reads, it gets
    the sink's bytes then the transport's, exactly."""
    events = [Ev("x" * 700 + str(i)) for i in range(400)] + [Ev("end", "length")]

    async def main():
        transport, cycle, client = await connected(sndbuf=4096, rcvbuf=4096)
        sink = SocketSink(cycle, line)
        assert sink.attach(0)
        assert not sink.take(events, False)
        assert 0 < sink.end < 100  # ~290 kB do not fit: it stopped early
        await route_takes_over(sink, transport, events)
        await client_reads(client, events, 0)
        for end in (sink, transport, client):
            end.close()
    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_reset_stops_the_sink(loop_name):
    events = [Ev(f"t{i}") for i in range(50)]

    async def main():
        transport, cycle, client = await connected()
        sink = SocketSink(cycle, line)
        assert sink.attach(0)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, as a client killed mid-stream
        await asyncio.sleep(0.05)
        assert not sink.take(events, False)
        assert isinstance(sink.error, OSError) and sink.end < len(events)
        sink.close()
        transport.close()
    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_it_never_writes_to_a_descriptor_number_given_up_and_reused(loop_name):
    """uvicorn may close its descriptor while the sink still holds events (a connection lost);
    the next socket opened can get the same number at once. The sink writes to its duplicate:
    the bytes go to the connection it was made for, none to the newcomer."""
    async def main():
        transport, cycle, client = await connected()
        number = transport.get_extra_info("socket").fileno()
        sink = SocketSink(cycle, line)
        assert sink.attach(0)
        other, peer_of_other = socket.socketpair()  # (numbers other than that one)
        transport.close()
        await asyncio.sleep(0.05)  # the loop closes the descriptor
        os.dup2(other.fileno(), number)  # the number now names another live connection
        events = [Ev("a"), Ev("b")]
        assert sink.take(events, False)
        expected = chunk(line(0, events[0])) + chunk(line(1, events[1]))
        assert await read_exactly(client, len(expected)) == expected
        peer_of_other.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer_of_other.recv(100)  # nothing for the connection now on that number
        sink.close()
        for s in (other, peer_of_other, client):
            s.close()
        os.close(number)
    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_it_attaches_only_when_nothing_else_is_in_flight(loop_name):
    async def main():
        transport, cycle, client = await connected(sndbuf=4096, rcvbuf=4096)
        sink = SocketSink(cycle, line)
        for field, value in (("response_started", False), ("response_complete", True),
                             ("disconnected", True), ("chunked_encoding", False)):
            setattr(cycle, field, value)
            assert not sink.attach(0), field
            setattr(cycle, field, not value)
        assert sink.attach(0)
        transport.write(b"y" * 500_000)  # the client reads nothing: the transport buffers
        assert transport.get_write_buffer_size() > 0
        assert not sink.attach(0)  # its bytes would overtake the buffered ones
        transport.abort()
        assert not sink.attach(0)
        sink.close()
        client.close()
    run(loop_name, main)


def test_requests_not_served_by_our_protocol_get_no_sink():
    assert SocketSink.for_request({"type": "http"}, line) is None
    tls = SimpleNamespace(transport=SimpleNamespace(
        get_extra_info=lambda key: object() if key in ("sslcontext", "socket") else None))
    assert SocketSink.for_request({"extensions": {direct_stream.SCOPE_KEY: tls}}, line) is None
