"""Between the OpenAI-compatible routes and the engine: one request's choices (prompts x n),
their sampling parameters, stop-string trimming, token strings, and merged streaming.

OpenAI semantics that differ from TGI's live here: `temperature` 0 is greedy and the default
1.0 samples; the returned text excludes the stop string; choice j of a seeded request samples
with seed + j (vLLM's rule for `n` > 1), so choices differ yet the response is reproducible.
Knows no response shapes (see `server.routes.completions` and `server.routes.chat`).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any
from collections.abc import AsyncIterator, Sequence

from camex_runtime import Constraint, SamplingParams
from camex_runtime.errors import ContextLengthError
from server import errors
from server.generation import GenerationRun, submit, until_disconnect, wait_for_disconnect
from server.middleware import log_fields
from server.openai_protocol import PromptTokensDetails, Usage
from server.protocol import MAX_SEED


@dataclass
class Choice:
    """One generated choice: its run, the prompt it continues, its stop-string trimmer."""
    index: int
    prompt_index: int
    prompt_text: str | None  # as the client sent it; None for token ids (decoded on echo)
    run: GenerationRun
    hold: StopHold
    events: AsyncIterator | None = field(default=None, repr=False)
    # the task reading the first event while the stream has already started (`first_events`)
    pending: asyncio.Task | None = field(default=None, repr=False)
    # chat with --reasoning-parser: its <think> / answer splitter (server.reasoning.ThinkSplit)
    think: Any = field(default=None, repr=False)
    # chat with tools and --tool-call-parser: its call parser (server.tool_calls.ToolCallSplit)
    calls: Any = field(default=None, repr=False)
    # a stream's sink writing its plain chunks to the socket (server.generation.direct_sink)
    sink: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The final text, without the stop string that ended it (OpenAI)."""
        res = self.run.result
        return strip_stop(res.text, self.hold.stops) if res.finish_reason == "stop_sequence" \
            and not self.hold.include else res.text


# `model` values that stand for "the served one": huggingface_hub's InferenceClient sends
# "dummy" to a server given by URL, and TGI, which ignores the field, documents "tgi"
PLACEHOLDER_MODELS = frozenset({"dummy", "tgi"})


def check_model(state, requested: str | None, placeholders: bool = True) -> None:
    """vLLM answers 404 for a model name it does not serve; so does this server, except for
    the placeholder names TGI's clients send (`placeholders`: a request body's `model`)."""
    from server.routes.completions import info_model_id
    served = info_model_id(state)
    if placeholders and requested in PLACEHOLDER_MODELS:
        return
    if requested is not None and requested != served:
        raise errors.ApiError(404, "not_found", f"The model `{requested}` does not exist: this "
                              f"server serves `{served}` (see GET /v1/models).", param="model",
                              code="model_not_found")


def check_stream_options(body) -> None:
    """`stream_options` shapes a stream; on a plain response OpenAI and vLLM refuse it rather
    than let a client believe it asked for something (an empty object passes, as in vLLM)."""
    if not body.stream and body.stream_options is not None and \
            body.stream_options.model_fields_set:
        raise errors.validation("`stream_options` is only allowed when `stream` is true",
                                param="stream_options")


def stop_list(stop, limit: int) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limit:
        raise errors.validation(f"`stop` has {len(stops)} sequences; at most {limit} are allowed",
                                param="stop")
    if any(not s for s in stops):
        raise errors.validation("`stop` sequences must be non-empty strings", param="stop")
    return stops


def sampling(body, state, *, max_tokens: int, stops: list[str], logprobs: int = 0,
             prompt_logprobs: int | None = None, seed: int | None,
             constraint: Constraint | None = None) -> SamplingParams:
    """OpenAI request fields -> SamplingParams for one choice (`constraint`: its structured
    output, see server.structured)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    greedy = temperature == 0.0
    if body.min_tokens > max_tokens:
        raise errors.validation(f"`min_tokens` ({body.min_tokens}) must not exceed the tokens "
                                f"asked for ({max_tokens})", param="min_tokens")
    return SamplingParams(
        max_new_tokens=max_tokens, do_sample=not greedy,
        temperature=1.0 if greedy else max(temperature, 1e-3),
        # greedy drops top_p/top_k as vLLM does; top_p 1.0 is no filter
        top_k=None if greedy else body.top_k,
        top_p=None if greedy or body.top_p in (None, 1.0) else body.top_p,
        repetition_penalty=body.repetition_penalty, seed=None if greedy else seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias(body.logit_bias), min_p=None if greedy else body.min_p or None,
        min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()),
        stop=tuple(stops), ignore_eos=body.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, queue_timeout_s=state.settings.queue_timeout_s,
        constraint=constraint,
        allowed_token_ids=None if body.allowed_token_ids is None
        else tuple(body.allowed_token_ids),
        skip_special_tokens=body.skip_special_tokens, bad_words=tuple(body.bad_words or ()))


def truncated(engine, body, prompt: str | list[int]) -> str | list[int]:
    """vLLM's truncate_prompt_tokens: the last N tokens of the prompt (-1: the last
    max_total_tokens); off the event loop (it may tokenize)."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return prompt
    if keep == 0:
        raise errors.validation("`truncate_prompt_tokens` must be -1 or a positive count",
                                param="truncate_prompt_tokens")
    if keep == -1:
        keep = engine.info()["max_total_tokens"]
    ids = prompt if not isinstance(prompt, str) else \
        engine.tokenizer.encode(prompt, add_special_tokens=False)
    return prompt if len(ids) <= keep else list(ids[-keep:])


