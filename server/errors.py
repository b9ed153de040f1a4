"""HTTP errors: one exception type, two wire shapes, one place that maps engine exceptions and
FastAPI's own validation errors onto status codes and sentences a user understands.

TGI routes answer TGI's `ErrorResponse`, `{"error", "error_type"}`, so TGI clients raise their
typed errors. OpenAI-compatible routes (`/v1/...`, and vLLM's `/tokenize`, `/detokenize`,
`/tokenizer_info`) answer OpenAI's `{"error": {"message", "type", "param", "code"}}`, so the
`openai` client shows the message. Every error is counted once in `camex_failures_total` by
`reason` (INTERFACES §3). A client mistake is never a 500; an unexpected exception is a 500 with
an opaque message (details go to the log only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from camex_runtime.errors import (ContextLengthError, EngineStoppedError, InputValidationError,
                                  QueueFullError)

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
OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


@dataclass
class ApiError(Exception):
    """An error response. `headers` carries e.g. Retry-After or WWW-Authenticate; `param` (the
    offending field) and `code` (a specific reason, default `error_type`) show in the OpenAI
    shape; `shape` forces "tgi" or "openai" where the path alone does not decide it."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None
    code: str | None = None
    shape: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}"

    def body(self, shape: str = "tgi") -> dict[str, Any]:
        if shape == "openai":
            return {"error": {"message": self.message, "type": openai_type(self.status),
                              "param": self.param, "code": self.code or self.error_type}}
        return {"error": self.message, "error_type": self.error_type}

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(self.shape or shape_for(path)), status_code=self.status,
                            headers=self.headers)


def shape_for(path: str) -> str:
    """"openai" for the OpenAI/vLLM-compatible paths, else "tgi"."""
    return "openai" if path.startswith(OPENAI_PATHS) else "tgi"


def openai_type(status: int) -> str:
    """OpenAI's error categories: the `openai` client keys its exception classes on the status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def validation(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(422, "validation", message, param=param, code=code)


def overloaded(retry_after_s: int = 1) -> ApiError:
    return ApiError(429, "overloaded",
                    "model is overloaded: the waiting queue is full, retry later",
                    {"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "5"})


def internal_error() -> ApiError:
    """The opaque 500 for an unexpected exception (details go to the log only)."""
    return ApiError(500, "internal", "internal server error")


@contextmanager
def engine_errors(context_error: Callable[[ContextLengthError], ApiError] | None = None):
    """Engine refusals as HTTP errors: bad input 422, full queue 429, stopping engine 503.
    `context_error` words a too-long request in an API's own terms (OpenAI's)."""
    try:
        yield
    except ContextLengthError as exc:
        raise (context_error(exc) if context_error else validation(str(exc))) from None
    except InputValidationError as exc:
        raise validation(str(exc)) from None
    except QueueFullError:
        raise overloaded() from None
    except EngineStoppedError as exc:
        raise unavailable(f"engine is not accepting requests: {exc}") from None


def unparsable_body(exc: StarletteHTTPException) -> str:
    """FastAPI's detail, or why its "There was an error parsing the body" (a body that is not
    JSON's UTF-8, or nests too deeply for the parser) happened."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (f"the body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset "
                f"{cause.start}): send JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return "the JSON body nests too deeply to be parsed"
    return str(exc.detail)


def install_error_handlers(app: FastAPI, record_failure) -> None:
    """`record_failure(reason)` increments `camex_failures_total`."""
    from server.validation_messages import describe

    def respond(request: Request, err: ApiError, body: Any = None) -> JSONResponse:
        reason = FAILURE_REASON.get(err.error_type)
        if reason is not None:
            record_failure(reason)
        if err.shape is None and request.url.path == "/tokenize" and \
                isinstance(body, dict) and "inputs" in body:
            err.shape = "tgi"  # TGI's /tokenize shares the path with vLLM's
        return err.response(request.url.path)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        if request.url.path == "/tokenize":  # its tagged union puts the tag in every location
            errs = [{**e, "loc": tuple(p for k, p in enumerate(e.get("loc", ()))
                                       if not (k == 1 and p in ("prompt", "messages", "inputs")))}
                    for e in errs]
        message, param = describe(errs, exc.body, request.headers.get("content-type"))
        err = validation(message, param)
        if any(e.get("type") == "json_invalid" for e in errs):
            # A body that is not JSON at all is 400, as the other unparsable bodies (FastAPI's
            # "error parsing the body") and as TGI, OpenAI and vLLM answer it; 422 stays for
            # well-formed JSON that breaks the schema.
            err.status = 400
        return respond(request, err, exc.body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 401: "unauthorized", 400: "validation", 422: "validation"}
        kind = kinds.get(exc.status_code, "internal" if exc.status_code >= 500 else "validation")
        return respond(request, ApiError(exc.status_code, kind, unparsable_body(exc),
                                         dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return respond(request, internal_error())
