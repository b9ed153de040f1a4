"""A generation request: its sampling parameters, its tensor-free state, and the caller's handle.

`SamplingParams` is what callers pass; `GenerationRequest` is the engine's bookkeeping for one
request (token ids, slot, timings; no tensors, so the scheduler can be tested on it);
`RequestHandle` is what `Engine.submit` returns: a thread-safe event stream that can be read
synchronously (`for ev in handle`) or from asyncio (`async for ev in handle.aiter()`, or
`await handle.wait_done()` for the end alone). An asyncio reader may hand the events over to an
`EventSink` while it waits, which takes them on the publishing thread (the server writes
streamed tokens to the client's socket that way, without waking its event loop per token).
"""
from __future__ import annotations

import asyncio
import math
import threading
import logging
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from camex_runtime.errors import (InputValidationError, QueueTimeoutError,
                                  RequestFailedError)
from camex_runtime.engine.outputs import (GenerationResult, PromptLogprob, RequestTimings,
                                          RoutingTrace, TokenEvent)

log = logging.getLogger("camex.engine")
ROUTING_MODES = ("segment", "prompt")
MAX_STOP_SEQUENCES = 16
MAX_BAD_WORDS = 256  # each is checked against the generated tail every step
MAX_LOGPROBS = 20  # alternatives per position (vLLM's default --max-logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias, [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties, [-2, 2]
# what a `Constraint` may hold: a JSON Schema (JSON text), a regular expression, a list of
# strings to choose from, a grammar in llguidance's Lark syntax
CONSTRAINT_KINDS = ("json", "regex", "choice", "lark")
MAX_CONSTRAINT_CHARS = 1 << 20  # a grammar or schema's text