def logit_bias(bias: dict[int, float] | None) -> dict[int, float] | None:
    """OpenAI's `logit_bias` (token id -> bias): the range checked here, so the 422 names the
    field (token ids beyond the vocabulary are the engine's to refuse)."""
    if not bias:
        return None
    for token, value in bias.items():
        if token < 0 or not -100.0 <= value <= 100.0:
            raise errors.validation(
                f"`logit_bias` maps token ids (>= 0) to biases in [-100, 100], got {token}: "
                f"{value}", param="logit_bias")
    return dict(bias)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """vLLM's rule: choice j of a seeded request uses seed + j; unseeded choices draw their own."""
    if seed is None:
        return [secrets.randbelow(MAX_SEED) for _ in range(n)]
    return [(seed + j) % (MAX_SEED + 1) for j in range(n)]


def context_length_error(prompt_field: str, tokens_field: str):
    """A request too long for the context, worded as OpenAI does (clients such as LiteLLM and
    CrewAI recognise "maximum context length" / `context_length_exceeded` and shorten the
    prompt): `prompt_field` is "prompt" or "messages", `tokens_field` the field that asked
    for the new tokens."""
    def error(exc: ContextLengthError) -> errors.ApiError:
        head = f"This model's maximum context length is {exc.max_total_tokens} tokens."
        if exc.prompt_too_long:
            text = (f"{head} However, your {prompt_field} has {exc.prompt_tokens} tokens, and "
                    f"at most {exc.max_input_tokens} may be input. Please reduce the length of "
                    f"the {prompt_field}.")
            param = prompt_field
        else:
            text = (f"{head} However, you requested {exc.prompt_tokens + exc.max_new_tokens} "
                    f"tokens ({exc.prompt_tokens} in the {prompt_field}, {exc.max_new_tokens} "
                    f"in the completion). Please reduce the length of the {prompt_field} or "
                    f"`{tokens_field}`.")
            param = tokens_field
        return errors.validation(text, param=param, code="context_length_exceeded")
    return error


async def start_choices(request, engine, prompts: Sequence, n: int, params_for,
                        context_error=None, include_stop: bool = False) -> list[Choice]:
    """Submit every prompt n times (`params_for(prompt_index, choice_j)` -> SamplingParams).
    A refusal part-way cancels what was already queued, so nothing is left running.
    `context_error`: `context_length_error(...)`, how a too-long request is refused;
    `include_stop`: texts keep the stop string that ended them (vLLM's
    include_stop_str_in_output)."""
    state = request.app.state.serving
    limit = state.settings.max_client_batch_size
    if len(prompts) * n > limit:
        raise errors.validation(f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} choices "
                                f"exceed the maximum of {limit} per request", param="n")
    choices: list[Choice] = []
    try:
        for i, prompt in enumerate(prompts):
            for j in range(n):
                params = params_for(i, j)
                handle = await submit(engine, prompt, params, context_error)
                run = GenerationRun(handle, state.metrics, params.seed, log_fields(request))
                choices.append(Choice(len(choices), i, prompt if isinstance(prompt, str) else None,
                                      run, StopHold(params.stop, include_stop)))
    except BaseException:
        for c in choices:
            c.run.handle.cancel()
        raise
    return choices


async def run_to_end(request, choices: list[Choice]) -> None:
    """Non-streaming: wait for every choice (a disconnect or failure cancels them all)."""
    try:
        await until_disconnect(asyncio.gather(*(c.run.collect() for c in choices)),
                               wait_for_disconnect(request.receive))
    finally:
        for c in choices:
            if c.run.result is None:
                c.run.handle.cancel()


async def first_events(request, choices: list[Choice]) -> list:
    """Streaming starts once one choice has its first event, so a request refused or timed
    out in the queue before any token still gets a status code; the other choices' first
    events follow in the stream (as vLLM streams `n` > 1). Waiting for every choice instead
    held a stream back while its first choices ran: with more choices than batch slots,
    each request's last choice queued behind the others' first ones, which ran to the end
    before any stream began. Returns the first events, None where a choice is still
    waiting (its `pending` task then holds the read)."""
    for c in choices:
        c.events = c.run.stream(c.sink)
    tasks = [asyncio.ensure_future(anext(c.events)) for c in choices]

    async def first_one() -> None:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # a choice that failed before any token: the request's status code
    try:
        await until_disconnect(first_one(), wait_for_disconnect(request.receive))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(choices)
        raise
    firsts = []
    for c, t in zip(choices, tasks):
        if t.done():
            firsts.append(t.result())
        else:
            c.pending = t
            firsts.append(None)
    return firsts


