"""OpenAI-compatible `POST /v1/chat/completions`, streamed or not (vLLM semantics).

Messages are rendered with the model's chat template (`server.chat_template`), tokenized
without extra special tokens (the template places them), and generated on the same engine path
as `/v1/completions` (`server.openai_runs`). `logprobs` + `top_logprobs` report the generated
tokens only (OpenAI's chat API has no prompt logprobs). Finish reasons are "stop" (EOS or a stop
string, which the text excludes) and "length".
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import errors
from server.generation import direct_sink
from server.chat_template import render, require_template
from server.openai_protocol import (AssistantMessage, ChatChoice, ChatCompletion,
                                    ChatCompletionRequest, ChoiceLogprobs, NamedToolChoice,
                                    TokenLogprob, ToolCallOut, TopLogprob, Usage)
from server.openai_runs import (Choice, check_model, check_stream_options, choice_seeds, clamp,
                                close_all, context_length_error, finish_reason, first_events,
                                merged, run_to_end, sampling, start_choices, stop_list,
                                plain_stream, token_strings, truncated, usage_now, usage_of)
from server.reasoning import (KEEPS_SPECIAL_TOKENS, answer_only, answer_opening,
                              reasoning_splitter)
from server.structured import openai_constraint, tool_constraint
from server.tool_calls import ForcedCalls, splitter
from server.routes.completions import OPENAI_ERRORS, model_name
from server.routes.tgi import SSE_HEADERS

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])


async def start(request: Request, body: ChatCompletionRequest) -> list[Choice]:
    state = request.app.state.serving
    engine = state.require("causal-lm")
    check_model(state, body.model)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.validation("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    stops = stop_list(body.stop, state.settings.max_stop_sequences)
    # (grammars are checked off the event loop: a large schema takes a while)
    constraint, forced = await anyio.to_thread.run_sync(openai_constraint, body), None
    parallel = body.parallel_tool_calls is not False
    forcing = body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)
    if forcing and state.settings.tool_call_parser == "openai":
        raise errors.validation("a forced tool call (tool_choice \"required\" or a named "
                                "function) is not supported in GPT-OSS's harmony format "
                                "(--tool-call-parser openai): send tool_choice \"auto\"",
                                param="tool_choice")
    if forcing:
        if constraint is not None:
            raise errors.validation("`tool_choice` forces a tool call, whose arguments are the "
                                    "output format: drop `response_format` (or the other "
                                    "format field), or send tool_choice \"auto\"",
                                    param="tool_choice")
        constraint, forced = await anyio.to_thread.run_sync(tool_constraint, body.tools,
                                                            body.tool_choice, parallel)
    calling = bool(body.tools) and body.tool_choice in (None, "auto")
    if calling and state.settings.tool_call_parser is None:
        raise errors.validation("this server parses no tool calls: start it with "
                                "`--tool-call-parser hermes` (or llama3_json, mistral, openai: the "
                                "model's format), or send tool_choice \"none\"",
                                param="tools")
    template = require_template(engine, state.settings)
    text, ids = await anyio.to_thread.run_sync(prompt_ids, engine, template, body)
    ids = truncated(engine, body, ids)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # vLLM: whatever the context has left after the prompt
        max_tokens = max(1, engine.info()["max_total_tokens"] - len(ids))
    seeds = choice_seeds(body.seed, body.n)
    parser = state.settings.reasoning_parser
    eos_texts = tuple(engine.tokenizer.decode([i]) for i in sorted(engine.eos_token_ids)) \
        if parser in KEEPS_SPECIAL_TOKENS else ()
    plain = parser is not None and answer_only(parser, text, body.template_kwargs())
    if constraint is not None and parser is not None and not plain:
        # a thinking model reasons freely; its answer, after `</think>` (harmony: once its
        # final channel opens), is constrained
        constraint = replace(constraint, start_after=tuple(engine.tokenizer(
            answer_opening(parser), add_special_tokens=False)["input_ids"]))

    def params_for(i: int, j: int):
        params = sampling(body, state, max_tokens=max_tokens, stops=stops,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
                          seed=seeds[j], constraint=constraint)
        if parser in KEEPS_SPECIAL_TOKENS:  # its splitter reads the markup, then drops it
            params = replace(params, skip_special_tokens=False)
        return params
    tokens_field = "max_tokens" if body.max_completion_tokens is None and \
        body.max_tokens is not None else "max_completion_tokens"
    choices = await start_choices(request, engine, [ids], body.n, params_for,
                                  context_length_error("messages", tokens_field),
                                  body.include_stop_str_in_output)
    for c in choices:
        harmony_calls = calling and state.settings.tool_call_parser == "openai"
        c.think = reasoning_splitter(parser, plain, eos_texts, harmony_calls) \
            if parser is not None else None
        if forcing:
            c.calls = ForcedCalls(forced)
        else:
            c.calls = splitter(state.settings.tool_call_parser, parallel, c.think) \
                if calling else None
    return choices


def prompt_ids(engine, template: str, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    text = render(engine, template, body.messages, body.add_generation_prompt,
                  body.continue_final_message, body.template_kwargs(), body.tools)
    return text, list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


@router.post("/chat/completions", response_model=ChatCompletion, responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **OPENAI_ERRORS})
async def chat_completions(request: Request, body: ChatCompletionRequest):
    """OpenAI chat completion, rendered with the model's chat template."""
    choices = await start(request, body)
    tokenizer = request.app.state.serving.lm.tokenizer
    if body.stream:
        meta = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name(request)}
        plain = plain_stream(choices, body)
        if plain is not None:
            # its content chunks may go to the socket from the engine's side
            plain.sink = direct_sink(request, lambda position, ev: None if ev.finish_reason
                                     else chunk(meta, plain.index,
                                                {"content": plain.hold.push(ev.text, None)}))
        firsts = await first_events(request, choices)
        return StreamingResponse(chat_chunks(choices, firsts, body, tokenizer, meta),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await run_to_end(request, choices)
    out = await anyio.to_thread.run_sync(lambda: [choice_json(c, body, tokenizer)
                                                  for c in choices])
    completion = ChatCompletion(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()),
                                model=model_name(request), choices=out, usage=usage_of(choices))
    answer = completion.model_dump(exclude_none=True)
    for choice in answer["choices"]:  # a reasoning-only answer: `content: null`, as OpenAI's
        choice["message"].setdefault("content", None)
        choice.setdefault("stop_reason", None)  # vLLM's, null included
    return JSONResponse(answer)


