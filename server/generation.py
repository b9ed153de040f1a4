"""Between the HTTP routes and the engine: request conversion, submission, and one run's life.

`to_sampling` turns TGI parameters into `SamplingParams` (refusing what we do not support with a
422 that says so); `submit` maps engine exceptions to HTTP errors; `GenerationRun` follows one
submitted request: it yields token events (or, for a non-streaming response, waits for the end
alone), measures inter-token latency, cancels the engine request when the client goes away
(counted as `dropped`), and records per-request metrics once.
Knows no routes and no response shapes (see `server.routes`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from camex_runtime import SamplingParams
from camex_runtime.errors import QueueTimeoutError, RequestFailedError
from server import errors
from server.direct_stream import SocketSink
from server.metrics import ServerMetrics
from server.protocol import GenerateParameters
from server.shutdown import cut_error
from server.structured import tgi_constraint

log = logging.getLogger("camex.server")
DEFAULT_MAX_NEW_TOKENS = 20
UNSUPPORTED = ("adapter_id",)


def to_sampling(p: GenerateParameters, *, max_stop_sequences: int,
                queue_timeout_s: float) -> tuple[SamplingParams, int | None]:
    """TGI parameters -> SamplingParams and the seed to report. Raises ApiError (422)."""
    for name in UNSUPPORTED:
        if getattr(p, name) is not None:
            raise errors.validation(f"parameter `{name}` is not supported by this server")
    if p.watermark:
        raise errors.validation("parameter `watermark` is not supported by this server")
    if p.best_of is not None and p.best_of > 1:
        raise errors.validation(f"`best_of` > 1 is not supported (got {p.best_of})")
    if len(p.stop) > max_stop_sequences:
        raise errors.validation(f"`stop` has {len(p.stop)} sequences; at most "
                                f"{max_stop_sequences} are allowed")
    if any(not s for s in p.stop):
        raise errors.validation("`stop` sequences must be non-empty strings")
    # TGI: any logits warper (temperature != 1, top_k, top_p < 1, typical_p) switches sampling on.
    warpers = p.temperature not in (None, 1.0) or p.top_k is not None or \
        p.top_p not in (None, 1.0) or p.typical_p is not None
    sampling = p.do_sample or warpers
    seed = p.seed if p.seed is not None else (secrets.randbelow(2**63) if sampling else None)
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample=sampling,
        temperature=p.temperature or 1.0, top_k=p.top_k,
        top_p=None if p.top_p == 1.0 else p.top_p, typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty,
        # TGI's frequency penalty: over prompt and generated tokens, divided by their count
        sequence_frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed, stop=tuple(p.stop), ignore_eos=p.ignore_eos, return_routing=p.return_routing,
        routing=p.routing, queue_timeout_s=queue_timeout_s, logprobs=p.top_n_tokens or 0,
        # TGI's prefill details carry each prompt token's logprob, no alternatives
        prompt_logprobs=0 if p.decoder_input_details else None,
        constraint=tgi_constraint(p.grammar))
    return params, (seed if sampling else None)


def truncate_prompt(tokenizer, prompt: str, keep_last: int | None) -> str | list[int]:
    """TGI `truncate`: keep only the last N prompt tokens."""
    if keep_last is None:
        return prompt
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return ids if len(ids) <= keep_last else ids[-keep_last:]


async def submit(engine, prompt: str | list[int], sampling: SamplingParams,
                 context_error: Callable[..., errors.ApiError] | None = None):
    """engine.submit off the event loop (it tokenizes); engine exceptions -> ApiError
    (`context_error`: see `errors.engine_errors`)."""
    with errors.engine_errors(context_error):
        return await anyio.to_thread.run_sync(engine.submit, prompt, sampling)


async def until_disconnect(awaitable, disconnected: Callable[[], Awaitable[None]]):
    """Await `awaitable` unless the client disconnects first (then cancel it, 499)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise errors.ApiError(499, "client_closed", "client closed the connection")
    return task.result()


def direct_sink(request, line: Callable[[int, object], str | None]) -> SocketSink | None:
    """A sink writing a stream's events to the client's socket from the engine's side
    (`server.direct_stream`), or None when the server or the connection does not allow it.
    `line(position, event)`: that event's SSE text, None for one the route must send."""
    state = request.app.state.serving
    if not state.settings.stream_direct:
        return None
    return SocketSink.for_request(request.scope, line, state.metrics.stream_direct_tokens.inc)


def wait_for_disconnect(receive) -> Callable[[], Awaitable[None]]:
    """A coroutine factory that returns when the ASGI peer disconnects (the body is already
    read by then, so the only message left to receive is `http.disconnect`)."""
    async def wait() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
    return wait