async def merged(choices: list[Choice], firsts: list) -> AsyncIterator[tuple[Choice, object]]:
    """(choice, event) as events arrive: the first events already there first, then the rest
    (a choice still waiting for its first event joins when it comes)."""
    for c, ev in zip(choices, firsts):
        if ev is not None:
            yield c, ev
    live = [c for c, ev in zip(choices, firsts) if ev is None or ev.finish_reason is None]
    if len(live) == 1 and live[0].pending is None:  # one stream (`n` = 1): followed here,
        async for ev in live[0].events:  # no task and queue per token
            yield live[0], ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(c: Choice) -> None:
        try:
            if c.pending is not None:  # its first event, read by first_events' task
                try:
                    first = await c.pending
                except StopAsyncIteration:
                    first = None
                if first is not None:
                    await queue.put((c, first, None))
                if first is None or first.finish_reason is not None:
                    await queue.put((c, done, None))
                    return
            async for ev in c.events:
                await queue.put((c, ev, None))
        except Exception as exc:  # an ApiError of a failed run: re-raised in the consumer
            await queue.put((c, None, exc))
            return
        await queue.put((c, done, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in live]
    try:
        remaining = len(tasks)
        while remaining:
            c, ev, exc = await queue.get()
            if exc is not None:
                raise exc
            if ev is done:
                remaining -= 1
                continue
            yield c, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(choices: list[Choice]) -> None:
    """Close every choice's event stream (an unfinished one is cancelled, counted dropped),
    a first read still in flight first (a stream cannot be closed while it is read)."""
    pending = [c.pending for c in choices if c.pending is not None]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for c in choices:
        if c.events is not None:
            await c.events.aclose()


def strip_stop(text: str, stops: Sequence[str]) -> str:
    """The engine's text ends with the stop string that ended it (TGI); OpenAI's excludes it."""
    for s in sorted(stops, key=len, reverse=True):
        if text.endswith(s):
            return text[:-len(s)]
    return text


class StopHold:
    """Streaming without the stop string: text that could still be the start of a stop string
    is held back until the next piece shows it is not (vLLM does the same). `include`: the
    stop string stays (nothing is held back)."""

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops, self.include = tuple(stops), include
        self.keep = 0 if include else max((len(s) for s in self.stops), default=1) - 1
        self.held = ""

    def push(self, piece: str, finish_reason: str | None) -> str:
        """The text that can be sent now, given one more piece."""
        self.held += piece
        if finish_reason is not None:
            out = strip_stop(self.held, self.stops) if finish_reason == "stop_sequence" \
                and not self.include else self.held
            self.held = ""
            return out
        cut = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's: "length", else "stop" (EOS or a stop string)."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (as vLLM reports logprob tokens; special tokens kept)."""
    return tokenizer.batch_decode([[i] for i in ids]) if ids else []


def clamp(logprob: float) -> float:
    """-inf is not JSON; OpenAI and vLLM report -9999.0."""
    return max(logprob, -9999.0)


def usage_of(choices: list[Choice]) -> Usage:
    """Prompt tokens count once per prompt (not per choice), as vLLM."""
    prompts = {c.prompt_index: c.run.prompt_tokens for c in choices}
    prompt = sum(prompts.values())
    completion = sum(len(c.run.events) for c in choices)
    # with prefix caching: each prompt's first choice's cached tokens (the others' may hit it)
    firsts = {}
    for c in choices:
        if c.run.result is not None and c.run.result.cached_tokens is not None:
            firsts.setdefault(c.prompt_index, c.run.result.cached_tokens)
    details = PromptTokensDetails(cached_tokens=sum(firsts.values())) if firsts else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion, prompt_tokens_details=details)


def plain_stream(choices: list[Choice], body) -> Choice | None:
    """The one choice of a stream whose token chunks hold text alone, or None: such chunks
    may be written to the socket from the engine's side (`server.direct_stream`); several
    choices, logprobs (completions' 0 included), echo, usage in every chunk and a chat's
    reasoning or tool-call splitting are the route's."""
    if len(choices) != 1 or (body.logprobs is not None and body.logprobs is not False) or \
            getattr(body, "echo", False) or choices[0].think is not None or \
            choices[0].calls is not None or \
            (body.stream_options and body.stream_options.continuous_usage_stats):
        return None
    return choices[0]


def usage_now(c: Choice, body) -> Usage | None:
    """vLLM's `continuous_usage_stats`: every chunk carries its choice's usage so far."""
    if not (body.stream_options and body.stream_options.continuous_usage_stats):
        return None
    done = len(c.run.events)
    return Usage(prompt_tokens=c.run.prompt_tokens, completion_tokens=done,
                 total_tokens=c.run.prompt_tokens + done)
