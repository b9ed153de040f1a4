"""OpenAI's Responses API, `POST /v1/responses`, streamed or not, over the chat machinery.

A request is read as the chat request it amounts to (vLLM does the same): `instructions` a
system message first; `input` a string (one user message) or a list of items — messages
(`input_text` / `output_text` parts), earlier `function_call` items (an assistant turn's
calls) and their `function_call_output` items (tool messages), earlier `reasoning` items
(dropped: chat templates drop past reasoning too); `tools` (flat `{"type": "function",
"name", "parameters", ...}`), `tool_choice`, `parallel_tool_calls`, `text.format` (text,
json_object, json_schema: structured output), `max_output_tokens`, `temperature`, `top_p`.
The chat route's rendering, tool-call and reasoning parsers and structured output then apply
unchanged, and the answer comes back as output items: `reasoning` (with `--reasoning-parser`),
a `message` with one `output_text`, `function_call`s. A length cut is status `incomplete`
with `incomplete_details.reason` "max_output_tokens".

Streams send the typed events OpenAI's do (`response.created`, `response.in_progress`, per
item `output_item.added`, its deltas and `.done` events, `output_item.done`, then
`response.completed` or `response.incomplete`), numbered by `sequence_number`; the `openai`
client's `responses.stream()` assembles them into the same response as the plain call.

`reasoning.effort` goes to the chat template as `reasoning_effort` (as chat's
`reasoning_effort`); `include: ["message.output_text.logprobs"]` (or `top_logprobs`) returns the
answer's token logprobs in its `output_text` part and in each `output_text.delta` (those of
the tokens since the last delta). Hints that ask nothing of this server (`prompt_cache_key`,
`safety_identifier`, `service_tier`, `max_tool_calls`, `stream_options`, `include` values of
built-in tools or encrypted reasoning, `reasoning.summary`) are accepted as vLLM accepts them.

Nothing is stored: `store` is accepted and ignored, `previous_response_id` and
`conversation` are refused (send the conversation as `input`), as are `background`,
`prompt` (stored prompt templates) and non-function tools.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, ValidationError

from server import errors
from server.openai_protocol import (MAX_TOP_LOGPROBS, ChatCompletionRequest, ReasoningEffort,
                                    OpenAIHints)
from server.openai_runs import Choice, close_all, first_events, merged, run_to_end
from server.protocol import Float, Int, RequestSchema, Text
from server.routes.chat import answer_parts, logprobs_json, split_piece, start
from server.routes.completions import OPENAI_ERRORS, model_name
from server.routes.tgi import SSE_HEADERS

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])


# `include` values: the answer's token logprobs are given; the rest name what a stateless
# server without built-in tools or images has none of (encrypted reasoning is for a store that
# keeps it; past reasoning items are dropped on input anyway), so there is nothing to add
INCLUDE_LOGPROBS = "message.output_text.logprobs"
Include = Literal["message.output_text.logprobs", "reasoning.encrypted_content",
                  "file_search_call.results", "web_search_call.results",
                  "web_search_call.action.sources", "code_interpreter_call.outputs",
                  "computer_call_output.output.image_url", "message.input_image.image_url"]


class ReasoningOptions(RequestSchema):
    effort: ReasoningEffort | None = Field(
        None, description="given to the chat template as `reasoning_effort`")
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="accepted; reasoning items carry the reasoning text, no summary")
    generate_summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="the older name of summary")


class ResponsesRequest(OpenAIHints):
    unsupported = frozenset({"previous_response_id", "conversation", "background",
                             "prompt", "context_management"})
    model: Text | None = Field(None, description="must name the served model when given")
    input: Text | list[dict[str, Any]] = Field(
        ..., description="a user message, or a list of message / function_call / "
                         "function_call_output items")
    instructions: Text | None = Field(None, description="a system message before the input")
    max_output_tokens: Int | None = Field(None, ge=1, description="default: what the context "
                                                                  "has left")
    temperature: Float | None = Field(None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: Float | None = Field(None, ge=1e-6, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(
        None, description='function tools: {"type": "function", "name", "description", '
                          '"parameters", "strict"}')
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = Field(
        None, description='"auto", "none", "required" or {"type": "function", "name"}')
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(
        None, description='{"format": {"type": "text" | "json_object" | "json_schema", '
                          '"name", "schema", "strict"}}')
    metadata: dict[Text, Text] | None = Field(None, description="returned as given")
    store: bool | None = Field(None, description="accepted; responses are not stored")
    user: Text | None = None
    truncation: Literal["disabled"] | None = Field(None, description='only "disabled"')
    reasoning: ReasoningOptions | None = None
    include: list[Include] | None = Field(
        None, description=f'"{INCLUDE_LOGPROBS}": the answer\'s token logprobs; the others '
                          f"are accepted (nothing of theirs exists here)")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="alternatives per token (logprobs implied)")
    max_tool_calls: Int | None = Field(None, ge=1, description="accepted (it counts built-in "
                                                               "tool calls: there are none)")
    stream_options: dict[Text, Any] | None = Field(
        None, description="accepted (include_obfuscation: nothing is padded)")

    def logprobs(self) -> int | None:
        """Alternatives per answer token when logprobs are asked for (`include` names them, or
        `top_logprobs` is given), else None."""
        if self.top_logprobs is None and INCLUDE_LOGPROBS not in (self.include or ()):
            return None
        return self.top_logprobs or 0


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (`input_text`, `output_text`, `text`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.validation(f"`{where}.content` must be a string or a list of parts",
                                param=f"{where}.content")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str):
            raise errors.validation(f"`{where}.content[{k}]` has type `{kind}`: this model "
                                    f"reads text parts only (input_text / output_text)",
                                    param=f"{where}.content")
        out.append(part["text"])
    return "".join(out)


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """`instructions` + `input` as chat messages."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise errors.validation(f"`{where}.role` must be user, system, developer or "
                                        f"assistant, got {role!r}", param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise errors.validation(f"`{where}` (a function_call) needs `call_id`, `name` "
                                        f"and `arguments` strings", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn's calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise errors.validation(f"`{where}` (a function_call_output) needs `call_id` "
                                        f"and `output`", param=where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(output, where)})
        elif kind != "reasoning":
            raise errors.validation(f"`{where}` has type `{kind}`: supported input items are "
                                    f"message, function_call, function_call_output, reasoning",
                                    param=where)
    return messages


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise errors.validation(f"`tools[{i}]` has type `{tool.get('type')}`: only function "
                                    f"tools are supported", param=f"tools[{i}]")
        out.append({"type": "function", "function": {
            k: v for k, v in tool.items() if k in ("name", "description", "parameters",
                                                   "strict")}})
    return out


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request amounts to."""
    chat: dict[str, Any] = {"messages": chat_messages(body), "stream": body.stream}
    for name in ("model", "temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(body, name) is not None:
            chat[name] = getattr(body, name)
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = body.reasoning.effort
    if body.logprobs() is not None:
        chat.update(logprobs=True, top_logprobs=body.logprobs())
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    tools = chat_tools(body.tools)
    if tools:
        chat["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise errors.validation('`tool_choice` must be "auto", "none", "required" or '
                                    '{"type": "function", "name"}', param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                                "json_schema"):
            raise errors.validation('`text.format.type` must be "text", "json_object" or '
                                    '"json_schema"', param="text.format")
        if fmt["type"] == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}}
        else:
            chat["response_format"] = {"type": fmt["type"]}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.validation(f"{where}: {first['msg']}") from None


def response_json(rid: str, created: int, body: ResponsesRequest, model: str, status: str,
                  output: list[dict], usage: dict | None) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "text": body.text or {"format": {"type": "text"}}, "metadata": body.metadata or {},
            "store": False, "truncation": "disabled", "usage": usage,
            "reasoning": {"effort": body.reasoning.effort, "summary": None} if body.reasoning
            else {"effort": None, "summary": None},
            "service_tier": "default", "top_logprobs": body.top_logprobs or 0,
            "max_tool_calls": body.max_tool_calls,
            "prompt_cache_key": body.prompt_cache_key,
            "safety_identifier": body.safety_identifier}


def usage_json(c: Choice, reasoning_tokens: int) -> dict:
    result = c.run.result
    prompt, output = c.run.prompt_tokens, len(result.token_ids)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": result.cached_tokens or 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + output}


def reasoning_tokens(c: Choice) -> int:
    """Tokens up to and including the one that closed the reasoning (none without it)."""
    if c.think is None:
        return 0
    at = c.run.result.text.find(c.think.end)
    if at < 0:
        return len(c.run.events) if c.think.state != "answer" else 0
    end, seen = at + len(c.think.end), 0
    for k, ev in enumerate(c.run.events):
        seen += len(ev.text)
        if seen >= end:
            return k + 1
    return len(c.run.events)


def status_of(c: Choice) -> str:
    return "incomplete" if c.run.result.finish_reason == "length" else "completed"


def reasoning_item(text: str, status: str = "completed") -> dict:
    return {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, status: str = "completed", logprobs: list | None = None) -> dict:
    return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant",
            "status": status, "content": [output_text(text, logprobs)]}


def output_text(text: str, logprobs: list | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def token_logprobs(tokenizer, events: list, n: int | None) -> list[dict]:
    """The Responses shape of tokens' logprobs (chat's: token, logprob, bytes, n
    alternatives); none unless asked for (`n` None)."""
    if n is None or not events:
        return []
    return [entry.model_dump() for entry in logprobs_json(tokenizer, events, n).content]


def answer_events(c: Choice) -> list:
    """The events of the answer's tokens: those after the reasoning (all without it)."""
    return [ev for ev in c.run.events[reasoning_tokens(c):] if ev.token_id >= 0]