class GenerationRun:
    """One submitted request, followed to its end (or cancelled when the client leaves)."""

    def __init__(self, handle, metrics: ServerMetrics, seed: int | None,
                 log_fields: dict | None = None) -> None:
        self.handle = handle
        self.metrics = metrics
        self.seed = seed
        # added to the request's access-log line (see server.middleware)
        self.log_fields = log_fields if log_fields is not None else {}
        self.log_fields.update(engine_request_id=handle.request_id,
                               prompt_tokens=len(handle.prompt_token_ids))
        self.events: list = []  # token events delivered, the final one if it holds a token
        self.result = None  # GenerationResult once finished
        self._finished = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_token_ids)

    async def stream(self, sink: SocketSink | None = None) -> AsyncIterator:
        """Yield token events. The final event (finish_reason set) is held back until the
        result is available, so whoever sees it can read `self.result`; a failed request
        raises ApiError instead. Closing or cancelling the iterator early cancels the engine
        request and counts it as `dropped` (the client went away).

        A `sink` (`direct_sink`) may write events to the client's socket while the stream
        waits: those are recorded here as any other (`events`, their gaps from when it wrote
        them) but not yielded, so a route meets only the events it has to send itself (and
        `len(self.events)` is the position of the one it has)."""
        last, final, final_at = None, None, None
        position = 0
        try:
            async for ev in self.handle.aiter(sink):
                direct = sink is not None and sink.sent(position)
                now = sink.times[position - sink.start] if direct else time.monotonic()
                position += 1
                if ev.finish_reason is not None:
                    final, final_at = ev, now
                    continue
                if last is not None:
                    self.metrics.itl.observe(now - last)
                last = now
                self.events.append(ev)
                if not direct:
                    yield ev
                elif position == sink.end:  # the last one it wrote: what the socket did not
                    sink.flush()  # take of its chunk goes first
            self.finish()
            if final is not None and final.finish_reason not in ("error", "cancelled"):
                if last is not None and final.token_id >= 0:
                    self.metrics.itl.observe(final_at - last)
                if final.token_id >= 0:  # not the token-less end of a prompt-scoring request
                    self.events.append(final)
                yield final
        finally:
            if not self._finished:
                self._dropped()
            if sink is not None:
                sink.close()

    async def collect(self) -> None:
        """Wait for the end without following each token (a non-streaming response: the event
        loop wakes once per request, not per token), then record what `stream` would have: the
        same `events` and `result`, the same errors, and each gap between tokens from the times
        the engine produced them. Cancelled before the end: the engine request is cancelled and
        counted as `dropped`."""
        try:
            await self.handle.wait_done()
        except BaseException:
            self._dropped()
            raise
        events = self.handle.events()
        final = events.pop() if events and events[-1].finish_reason is not None else None
        self.events.extend(events)
        try:
            self.finish()
        finally:
            if final is not None and final.token_id >= 0 and \
                    final.finish_reason not in ("error", "cancelled"):
                self.events.append(final)
            for before, after in zip(self.events, self.events[1:]):
                self.metrics.itl.observe(max(0.0, after.at - before.at))

    def _dropped(self) -> None:
        """The client went away before the end: cancel the engine request, count it."""
        self._finished = True
        self.handle.cancel()
        self.metrics.record_failure("dropped")
        log.info("client disconnected; request cancelled",
                 extra={"engine_request_id": self.handle.request_id})

    def finish(self) -> None:
        """Fetch the result; raise ApiError for a queue timeout, failure or shutdown cancel."""
        self._finished = True
        try:
            self.result = self.handle.result(timeout=0)
            self.log_fields.update(finish_reason=self.result.finish_reason,
                                   generated_tokens=len(self.result.token_ids))
        except QueueTimeoutError as exc:
            raise errors.ApiError(504, "queue_timeout",
                                  f"request waited too long in the queue: {exc}") from None
        except RequestFailedError as exc:
            log.error("generation failed", extra={"engine_request_id": self.handle.request_id,
                                                  "error": str(exc)})
            raise errors.ApiError(500, "generation", "request failed during generation") from None
        # Only the engine's shutdown cut ends here cancelled (a client that left was already
        # handled in stream()): 503 + Retry-After, or the final in-stream error event.
        if self.result.finish_reason == "cancelled":
            raise cut_error()
        self.metrics.observe_generation(self.result.timings, self.prompt_tokens,
                                        len(self.result.token_ids), self.result.cached_tokens)

    async def run_to_end(self, disconnected: Callable[[], Awaitable[None]]) -> None:
        """Wait for the end (`collect`); if the client disconnects first, cancel (dropped)."""
        await until_disconnect(self.collect(), disconnected)
