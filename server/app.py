"""The ASGI app factory: settings in, FastAPI app out (routes, errors, middleware, lifespan).

Startup loads the engines in a background thread (see `server.state`); shutdown stops them
with the configured grace period. `create_app` is what tests use in-process and what
`server.cli` hands to uvicorn.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable, Optional

import anyio
from fastapi import Depends, FastAPI

from server import __version__
from server.errors import install_error_handlers
from server.metrics import EngineStatsCollector, ServerMetrics, StatsReader
from server.middleware import ServingMiddleware
from server.protocol import LENIENT_FIELDS
from server.routes import chat, classify, completions, ops, tgi, tokenize
from server.settings import ServerSettings
from server.state import ServingState


def create_app(settings: ServerSettings,
               on_fatal: Optional[Callable[[str], None]] = None) -> FastAPI:
    metrics = ServerMetrics()
    reader = StatsReader(timeout_s=min(2.0, settings.health_stale_s))
    state = ServingState(settings=settings, metrics=metrics, version=__version__,
                         stats_reader=reader, on_fatal=on_fatal)
    metrics.registry.register(EngineStatsCollector(state.engines, reader,
                                                   settings.health_stale_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
    install_error_handlers(app, metrics.record_failure)
    for module in (tgi, classify, completions, chat, tokenize, ops):
        app.include_router(module.router)
    app.add_middleware(ServingMiddleware, metrics=metrics, settings=settings,
                       known_paths=frozenset(route_paths(app.routes)))
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