@dataclass(frozen=True)
class Constraint:
    """Structured output: the generated text must match this (`camex_runtime.engine.structured`).

    `kind` "json": `value` is a JSON Schema as JSON text ("{}" or an object schema with no
    keywords: any JSON value / object); "regex": the whole answer matches `value`; "choice":
    `value` is a tuple of strings, the answer is one of them; "lark": `value` is a grammar in
    llguidance's Lark syntax. `lenient` (json): schema keywords that cannot be enforced are
    ignored instead of refused (OpenAI's non-strict schemas). Plain data, so it crosses the
    engine process pipe as is."""
    kind: str
    value: str | tuple[str, ...]
    lenient: bool = False  # json: ignore schema keywords that cannot be enforced
    # the grammar applies from the token after these generated ids (a thinking model's
    # end-of-reasoning marker, e.g. `</think>`'s ids); before them the text is free. (): from
    # the first token
    start_after: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InputValidationError(f"constraint kind must be one of {CONSTRAINT_KINDS}, "
                                       f"got {self.kind!r}")
        if self.kind == "choice":
            if isinstance(self.value, str) or not isinstance(self.value, Sequence) or \
                    not self.value or not all(isinstance(v, str) and v for v in self.value):
                raise InputValidationError(f"a choice constraint needs a non-empty list of "
                                           f"non-empty strings, got {self.value!r}")
            size = sum(map(len, self.value))
        elif not isinstance(self.value, str) or not self.value:
            raise InputValidationError(f"a {self.kind} constraint needs non-empty text, "
                                       f"got {self.value!r}")
        else:
            size = len(self.value)
        if not isinstance(self.start_after, tuple) or not all(map(_token_id, self.start_after)):
            raise InputValidationError(f"start_after must be a tuple of token ids, got "
                                       f"{self.start_after!r}")
        if size > MAX_CONSTRAINT_CHARS:
            raise InputValidationError(f"the {self.kind} constraint has {size} characters; at "
                                       f"most {MAX_CONSTRAINT_CHARS} are accepted")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False  # False -> greedy; temperature/top_k/top_p are then ignored (TGI)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None  # HF semantics: >1 discourages repeats
    # OpenAI's penalties, over the generated tokens (vLLM's rule): a generated token's logit
    # loses presence_penalty once and frequency_penalty per time it was generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # TGI's frequency penalty, over the whole sequence (prompt and generated): a token's logit
    # loses sequence_frequency_penalty x (its count in the sequence) / (the sequence's length)
    sequence_frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit
    min_p: float | None = None  # sampling: drop tokens below min_p x the likeliest's probability
    # sampling: keep the locally typical tokens (closest to the distribution's entropy in
    # -log p) until they hold this much mass (typical decoding, HF's and TGI's warper)
    typical_p: float | None = None
    # no EOS, stop_token_ids or stop string ends generation before this many new tokens (the
    # ids that would are never chosen before then)
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()  # more ids that end generation as EOS does
    seed: int | None = None  # per-request generator: same seed -> same tokens
    stop: Sequence[str] = ()  # stop when the decoded generated text contains one of these
    ignore_eos: bool = False
    return_routing: bool = False  # attach a RoutingTrace to the result
    routing: str | None = None  # None: the engine's default mode
    queue_timeout_s: float | None = None  # give up if not scheduled within this time
    # top-N alternatives reported per generated token (the chosen token's logprob always is)
    logprobs: int = 0
    # None: not computed. k >= 0: each prompt token's logprob (the first has none) and its
    # top-k alternatives, computed in the prefill pass (OpenAI `echo`, TGI prefill details)
    prompt_logprobs: int | None = None
    # structured output: the answer is kept inside this grammar, token by token; it ends (as
    # at EOS) once the grammar allows nothing more
    constraint: Constraint | None = None
    # the only ids it may generate (vLLM's allowed_token_ids; EOS only if listed); None: any
    allowed_token_ids: Sequence[int] | None = None
    # special tokens (EOS, chat markers) left out of the generated text (vLLM's default)
    skip_special_tokens: bool = True
    # words never generated (vLLM's bad_words): the token that would complete one, as it
    # starts the text or after a space, is not chosen
    bad_words: Sequence[str] = ()

    def validate(self) -> None:
        """Raise InputValidationError with the offending value; the engine calls this on submit."""
        def bad(msg: str) -> None:
            raise InputValidationError(msg)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            # scoring a prompt (OpenAI echo + max_tokens 0) is the only use of zero new tokens
            bad("max_new_tokens may be 0 only when prompt_logprobs are requested")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {n!r}")
        if self.do_sample and not self.temperature > 0:
            bad(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty", "sequence_frequency_penalty"):
            v = getattr(self, name)
            if not _number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                bad(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                bad(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for t, v in self.logit_bias.items():
                if not _token_id(t):
                    bad(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
                if not _number(v) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                    bad(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                        f"{MAX_LOGIT_BIAS:g}], got {v!r} for token {t}")
        if self.min_p is not None and (not _number(self.min_p) or not 0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.typical_p is not None and (not _number(self.typical_p)
                                           or not 0.0 < self.typical_p <= 1.0):
            bad(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.max_new_tokens, int) and self.min_tokens > self.max_new_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens "
                f"({self.max_new_tokens})")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
                self.stop_token_ids, Sequence) or not all(map(_token_id, self.stop_token_ids)):
            bad(f"stop_token_ids must be a list of token ids (integers >= 0), "
                f"got {self.stop_token_ids!r}")
        if self.allowed_token_ids is not None and (
                isinstance(self.allowed_token_ids, (str, bytes))
                or not isinstance(self.allowed_token_ids, Sequence) or not self.allowed_token_ids
                or not all(map(_token_id, self.allowed_token_ids))):
            bad(f"allowed_token_ids must be a non-empty list of token ids (integers >= 0), "
                f"got {self.allowed_token_ids!r}")
        if isinstance(self.bad_words, (str, bytes)) or not isinstance(self.bad_words, Sequence) \
                or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            bad(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        if len(self.bad_words) > MAX_BAD_WORDS:
            bad(f"at most {MAX_BAD_WORDS} bad_words, got {len(self.bad_words)}")
        if not isinstance(self.skip_special_tokens, bool):
            bad(f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            bad(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        if self.routing is not None and self.routing not in ROUTING_MODES:
            bad(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.queue_timeout_s is not None and not self.queue_timeout_s > 0:
            bad(f"queue_timeout_s must be > 0, got {self.queue_timeout_s!r}")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                bad(f"constraint must be a Constraint, got {self.constraint!r}")
            self.constraint.validate()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The token ids a request names (logit_bias, stop_token_ids, allowed_token_ids) exist in
    the vocabulary."""
    for name, ids in (("logit_bias", params.logit_bias or ()),
                      ("stop_token_ids", params.stop_token_ids),
                      ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("constraint.start_after",
                       params.constraint.start_after if params.constraint else ())):
        bad = sorted(t for t in ids if t >= vocab_size)
        if bad:
            raise InputValidationError(f"{name} names token ids outside the vocabulary "
                                       f"[0, {vocab_size}): {bad[:5]}")


class EventSink(Protocol):
    """Takes a request's events on the thread that publishes them, while its reader waits
    (`RequestHandle.aiter(sink=...)`). Both methods run under the handle's lock, so they must
    be quick and must not block."""

    def attach(self, start: int) -> bool:
        """On the reader's event loop: may the sink take the events from index `start` on?
        False: the reader waits as usual."""

    def take(self, events: list[TokenEvent], finished: bool) -> bool:
        """On the publishing thread: every event so far (`finished`: the result is in). The
        sink takes what it can from where it stopped (it counts how far itself); False once it
        stops taking, which wakes the reader. It gives events back only at its end: the
        reader then iterates all of them, those the sink took included."""


class RequestHandle:
    """The caller's side of one request: an append-only event list plus a completion flag.

    Written only by the engine thread (`_publish`), read by any number of threads and
    event loops; each iterator keeps its own cursor, so iterating twice replays the events.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 cancel: Callable[[str], None]):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        # set by the engine at prefill, before the first event, when SamplingParams asked for
        # them (streaming callers need them before the result exists)
        self.prompt_logprobs: list | None = None
        self._cancel = cancel
        self._events: list[TokenEvent] = []
        self._result: GenerationResult | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._sink: EventSink | None = None
        self._sink_wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # -- engine side ---------------------------------------------------------------------
    def _publish(self, events: list[TokenEvent], result: GenerationResult | None) -> None:
        with self._cond:
            self._events.extend(events)
            if result is not None:
                self._result = result
            waiters, self._waiters = self._waiters, []
            if result is not None:
                waiters += self._done_waiters
                self._done_waiters = []
            if self._sink is not None and not self._sink_takes(result is not None):
                waiters.append(self._sink_wake)
                self._sink = self._sink_wake = None
            self._cond.notify_all()
        here = asyncio._get_running_loop() if waiters else None  # a loop publishing itself
        for loop, ev in waiters:
            if loop is here:  # (an EngineProcess read by this loop): no hop needed
                ev.set()
                continue
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

    def _sink_takes(self, finished: bool) -> bool:
        """The attached sink's `take`; a sink that raises has stopped (the engine goes on)."""
        try:
            return bool(self._sink.take(self._events, finished))
        except Exception:
            log.exception("event sink failed for %s; its reader takes over", self.request_id)
            return False

    # -- caller side ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None

    def cancel(self) -> None:
        """Stop generating; the slot and its cache entries are freed at the next engine step."""
        self._cancel(self.request_id)

    def __iter__(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and self._result is None:
                    self._cond.wait()
                new, finished = self._events[i:], self._result is not None
            i += len(new)
            yield from new
            if finished and i >= len(self._events):
                return

    async def aiter(self, sink: EventSink | None = None):
        """Async iteration for asyncio callers (the server); never blocks the event loop.
        With a `sink`, the first wait with nothing new hands the events over to it instead
        (if `sink.attach` agrees), until it stops taking them; its events are yielded then,
        after it. Leaving the iteration early detaches the sink first."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            wake = asyncio.Event()
            handed = False
            with self._cond:
                new, finished = self._events[i:], self._result is not None
                if not new and not finished:
                    if sink is not None and sink.attach(i):
                        self._sink, self._sink_wake, handed = sink, (loop, wake), True
                    else:
                        self._waiters.append((loop, wake))
            i += len(new)
            for ev in new:
                yield ev
            if finished and not new:
                return
            if not new:
                if handed:
                    sink = None  # one hand-over: from its end on, this reader follows
                    try:
                        await wake.wait()
                    finally:
                        self._detach(wake)
                else:
                    await wake.wait()

    def _detach(self, wake: asyncio.Event) -> None:
        """The sink waking `wake` takes nothing more (already true if it stopped itself)."""
        with self._cond:
            if self._sink_wake is not None and self._sink_wake[1] is wake:
                self._sink = self._sink_wake = None

    async def wait_done(self) -> None:
        """Return once the request has ended, for asyncio callers that want only the end (a
        non-streaming response): their event loop wakes once, not once per token."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._cond:
            if self._result is not None:
                return
            self._done_waiters.append((loop, wake))
        await wake.wait()

    def events(self) -> list[TokenEvent]:
        """The events published so far, in order (all of them once `done`)."""
        with self._cond:
            return list(self._events)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request is done. Raises QueueTimeoutError when it timed out in the
        queue, RequestFailedError on an internal error, TimeoutError when `timeout` passes."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not done after {timeout}s")
            res = self._result
        if res.finish_reason == "error":
            if res.error and res.error.startswith("queue timeout"):
                raise QueueTimeoutError(res.error)
            raise RequestFailedError(res.error or "request failed")
        return res

    async def aresult(self) -> GenerationResult:
        """Async version of `result()`."""
        await self.wait_done()
        return self.result(timeout=0)


@dataclass(eq=False)
class GenerationRequest:
    """The engine's tensor-free record of one request (what the scheduler sees)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    routing: str  # resolved routing mode ("segment" | "prompt")
    handle: RequestHandle
    timings: RequestTimings
    slot: int | None = None  # KV-cache / routing-state row while running
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # set by prefill if asked
    text: str = ""  # decoded generated text so far
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # TokenEvent.stop_reason
    error: str | None = None
    cancel_requested: bool = False
    routing_trace: RoutingTrace | None = None
    # prompt tokens its slot held already, not computed again (None: no prefix caching)
    cached_tokens: int | None = None
    # its structured-output matcher (`structured.Guide`), made at submit when it has a constraint
    guide: object | None = field(default=None, repr=False)
    # (V,) bool of its `allowed_token_ids`, made at submit (None: every id)
    allowed_ids: object | None = field(default=None, repr=False)
    # its `bad_words` as token-id sequences (each word bare and after a space), made at submit
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    # prompt + generated ids, appended to in place (decode reads it every step: no copies)
    _all_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._all_ids = list(self.prompt_token_ids)

    def append_token(self, token_id: int, logprob: float,
                     top: tuple[tuple[int, float], ...] = ()) -> None:
        self.output_token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)
        self._all_ids.append(token_id)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V are (or will be, after this step) in the cache."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def queue_deadline(self) -> float | None:
        t = self.params.queue_timeout_s
        return None if t is None else self.timings.queued_at + t

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + generated ids (the live list: do not modify)."""
        return self._all_ids

    def to_result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.request_id, prompt_token_ids=list(self.prompt_token_ids),
            token_ids=list(self.output_token_ids), text=self.text,
            finish_reason=self.finish_reason, logprobs=list(self.logprobs),
            routing=self.routing_trace, timings=self.timings, error=self.error,
            top_logprobs=list(self.top_logprobs), prompt_logprobs=self.prompt_logprobs,
            cached_tokens=self.cached_tokens, stop_reason=self.stop_reason)
