"""Continuous-batching scheduler: which requests run this step. Holds no tensors.

Every step the engine calls `schedule(now)`: cancelled and queue-timed-out requests leave,
waiting requests are admitted FIFO into free slots (bounded by `max_batch_size` and a
per-step prefill token budget), and everything already running decodes one token. After
the model ran, the engine calls `finish(req)` for requests that ended, which frees their slot
at once so a waiting request can join in the next step.

It works on any object with `request_id`, `num_prompt_tokens`, `queue_deadline`,
`cancel_requested` and a writable `slot` (tests use plain objects). It knows nothing about
models, tokens or sampling; length limits are checked here because they are admission rules.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from camex_runtime.errors import InputValidationError, QueueFullError


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8  # running requests (= KV-cache slots)
    max_waiting: int = 64  # bounded queue: beyond this submit raises QueueFullError
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048  # prompt + generated, per request (= KV-cache row length)
    # Prompt tokens admitted per step: bounds how long one step's prefills stall the running
    # decodes. At least one waiting request is admitted per step whatever its length.
    max_prefill_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_tokens", "max_total_tokens",
                     "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be < "
                             f"max_total_tokens ({self.max_total_tokens})")


@dataclass
class SchedulerOutput:
    prefill: list[Any] = field(default_factory=list)  # admitted this step (slot assigned)
    decode: list[Any] = field(default_factory=list)  # running: one new token each
    timed_out: list[Any] = field(default_factory=list)  # dropped from the queue: too old
    cancelled: list[Any] = field(default_factory=list)  # dropped (waiting or running)

    @property
    def batch_size(self) -> int:
        return len(self.prefill) + len(self.decode)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Any] = deque()
        self.running: dict[str, Any] = {}
        self._free_slots = list(range(config.max_batch_size))  # min-heap: lowest slot first
        heapq.heapify(self._free_slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_lengths(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Admission rule on lengths; raises InputValidationError naming the numbers."""
        c = self.config
        if num_prompt_tokens < 1:
            raise InputValidationError("the prompt is empty (0 tokens)")
        if num_prompt_tokens > c.max_input_tokens:
            raise InputValidationError(
                f"the prompt has {num_prompt_tokens} tokens; max_input_tokens is "
                f"{c.max_input_tokens}")
        if num_prompt_tokens + max_new_tokens > c.max_total_tokens:
            raise InputValidationError(
                f"prompt tokens ({num_prompt_tokens}) + max_new_tokens ({max_new_tokens}) "
                f"= {num_prompt_tokens + max_new_tokens} exceeds max_total_tokens "
                f"({c.max_total_tokens})")

    def add(self, req: Any) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)}/{self.config.max_waiting})")
        self.waiting.append(req)

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_cancelled_and_expired(now, out)
        # In slot order: a request that joined into a freed lower slot would otherwise leave
        # the batch's slots out of order for good, and the KV cache can hand attention a view
        # only for an ascending contiguous slot range (else it gathers every layer, every step).
        out.decode = sorted(self.running.values(), key=lambda r: r.slot)
        budget = self.config.max_prefill_tokens
        while self.waiting and self._free_slots:
            req = self.waiting[0]
            if out.prefill and req.num_prompt_tokens > budget:
                break  # FIFO: later requests wait behind this one rather than overtaking it
            self.waiting.popleft()
            req.slot = heapq.heappop(self._free_slots)
            self.running[req.request_id] = req
            out.prefill.append(req)
            budget -= req.num_prompt_tokens
        return out

    def finish(self, req: Any) -> None:
        """Remove a running request and free its slot (idempotent)."""
        if self.running.pop(req.request_id, None) is not None:
            heapq.heappush(self._free_slots, req.slot)

    def drain_waiting(self) -> list[Any]:
        """Remove and return every waiting request (engine shutdown)."""
        reqs, self.waiting = list(self.waiting), deque()
        return reqs

    def _drop_cancelled_and_expired(self, now: float, out: SchedulerOutput) -> None:
        keep: deque[Any] = deque()
        for req in self.waiting:
            if req.cancel_requested:
                out.cancelled.append(req)
            elif req.queue_deadline is not None and now > req.queue_deadline:
                out.timed_out.append(req)
            else:
                keep.append(req)
        self.waiting = keep
        for req in [r for r in self.running.values() if r.cancel_requested]:
            self.finish(req)
            out.cancelled.append(req)