def choice_json(c: Choice, body: ChatCompletionRequest, tokenizer) -> ChatChoice:
    lp = logprobs_json(tokenizer, c.run.events, body.top_logprobs or 0) if body.logprobs \
        else None
    reasoning, answer, calls = answer_parts(c)
    message = AssistantMessage(
        content=answer, reasoning_content=reasoning, reasoning=reasoning,
        tool_calls=[ToolCallOut(**call.json()) for call in calls] or None)
    reason = c.calls.finish if calls and c.calls.finish else \
        finish_reason(c.run.result.finish_reason)
    return ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=reason,
                      stop_reason=c.run.result.stop_reason)


def answer_parts(c: Choice) -> tuple[str | None, str | None, list]:
    """A finished choice's (reasoning, content, tool calls), through its splitters."""
    reasoning, answer, calls = None, c.text, []
    if c.think is not None:
        c.think.push(answer, final=True)
        reasoning, answer = c.think.whole()
    if c.calls is not None:
        c.calls.push(answer or "", final=True)
        answer, calls = c.calls.whole()
    return reasoning, answer, calls


def logprobs_json(tokenizer, events, n: int) -> ChoiceLogprobs:
    """OpenAI chat logprobs: per token its string, logprob, UTF-8 bytes and n alternatives."""
    strings = token_strings(tokenizer, [ev.token_id for ev in events])
    alt_ids = [i for ev in events for i, _ in ev.top_logprobs[:n]]
    alt_strings, k, content = token_strings(tokenizer, alt_ids), 0, []
    for s, ev in zip(strings, events):
        tops = []
        for _, v in ev.top_logprobs[:n]:
            tops.append(TopLogprob(token=alt_strings[k], logprob=clamp(v),
                                   bytes=list(alt_strings[k].encode())))
            k += 1
        content.append(TokenLogprob(token=s, logprob=clamp(ev.logprob), bytes=list(s.encode()),
                                    top_logprobs=tops))
    return ChoiceLogprobs(content=content)


async def chat_chunks(choices: list[Choice], firsts: list, body: ChatCompletionRequest,
                      tokenizer, meta: dict):
    """A role chunk per choice, a content chunk per token, the finish reason on the last one."""
    try:
        for c in choices:
            yield chunk(meta, c.index, {"role": "assistant", "content": ""})
        async for c, ev in merged(choices, firsts):
            text = c.hold.push(ev.text, ev.finish_reason)
            events = [ev] if ev.token_id >= 0 else []
            lp = logprobs_json(tokenizer, events, body.top_logprobs or 0).model_dump() \
                if body.logprobs else None
            final = ev.finish_reason is not None
            if c.think is None and c.calls is None:
                delta = {"content": text} if text or not final else {}
            else:
                delta = answer_delta(c, text, final)
            reason = finish_reason(ev.finish_reason)
            if final and c.calls is not None and c.calls.calls and c.calls.finish:
                reason = c.calls.finish
            yield chunk(meta, c.index, delta, lp, reason, usage_now(c, body), ev.stop_reason)
        if body.stream_options and body.stream_options.include_usage:
            usage = usage_of(choices).model_dump(exclude_none=True)
            yield "data: " + json.dumps({**meta, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    except errors.ApiError as err:  # failed after the 200 went out: an in-stream error
        choices[0].run.metrics.record_failure(errors.FAILURE_REASON.get(err.error_type)
                                              or "internal")
        yield "data: " + json.dumps(err.body("openai")) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await close_all(choices)


def answer_delta(c: Choice, text: str, final: bool) -> dict:
    """A streamed piece through the choice's reasoning and tool-call splitters: its reasoning
    (both names, as the complete message has them), its content, the calls it completed;
    `{}` when the piece is held back."""
    reasoning, answer, new = split_piece(c, text, final)
    delta = {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}
    if answer:
        delta["content"] = answer
    if new:
        delta["tool_calls"] = new
    return delta


def split_piece(c: Choice, text: str, final: bool) -> tuple[str, str, list[dict]]:
    """A streamed piece -> (its reasoning, its content, the calls it completed as JSON with
    their index)."""
    reasoning, answer = c.think.push(text, final) if c.think is not None else ("", text)
    new = []
    if c.calls is not None:
        done = len(c.calls.calls)
        answer, new = c.calls.push(answer, final)
        new = [call.json(done + i) for i, call in enumerate(new)]
    return reasoning, answer, new


def chunk(meta: dict, index: int, delta: dict, logprobs: dict | None = None,
          reason: str | None = None, usage: Usage | None = None,
          stop_reason: int | str | None = None) -> str:
    body = {**meta, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": reason}]}
    if reason is not None:  # vLLM's stop_reason, on the choice's last chunk
        body["choices"][0]["stop_reason"] = stop_reason
    if usage is not None:
        body["usage"] = usage.model_dump()
    return "data: " + json.dumps(body) + "\n\n"
