"""TGI-compatible generation routes: `POST /generate`, `POST /generate_stream`, `POST /`.

Response shapes follow text-generation-inference (GenerateResponse, SSE StreamResponse events,
`POST /` returning a one-element list when not streaming) so TGI clients work unchanged.
Streaming responses only start once the first token exists, so queue timeouts, overload and
validation errors still arrive as proper status codes instead of mid-stream errors.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache, partial
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import errors
from server.direct_stream import SocketSink
from server.generation import (GenerationRun, direct_sink, submit, to_sampling,
                               truncate_prompt, until_disconnect, wait_for_disconnect)
from server.middleware import log_fields
from server.protocol import (CompatGenerateRequest, Details, ErrorResponse, GenerateRequest,
                             GenerateResponse, PrefillToken, StreamDetails, StreamResponse, Token)

router = APIRouter(tags=["Text Generation Inference"])
# `POST /`: on every server with a text-generation model (server.app; a classifier-only server
# answers classification there instead, server.routes.classify.root_router).
compat_router = APIRouter(tags=["Text Generation Inference"])
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503, 504)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Characters that str.splitlines() takes for line ends and JSON may carry raw inside a string
# (the ASCII ones, control characters, JSON always escapes). An event stream ends its lines only
# at CR and LF, but httpx's iter_lines (and requests' on decoded text) split where splitlines()
# does, and a client reading a stream that way would get a data line cut in two mid-string when a
# token decodes to one of these. Every SSE payload carries them as \u escapes: the same JSON value.
_LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(text: str) -> str:
    """JSON text with U+0085, U+2028 and U+2029 escaped (see _LINE_SEPARATORS)."""
    return text.translate(_LINE_SEPARATORS)


async def start_generation(request: Request, body: GenerateRequest) -> GenerationRun:
    state = request.app.state.serving
    engine = state.require("causal-lm")
    settings = state.settings
    convert = partial(to_sampling, body.parameters, max_stop_sequences=settings.max_stop_sequences,
                      queue_timeout_s=settings.queue_timeout_s)
    # a grammar is checked off the event loop (a large schema takes a while)
    sampling, seed = convert() if body.parameters.grammar is None else \
        await anyio.to_thread.run_sync(convert)
    prompt = body.inputs
    if body.parameters.truncate is not None:  # tokenizes: off the event loop
        prompt = await anyio.to_thread.run_sync(truncate_prompt, engine.tokenizer, body.inputs,
                                                body.parameters.truncate)
    handle = await submit(engine, prompt, sampling)
    return GenerationRun(handle, state.metrics, seed, log_fields(request))


@lru_cache(maxsize=8)
def special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids)


def token_json(tokenizer, ev) -> Token:
    return Token(id=ev.token_id, text=ev.text, logprob=ev.logprob,
                 special=ev.token_id in special_ids(tokenizer))


_json_encode = json.JSONEncoder(ensure_ascii=False).encode


def _json_str(text: str) -> str:
    """A JSON string literal for an SSE payload (`sse_json`'s escapes applied)."""
    return sse_json(_json_encode(text))


def token_event(index: int, ev, special: bool) -> str:
    """The SSE line of a token event before the last, without alternatives: what
    `StreamResponse(index=index, token=token_json(...)).model_dump_json()` writes (a test holds
    the two equal), formatted directly. Pydantic's validation and serialisation were about a
    fifth of the event loop's CPU time per streamed token."""
    return (f'data: {{"index":{index},"token":{{"id":{ev.token_id},"text":{_json_str(ev.text)},'
            f'"logprob":{ev.logprob!r},"special":{"true" if special else "false"}}},'
            '"top_tokens":null,"generated_text":null,"details":null}\n\n')


def plain_event(index: int, ev, special: frozenset[int]) -> str | None:
    """`token_event` for an event before the last whose logprob JSON can hold, else None (the
    response models format it). What a stream without alternatives sends either way: from its
    event loop, or from the engine's side (`socket_sink`)."""
    if ev.finish_reason is not None or not math.isfinite(ev.logprob):
        return None
    return token_event(index, ev, ev.token_id in special)


def top_tokens(tokenizer, ev) -> list[Token]:
    """TGI `top_n_tokens`: the best alternatives of one generated token, best first."""
    return [Token(id=i, text=tokenizer.decode([i]), logprob=lp,
                  special=i in special_ids(tokenizer)) for i, lp in ev.top_logprobs]


def prefill_tokens(tokenizer, res) -> list[PrefillToken]:
    """TGI `decoder_input_details`: the prompt tokens with their logprobs (the first has none)."""
    lps = res.prompt_logprobs or [None] * len(res.prompt_token_ids)
    return [PrefillToken(id=t, text=tokenizer.decode([t]),
                         logprob=None if lp is None else lp.logprob)
            for t, lp in zip(res.prompt_token_ids, lps)]


def build_details(run: GenerationRun, tokenizer, body: GenerateRequest) -> Details:
    res, p = run.result, body.parameters
    return Details(finish_reason=res.finish_reason, generated_tokens=len(res.token_ids),
                   seed=run.seed,
                   prefill=prefill_tokens(tokenizer, res) if p.decoder_input_details else [],
                   tokens=[token_json(tokenizer, ev) for ev in run.events],
                   top_tokens=[top_tokens(tokenizer, ev) for ev in run.events]
                   if p.top_n_tokens else None,
                   routing=res.routing if p.return_routing else None)


def full_text(body: GenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def timing_headers(run: GenerationRun) -> dict[str, str]:
    """TGI's per-request headers (milliseconds)."""
    t = run.result.timings
    n = max(1, len(run.result.token_ids))
    scheduled = t.scheduled_at if t.scheduled_at is not None else t.queued_at
    finished = t.finished_at if t.finished_at is not None else time.monotonic()
    inference_ms = (finished - scheduled) * 1000
    return {"x-queue-time": str(int((scheduled - t.queued_at) * 1000)),
            "x-inference-time": str(int(inference_ms)),
            "x-time-per-token": str(int(inference_ms / n)),
            "x-prompt-tokens": str(run.prompt_tokens),
            "x-generated-tokens": str(len(run.result.token_ids))}


async def generate_response(request: Request,
                            body: GenerateRequest) -> tuple[GenerateResponse, dict]:
    run = await start_generation(request, body)
    await run.run_to_end(wait_for_disconnect(request.receive))
    tokenizer = request.app.state.serving.lm.tokenizer
    details = None
    if body.parameters.details or body.parameters.decoder_input_details or \
            body.parameters.return_routing:
        details = build_details(run, tokenizer, body)
    response = GenerateResponse(generated_text=full_text(body, run.result.text), details=details)
    return response, timing_headers(run)


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
    """Generate text for one prompt (TGI schema)."""
    response, headers = await generate_response(request, body)
    return JSONResponse(response_json(response), headers=headers)


def response_json(response: GenerateResponse) -> dict:
    out = response.model_dump(exclude_none=True)
    for token in (out.get("details") or {}).get("prefill", []):
        token.setdefault("logprob", None)  # TGI sends the first prompt token's as null
    return out


async def stream_response(request: Request, body: GenerateRequest) -> StreamingResponse:
    if body.parameters.decoder_input_details:
        raise errors.validation("`decoder_input_details` is not supported when streaming")
    run = await start_generation(request, body)
    events = run.stream(socket_sink(request, body))
    try:
        first = await until_disconnect(events.__anext__(), wait_for_disconnect(request.receive))
    except StopAsyncIteration:
        raise errors.ApiError(500, "generation", "generation ended without a token") from None
    tokenizer = request.app.state.serving.lm.tokenizer
    headers = {**SSE_HEADERS, "x-prompt-tokens": str(run.prompt_tokens)}
    return StreamingResponse(sse_events(run, first, events, tokenizer, body),
                             media_type="text/event-stream", headers=headers)


def socket_sink(request: Request, body: GenerateRequest) -> SocketSink | None:
    """The stream's plain token events written to the socket from the engine's side
    (`server.direct_stream`); None: all through the event loop."""
    if body.parameters.top_n_tokens:
        return None
    special = special_ids(request.app.state.serving.lm.tokenizer)

    return direct_sink(request, lambda position, ev: plain_event(position + 1, ev, special))


async def sse_events(run: GenerationRun, first, events: AsyncIterator, tokenizer,
                     body: GenerateRequest) -> AsyncIterator[str]:
    """TGI StreamResponse events; the last one carries generated_text (and details). An
    event's index is its position: events a socket sink wrote are not seen here."""
    ev, top_n = first, body.parameters.top_n_tokens
    try:
        while ev is not None:
            index = len(run.events)  # the events so far, this one included
            line = None if top_n else plain_event(index, ev, special_ids(tokenizer))
            if line is None:  # the last event, alternatives, or a logprob JSON cannot hold
                event = StreamResponse(index=index, token=token_json(tokenizer, ev),
                                       top_tokens=top_tokens(tokenizer, ev) if top_n else None)
                if ev.finish_reason is not None:
                    event.generated_text = full_text(body, run.result.text)
                    if body.parameters.details or body.parameters.return_routing:
                        event.details = stream_details(run, body)
                line = "data: " + sse_json(event.model_dump_json()) + "\n\n"
            yield line
            ev = await anext(events, None)
    except errors.ApiError as err:  # failed after the 200 went out: TGI's in-stream error
        run.metrics.record_failure(errors.FAILURE_REASON.get(err.error_type) or "internal")
        yield "data: " + json.dumps(err.body()) + "\n\n"
    finally:
        await events.aclose()


def stream_details(run: GenerationRun, body: GenerateRequest) -> StreamDetails:
    res = run.result
    return StreamDetails(finish_reason=res.finish_reason, generated_tokens=len(res.token_ids),
                         seed=run.seed, input_length=run.prompt_tokens,
                         routing=res.routing if body.parameters.return_routing else None)


@router.post("/generate_stream", responses={200: {"content": {"text/event-stream": {}}},
                                            **ERROR_RESPONSES})
async def generate_stream(request: Request, body: GenerateRequest) -> StreamingResponse:
    """Stream tokens as Server-Sent Events (TGI event format)."""
    return await stream_response(request, body)


@compat_router.post("/", responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **ERROR_RESPONSES})
async def compat_generate(request: Request, body: CompatGenerateRequest):
    """TGI compatibility route: streams when `stream` is true, else a one-element list."""
    if body.stream:
        return await stream_response(request, body)
    response, headers = await generate_response(request, body)
    return JSONResponse([response_json(response)], headers=headers)
