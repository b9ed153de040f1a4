"""OpenAI-compatible `POST /v1/completions` (non-chat; streaming included) and `GET /v1/models`.

Mapped onto the same engine path as TGI's /generate: `temperature` 0 is greedy, anything else
(default 1.0, as OpenAI) samples; `finish_reason` is "stop" (EOS or a stop sequence) or
"length". A list of prompts is answered as one choice per prompt (not when streaming).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import errors
from server.generation import (GenerationRun, submit, to_sampling, until_disconnect,
                               wait_for_disconnect)
from server.middleware import log_fields
from server.protocol import (Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
                             CompletionUsage, GenerateParameters, ModelCard, ModelList)
from server.routes.tgi import ERROR_RESPONSES, SSE_HEADERS

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "suffix")


def to_parameters(body: CompletionRequest) -> GenerateParameters:
    for name in UNSUPPORTED:
        if getattr(body, name):
            raise errors.validation(f"`{name}` is not supported by this server")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = 1.0 if body.temperature is None else body.temperature
    greedy = temperature == 0.0
    # greedy drops top_p (as vLLM): under TGI's rule any warper would turn sampling back on
    return GenerateParameters(max_new_tokens=body.max_tokens, do_sample=not greedy,
                              temperature=None if greedy else max(temperature, 0.001),
                              top_p=None if greedy else body.top_p, seed=body.seed, stop=stop,
                              ignore_eos=body.ignore_eos)


async def start(request: Request, body: CompletionRequest, prompt: str) -> GenerationRun:
    state = request.app.state.serving
    engine = state.require("causal-lm")
    sampling, seed = to_sampling(to_parameters(body), queue_timeout_s=state.settings.queue_timeout_s,
                                 max_stop_sequences=state.settings.max_stop_sequences)
    return GenerationRun(await submit(engine, prompt, sampling), state.metrics, seed,
                         log_fields(request))


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def logprobs_of(events, start_offset: int) -> CompletionLogprobs:
    offsets, at = [], start_offset
    for ev in events:
        offsets.append(at)
        at += len(ev.text)
    return CompletionLogprobs(tokens=[ev.text for ev in events],
                              token_logprobs=[ev.logprob for ev in events], text_offset=offsets)


def model_name(request: Request) -> str:
    return info_model_id(request.app.state.serving)


def info_model_id(state) -> str:
    if state.settings.model_id:
        return state.settings.model_id
    engine = state.lm or state.classifier
    return str(engine.info().get("model", "camex")) if engine else "camex"


@router.post("/completions", response_model=Completion, responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **ERROR_RESPONSES})
async def completions(request: Request, body: CompletionRequest):
    """OpenAI text completion."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    limit = request.app.state.serving.settings.max_client_batch_size
    if not prompts or any(not p for p in prompts):
        raise errors.validation("`prompt` must be a non-empty string or list of them")
    if len(prompts) > limit:
        raise errors.validation(f"{len(prompts)} prompts exceed the maximum batch size of {limit}")
    if body.stream:
        if len(prompts) != 1:
            raise errors.validation("streaming supports a single prompt")
        return await stream_completion(request, body, prompts[0])
    runs: list[GenerationRun] = []
    try:  # submitted inside the try: a later prompt's refusal cancels the ones already queued
        for p in prompts:
            runs.append(await start(request, body, p))
        disconnected = wait_for_disconnect(request.receive)
        await until_disconnect(asyncio.gather(*(r.consume() for r in runs)), disconnected)
    finally:
        for r in runs:
            if r.result is None:
                r.handle.cancel()
    choices = []
    for i, (prompt, run) in enumerate(zip(prompts, runs)):
        prefix = prompt if body.echo else ""
        lp = logprobs_of(run.events, len(prefix)) if body.logprobs is not None else None
        choices.append(CompletionChoice(index=i, text=prefix + run.result.text, logprobs=lp,
                                        finish_reason=finish_reason(run.result.finish_reason)))
    prompt_tokens = sum(r.prompt_tokens for r in runs)
    completion_tokens = sum(len(r.result.token_ids) for r in runs)
    completion = Completion(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()),
                            model=model_name(request), choices=choices,
                            usage=CompletionUsage(prompt_tokens=prompt_tokens,
                                                  completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))
    return JSONResponse(completion.model_dump(exclude_none=True))


async def stream_completion(request: Request, body: CompletionRequest, prompt: str):
    run = await start(request, body, prompt)
    events = run.stream()
    try:
        first = await until_disconnect(events.__anext__(), wait_for_disconnect(request.receive))
    except StopAsyncIteration:
        raise errors.ApiError(500, "generation", "generation ended without a token") from None
    meta = {"id": "cmpl-" + uuid.uuid4().hex, "created": int(time.time()),
            "model": model_name(request)}
    return StreamingResponse(completion_chunks(run, first, events, body, prompt, meta),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def completion_chunks(run: GenerationRun, first, events: AsyncIterator,
                            body: CompletionRequest, prompt: str, meta: dict):
    ev, at = first, 0
    try:
        if body.echo:
            yield chunk(meta, prompt, None, None)
            at = len(prompt)
        while ev is not None:
            lp = logprobs_of([ev], at) if body.logprobs is not None else None
            at += len(ev.text)
            yield chunk(meta, ev.text, lp, finish_reason(ev.finish_reason))
            ev = await anext(events, None)
        yield "data: [DONE]\n\n"
    except errors.ApiError as err:
        run.metrics.record_failure(errors.FAILURE_REASON.get(err.error_type) or "internal")
        yield "data: " + json.dumps(err.body()) + "\n\n"
    finally:
        await events.aclose()


def chunk(meta: dict, text: str, logprobs, reason) -> str:
    body = Completion(**meta, choices=[CompletionChoice(index=0, text=text, logprobs=logprobs,
                                                        finish_reason=reason)])
    return "data: " + body.model_dump_json(exclude_none=True) + "\n\n"


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served model (OpenAI format)."""
    state = request.app.state.serving
    return ModelList(data=[ModelCard(id=info_model_id(state), created=int(state.started_at),
                                     owned_by="camex-serve")])
