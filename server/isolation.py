"""Where blocking work runs, so that one kind of work never starves another.

- `/classify` runs on its own `classify_workers` threads behind `ClassifyQueue`: at most
  `max_waiting` calls wait (429 beyond), a call not started within `queue_timeout_s` gets 504,
  and a shutdown cuts the calls still waiting (503). Its threads are never anyio's shared pool,
  which generation submits (tokenization) use.
- `/metrics` and `/info` run on two "ops" threads of their own; `/health` and `/ready` hop to no
  thread at all except the deadline-bounded engine stats read (`server.metrics.StatsReader`).
- Few, long-lived threads also bound memory: glibc gives every thread that allocates its own
  malloc arena, and an arena keeps what it once held. When the classify queue goes idle after
  a burst, `release_memory()` hands freed heap pages back to the OS (`malloc_trim`).

Knows no routes and no engine: callers pass plain callables.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from collections.abc import Callable

from server import errors

log = logging.getLogger("camex.server")
T = TypeVar("T")
TRIM_IDLE_S = 1.0  # idle time after a classify burst before the heap is trimmed


class ClassifyQueue:
    """A FIFO of /classify calls in front of a fixed set of worker threads."""

    def __init__(self, workers: int, max_waiting: int, queue_timeout_s: float,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.on_idle = on_idle  # called on a worker thread once the queue has drained
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="camex-classify")
        self._busy = 0  # calls on a worker now
        self._waiters: deque[asyncio.Future] = deque()
        self._closed: str | None = None  # set at shutdown: why new calls are refused
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    @property
    def running(self) -> int:
        return self._busy

    async def run(self, call: Callable[[], T]) -> T:
        """Run `call` on a worker; ApiError 429 (queue full), 504 (waited too long), 503
        (shutting down). Cancelling a waiting call leaves the queue; a running one finishes
        on its thread (a forward cannot be interrupted) and only then frees its worker."""
        if self._closed:
            raise errors.unavailable(self._closed)
        await self._acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(call)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    async def _acquire(self) -> None:
        if self._busy < self.workers and not self.waiting:
            self._busy += 1
            return
        if self.waiting >= self.max_waiting:
            raise errors.overloaded()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # granted just as the caller went away: pass the worker on
            waiter.cancel()
            raise
        if not waiter.done():
            waiter.cancel()
            raise errors.ApiError(504, "queue_timeout", "classification waited more than "
                                  f"{self.queue_timeout_s:g}s in the queue; retry later")
        waiter.result()  # raises the shutdown error when the queue was cut

    def _release(self) -> None:
        """A worker is free: hand it to the oldest live waiter, else count it idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._busy -= 1
        if self._busy == 0 and self.on_idle is not None:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(TRIM_IDLE_S, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self._busy == 0 and not self._closed:
            self._pool.submit(self.on_idle)

    def close(self, reason: str) -> None:
        """Refuse new calls from now on (503 with `reason`); waiting ones keep their place."""
        self._closed = reason

    def cut(self, error: errors.ApiError) -> int:
        """Fail every call still waiting with `error`; returns how many were cut."""
        cut = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                cut += 1
        return cut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OpsPool:
    """Two threads for /metrics and /info: scrapes never queue behind model work."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="camex-ops")

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_libc = None
_trim_lock = threading.Lock()


def release_memory() -> bool:
    """Return freed malloc memory to the OS (glibc `malloc_trim(0)`, every arena). Returns
    whether anything was released; a no-op off glibc."""
    global _libc
    with _trim_lock:
        if _libc is None:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _libc = False
        if not _libc:
            return False
        start = time.perf_counter()
        released = bool(_libc.malloc_trim(0))
        log.debug("malloc_trim", extra={"released": released,
                                        "ms": round((time.perf_counter() - start) * 1e3, 1)})
        return released
