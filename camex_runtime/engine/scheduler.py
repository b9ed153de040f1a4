"""Continuous-batching scheduler: which requests run this step. Holds no tensors.

Every step the engine calls `schedule(now)`: cancelled and queue-timed-out requests leave,
waiting requests are admitted FIFO into free slots (bounded by `max_batch_size` and a
per-step prefill token budget), and everything already running decodes one token. After
the model ran, the engine calls `finish(req)` for requests that ended, which frees their slot
at once so a waiting request can join in the next step.

Chunked prefill (as vLLM and TGI do): while requests decode, one step's prompt work is bounded
by a token budget (`max_batched_tokens` minus one per decoding row, but never less than half of
it), so a long prompt arriving next to running streams is prefilled over several steps,
interleaved with their decodes, instead of stalling them for its whole prefill.
- With others waiting, no single prompt takes more than half of the budget, and the first
  waiting request's join is planned before prefills in progress share the rest (shortest
  remaining first, each advancing where its least chunk fits what is left), so short prompts
  behind a long one get their first token within a few steps; the oldest prefill, passed over
  `OLDEST_PASSES` steps in a row, goes first in the next, so none starves and no step does a
  least chunk on top of a full room.
- `max_joins_per_step` can bound how many waiting requests join per such step.
- Queue pressure (`waiting_served_ratio`, TGI's setting of that name): when the requests that
  could join now number at least that ratio times the running ones (rounded down, as TGI
  does: 1 beside 1, 4 beside 4, 8 beside 7 never with 8 slots), the waiting are served
  first: short prompts (each within the step's token budget) join whole, together, as when
  nothing decodes, beside the decoding rows; neither the join bound nor the pacer holds them.
  8 requests that arrive together reach the engine a few milliseconds apart, so the first
  step seats one and, without this, the other 7 joined one per step behind it, paced
  (merged-expert prompts): the last first token came ~5 s after the first (GPT-2-small, 7+1
  experts, bf16, one core) and most steps decoded 2-4 rows instead of 8.
- Work a chunk causes beyond its tokens counts against the budget too, in prompt tokens, when
  the engine supplies a `chunk_cost` (a merged-expert model: the merges of the routing
  decisions the chunk makes): chunks are cut so that tokens plus cost fit.
- On the CPU the engine also passes `schedule` a bound from a `PrefillPacer`: the work per
  step of a long prompt (more tokens than the token budget) or one with merges to make is held
  to about `ratio` times the step's decode, from measured times; other prompts join under the
  token budget alone.
A chunk that covers the rest of its prompt completes it in that step (the request decodes from
the next); after any other chunk the engine reports how far the prompt got with
`prefilled(req, computed)`. With no request decoding, whole prompts are admitted under
`max_prefill_tokens`, as without chunking.

Prefix caching: with a `placer`, the engine picks the free slot each admitted request takes
and says how many of its prompt tokens that slot's KV cache holds already (a finished
sequence's prefix left there); the request is then planned, budgeted and reported from that
token on (`SchedulerOutput.cached`). Without one, the lowest free slot, from token 0.

It works on any object with `request_id`, `num_prompt_tokens`, `queue_deadline`,
`cancel_requested` and a writable `slot` (tests use plain objects). It knows nothing about
models, tokens or sampling; length limits are checked here because they are admission rules.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from camex_runtime.errors import ContextLengthError, InputValidationError, QueueFullError


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8  # running requests
    # KV-cache slots (None: max_batch_size). More than max_batch_size with prefix caching: the
    # others only keep what finished requests left, for a later prompt to resume (a running
    # request takes any free slot, and at most max_batch_size run at once)
    num_slots: int | None = None
    max_waiting: int = 64  # requests waiting for a slot; beyond this submit: QueueFullError
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048  # prompt + generated, per request (= KV-cache row length)
    # Prompt tokens admitted per step when nothing decodes (whole prompts). At least one
    # waiting request is admitted per step whatever its length.
    max_prefill_tokens: int = 4096
    # Tokens per step while requests decode (each decoding row counts one; prefill chunks
    # share the rest). None: no chunking, prompts are always prefilled whole.
    max_batched_tokens: int | None = None
    # While requests decode (chunked steps): waiting requests that may join per step (None: as
    # many as the budget allows). A CAMEx engine sets 1, since a joining sequence builds one
    # merged FFN per MoE layer in its first step and several at once stall the running streams
    # (measured: 3 short prompts joining together made a 0.9 s step beside 0.13 s decode steps).
    max_joins_per_step: int | None = None
    # While requests decode: when the requests that could join (waiting, up to the free
    # slots) are at least this many times the running ones, rounded down, short prompts join
    # whole together (TGI's `waiting_served_ratio`, also 1.2 there). None: never.
    waiting_served_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_tokens", "max_total_tokens",
                     "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batched_tokens is not None and self.max_batched_tokens < 2:
            raise ValueError(f"max_batched_tokens must be >= 2, got {self.max_batched_tokens}")
        if self.max_joins_per_step is not None and self.max_joins_per_step < 1:
            raise ValueError(f"max_joins_per_step must be >= 1, got {self.max_joins_per_step}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.waiting_served_ratio is not None and not self.waiting_served_ratio > 0:
            raise ValueError(f"waiting_served_ratio must be > 0, got {self.waiting_served_ratio}")
        if self.num_slots is not None and self.num_slots < self.max_batch_size:
            raise ValueError(f"num_slots ({self.num_slots}) must be >= max_batch_size "
                             f"({self.max_batch_size})")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be < "
                             f"max_total_tokens ({self.max_total_tokens})")


@dataclass
class SchedulerOutput:
    prefill: list[Any] = field(default_factory=list)  # prefill work this step (slot assigned)
    decode: list[Any] = field(default_factory=list)  # running: one new token each
    # prompt tokens each prefill may compute this step (request_id -> n); None: all it has left
    chunks: dict[str, int | None] = field(default_factory=dict)
    timed_out: list[Any] = field(default_factory=list)  # dropped from the queue: too old
    # admitted this step with prompt tokens already in their slot (request_id -> tokens)
    cached: dict[str, int] = field(default_factory=dict)
    cancelled: list[Any] = field(default_factory=list)  # dropped (waiting or running)

    @property
    def batch_size(self) -> int:
        return len(self.prefill) + len(self.decode)


ChunkCost = Callable[[Any, int, int], int]
# (request, free slots) -> (the slot it takes, prompt tokens that slot holds for it already)
Placer = Callable[[Any, list[int]], tuple[int, int]]


# Steps in a row the oldest prefill in progress may be passed over (its least chunk does not
# fit what the shorter prompts left) before it goes first. The short prompts queued behind a
# long one finish sooner the longer it waits: at 1 (the long prompt advancing every other
# step) their first tokens came 0.5 s later than when it was forced into every step; at 2,
# the last of three 8-token prompts completes after 9 steps instead of 12 (docs/DESIGN.md).
OLDEST_PASSES = 2


class PrefillPacer:
    """Sizes chunked steps' prompt work by time, so a long prefill next to running streams
    costs them a known factor of inter-token latency on any hardware. A token budget alone
    cannot: 64 prompt tokens were ~2.5x a decode step of 8 streams for GPT-2-small on one CPU
    core, and would be nothing on a GPU.

    Short prompts without merges to make are not paced (`Scheduler.is_paced`): they join
    under the token budget alone. Pacing the 32-token prompts of 8 streams arriving together
    cut them into chunks of a few tokens, each a pass over all the weights: their last first
    token came after 1.5 s instead of 0.7 s, and the closed loop made 15 % fewer tokens per
    second (dense GPT-2-small, fp32, 2 CPU threads). A merged-expert prompt stays paced
    however short: its merges cost more than its tokens and spread by layers (unpaced, three
    8-token prompts next to 8 streams made 0.3-0.6 s steps).

    The engine reports how long its steps' decodes take and how long paced prompts' prefill
    chunks take for their work (prompt tokens plus chunk costs, the scheduler's unit). The
    sustained rate is the work that fits in `ratio` x the decode time per step, so a paced prefill's
    steps last about (1 + ratio) decode steps. Steps without paced work bank their rate, up to
    `burst` tokens (at most the token budget; the engine uses 64), and a paced prefill's first
    step may spend it all, then runs at the sustained rate (a bank that drained over several
    steps made several slow steps in a row, which is what a p99 sees).

    The decode time is the fastest of the last `window` decodes: when the machine slows down
    for a while (a noisy neighbour), the chunk times rise and the decode baseline does not, so
    the prefill shrinks instead of growing with the slow decodes. What the last decode took
    beyond the baseline is taken off the next step's prompt work: when short prompts joined
    and 10 rows decode instead of 8, their steps (1.2 decodes plus the prefill) were the
    slowest of a long prefill (GPT-2-small, 7+1 experts, fp32, one core).

    A chunk's time is affine in its work, `fixed_s + token_s x work`: every chunk is a pass over
    all the weights whatever its size (~35 ms of a 1-token chunk there, against ~3.5 ms per
    further token). Both come from an exponentially weighted least-squares fit over recent
    chunks (weight `alpha` on the newest); a time per token alone, inflated by the fixed part
    of small chunks, cut the next chunks smaller still, down to one token a step. Until the
    chunk sizes seen vary, the fit is a time per token. No bound until a decode and a chunk
    were measured."""

    def __init__(self, ratio: float, burst: int, alpha: float = 0.25, window: int = 16):
        if ratio <= 0:
            raise ValueError(f"prefill time ratio must be > 0, got {ratio}")
        self.ratio, self.burst, self.alpha = ratio, burst, alpha
        self.credit = float(burst)  # banked by steps without prompt work, up to `burst`
        self._held = False  # the last budget was 0 (a turn took the step)
        self._decodes: deque[float] = deque(maxlen=window)
        # weighted sums over timed chunks: weight, work, seconds, work^2, work x seconds
        self._fit = [0.0] * 5
        self.fixed_s = 0.0  # a chunk's time beside its work
        self.token_s: float | None = None  # one prompt token of prefill work

    @property
    def decode_s(self) -> float | None:
        """One decode of the running rows: the fastest recent one."""
        return min(self._decodes) if self._decodes else None

    def rate(self, extra_s: float = 0.0) -> float | None:
        """Sustained prompt work per step, in prompt tokens: what fits in `ratio` x the
        baseline decode, less what the last decode took beyond it, what this step's decode is
        known to take beyond it (`extra_s`: merges of rows opening a segment) and a chunk's
        fixed time, so the step as a whole stays near (1 + ratio) baseline decodes."""
        if self.decode_s is None or not self.token_s:
            return None
        excess = max(0.0, self._decodes[-1] - self.decode_s) + max(0.0, extra_s)
        return max(0.0, self.ratio * self.decode_s - excess - self.fixed_s) / self.token_s

    def record_decode(self, seconds: float) -> None:
        self._decodes.append(seconds)

    def record_prefill(self, work_tokens: int, seconds: float) -> None:
        if work_tokens <= 0:
            return
        keep = 1.0 - self.alpha if self.token_s is not None else 0.0
        w, t = float(work_tokens), seconds
        self._fit = [keep * a + b for a, b in zip(self._fit, (1.0, w, t, w * w, w * t))]
        n, sw, st, sww, swt = self._fit
        spread = n * sww - sw * sw  # n^2 x the weighted variance of the work
        fixed, per = 0.0, st / sw
        if spread > n * n:  # sizes vary by more than a token: fit the fixed part too
            slope = (n * swt - sw * st) / spread
            intercept = (st - slope * sw) / n
            # a fit that leaves the tokens almost nothing (two sizes timed alike) or gives a
            # negative or larger-than-average fixed part is noise: keep the time per token
            if slope > 0.05 * st / sw and 0 <= intercept <= st / n:
                fixed, per = intercept, slope
        self.fixed_s, self.token_s = fixed, per

    def budget(self, extra_s: float = 0.0) -> int | None:
        """This step's bound (call once per step): the bank, with this step's rate added
        (`extra_s`: see `rate`). At least one token, so a prefill always advances, except in
        a step whose known decode excess (`extra_s`) leaves the bank under a token: that step
        gets 0, no paced work at all (never two steps in a row, so none starves). A chunk of
        one token still costs a chunk's fixed time (a pass over the weights: 25-55 ms beside
        a stream's segment turn, GPT-2-small 7+1 experts, fp32, one core), and the turn
        alone already made the slowest steps of a long prefill."""
        rate = self.rate(extra_s)
        if rate is None:
            return None
        self.credit = min(float(self.burst), self.credit + rate)
        if extra_s > 0 and self.credit < 1 and not self._held:
            self._held = True
            return 0
        self._held = False
        return max(1, int(self.credit))

    def spend(self, work_tokens: int) -> None:
        """A chunked step did paced work: whatever it did, the bank is spent."""
        if work_tokens > 0:
            self.credit = 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, chunk_cost: ChunkCost | None = None,
                 placer: Placer | None = None):
        """`chunk_cost(req, start, n)`: the work of computing prompt tokens [start, start+n) of
        `req` beyond the tokens themselves, in prompt tokens, with n + cost non-decreasing in n
        (a chunk advancing a span by whole layers may work less than its n tokens: negative).
        `placer(req, free_slots)`: the slot a request joining now takes, and how many of its
        prompt tokens are in it already (prefix caching; None: the lowest slot, none)."""
        self.config = config
        self.chunk_cost = chunk_cost
        self.placer = placer
        # the first prompt token each admitted (or planned) request computes: request_id -> n
        self._starts: dict[str, int] = {}
        self.waiting: deque[Any] = deque()
        self.running: dict[str, Any] = {}
        # admitted, prefill not done yet (in admission order): request_id -> (req, tokens left)
        self.prefilling: dict[str, tuple[Any, int]] = {}
        # the oldest prefill and how many steps in a row it was passed over
        self._passed_over: tuple[str, int] = ("", 0)
        # min-heap: lowest slot first
        self._free_slots = list(range(config.num_slots or config.max_batch_size))
        heapq.heapify(self._free_slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _room(self) -> int:
        """Requests that may join now: free slots, and room in the batch."""
        return min(len(self._free_slots), self.config.max_batch_size - len(self.running))

    def decoding(self) -> list[Any]:
        """Running requests whose prompt is in: the rows of the next decode."""
        return [r for r in self.running.values() if r.request_id not in self.prefilling]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_lengths(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Admission rule on lengths; raises InputValidationError (ContextLengthError for
        the limits) naming the numbers."""
        c = self.config
        if num_prompt_tokens < 1:
            raise InputValidationError("the prompt is empty (0 tokens)")
        numbers = (num_prompt_tokens, max_new_tokens, c.max_input_tokens, c.max_total_tokens)
        if num_prompt_tokens > c.max_input_tokens:
            raise ContextLengthError(
                f"the prompt has {num_prompt_tokens} tokens; max_input_tokens is "
                f"{c.max_input_tokens}", *numbers)
        if num_prompt_tokens + max_new_tokens > c.max_total_tokens:
            raise ContextLengthError(
                f"prompt tokens ({num_prompt_tokens}) + max_new_tokens ({max_new_tokens}) "
                f"= {num_prompt_tokens + max_new_tokens} exceeds max_total_tokens "
                f"({c.max_total_tokens})", *numbers)

    def add(self, req: Any) -> None:
        # max_waiting bounds the requests that wait for a batch slot: those the next step will
        # seat in a free slot do not count (else a burst could be refused while slots are
        # empty, just because the loop had not stepped yet since the previous arrival).
        free = max(0, self.config.max_batch_size - len(self.running))
        queued = max(0, len(self.waiting) - free)
        if queued >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({queued}/{self.config.max_waiting} waiting for "
                f"one of {self.config.max_batch_size} batch slots)")
        self.waiting.append(req)

    def schedule(self, now: float, max_prefill_work: int | None = None) -> SchedulerOutput:
        """`max_prefill_work`: a tighter bound, in prompt tokens, on a chunked step's prompt
        work (tokens plus chunk costs) than the token budget (see PrefillPacer); 0: paced
        prompts neither advance nor join in this step."""
        out = SchedulerOutput()
        self._drop_cancelled_and_expired(now, out)
        # In slot order: a request that joined into a freed lower slot would otherwise leave
        # the batch's slots out of order for good, and the KV cache can hand attention a view
        # only for an ascending contiguous slot range (else it gathers every layer, every step).
        out.decode = sorted(self.decoding(), key=lambda r: r.slot)
        c = self.config
        if c.max_batched_tokens is None or not out.decode:
            self._admit_whole(out)
            return out
        # decoding rows count against the budget, but prompts always keep half of it:
        # a full batch must not starve the queue
        budget = min(c.max_prefill_tokens,
                     max(c.max_batched_tokens - len(out.decode), c.max_batched_tokens // 2))
        if self._pressed(budget):  # short prompts join whole, as when nothing decodes
            self._admit_whole(out, longest=budget)
        else:
            self._schedule_chunks(out, budget, max_prefill_work)
        return out

    def _pressed(self, budget: int) -> bool:
        """Queue pressure: the requests that could join now are at least `waiting_served_ratio`
        times the running ones (rounded down, at least one), no prefill is in progress, and the
        first waiting prompt fits the step's token budget (a long one keeps the chunked, paced
        path)."""
        ratio = self.config.waiting_served_ratio
        if ratio is None or self.prefilling or not self.waiting or not self._room():
            return False
        joinable = min(len(self.waiting), self._room())
        return (joinable >= max(1, math.floor(ratio * len(self.running)))
                and self.waiting[0].num_prompt_tokens <= budget)

    def is_paced(self, req: Any) -> bool:
        """Whether the pacer's bound applies to this prompt's prefill: more tokens to compute
        than the token budget, or work beyond its tokens (chunk costs: a merged-expert
        prompt's merges, which spread over steps by layers at no extra cost). A short prompt
        with nothing but tokens joins under the token budget alone: cut into pieces, each
        would pay a pass over all the weights for a few tokens."""
        start = self._starts.get(req.request_id, 0)
        budget, n = self.config.max_batched_tokens, req.num_prompt_tokens - start
        return budget is not None and (n > budget or self._cost(req, start, n) > 0)

    def _place(self, req: Any) -> tuple[int, int]:
        """The free slot `req` would take now and the prompt tokens it holds for it (see
        `placer`); remembered as the request's first token to compute."""
        if self.placer is None:
            place = (self._free_slots[0], 0)
        else:
            place = self.placer(req, sorted(self._free_slots))
        self._starts[req.request_id] = place[1]
        return place

    def _admit_whole(self, out: SchedulerOutput, longest: int | None = None) -> None:
        """Prefills in progress finish whole; waiting requests join FIFO under the budget
        (under queue pressure, only prompts of at most `longest` tokens)."""
        for req, _ in self.prefilling.values():
            out.prefill.append(req)
            out.chunks[req.request_id] = None
        self.prefilling.clear()
        budget = self.config.max_prefill_tokens
        while self.waiting and self._room():
            req = self.waiting[0]
            place = self._place(req)
            n = req.num_prompt_tokens - place[1]
            if out.prefill and n > budget or longest is not None and n > longest:
                break  # FIFO: later requests wait behind this one rather than overtaking it
            self._admit(req, out, None, place)
            budget -= n

    def _schedule_chunks(self, out: SchedulerOutput, budget: int, paced: int | None) -> None:
        """Share `budget` prompt tokens between prefills in progress, then new admissions. The
        first join is planned first: the chunks in progress leave room for it (after the
        oldest prefill's least chunk, when the last steps passed it over). Paced prompts' work
        is also held within `paced` (the pacer's bound; None: no bound)."""
        waiting_in = min(len(self.waiting), self._room())
        crowded = len(self.prefilling) + waiting_in > 1
        share = max(1, budget // 2) if crowded else budget
        joins = self.config.max_joins_per_step
        hold = paced == 0  # the pacer holds paced prompts this step
        if paced is None:
            paced_room = budget
        else:
            paced_room = 0 if hold else max(1, min(budget, paced))

        def fit(req: Any, start: int, most: int, room: int) -> int:
            """`_fit`, within the paced room too for a paced prompt (whose work it takes). An
            unpaced prompt's rest goes whole where it fits the room, whatever its share: a
            piece left over would cost a pass over the weights of its own."""
            nonlocal paced_room
            if not self.is_paced(req):
                rest = req.num_prompt_tokens - start
                return rest if rest <= room else self._fit(req, start, most, room)
            n = self._fit(req, start, most, min(room, paced_room))
            paced_room -= n + self._cost(req, start, n)
            return n

        # The oldest prefill in progress, passed over for want of room in the last
        # OLDEST_PASSES steps, goes first: its least chunk is set aside before anything else
        # is planned. So it advances at least once in OLDEST_PASSES + 1 steps (none starves),
        # and no step does a least chunk on top of a full room. (A layer-by-layer span's least
        # chunk is a whole layer: 25 tokens' worth of a 256-token span, Llama shape; forced in
        # after short prompts had taken the room, it made the slowest steps of a long prefill.)
        items = list(self.prefilling.values())
        oldest = items[0][0] if items else None
        due = 0
        passed_id, passes = self._passed_over
        if (oldest is not None and oldest.request_id == passed_id
                and passes >= OLDEST_PASSES and not (hold and self.is_paced(oldest))):
            due = self._least(oldest, oldest.num_prompt_tokens - items[0][1])
            paced_room -= due
        self._passed_over = ("", 0)
        room = budget - due
        first_join = first_place = None
        if waiting_in and joins != 0:
            req = self.waiting[0]
            place = self._place(req)
            if not (hold and self.is_paced(req)):
                s0 = place[1]
                n = fit(req, s0, min(req.num_prompt_tokens - s0, share), room)
                first_join, first_place = n, place
                room -= n + self._cost(req, s0, n)
        # shortest remaining first (short prompts that joined behind a long one get their
        # first token in a few steps), each advancing where its least chunk fits what is left
        # of the room; the first one planned in a step advances whatever the room, unless the
        # oldest is due (it advances: the step makes progress within its budget)
        for req, left in sorted(items, key=lambda item: item[1]):
            start = req.num_prompt_tokens - left
            is_paced = self.is_paced(req)
            if hold and is_paced:
                continue
            if req is oldest and due:
                room, paced_room = room + due, paced_room + due
            elif (out.prefill or first_join is not None or due) and self._least(req, start) > (
                    min(room, paced_room) if is_paced else room):
                if req is oldest:
                    self._passed_over = (req.request_id,
                                         passes + 1 if req.request_id == passed_id else 1)
                continue
            n = fit(req, start, min(left, share), room)
            out.prefill.append(req)
            out.chunks[req.request_id] = n
            if n >= left:  # the rest of its prompt: done after this step
                del self.prefilling[req.request_id]
            room -= n + self._cost(req, start, n)
        if first_join is None:
            return
        req = self.waiting[0]
        self._admit(req, out, first_join, first_place)
        budget = room
        joins = None if joins is None else joins - 1
        while budget > 0 and self.waiting and self._room() and joins != 0:
            req = self.waiting[0]
            place = self._place(req)
            s0, left = place[1], req.num_prompt_tokens - place[1]
            paced = self.is_paced(req)
            if (paced_room <= 0) if paced else left > budget:
                break  # it joins next step, planned first there (whole, if unpaced)
            n = fit(req, s0, min(left, share, budget), budget)
            if n + self._cost(req, s0, n) > budget:
                break  # it joins next step, planned first there
            self._admit(req, out, n, place)
            budget -= n + self._cost(req, s0, n)
            joins = None if joins is None else joins - 1

    def _cost(self, req: Any, start: int, n: int) -> int:
        return 0 if self.chunk_cost is None else self.chunk_cost(req, start, n)

    def _least(self, req: Any, start: int) -> int:
        """The work of the smallest chunk from `start`: one token and its cost (a span that
        advances by layers: one layer's share)."""
        return 1 + self._cost(req, start, 1)

    def _fit(self, req: Any, start: int, most: int, room: int) -> int:
        """The longest chunk from `start`, at most `most` tokens, whose tokens plus cost fit in
        `room`; at least 1 (a chunk that cannot fit still advances by one token)."""
        most = max(1, min(most, room))
        if most + self._cost(req, start, most) <= room:
            return most
        lo, hi = 1, most - 1  # n + cost(n) is non-decreasing in n: bisect for the last fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid + self._cost(req, start, mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _admit(self, req: Any, out: SchedulerOutput, chunk: int | None,
               place: tuple[int, int]) -> None:
        """`req` joins into `place` (`_place`: its slot, prompt tokens in it already), with a
        first chunk of `chunk` tokens (None: its whole prompt)."""
        self.waiting.popleft()
        slot, start = place
        if slot == self._free_slots[0]:
            heapq.heappop(self._free_slots)
        else:
            self._free_slots.remove(slot)
            heapq.heapify(self._free_slots)
        req.slot = slot
        self.running[req.request_id] = req
        left = req.num_prompt_tokens - start
        if chunk is not None and chunk < left:
            self.prefilling[req.request_id] = (req, left)
        out.prefill.append(req)
        out.chunks[req.request_id] = chunk
        if start:
            out.cached[req.request_id] = start

    def prefilled(self, req: Any, computed: int) -> None:
        """The engine's report after a prefill chunk: `computed` prompt tokens are in the KV
        cache (0 while the first routing span advances by layers; all of them once the prompt
        is complete, which may happen on a smaller chunk than its token count)."""
        if req.request_id not in self.running:
            return
        left = req.num_prompt_tokens - computed
        if left <= 0:
            self.prefilling.pop(req.request_id, None)
        else:  # including a chunk handed out as its last that did not complete the prompt:
            # a request decodes only once its prompt is in
            self.prefilling[req.request_id] = (req, left)

    def finish(self, req: Any) -> None:
        """Remove a running request and free its slot (idempotent)."""
        self.prefilling.pop(req.request_id, None)
        self._starts.pop(req.request_id, None)
        if self.running.pop(req.request_id, None) is not None:
            heapq.heappush(self._free_slots, req.slot)

    def drain_waiting(self) -> list[Any]:
        """Remove and return every waiting request (engine shutdown)."""
        reqs, self.waiting = list(self.waiting), deque()
        for req in reqs:
            self._starts.pop(req.request_id, None)
        return reqs

    def _drop_cancelled_and_expired(self, now: float, out: SchedulerOutput) -> None:
        keep: deque[Any] = deque()
        for req in self.waiting:
            if req.cancel_requested:
                out.cancelled.append(req)
            elif req.queue_deadline is not None and now > req.queue_deadline:
                out.timed_out.append(req)
            else:
                keep.append(req)
                continue
            self._starts.pop(req.request_id, None)
        self.waiting = keep
        for req in [r for r in self.running.values() if r.cancel_requested]:
            self.finish(req)
            out.cancelled.append(req)
