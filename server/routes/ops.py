"""Operational routes: `GET /health` (liveness), `GET /ready` (readiness), `GET /info`,
`GET /metrics`.

/health is a real check of the engine loop: 503 when a loop thread died, stopped, or has not
heartbeated for `health_stale_s` (200 while the model is still loading, so liveness probes do not
kill a pod that builds demo checkpoints). /ready is 503 until every engine is loaded and warm,
and again from SIGTERM on. The probes run on the event loop and /metrics and /info on threads
of their own (`server.isolation`), so neither waits behind model work. /info shows no
file-system paths.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.protocol import ErrorResponse
from server.routes.completions import info_model_id
from server.security import redact_paths

router = APIRouter(tags=["Operations"])
UNAVAILABLE = {503: {"model": ErrorResponse}}


@router.get("/health", responses=UNAVAILABLE)
async def health(request: Request) -> JSONResponse:
    """200 while the engine loop runs; 503 when it is stopped, dead or stuck."""
    h = await request.app.state.serving.health()
    if h.ok:
        return JSONResponse({"status": h.status})
    return JSONResponse({"error": f"unhealthy ({h.status}): {h.detail}",
                         "error_type": "unhealthy"}, status_code=503)


@router.get("/ready", responses=UNAVAILABLE)
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up (and the engine is healthy)."""
    state = request.app.state.serving
    h = await state.health()
    if state.ready and h.ok and not state.draining:
        return JSONResponse({"status": "ready"})
    reason = "shutting down" if state.draining else (
        h.detail if not h.ok else "model is loading")
    return JSONResponse({"error": f"not ready: {reason}", "error_type": "unavailable"},
                        status_code=503)


@router.get("/info")
async def info(request: Request) -> dict:
    """Served model(s), routing, limits and live engine state (TGI-like keys included)."""
    state = request.app.state.serving
    return redact_paths(await state.ops.run(info_of, state))


def info_of(state) -> dict:
    s = state.settings
    main = state.lm or state.classifier
    main_info = main.info() if main else {}
    out = {
        "model_id": info_model_id(state),
        "model_sha": None,
        "model_dtype": str(main_info.get("dtype", s.dtype or "float32")),
        "model_device_type": s.device.split(":")[0],
        "model_pipeline_tag": "text-generation" if state.lm else "text-classification",
        "max_concurrent_requests": s.max_batch_size + s.max_waiting,
        "max_best_of": 1,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": main_info.get("max_input_tokens", s.max_input_tokens),
        "max_total_tokens": main_info.get("max_total_tokens", s.max_total_tokens),
        "max_batch_size": s.max_batch_size,
        "waiting_served_ratio": s.waiting_served_ratio,  # 0: off
        "max_waiting": s.max_waiting,
        "max_client_batch_size": s.max_client_batch_size,
        "max_body_bytes": s.max_body_bytes,
        "queue_timeout_s": s.queue_timeout_s,
        "router": "camex-server",
        "version": state.version,
        "sha": None,
        "docker_label": None,
        "ready": state.ready,
    }
    for key in ("num_experts", "moe_layers", "segment_len", "routing", "strategy",
                "expert_deltas", "prefix_caching", "prefix_cache_slots"):
        out[key] = main_info.get(key)
    # engine_pid: the process whose CPU time is the engine's (its own with --engine-process)
    out["models"] = {e.kind: {"engine_pid": os.getpid(), **e.info(),
                              "stats": stats_json(state.stats_reader.read(e))}
                     for e in state.engines()}
    return out


def stats_json(stats) -> dict | None:
    if stats is None:  # the engine did not answer in time (see /health)
        return None
    c = stats.cache
    return {"running": stats.running, "waiting": stats.waiting, "steps": stats.steps,
            "alive": stats.alive,
            "merge_cache": {"hits": c.hits, "misses": c.misses, "evictions": c.evictions,
                            "fallbacks": c.fallbacks, "bytes_used": c.bytes_used,
                            "bytes_budget": c.bytes_budget}}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of every camex_* metric."""
    state = request.app.state.serving
    body = await state.ops.run(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
