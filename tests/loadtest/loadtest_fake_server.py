"""A real HTTP fake of the TGI-compatible server, with known delays and statuses.

Behaviour is scripted by the prompt, as space-separated ``key=value`` directives:
``status=429`` (answer that status with a JSON error), ``ttft=0.2`` (seconds before the first
token), ``itl=0.05`` (seconds between tokens), ``n=5`` (tokens to produce), ``error_after=2``
(stream: send an error event after 2 tokens), ``garbage=1`` (a 200 whose body is not
JSON), ``truncated=1`` (stream: stop before the final event). ``/generate`` sleeps
``ttft + itl*(n-1)`` and
``/classify`` sleeps ``ttft``. Every request body is kept in ``FakeServer.received``, its
``Authorization`` header in ``auth`` and the client's port (one per connection) in ``peers``.
Runs uvicorn in a thread on 127.0.0.1 with a free port; for tests only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


def directives(prompt: str) -> dict[str, float]:
    out = {"status": 200, "ttft": 0.0, "itl": 0.0, "n": 3, "error_after": -1, "garbage": 0,
           "truncated": 0}
    for item in prompt.split():
        key, sep, value = item.partition("=")
        if sep and key in out:
            out[key] = float(value)
    return out


def _error(d: dict) -> JSONResponse:
    status = int(d["status"])
    return JSONResponse({"error": f"scripted {status}", "error_type": "scripted"},
                        status_code=status,
                        headers={"Retry-After": "1"} if status == 429 else None)


class FakeServer:
    """Start with ``with FakeServer() as srv:``; ``srv.url`` is the base URL."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self.auth: list[str | None] = []
        self.peers: list[int] = []
        routes = [Route("/generate_stream", self._stream, methods=["POST"]),
                  Route("/generate", self._generate, methods=["POST"]),
                  Route("/classify", self._classify, methods=["POST"])]
        self.app = Starlette(routes=routes)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def clear(self) -> None:
        """Forget the requests seen so far."""
        self.received.clear()
        self.auth.clear()
        self.peers.clear()

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    async def _body(self, request: Request) -> tuple[dict, dict]:
        body = await request.json()
        self.received.append((request.url.path, body))
        self.auth.append(request.headers.get("authorization"))
        self.peers.append(request.client.port)
        inputs = body["inputs"]
        return body, directives(inputs if isinstance(inputs, str) else " ".join(inputs))

    async def _stream(self, request: Request):
        _, d = await self._body(request)
        if d["status"] != 200:
            return _error(d)
        n = int(d["n"])

        async def events():
            if d["garbage"]:
                yield "data: {not json\n\n"
                return
            for i in range(n - int(d["truncated"])):
                await asyncio.sleep(d["ttft"] if i == 0 else d["itl"])
                if i == d["error_after"]:
                    yield ("data: " + json.dumps({"error": "boom", "error_type": "generation"})
                           + "\n\n")
                    return
                last = i == n - 1
                event = {"index": i,
                         "token": {"id": i, "text": f" t{i}", "logprob": -0.5, "special": False},
                         "generated_text": "".join(f" t{j}" for j in range(n)) if last else None,
                         "details": ({"finish_reason": "length", "generated_tokens": n}
                                     if last else None)}
                yield "data: " + json.dumps(event) + "\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _generate(self, request: Request):
        _, d = await self._body(request)
        if d["status"] != 200:
            return _error(d)
        n = int(d["n"])
        await asyncio.sleep(d["ttft"] + d["itl"] * (n - 1))
        if d["garbage"]:
            return PlainTextResponse("this is not json")
        return JSONResponse({"generated_text": " t" * n,
                             "details": {"finish_reason": "length", "generated_tokens": n}})

    async def _classify(self, request: Request):
        _, d = await self._body(request)
        if d["status"] != 200:
            return _error(d)
        await asyncio.sleep(d["ttft"])
        return JSONResponse([{"label": "POSITIVE", "score": 0.75},
                             {"label": "NEGATIVE", "score": 0.25}])
