"""HTTP errors: one exception type, one JSON body `{"error", "error_type"}`, one place that maps
engine exceptions and FastAPI's own validation errors onto status codes.

The body matches TGI's `ErrorResponse` so TGI clients raise their typed errors. Every error is
counted once in `camex_failures_total` by `reason` (INTERFACES §3). A client mistake is never a
500; an unexpected exception is a 500 with an opaque message (details go to the log only).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from camex_runtime.errors import EngineStoppedError, InputValidationError, QueueFullError

log = logging.getLogger("camex.server")

# error_type -> camex_failures_total reason (None: not a failure of the service, e.g. 404)
FAILURE_REASON = {
    "validation": "validation",
    "payload_too_large": "validation",
    "overloaded": "overloaded",
    "queue_timeout": "timeout",
    "unauthorized": "unauthorized",
    "generation": "internal",
    "internal": "internal",
    "unavailable": None,
    "shutdown": "shutdown",  # cut by the shutdown deadline (server.shutdown)
    "client_closed": None,  # counted as "dropped" where the generation is cancelled
    "not_found": None,
    "method_not_allowed": None,
}


@dataclass
class ApiError(Exception):
    """An error response. `headers` carries e.g. Retry-After or WWW-Authenticate."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}"

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation(message: str) -> ApiError:
    return ApiError(422, "validation", message)


def overloaded(retry_after_s: int = 1) -> ApiError:
    return ApiError(429, "overloaded", "model is overloaded: the waiting queue is full, retry later",
                    {"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "5"})


def internal_error() -> ApiError:
    """The opaque 500 for an unexpected exception (details go to the log only)."""
    return ApiError(500, "internal", "internal server error")


@contextmanager
def engine_errors():
    """Engine refusals as HTTP errors: bad input 422, full queue 429, stopping engine 503."""
    try:
        yield
    except InputValidationError as exc:
        raise validation(str(exc)) from None
    except QueueFullError:
        raise overloaded() from None
    except EngineStoppedError as exc:
        raise unavailable(f"engine is not accepting requests: {exc}") from None


def format_validation_errors(errors: list[dict]) -> str:
    """FastAPI's error list as one readable line: `body.parameters.top_p: Input should be ...`."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, record_failure) -> None:
    """`record_failure(reason)` increments `camex_failures_total`."""

    def respond(err: ApiError) -> JSONResponse:
        reason = FAILURE_REASON.get(err.error_type)
        if reason is not None:
            record_failure(reason)
        return err.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation(format_validation_errors(list(exc.errors())))
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            # A body that is not JSON at all is 400, as the other unparsable bodies (FastAPI's
            # "error parsing the body") and as TGI, OpenAI and vLLM answer it; 422 stays for
            # well-formed JSON that breaks the schema.
            err.status = 400
        return respond(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 401: "unauthorized", 400: "validation", 422: "validation"}
        kind = kinds.get(exc.status_code, "internal" if exc.status_code >= 500 else "validation")
        return respond(ApiError(exc.status_code, kind, str(exc.detail), dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return respond(internal_error())
