"""The ASGI app factory: settings in, FastAPI app out (routes, errors, middleware, lifespan).

Startup loads the engines in a background thread (see `server.state`); shutdown waits for the
drain that SIGTERM started (`server.shutdown`), or stops the engines with the grace period
when the app runs without the CLI. `create_app` is what tests use in-process and what
`server.cli` hands to uvicorn; the connection guard it leaves in `app.state.connections` is
applied by the CLI's uvicorn protocol (`server.connections`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from collections.abc import Callable

import anyio
from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from server import __version__
from server.connections import ConnectionGuard
from server.errors import install_error_handlers
from server.metrics import EngineStatsCollector, ServerMetrics, StatsReader
from server.middleware import ServingMiddleware
from server.protocol import LENIENT_FIELDS
from server.routes import chat, classify, completions, ops, responses, tgi, tokenize
from server.security import HostPolicy, api_key_of
from server.settings import ServerSettings
from server.state import ServingState

SHARED_THREADS = 8  # anyio's default pool (40): generation submits, truncation, shutdown
# Response headers a browser page may read when CORS is on (besides the CORS-safelisted ones).
EXPOSED_HEADERS = ["x-request-id", "x-queue-time", "x-inference-time", "x-time-per-token",
                   "x-prompt-tokens", "x-generated-tokens", "retry-after"]


def create_app(settings: ServerSettings, on_fatal: Callable[[str], None] | None = None,
               hosts: HostPolicy | None = None, launched=None) -> FastAPI:
    """`hosts`: which Host headers to answer (the CLI passes the policy of its bind address;
    default: `--allowed-hosts` if given, else any). `launched`: the text-generation engine's
    process, if the CLI started it already (server.engine_launch)."""
    api_key = api_key_of(settings)  # StartupError for an empty or unreadable key
    metrics = ServerMetrics()
    reader = StatsReader(timeout_s=min(2.0, settings.health_stale_s))
    state = ServingState(settings=settings, metrics=metrics, version=__version__,
                         stats_reader=reader, on_fatal=on_fatal, launched=launched)
    metrics.registry.register(EngineStatsCollector(state.engines, reader,
                                                   settings.health_stale_s))
    guard = ConnectionGuard(settings.max_connections, settings.header_timeout_s,
                            on_close=lambda reason: metrics.connections_closed.labels(reason).inc())
    metrics.open_connections.set_function(lambda: guard.open)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # anyio's shared pool now serves only short work (generation submits tokenize there):
        # fewer threads mean fewer glibc malloc arenas holding on to memory.
        anyio.to_thread.current_default_thread_limiter().total_tokens = SHARED_THREADS
        state.load_in_background()
        yield
        await anyio.to_thread.run_sync(state.stop, settings.grace_s)

    async def field_policy() -> None:
        # request bodies validate after app dependencies run, in the same context
        LENIENT_FIELDS.set(settings.lenient_fields)

    app = FastAPI(title="CAMEx Serve", version=__version__, lifespan=lifespan,
                  dependencies=[Depends(field_policy)],
                  description="Generation (TGI-compatible), classification (TEI-like), OpenAI "
                              "completions and chat (vLLM-compatible) over CAMEx merged-expert "
                              "models.")
    app.state.serving = state
    app.state.connections = guard
    install_error_handlers(app, metrics.record_failure)
    for module in (tgi, classify, completions, chat, responses, tokenize, ops):
        app.include_router(module.router)
    app.include_router(classify.root_router if settings.classifier_only else tgi.compat_router)
    app.add_middleware(ServingMiddleware, state=state, api_key=api_key,
                       hosts=hosts or HostPolicy.from_settings(settings),
                       known_paths=frozenset(route_paths(app.routes)))
    if settings.cors_origins:  # outermost: preflights carry no API key and need no body
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=EXPOSED_HEADERS, max_age=600)
    return app


def route_paths(routes) -> list[str]:
    """Every path template, looking inside included routers (FastAPI nests them)."""
    out = []
    for route in routes:
        if getattr(route, "path", None):
            out.append(route.path)
        inner = getattr(route, "original_router", None) or getattr(route, "routes", None)
        if inner is not None:
            out += route_paths(getattr(inner, "routes", inner))
    return out
