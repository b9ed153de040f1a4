"""The ASGI layer every request passes: request id, Host check, API key, body size and time
limits, metrics, access log, and the last word on requests cut at shutdown.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so streaming responses and
client-disconnect detection pass through untouched. The body is read here, at most
`max_body_bytes` (413 beyond, before any JSON parsing) within `body_timeout_s` (408 beyond,
connection closed), and replayed to the app; later `receive()` calls go to the server, so
routes still see `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

from server.errors import ApiError, internal_error, overloaded, shape_for
from server.security import HostPolicy

log = logging.getLogger("camex.access")
error_log = logging.getLogger("camex.server")
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json",
                        "/docs/oauth2-redirect"})
LOG_FIELDS = "log_fields"  # scope["state"] key: extra fields routes add to the access log
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Generation routes share one bound on requests in flight, checked before the body is read:
# TGI's `max_concurrent_requests` (max_batch_size + max_waiting, as /info reports it). Beyond
# it the engine would refuse anyway, after a thread hop and tokenization that an overloaded
# server cannot afford; here the 429 costs a header parse.
GENERATION_PATHS = frozenset({"/generate", "/generate_stream", "/", "/v1/completions",
                              "/v1/chat/completions", "/v1/responses"})
# camex_failures_total reason of the errors answered here, before any route ran
# (a body too slow, 408, is the client's mistake like one too large: "validation")
FAILURE_OF_STATUS = {401: "unauthorized", 403: "unauthorized", 429: "overloaded"}


class ServingMiddleware:
    def __init__(self, app, *, state, api_key: str | None, hosts: HostPolicy,
                 known_paths: frozenset[str]) -> None:
        self.app = app
        self.known_paths = known_paths  # route label for requests rejected before routing
        self.state = state  # ServingState: in-flight count, draining
        self.metrics = state.metrics
        self.api_key = api_key
        self.hosts = hosts
        self.max_body = state.settings.max_body_bytes
        self.body_timeout_s = state.settings.body_timeout_s
        self.max_generations = state.settings.max_batch_size + state.settings.max_waiting
        # `/` classifies on a classifier-only server (bounded by the classify queue instead)
        self.generation_paths = GENERATION_PATHS - {"/"} if state.settings.classifier_only \
            else GENERATION_PATHS
        self.generations = 0  # generation requests in flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "started": False, "stream": False, "done": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                MutableHeaders(scope=message)["x-request-id"] = request_id
                status["stream"] = Headers(raw=message.get("headers", [])).get(
                    "content-type", "").startswith("text/event-stream")
            elif not message.get("more_body", False):
                status["done"] = True
            await send(message)

        self.state.http_in_flight += 1
        generation = scope["method"] == "POST" and scope["path"] in self.generation_paths
        self.generations += generation
        try:
            receive, error = await self.admit(scope, headers, receive, generation)
            if error is not None:
                self.metrics.record_failure(FAILURE_OF_STATUS.get(error.status, "validation"))
                await error.response(scope["path"])(scope, receive, send_with_id)
            elif receive is not None:
                await self.app(scope, receive, send_with_id)
            else:
                status["code"] = 499  # client left while sending its body
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            # uvicorn's shutdown deadline passed with this request still running (work that
            # ignores the engines' cut, e.g. a classify forward): answer it, no traceback.
            await self.answer_cut(scope, status, send_with_id)
        except Exception:
            # Answered here, not by Starlette's outer ServerErrorMiddleware: that one would send
            # the 500 without the request id and re-raise, so the server logs it a second time.
            if status["started"]:
                raise  # too late for an error response: let the server close the connection
            error_log.exception("unhandled error", extra={"path": scope.get("path"),
                                                          "request_id": request_id})
            self.metrics.record_failure("internal")
            await internal_error().response(scope["path"])(scope, receive, send_with_id)
        finally:
            self.state.http_in_flight -= 1
            self.generations -= generation
            self.finish(scope, status["code"], time.monotonic() - start, request_id)

    async def admit(self, scope, headers: Headers, receive, generation: bool):
        """Host, key, the generation bound, then the body: (replaying receive, None), or
        (receive, the error to answer), or (None, None) when the client left mid-body."""
        error = self.check_host(headers) or self.check_auth(scope, headers)
        if error is None and generation and self.generations > self.max_generations:
            error = overloaded()
        if error is not None:
            return receive, error
        return await self.read_body(scope, headers, receive)

    async def answer_cut(self, scope, status: dict, send) -> None:
        from server.shutdown import cut_error

        err = cut_error()
        self.metrics.record_failure("shutdown")
        error_log.warning("request cut at the shutdown deadline")
        try:
            if not status["started"]:
                response = err.response(scope["path"])
                response.headers["connection"] = "close"
                await response(scope, None, send)
            elif status["stream"] and not status["done"]:
                shape = shape_for(scope["path"])
                event = "data: " + json.dumps(err.body(shape)) + "\n\n"
                if shape == "openai":  # OpenAI streams always end with [DONE]
                    event += "data: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event.encode(),
                            "more_body": False})
        except Exception:  # the connection is going away anyway
            pass

    def check_host(self, headers: Headers) -> ApiError | None:
        host = headers.get("host", "")
        if self.hosts.allows(host):
            return None
        return ApiError(403, "forbidden", f"Host {host[:100]!r} is not served here (DNS "
                        "rebinding guard); use localhost/127.0.0.1, or start the server with "
                        "--allowed-hosts")

    def check_auth(self, scope, headers: Headers) -> ApiError | None:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.api_key.encode()):
            return None
        return ApiError(401, "unauthorized", "missing or invalid API key "
                        "(send `Authorization: Bearer <key>`)", {"WWW-Authenticate": "Bearer"})

    async def read_body(self, scope, headers: Headers, receive):
        """Buffer the body up to the limit; returns (replaying receive, error)."""
        too_large = ApiError(413, "payload_too_large",
                             f"request body exceeds the limit of {self.max_body} bytes")
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return receive, too_large
        chunks, size, more = [], 0, scope["method"] in ("POST", "PUT", "PATCH")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return receive, ApiError(408, "request_timeout", "the request body did not "
                                         f"arrive within {self.body_timeout_s:g}s",
                                         {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return receive, too_large
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay, None

    def finish(self, scope, status: int, seconds: float, request_id: str) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None)
        if label is None:
            label = scope["path"] if scope["path"] in self.known_paths else "unmatched"
        self.metrics.observe_request(label, status, seconds)
        extra = scope.get("state", {}).get(LOG_FIELDS, {})
        log.info("request", extra={**extra, "request_id": request_id,
                                   "method": scope.get("method"), "path": scope.get("path"),
                                   "route": label, "status": status,
                                   "duration_ms": round(seconds * 1000, 2)})


def log_fields(request) -> dict:
    """The dict whose items the access-log line of `request` will carry."""
    return request.scope.setdefault("state", {}).setdefault(LOG_FIELDS, {})
