"""Errors the runtime raises across its public boundary (the server maps them to HTTP codes).

This module knows nothing about HTTP; the mapping (422 / 429 / 503 / 504) lives in `server/`.
"""
from __future__ import annotations


class CamexRuntimeError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputValidationError(CamexRuntimeError, ValueError):
    """Bad request input (too long, bad parameter). The message states the numbers involved."""


class QueueFullError(CamexRuntimeError):
    """The bounded waiting queue is full: the caller should retry later (HTTP 429)."""


class QueueTimeoutError(CamexRuntimeError, TimeoutError):
    """A request waited longer than its `queue_timeout_s` before getting a slot (HTTP 504)."""


class EngineStoppedError(CamexRuntimeError):
    """The engine is stopping or stopped and accepts no new work (HTTP 503)."""


class RequestFailedError(CamexRuntimeError):
    """A request ended with finish_reason "error" (an internal failure while running it)."""
