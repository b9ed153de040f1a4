"""The ASGI layer every request passes: request id, API key, body size limit, metrics, access log.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so streaming responses and
client-disconnect detection pass through untouched. The body is read here, at most
`max_body_bytes` (413 beyond, before any JSON parsing), and replayed to the app; later
`receive()` calls go to the server, so routes still see `http.disconnect`.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

from server.errors import ApiError, internal_error

log = logging.getLogger("camex.access")
error_log = logging.getLogger("camex.server")
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json",
                        "/docs/oauth2-redirect"})
LOG_FIELDS = "log_fields"  # scope["state"] key: extra fields routes add to the access log
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ServingMiddleware:
    def __init__(self, app, *, metrics, settings, known_paths: frozenset[str]) -> None:
        self.app = app
        self.known_paths = known_paths  # route label for requests rejected before routing
        self.metrics = metrics
        self.api_key = settings.api_key
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "started": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            error = self.check_auth(scope, headers)
            if error is None:
                receive, error = await self.read_body(scope, headers, receive)
            if error is not None:
                self.metrics.record_failure("unauthorized" if error.status == 401 else "validation")
                await error.response(scope["path"])(scope, receive, send_with_id)
            elif receive is not None:
                await self.app(scope, receive, send_with_id)
            else:
                status["code"] = 499  # client left while sending its body
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
            self.finish(scope, status["code"], time.monotonic() - start, request_id)

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
        while more:
            message = await receive()
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
