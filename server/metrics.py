"""Prometheus metrics (INTERFACES §3): names, buckets and the two ways they are fed.

1. The server observes requests (route, status, latencies, tokens) directly.
2. The engine reports per-step observations through `EngineObserver` (batch size, merge time,
   router scores), and its counters/gauges (`Engine.stats()`) are read at scrape time by
   `EngineStatsCollector`, so cache hit counts are exactly the engine's.

Each app owns its own `CollectorRegistry`, so several apps (tests) never share counters. The
runtime never imports prometheus: this module is the only bridge.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# 1 ms ... 5 min, roughly x2.5 per bucket.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
SCORE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
FAILURE_REASONS = ("validation", "overloaded", "dropped", "timeout", "unauthorized", "internal",
                   "shutdown")
# Connections the server closed itself (server.connections): slow headers, evicted idle ones at
# the connection cap, refused at the cap; slow bodies are answered 408 per request instead.
CONNECTION_CLOSE_REASONS = ("header_timeout", "evicted", "over_capacity")


class ServerMetrics:
    """All `camex_*` metrics of one server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("camex_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("camex_request_duration_seconds",
                                          "HTTP request duration, including streaming",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = self._latency("camex_queue_time_seconds", "time waiting for a batch slot")
        self.ttft = self._latency("camex_time_to_first_token_seconds", "queued to first token")
        self.itl = self._latency("camex_inter_token_latency_seconds", "gap between tokens")
        self.e2e = self._latency("camex_e2e_latency_seconds", "queued to last token")
        self.prompt_tokens = Counter("camex_prompt_tokens", "prompt tokens of generation requests",
                                     registry=r)
        self.generated_tokens = Counter("camex_generated_tokens", "generated tokens", registry=r)
        self.stream_direct_tokens = Counter(
            "camex_stream_direct_tokens", "streamed token events the engine's side wrote to the "
            "client's socket itself, without waking the event loop (off with --no-stream-direct)",
            registry=r)
        self.cached_prompt_tokens = Counter(
            "camex_prompt_tokens_cached", "prompt tokens resumed from the prefix cache (not "
            "computed again; off with --no-prefix-caching)", registry=r)
        self.request_prompt_tokens = Histogram("camex_request_prompt_tokens",
                                               "prompt tokens per request", buckets=TOKEN_BUCKETS,
                                               registry=r)
        self.request_generated_tokens = Histogram("camex_request_generated_tokens",
                                                  "generated tokens per request",
                                                  buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("camex_batch_size", "running sequences per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.merge_duration = self._latency(
            "camex_merge_duration_seconds", "time to build merged expert weights (cache misses; "
            "a short prompt segment's merge includes applying it, done in the same pass)")
        self.router_score = Histogram("camex_router_score", "router softmax score per routing "
                                      "decision", ["layer", "expert"], buckets=SCORE_BUCKETS,
                                      registry=r)
        self.failures = Counter("camex_failures", "failed requests by reason", ["reason"],
                                registry=r)
        for reason in FAILURE_REASONS:  # export zeros so alerts see the series from the start
            self.failures.labels(reason)
        self.classified = Counter("camex_classified_sequences", "texts classified", registry=r)
        self.open_connections = Gauge("camex_open_connections", "open client connections",
                                      registry=r)
        self.connections_closed = Counter("camex_connections_closed", "connections the server "
                                          "closed: slow headers, evicted or refused at the cap",
                                          ["reason"], registry=r)
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason)
        self.build_info = Gauge("camex_build_info", "constant 1; labels describe the build",
                                ["version", "model", "kind"], registry=r)

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)

    def record_failure(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def failure_count(self, reason: str) -> float:
        return self.registry.get_sample_value("camex_failures_total", {"reason": reason}) or 0.0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def observe_generation(self, timings, prompt_tokens: int, generated_tokens: int,
                           cached_tokens: int | None = None) -> None:
        """`timings` is the engine's RequestTimings (time.monotonic() stamps, any may be None);
        `cached_tokens`: prompt tokens the prefix cache held (None: prefix caching off)."""
        self.prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.cached_prompt_tokens.inc(cached_tokens)
        self.generated_tokens.inc(generated_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generated_tokens.observe(generated_tokens)
        queued = timings.queued_at
        if timings.scheduled_at is not None:
            self.queue_time.observe(max(0.0, timings.scheduled_at - queued))
        if timings.first_token_at is not None:
            self.ttft.observe(max(0.0, timings.first_token_at - queued))
        if timings.finished_at is not None:
            self.e2e.observe(max(0.0, timings.finished_at - queued))


class EngineObserver:
    """Passed to `Engine.from_pretrained(observer=...)`; called from the engine thread."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.m.batch_size.observe(batch_size)

    def on_merge(self, layer: int, seconds: float, hit: bool) -> None:
        if not hit:
            self.m.merge_duration.observe(seconds)

    def on_route(self, layer: int, scores: list[float]) -> None:
        for expert, score in enumerate(scores):
            self.m.router_score.labels(str(layer), str(expert)).observe(score)

    def on_evict(self, count: int) -> None:
        pass  # evictions are read from Engine.stats() at scrape time


class StatsReader:
    """`engine.stats()` with a deadline: a wedged engine (holding its lock) must turn probes
    and scrapes into "stuck", not hang them. At most two reader threads can be stuck at once."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="camex-stats")

    def read(self, engine) -> object | None:
        """EngineStats, or None when the engine did not answer in time."""
        try:
            return self._pool.submit(engine.stats).result(timeout=self.timeout_s)
        except FutureTimeout:
            return None

    async def aread(self, engine) -> object | None:
        """`read` for the event loop: awaits the reader thread, holds no other thread."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._pool.submit(engine.stats)),
                                          self.timeout_s)
        except asyncio.TimeoutError:
            return None


class EngineStatsCollector:
    """Reads `Engine.stats()` of every loaded engine when Prometheus scrapes."""

    def __init__(self, engines: Callable[[], Iterable], reader: StatsReader,
                 stale_s: float) -> None:
        self.engines = engines
        self.reader = reader
        self.stale_s = stale_s

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: names are fixed below

    def collect(self) -> Iterable[Metric]:
        all_stats = [self.reader.read(e) for e in self.engines()]
        stats = [s for s in all_stats if s is not None]
        caches = [s.cache for s in stats]
        counters = {"hits": "cache hits", "misses": "cache misses (a merge was computed)",
                    "evictions": "entries evicted to stay in budget",
                    "fallbacks": "steps that used mixture because the budget was exhausted"}
        for attr, doc in counters.items():
            yield CounterMetricFamily(f"camex_merge_cache_{attr}", f"merged-weight {doc}",
                                      value=sum(getattr(c, attr) for c in caches))
        gauges = (
            ("camex_merge_cache_bytes", "bytes held by merged weights",
             sum(c.bytes_used for c in caches)),
            ("camex_merge_cache_budget_bytes", "merged-weight byte budget",
             sum(c.bytes_budget for c in caches)),
            ("camex_running_requests", "sequences in the running batch",
             sum(s.running for s in stats)),
            ("camex_waiting_requests", "requests in the waiting queue",
             sum(s.waiting for s in stats)),
            ("camex_engine_up", "1 while every engine loop heartbeats",
             float(bool(all_stats) and all(s is not None and engine_alive(s, self.stale_s)
                                           for s in all_stats))),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


def engine_alive(stats, stale_s: float, now: float | None = None) -> bool:
    """The loop thread runs and has iterated within `stale_s` seconds."""
    now = time.monotonic() if now is None else now
    return bool(stats.alive) and (now - stats.heartbeat) <= stale_s
