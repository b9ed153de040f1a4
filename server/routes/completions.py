"""OpenAI-compatible `POST /v1/completions` (as vLLM serves it) and `GET /v1/models[/{model}]`.

A prompt is a string, a list of strings, a list of token ids or a list of token-id lists; each
prompt gets `n` choices, indexed prompt-major (vLLM). `logprobs` N reports each token's logprob
and its N best alternatives as `{token: logprob}` dicts; with `echo` the prompt comes first,
with its own logprobs computed in the prefill pass (the first token has none), and
`max_tokens: 0` scores a prompt without generating (lm-eval's loglikelihood). Streaming works
for any number of prompts and choices; `stream_options.include_usage` adds a last chunk with
`usage`. The engine path is the one /generate uses (`server.openai_runs` converts).
"""

from __future__ import annotations

import json
import time
import uuid

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import errors
from server.generation import direct_sink
from server.structured import openai_constraint
from server.openai_protocol import (Completion, CompletionChoice, CompletionLogprobs,
                                    CompletionRequest, ModelCard, ModelList,
                                    OpenAIErrorResponse, Usage)
from server.openai_runs import (Choice, check_model, check_stream_options, choice_seeds, clamp,
                                close_all, context_length_error, finish_reason, first_events,
                                merged, run_to_end, sampling, start_choices, stop_list,
                                plain_stream, token_strings, truncated, usage_now, usage_of)
from server.routes.tgi import SSE_HEADERS, sse_json

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])
OPENAI_ERRORS = {code: {"model": OpenAIErrorResponse}
                 for code in (400, 401, 404, 413, 422, 429, 503, 504)}


def model_name(request: Request) -> str:
    return info_model_id(request.app.state.serving)


def info_model_id(state) -> str:
    if state.settings.model_id:
        return state.settings.model_id
    engine = state.lm or state.classifier
    return str(engine.info().get("model", "camex")) if engine else "camex"


def prompts_of(body: CompletionRequest) -> list:
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    return list(p)


async def start(request: Request, body: CompletionRequest) -> list[Choice]:
    state = request.app.state.serving
    engine = state.require("causal-lm")
    check_model(state, body.model)
    check_stream_options(body)
    if body.max_tokens == 0 and not body.echo:
        raise errors.validation("`max_tokens` 0 generates nothing: it needs `echo` (to score "
                                "the prompt)", param="max_tokens")
    stops = stop_list(body.stop, state.settings.max_stop_sequences)
    constraint = await anyio.to_thread.run_sync(openai_constraint, body)  # off the event loop
    n_logprobs = body.logprobs or 0
    prompt_lps = None  # the prompt is scored only when echoed with logprobs (or only scored)
    if body.echo and (body.logprobs is not None or body.max_tokens == 0):
        prompt_lps = n_logprobs
    seeds = choice_seeds(body.seed, body.n)
    prompts = prompts_of(body)
    if body.truncate_prompt_tokens is not None:
        prompts = await anyio.to_thread.run_sync(
            lambda: [truncated(engine, body, p) for p in prompts])
    max_tokens = [body.max_tokens] * len(prompts)
    if body.max_tokens is None:  # an explicit null: what the context has left (vLLM)
        max_tokens = await anyio.to_thread.run_sync(room_left, engine, prompts)

    def params_for(i: int, j: int):
        return sampling(body, state, max_tokens=max_tokens[i], stops=stops,
                        logprobs=n_logprobs, prompt_logprobs=prompt_lps, seed=seeds[j],
                        constraint=constraint)
    return await start_choices(request, engine, prompts, body.n, params_for,
                               context_length_error("prompt", "max_tokens"),
                               body.include_stop_str_in_output)


