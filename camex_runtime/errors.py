"""Errors the runtime raises across its public boundary (the server maps them to HTTP codes).

This module knows nothing about HTTP; the mapping (422 / 429 / 503 / 504) lives in `server/`.
"""
from __future__ import annotations


class CamexRuntimeError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputValidationError(CamexRuntimeError, ValueError):
    """Bad request input (too long, bad parameter). The message states the numbers involved."""


class ContextLengthError(InputValidationError):
    """A prompt longer than `max_input_tokens`, or a prompt and its `max_new_tokens` longer than
    `max_total_tokens`. The numbers are attributes, so an API can word the refusal in its own
    terms (OpenAI's `context_length_exceeded`); they are also the exception's args, so it
    crosses a process boundary as it is."""

    def __init__(self, message: str, prompt_tokens: int, max_new_tokens: int,
                 max_input_tokens: int, max_total_tokens: int):
        super().__init__(message, prompt_tokens, max_new_tokens, max_input_tokens,
                         max_total_tokens)
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.max_input_tokens, self.max_total_tokens = max_input_tokens, max_total_tokens

    def __str__(self) -> str:
        return self.args[0]

    @property
    def prompt_too_long(self) -> bool:
        """The prompt alone is over `max_input_tokens` (else prompt + new tokens are over
        `max_total_tokens`)."""
        return self.prompt_tokens > self.max_input_tokens


class QueueFullError(CamexRuntimeError):
    """The bounded waiting queue is full: the caller should retry later (HTTP 429)."""


class QueueTimeoutError(CamexRuntimeError, TimeoutError):
    """A request waited longer than its `queue_timeout_s` before getting a slot (HTTP 504)."""


class EngineStoppedError(CamexRuntimeError):
    """The engine is stopping or stopped and accepts no new work (HTTP 503)."""


class RequestFailedError(CamexRuntimeError):
    """A request ended with finish_reason "error" (an internal failure while running it)."""
