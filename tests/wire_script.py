"""A scripted HTTP server for client tests: it answers each request with exactly the bytes a test
chooses, split where the test chooses (tests/loadtest/test_wire.py, the load tester's and the
peer harness's readers)."""
from __future__ import annotations

import asyncio

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