def call_item(call: dict) -> dict:
    """A chat tool call (`ToolCall.json()`) as a function_call output item."""
    return {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": "completed"}


@router.post("/responses", responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}}}, **OPENAI_ERRORS})
async def responses(request: Request, body: ResponsesRequest):
    """OpenAI Responses API (stateless), rendered with the model's chat template."""
    chat = await anyio.to_thread.run_sync(chat_request, body)
    choices = await start(request, chat)
    rid, created, model = "resp_" + uuid.uuid4().hex, int(time.time()), model_name(request)
    if body.stream:
        firsts = await first_events(request, choices)
        tokenizer = request.app.state.serving.lm.tokenizer
        return StreamingResponse(events(choices, firsts, body, rid, created, model, tokenizer),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await run_to_end(request, choices)
    (c,) = choices
    reasoning, answer, calls = answer_parts(c)
    status = status_of(c)
    tokenizer = request.app.state.serving.lm.tokenizer
    logprobs = await anyio.to_thread.run_sync(token_logprobs, tokenizer, answer_events(c),
                                              body.logprobs())
    output = ([reasoning_item(reasoning)] if reasoning else []) + \
        ([message_item(answer, status, logprobs)] if answer else []) + \
        [call_item(call.json()) for call in calls]
    return JSONResponse(response_json(rid, created, body, model, status, output,
                                      usage_json(c, reasoning_tokens(c))))


class EventWriter:
    """The typed SSE events of one streamed response, with their sequence numbers, and the
    output items they build (opened, fed deltas, closed in order). With logprobs, each
    message delta carries those of the answer tokens that arrived since the last one; the
    `.done` event and the item carry all of them."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item receiving deltas
        self.text = ""
        self.pending: list[dict] = []  # answer tokens' logprobs not yet sent in a delta
        self.logprobs: list[dict] = []  # the open message's, all of them

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def delta(self, kind: str, text: str) -> list[str]:
        """`text` for a "reasoning" or "message" item: opens one (closing another) first."""
        out = []
        if self.open is not None and self.open["type"] != kind:
            out += self.close()
        if self.open is None:
            item = reasoning_item("", "in_progress") if kind == "reasoning" else \
                message_item("", "in_progress")
            part = item["content"][0]
            item["content"] = []
            self.open, self.text = item, ""
            index = len(self.output)
            out.append(self.event("response.output_item.added", output_index=index, item=item))
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0, part=part))
        self.text += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else \
            "response.output_text.delta"
        extra = {}
        if kind == "message":
            extra["logprobs"], self.pending = self.pending, []
        out.append(self.event(name, item_id=self.open["id"], output_index=len(self.output),
                              content_index=0, delta=text, **extra))
        return out

    def close(self, status: str = "completed") -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, text = len(self.output), self.text
        reasoning = item["type"] == "reasoning"
        logprobs = [] if reasoning else self.logprobs
        if not reasoning:
            self.logprobs = []
        part = {"type": "reasoning_text", "text": text} if reasoning else \
            output_text(text, logprobs)
        done = "response.reasoning_text.done" if reasoning else "response.output_text.done"
        extra = {} if reasoning else {"logprobs": logprobs}
        item = {**item, "status": status if not reasoning else "completed", "content": [part]}
        self.output.append(item)
        return [self.event(done, item_id=item["id"], output_index=index, content_index=0,
                           text=text, **extra),
                self.event("response.content_part.done", item_id=item["id"],
                           output_index=index, content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=item)]

    def call(self, call: dict) -> list[str]:
        out = self.close()
        item, index = call_item(call), len(self.output)
        self.output.append(item)
        added = {**item, "arguments": "", "status": "in_progress"}
        return out + [
            self.event("response.output_item.added", output_index=index, item=added),
            self.event("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=index, delta=item["arguments"]),
            self.event("response.function_call_arguments.done", item_id=item["id"],
                       output_index=index, name=item["name"], arguments=item["arguments"]),
            self.event("response.output_item.done", output_index=index, item=item)]


async def events(choices: list[Choice], firsts: list, body: ResponsesRequest, rid: str,
                 created: int, model: str, tokenizer):
    w = EventWriter()
    (c,) = choices
    start_json = response_json(rid, created, body, model, "in_progress", [], None)
    n = body.logprobs()
    try:
        yield w.event("response.created", response=start_json)
        yield w.event("response.in_progress", response=start_json)
        async for c, ev in merged(choices, firsts):
            final = ev.finish_reason is not None
            text = c.hold.push(ev.text, ev.finish_reason)
            before = c.think.state if c.think is not None else "answer"
            reasoning, answer, calls = split_piece(c, text, final)
            after = c.think.state if c.think is not None else "answer"
            # an answer token: after the reasoning closed, or where none opened (the one
            # closing it counts as reasoning, as in the plain response)
            if n is not None and ev.token_id >= 0 and after == "answer" and \
                    before in ("answer", "start"):
                entry = token_logprobs(tokenizer, [ev], n)
                w.pending += entry
                w.logprobs += entry
            for kind, piece in (("reasoning", reasoning), ("message", answer)):
                if piece:
                    for out in w.delta(kind, piece):
                        yield out
            for call in calls:
                for out in w.call(call):
                    yield out
        status = status_of(c)
        for out in w.close(status):
            yield out
        done = response_json(rid, created, body, model, status, w.output,
                             usage_json(c, reasoning_tokens(c)))
        yield w.event("response.completed" if status == "completed" else "response.incomplete",
                      response=done)
    except errors.ApiError as err:  # failed after the 200 went out: response.failed
        c.run.metrics.record_failure(errors.FAILURE_REASON.get(err.error_type) or "internal")
        failed = response_json(rid, created, body, model, "failed", w.output, None)
        failed["error"] = {"code": "server_error", "message": err.message}
        yield w.event("response.failed", response=failed)
    finally:
        await close_all(choices)
