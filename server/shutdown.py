"""Graceful shutdown: on SIGTERM stop taking work, give in-flight requests `grace_s`, then cut
what is left with an answer instead of a dropped connection.

Timeline (t = 0 at SIGTERM):
- t = 0: the listening socket closes (uvicorn), idle keep-alive connections close, `/ready`
  turns 503, engines and the classify queue refuse new work (503).
- 0 … grace_s: running and queued requests continue; most finish.
- t = grace_s: the engines cancel what is left; each cut request is answered `503` with
  `Retry-After: 1` (`error_type: "shutdown"`), or, if its stream had started, gets a final
  in-stream error event; classify calls still queued are cut the same way. Each is counted
  as `camex_failures_total{reason="shutdown"}`, never as a client drop.
- t ≤ grace_s + CUT_MARGIN_S: uvicorn's own deadline. Only work that ignores the cut (a
  classify forward already running) can reach it; the middleware then answers it the same way.

The counter is scraped only if a scrape lands before the process exits, so the drain also
logs one line with its outcome (`drained`: in flight at SIGTERM, cut). Knows the state and
the engines' `stop`, not routes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from server import errors

log = logging.getLogger("camex.server")
CUT_MARGIN_S = 5.0  # after the cut, time for the cut requests' answers to go out


def cut_error() -> errors.ApiError:
    """What a request cut by the shutdown deadline receives."""
    return errors.ApiError(503, "shutdown", "the server is shutting down and stopped this "
                           "request before it finished; retry it", {"Retry-After": "1"})


def uvicorn_grace(grace_s: float) -> int:
    """uvicorn's graceful-shutdown timeout: our deadline plus the margin to answer cuts."""
    return int(grace_s + CUT_MARGIN_S + 0.999)


class Drain:
    """One shutdown of one `ServingState`; `begin` runs on the event loop, once."""

    def __init__(self, state, grace_s: float) -> None:
        self.state = state
        self.grace_s = grace_s
        self.started_at: float | None = None
        self._thread: threading.Thread | None = None
        self._cut_before = 0.0
        self._in_flight_at_start = 0

    def begin(self) -> None:
        state = self.state
        self.started_at = time.monotonic()
        self._cut_before = state.metrics.failure_count("shutdown")
        self._in_flight_at_start = state.http_in_flight
        state.draining = True
        state.classify_queue.close("the server is shutting down; retry on another replica")
        log.info("draining", extra={"grace_s": self.grace_s,
                                    "in_flight": self._in_flight_at_start})
        loop = asyncio.get_running_loop()
        loop.call_later(self.grace_s, self._cut_classify)
        self._thread = threading.Thread(target=self._stop_engines, name="camex-drain",
                                        daemon=True)
        self._thread.start()

    def _cut_classify(self) -> None:
        cut = self.state.classify_queue.cut(cut_error())
        if cut:
            log.info("classify calls cut at the shutdown deadline", extra={"cut": cut})

    def _stop_engines(self) -> None:
        """engine.stop: refuse new work, wait up to grace_s, cancel the rest (each cancelled
        request is then answered by its route with `cut_error`)."""
        engines = self.state.engines()
        threads = [threading.Thread(target=e.stop, kwargs={"grace_s": self.grace_s},
                                    name=f"camex-stop-{e.kind}") for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def wait(self) -> None:
        """Until the engines have stopped; then log the outcome."""
        if self._thread is not None:
            self._thread.join()
        cut = self.state.metrics.failure_count("shutdown") - self._cut_before
        log.info("drained", extra={"in_flight": self._in_flight_at_start, "cut": int(cut),
                                   "seconds": round(time.monotonic() - self.started_at, 2)})
