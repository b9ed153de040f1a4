"""What one server process serves: its engines, their loading, readiness and liveness.

Loading (and building the demo checkpoints when no model is given) runs in a background thread
so the HTTP port answers at once: `/health` is 200 while loading progresses, `/ready` turns 200
only once every engine is loaded, started and warmed up. A load failure makes both 503 and calls
`on_fatal` (the CLI then exits non-zero). Shutdown is `server.shutdown.Drain`. Knows no routes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from server import errors
from server.chat_template import check_template
from server.isolation import ClassifyQueue, OpsPool, release_memory
from server.logs import adopt_library_logging
from server.preflight import FLAG_OF
from server.metrics import EngineObserver, ServerMetrics, StatsReader, engine_alive
from server.engine_launch import engine_limits
from server.security import redact_paths
from server.settings import DTYPES, ServerSettings, cpu_threads, engine_in_process_of_its_own

log = logging.getLogger("camex.server")


@dataclass
class Health:
    ok: bool
    status: str  # "ok" | "loading" | "failed" | "stopped" | "stuck"
    detail: str = ""


@dataclass
class ServingState:
    settings: ServerSettings
    metrics: ServerMetrics
    version: str
    stats_reader: StatsReader
    lm: object | None = None  # camex_runtime.Engine (causal-lm)
    classifier: object | None = None  # camex_runtime.Engine (classifier)
    ready: bool = False
    load_error: str | None = None
    loading: bool = False
    stopping: bool = False  # a drain or a stop began: a load cut short by it is no failure
    on_fatal: Callable[[str], None] | None = None
    started_at: float = field(default_factory=time.time)
    draining: bool = False  # SIGTERM received: /ready is 503, no new work
    http_in_flight: int = 0  # requests inside the app now (kept by the middleware)
    classify_queue: ClassifyQueue | None = None
    ops: OpsPool = field(default_factory=OpsPool)  # /metrics and /info
    drain: object | None = None  # server.shutdown.Drain once SIGTERM arrived
    launched: object | None = None  # server.engine_launch.LaunchedEngine until the loader takes it
    loop: asyncio.AbstractEventLoop | None = None  # the server's, once loading began
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        s = self.settings
        if self.classify_queue is None:
            self.classify_queue = ClassifyQueue(s.classify_workers, s.max_waiting,
                                                s.queue_timeout_s, on_idle=release_memory)

    def engines(self) -> list:
        return [e for e in (self.lm, self.classifier) if e is not None]

    # -- lifecycle -----------------------------------------------------------------------------
    def load_in_background(self) -> None:
        """Load and warm the engines in a thread. Called on the event loop (the lifespan): an
        engine in a process of its own has its pipe read by this loop."""
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.loading = True
        self._thread = threading.Thread(target=self._load, name="camex-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            import torch

            adopt_library_logging()  # transformers' own stderr handler would break JSON lines

            threads = cpu_threads(self.settings)
            torch.set_num_threads(threads)
            log.info("torch CPU threads", extra={"threads": threads})
            lm_dir, clf_dir = resolve_checkpoints(self.settings)
            observer = EngineObserver(self.metrics)
            launched, self.launched = self.launched, None
            if launched is not None and not launched.current():  # the demo was rebuilt
                launched.discard()
                launched = None
            lm = build_engine(self.settings, lm_dir, observer, "causal-lm",
                              launched=launched, loop=self.loop) if lm_dir else None
            clf = build_engine(self.settings, clf_dir, observer, "classifier") if clf_dir else None
            self.lm, self.classifier = lm, clf  # (set first: a refusal below stops them too)
            if lm is not None and lm.tokenizer is not None:
                check_template(lm, self.settings)
            self._start_and_warm()
        except Exception as exc:  # any failure to load is fatal for this process ...
            if self.stopping:  # ... except the engines stopping under a warm-up (SIGTERM)
                log.info("loading stopped: the server is shutting down",
                         extra={"cause": f"{type(exc).__name__}: {exc}"})
                return
            self.load_error = f"{type(exc).__name__}: {exc}"
            # One line; the traceback only with --log-level debug (it adds nothing to e.g. a
            # CheckpointError, which names the file and tensor).
            log.error("model failed to load: %s", self.load_error,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if self.on_fatal:
                self.on_fatal(self.load_error)
        finally:
            self.loading = False

    def _start_and_warm(self) -> None:
        for engine in self.engines():
            if self.stopping:  # stopped while loading: start nothing more
                return
            engine.start()
            engine.warmup()
            info = engine.info()
            self.metrics.build_info.labels(self.version, str(info.get("model", "")),
                                           engine.kind).set(1)
        self.ready = True
        log.info("ready", extra={"engines": [e.kind for e in self.engines()]})

    def begin_drain(self) -> None:
        """SIGTERM (on the event loop): see server.shutdown."""
        from server.shutdown import Drain

        self.draining = self.stopping = True
        if self.drain is None and self.engines():  # nothing to drain after a failed load
            self.drain = Drain(self, self.settings.grace_s)
            self.drain.begin()

    def stop(self, grace_s: float) -> None:
        """Lifespan end: after a drain only wait for it; without one (in-process use) stop
        the engines with `grace_s` as before."""
        self.ready, self.stopping = False, True
        if self.launched is not None:  # stopped before the loader got to it
            self.launched.discard()
        if self.drain is not None:
            self.drain.wait()
        else:
            for engine in self.engines():
                engine.stop(grace_s=grace_s)
        self.classify_queue.shutdown()
        self.ops.shutdown()

    # -- probes --------------------------------------------------------------------------------
    def public_load_error(self) -> str:
        """The load failure as clients may see it: no absolute paths (the log has them)."""
        return "the model failed to load: " + redact_paths(self.load_error or "unknown error")

    async def health(self) -> Health:
        """Liveness, on the event loop: only the engine stats read leaves it (deadline-bound,
        on the stats reader's own threads), so a busy worker pool never delays a probe."""
        if self.load_error:
            return Health(False, "failed", self.public_load_error())
        if not self.engines():
            return Health(self.loading, "loading" if self.loading else "stopped",
                          "" if self.loading else "no engine loaded")
        for engine in self.engines():
            stats = await self.stats_reader.aread(engine)
            if stats is None:
                return Health(False, "stuck", f"{engine.kind} engine did not answer within "
                              f"{self.stats_reader.timeout_s:.1f}s")
            if not stats.alive:
                return Health(False, "stopped", f"{engine.kind} engine loop is not running")
            if not engine_alive(stats, self.settings.health_stale_s):
                silent = time.monotonic() - stats.heartbeat
                return Health(False, "stuck", f"{engine.kind} engine loop silent for {silent:.1f}s")
        return Health(True, "ok" if self.ready else "loading")

    # -- access for routes ---------------------------------------------------------------------
    def require(self, kind: str):
        """The engine of `kind`, or ApiError 503 (not ready) / 404 (not served)."""
        engine = self.lm if kind == "causal-lm" else self.classifier
        if self.draining:
            raise errors.unavailable("the server is shutting down; retry on another replica")
        if not self.ready:
            raise errors.unavailable(self.public_load_error() if self.load_error
                                     else "model is loading; retry when /ready is 200")
        if engine is None:
            what = "text generation" if kind == "causal-lm" else "classification"
            raise errors.ApiError(404, "not_found", f"this server has no {kind} model loaded, "
                                  f"so {what} is not available")
        return engine


def resolve_checkpoints(settings: ServerSettings) -> tuple[str | None, str | None]:
    """The directories to serve; builds the demo checkpoints when neither is given."""
    if settings.model or settings.classifier:
        return settings.model, settings.classifier
    from camex_runtime.training.demo import ensure_demo_models

    log.info("no model given: serving the demo checkpoints (built if missing)")
    lm_dir, clf_dir = ensure_demo_models(settings.demo_dir)
    return str(lm_dir), str(clf_dir)


def build_engine(settings: ServerSettings, path: str, observer, expect_kind: str,
                 launched=None, loop=None):
    """The engine of `expect_kind` for `path`; `launched`: its process, if the CLI started it
    early (server.engine_launch); `loop`: the event loop that reads an engine process's pipe
    (None: a thread of its own)."""
    limits = engine_limits(settings)
    dtype = parse_dtype(settings.dtype)
    own_process = expect_kind == "causal-lm" and engine_in_process_of_its_own(settings)
    if expect_kind == "causal-lm":
        log.info("text-generation engine: %s", "its own process" if own_process
                 else "this process", extra={"engine_process": settings.engine_process})
    if own_process:
        from camex_runtime.engine.process import EngineProcess
        from server.logs import configure_engine_process_logging

        logs = (configure_engine_process_logging, (settings.log_level,))
        engine = EngineProcess(path, device=settings.device, dtype=dtype,
                               threads=cpu_threads(settings), observer=observer,
                               log_setup=logs, launched=launched, loop=loop, **limits)
    else:
        from camex_runtime import Engine

        engine = Engine.from_pretrained(path, device=settings.device, dtype=dtype,
                                        observer=observer, **limits)
    if engine.kind != expect_kind:
        if own_process:
            engine.stop(grace_s=0)  # its process
        raise ValueError(f"{FLAG_OF[expect_kind]} {path} is a {engine.kind} checkpoint: pass it "
                         f"with {FLAG_OF[engine.kind]}")
    return engine


def parse_dtype(name: str | None):
    if name is None:
        return None
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES.values()))}")
    return getattr(torch, DTYPES[name])