def room_left(engine, prompts: list) -> list[int]:
    """Per prompt, the tokens max_total_tokens leaves after it (at least 1: a prompt that
    fills the context is then refused with the numbers)."""
    total = engine.info()["max_total_tokens"]
    lengths = [len(p) if not isinstance(p, str) else
               len(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return [max(1, total - n) for n in lengths]


@router.post("/completions", response_model=Completion, responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **OPENAI_ERRORS})
async def completions(request: Request, body: CompletionRequest):
    """OpenAI text completion (vLLM semantics)."""
    choices = await start(request, body)
    tokenizer = request.app.state.serving.lm.tokenizer
    if body.stream:
        meta = {"id": "cmpl-" + uuid.uuid4().hex, "created": int(time.time()),
                "model": model_name(request)}
        plain = plain_stream(choices, body)
        if plain is not None:  # its token chunks may go to the socket from the engine's side
            plain.sink = direct_sink(request, lambda position, ev: None if ev.finish_reason
                                     else text_chunk(meta, plain, ev,
                                                     plain.hold.push(ev.text, None)))
        firsts = await first_events(request, choices)
        return StreamingResponse(completion_chunks(choices, firsts, body, tokenizer, meta),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await run_to_end(request, choices)
    out = await anyio.to_thread.run_sync(lambda: [
        choice_json(c, body, tokenizer) for c in choices])  # decodes tokens: off the loop
    completion = Completion(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()),
                            model=model_name(request), choices=out, usage=usage_of(choices))
    answer = completion.model_dump(exclude_none=True)
    for choice in answer["choices"]:  # vLLM's stop_reason, null included
        choice.setdefault("stop_reason", None)
    return JSONResponse(answer)


def choice_json(c: Choice, body: CompletionRequest, tokenizer) -> CompletionChoice:
    res = c.run.result
    prefix = echo_text(c, tokenizer) if body.echo else ""
    lp = None
    if body.logprobs is not None:
        lp = logprobs_json(tokenizer, c.run.events, res.prompt_logprobs if body.echo else None,
                           res.prompt_token_ids, body.logprobs)
    return CompletionChoice(index=c.index, text=prefix + c.text, logprobs=lp,
                            finish_reason=finish_reason(res.finish_reason),
                            stop_reason=res.stop_reason)


def echo_text(c: Choice, tokenizer) -> str:
    if c.prompt_text is not None:
        return c.prompt_text
    return tokenizer.decode(c.run.handle.prompt_token_ids)


def logprobs_json(tokenizer, events, prompt_logprobs, prompt_ids, n: int,
                  offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completion logprobs: per token its string, logprob and a `{token: logprob}`
    dict of the chosen token and the n best (vLLM); prompt entries first when echoing."""
    ids, chosen, alts = [], [], []
    if prompt_logprobs is not None:
        for t, lp in zip(prompt_ids, prompt_logprobs):
            ids.append(t)
            chosen.append(None if lp is None else lp.logprob)
            alts.append(None if lp is None else lp.top_logprobs)
    for ev in events:
        ids.append(ev.token_id)
        chosen.append(ev.logprob)
        alts.append(ev.top_logprobs)
    strings = token_strings(tokenizer, ids)
    alt_strings = token_strings(tokenizer, [i for a in alts if a for i, _ in a[:n]])
    tops, k = [], 0
    for s, lp, alt in zip(strings, chosen, alts):
        if lp is None:
            tops.append(None)
            continue
        top = {s: clamp(lp)}
        for _, v in alt[:n]:
            top.setdefault(alt_strings[k], clamp(v))
            k += 1
        tops.append(top)
    offsets, at = [], offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    return CompletionLogprobs(tokens=strings, token_logprobs=[None if v is None else clamp(v)
                                                              for v in chosen],
                              top_logprobs=tops, text_offset=offsets)


async def completion_chunks(choices: list[Choice], firsts: list, body: CompletionRequest,
                            tokenizer, meta: dict):
    """SSE chunks; with echo, a choice's first chunk carries the prompt (and its logprobs)."""
    offsets = {c.index: 0 for c in choices}
    echoed: set[int] = set()
    try:
        async for c, ev in merged(choices, firsts):
            text = c.hold.push(ev.text, ev.finish_reason)
            prompt_lps, prompt_ids = None, []
            if body.echo and c.index not in echoed:
                echoed.add(c.index)
                text = echo_text(c, tokenizer) + text
                prompt_lps, prompt_ids = c.run.handle.prompt_logprobs, c.run.handle.prompt_token_ids
            lp = None
            if body.logprobs is not None:
                lp = logprobs_json(tokenizer, [ev] if ev.token_id >= 0 else [], prompt_lps,
                                   prompt_ids, body.logprobs, offsets[c.index])
                if lp.tokens:
                    offsets[c.index] = lp.text_offset[-1] + len(lp.tokens[-1])
            yield text_chunk(meta, c, ev, text, lp, usage_now(c, body))
        if body.stream_options and body.stream_options.include_usage:
            yield sse(Completion(**meta, choices=[]), usage_of(choices))
        yield "data: [DONE]\n\n"
    except errors.ApiError as err:  # failed after the 200 went out: an in-stream error
        choices[0].run.metrics.record_failure(errors.FAILURE_REASON.get(err.error_type)
                                              or "internal")
        yield "data: " + json.dumps(err.body("openai")) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await close_all(choices)


def text_chunk(meta: dict, c: Choice, ev, text: str, lp: CompletionLogprobs | None = None,
               usage: Usage | None = None) -> str:
    """One event's chunk of a completion stream."""
    return sse(Completion(**meta, choices=[CompletionChoice(
        index=c.index, text=text, logprobs=lp, finish_reason=finish_reason(ev.finish_reason),
        stop_reason=ev.stop_reason)]), usage)


def sse(chunk, usage: Usage | None) -> str:
    if usage is not None:
        chunk.usage = usage
    return "data: " + sse_json(chunk.model_dump_json(exclude_none=True)) + "\n\n"


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served model (OpenAI format)."""
    return ModelList(data=[model_card(request.app.state.serving)])


@router.get("/models/{model:path}", response_model=ModelCard,
            responses={404: {"model": OpenAIErrorResponse}})
async def model(request: Request, model: str) -> ModelCard:
    """One model by name (OpenAI's retrieve): the served one, or 404 for any other."""
    state = request.app.state.serving
    check_model(state, model, placeholders=False)  # (a placeholder names no model)
    return model_card(state)


def model_card(state) -> ModelCard:
    engine = state.lm or state.classifier
    max_len = engine.info().get("max_total_tokens") if engine else None
    return ModelCard(id=info_model_id(state), created=int(state.started_at),
                     owned_by="camex-serve", max_model_len=max_len)
