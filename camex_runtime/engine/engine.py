"""Engine: the facade the server uses (docs/INTERFACES.md §2) and its background step loop.

One step reads like its algorithm (vLLM V1 `EngineCore.step`):

    scheduled = scheduler.schedule(now)        # who runs: joins, leaves, decodes
    logits    = self._execute(scheduled)       # model runner: prefills + one batched decode
    self._update(scheduled, logits)            # sample, detokenize, stop, publish, free slots

`submit` only validates and enqueues (any thread); the loop thread owns the runner and
the merge cache. `classify` runs in the caller's thread under the same model lock, so a
classifier engine needs no loop. Knows nothing about HTTP or Prometheus: metrics leave through
the optional observer (`on_step`, `on_merge`, `on_route`, `on_evict`); an observer that
raises is logged, never allowed to fail a request.
"""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import threading
import time
import uuid
import weakref
from pathlib import Path
from collections.abc import Sequence

import torch
from torch import Tensor

from camex_runtime import kernels
from camex_runtime.engine.compute_threads import in_passing_thread
from camex_runtime.engine.cost_model import STRATEGIES
from camex_runtime.engine.moe import DELTA_FORMATS
from camex_runtime.engine.precision import choose as choose_precision
from camex_runtime.engine.outputs import EngineStats, GenerationResult, PromptLogprob
from camex_runtime.engine.output_processor import OutputProcessor, terminal_event
from camex_runtime.engine.request import (ROUTING_MODES, GenerationRequest, RequestHandle,
                                          RequestTimings, SamplingParams, check_token_ids)
from camex_runtime.engine.runner import ModelRunner, build_model, notify
from camex_runtime.engine.sampling import make_generator, sample_batch
from camex_runtime.engine.structured import Grammars
from camex_runtime.engine.scheduler import (PrefillPacer, Scheduler, SchedulerConfig,
                                            SchedulerOutput)
from camex_runtime.engine.classify import classify_texts
from camex_runtime.engine.outputs import ClassificationResult
from camex_runtime.errors import EngineStoppedError, InputValidationError

log = logging.getLogger("camex.engine")
WARM_SHORT = 16  # tokens of the warm-up's mixture-strategy prompts (see Engine._warm_requests)
IDLE_WAIT_S = 0.25  # the idle loop still heartbeats this often (the server's liveness signal)
# A burst of requests (a client's concurrent ones) reaches the engine one by one, as the server
# reads and parses them (~1-2 ms each), and an idle loop would start a step on the first: waves
# of 8 concurrent requests to a GPT-2-small 7+1 bf16 server on two Zen 3 threads queued 39 of
# 48 requests 50-250 ms behind a prefill of one or two, and with merged experts every prefill
# step streams all experts of every layer once for its merges. So an engine with merged-expert
# layers, woken from idle, waits while requests keep arriving: until none came for
# GATHER_QUIET_S, or GATHER_MAX_S in all (a lone request pays GATHER_QUIET_S). The server cannot
# tell the engine that more are coming: it reads one request through to its submission before
# it parses the next. Measured (6 waves, same server): 1 ms / 5 ms put 27 of 48 requests in the
# first step, 2 ms / 20 ms 45. Dense engines start at once (a prefill split costs them little).
GATHER_QUIET_S = 0.002
GATHER_MAX_S = 0.02
# Tokens per step while requests decode (chunked prefill, scheduler.py). Long prompts (and
# merged-expert ones) are paced by measured time on the CPU, within a bank of
# PREFILL_BURST_TOKENS; the budget itself bounds the short dense prompts that join whole. 256
# lets a wave of 8 chat-sized prompts (32 tokens) join in one or two steps, packed into one
# forward, instead of one per step beside the running streams: a closed loop of 8 streams
# made 114.6 -> 124 tok/s (dense GPT-2-small, fp32, one core; 188 -> 205 on two), at the
# cost of one longer step for the streams already running when the wave arrives.
DEFAULT_MAX_BATCHED_TOKENS = 256
# The most prompt work, in tokens, a paced step may bank (PrefillPacer's burst; at most the
# token budget): a long prompt's first chunk costs the running streams about one 64-token
# forward (benchmarks/chunked_prefill.py).
PREFILL_BURST_TOKENS = 64
# a chunked step's prompt work, in units of its decode's own time (CPU; see PrefillPacer).
# A paced step lasts about 1 + ratio decodes, so at 1.0 a long prefill's p99 step sat at
# 1.89-2.00x the streams' steady p99 once segment turns got cheap (the bound is 2x; 7+1
# experts, GPT-2-small and a Llama of its size, one fp32 core); 0.8 gives 1.70-1.76x there for
# a first token of the long prompt 0-25 % later (20-50 % later with bf16 weights on two threads,
# where the ratio did not decide the p99: benchmarks/peer.md, "Chunked prefill").
DEFAULT_PREFILL_TIME_RATIO = 0.8
# queue pressure at which waiting short prompts join together beside decoding rows
# (Scheduler: `waiting_served_ratio`; TGI's default too)
DEFAULT_WAITING_SERVED_RATIO = 1.2


def eos_ids(*values) -> frozenset[int]:
    """Token ids from config values that are an int, a list of ints, or None."""
    out: set[int] = set()
    for v in values:
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v)
    return frozenset(out)


class Engine:
    """Serves one folded model. `Engine(model, tokenizer, ...)` takes ownership of `model`
    (its expert tensors move into the runner's serving layout); most callers use
    `Engine.from_pretrained(path, ...)`."""

    def __init__(self, model, tokenizer, *, name: str = "camex", kind: str = "causal-lm",
                 max_batch_size: int = 8, max_input_tokens: int | None = None,
                 max_total_tokens: int | None = None, max_waiting: int = 64,
                 merge_cache_bytes: int | None = None, strategy: str = "auto",
                 routing: str | None = None, observer=None,
                 max_prefill_tokens: int | None = None, profile=None, generation_config=None,
                 max_batched_tokens: int | None = DEFAULT_MAX_BATCHED_TOKENS,
                 prefill_time_ratio: float | None = DEFAULT_PREFILL_TIME_RATIO,
                 waiting_served_ratio: float | None = DEFAULT_WAITING_SERVED_RATIO,
                 expert_deltas: str = "full", prefix_caching: bool = False,
                 prefix_cache_slots: int = 0):
        cfg = model.config
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if expert_deltas not in DELTA_FORMATS:
            raise ValueError(f"expert_deltas must be one of {DELTA_FORMATS}, got "
                             f"{expert_deltas!r}")
        if expert_deltas == "int8" and strategy == "mixture" and kind == "causal-lm":
            raise ValueError("strategy 'mixture' runs every expert's full weights on each call: "
                             "with expert_deltas='int8' it would dequantize them every time; "
                             "use 'merged' or 'auto' (they merge, and fall back to the "
                             "mixture only when the merge pool is full)")
        routing = routing or cfg.routing
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        max_total = max_total_tokens or cfg.max_position_embeddings
        if max_total > cfg.max_position_embeddings:
            raise ValueError(f"max_total_tokens={max_total} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        max_input = max_input_tokens or max(1, max_total - 1)
        # a finished sequence's tokens stay in its free slot's KV cache, and a prompt that
        # starts with them (a chat's next turn, a shared system prompt) resumes from there
        self.prefix_caching = prefix_caching and kind == "causal-lm"
        # KV-cache slots beyond the batch that only keep finished requests' tokens (more
        # conversations than running sequences keep theirs)
        if prefix_cache_slots < 0:
            raise ValueError(f"prefix_cache_slots must be >= 0, got {prefix_cache_slots}")
        self.prefix_cache_slots = prefix_cache_slots if self.prefix_caching else 0
        num_slots = max_batch_size + self.prefix_cache_slots
        # placed requests whose cached prefix is copied in from another free slot: id -> slot
        self._copy_from: dict[str, int] = {}
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch_size=max_batch_size, num_slots=num_slots, max_waiting=max_waiting,
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            max_prefill_tokens=max_prefill_tokens or max(max_input, 4096),
            max_batched_tokens=max_batched_tokens,
            # merged-expert models build a merge per MoE layer for every sequence that joins
            max_joins_per_step=1 if cfg.num_experts > 0 and cfg.moe_layers else None,
            waiting_served_ratio=waiting_served_ratio),
            chunk_cost=self._chunk_cost, placer=self._place if self.prefix_caching else None)
        param = next(model.parameters())
        precision = choose_precision(param.device, param.dtype, kind == "causal-lm")
        self.runner = ModelRunner(model, num_slots=num_slots, max_len=max_total,
                                  merge_cache_bytes=merge_cache_bytes, strategy=strategy,
                                  observer=observer, profile=profile, precision=precision,
                                  # a classifier merges once per sequence: nothing to win
                                  expert_deltas=expert_deltas if kind == "causal-lm" else "full",
                                  prefix_caching=self.prefix_caching)
        # Chunked steps paced by measured time on the CPU. On a GPU the host would have to wait
        # for the device to time a step (no syncs in the step loop): the token budget alone.
        self.pacer = (PrefillPacer(prefill_time_ratio,
                                   burst=min(max_batched_tokens, PREFILL_BURST_TOKENS))
                      if prefill_time_ratio is not None
                      and max_batched_tokens is not None and self.runner.device.type == "cpu"
                      else None)
        self.config, self.tokenizer, self.kind, self.name = cfg, tokenizer, kind, name
        self.routing, self.observer = routing, observer
        # Generation stops on every EOS id the config, the generation config and the tokenizer
        # name (the tokenizer's only when the checkpoint names none itself).
        self.eos_token_ids = eos_ids(cfg.eos_token_id,
                                     getattr(generation_config, "eos_token_id", None))
        if not self.eos_token_ids:
            self.eos_token_ids = eos_ids(getattr(tokenizer, "eos_token_id", None))
        # structured output: the vocabulary compiled for grammars (at warm-up), per-request guides
        self.grammars = Grammars(tokenizer, cfg.vocab_size, self.eos_token_ids)
        self._lock = threading.Lock()  # scheduler + request table
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # runner: loop steps and classify calls
        self._procs: dict[str, OutputProcessor] = {}
        self._gens: dict[str, torch.Generator | None] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting, self._shutdown = True, False
        # (quiet, most) of GATHER_QUIET_S, for engines with merged-expert layers; (0, 0): none
        self.gather_s = (GATHER_QUIET_S, GATHER_MAX_S) if self.runner.moe else (0.0, 0.0)
        self._arrivals = 0  # submissions so far (the gathering's clock)
        self.steps, self.last_batch_size, self.heartbeat = 0, 0, time.monotonic()
        # Hooks for an engine served from another process (engine/process.py): what `submit`
        # hands out, and what the loop calls after each step (there: ship the step's events).
        self.make_handle = RequestHandle
        self.after_step = None
        self.tokenizer_dir: Path | None = None  # set by from_pretrained

    @property
    def eos_token_id(self) -> int | None:
        """One EOS id (the smallest), for callers that know only one; see `eos_token_ids`."""
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @eos_token_id.setter
    def eos_token_id(self, value) -> None:
        self.eos_token_ids = eos_ids(value)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype=None,
                        **limits) -> Engine:
        """Load and validate a folded checkpoint (CheckpointError names a bad tensor). Runs in a
        thread of its own, so that the caller's thread keeps no pool of torch worker threads
        beside the loop thread's (see engine/compute_threads.py)."""
        return in_passing_thread(cls._load, path, device, dtype, limits, name="camex-load")

    @classmethod
    def _load(cls, path: str | Path, device: str, dtype, limits: dict) -> Engine:
        from camex_runtime.checkpoint import load_folded
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        ckpt = load_folded(path, device=device, dtype=dtype)
        tok = None
        if ckpt.tokenizer_dir is not None:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
        engine = cls(build_model(ckpt), tok, name=Path(path).name, kind=ckpt.kind,
                     generation_config=ckpt.generation_config, **limits)
        engine.tokenizer_dir = ckpt.tokenizer_dir
        return engine

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._shutdown:
                raise EngineStoppedError("the engine was stopped; build a new one")
            self._thread = threading.Thread(target=self._loop, name="camex-engine", daemon=True)
            self._thread.start()
            _LOOPS.add(self)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish until `grace_s`, cancel the rest."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._loop_running() and time.monotonic() < deadline:
            with self._lock:
                if not self.scheduler.has_work():
                    break
            time.sleep(0.01)
        with self._lock:
            for req in list(self.scheduler.waiting) + list(self.scheduler.running.values()):
                req.cancel_requested = True
            self._wake.notify_all()
        if self._loop_running():
            while time.monotonic() < deadline + 5.0:
                with self._lock:
                    if not self.scheduler.has_work():
                        break
                time.sleep(0.01)
        else:
            self.step()  # no loop thread: finish the cancellations here
        with self._lock:
            self._shutdown = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if not self._loop_running():  # else the loop cancels the leftovers as it exits
            self._cancel_leftovers()

    def _loop_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        idle = True
        while True:
            with self._lock:
                self.heartbeat = time.monotonic()
                if self._shutdown:
                    break
                if not self.scheduler.has_work():
                    self._wake.wait(IDLE_WAIT_S)
                    idle = True
                    continue
                if idle:
                    self._gather_arrivals()
                    idle = False
            try:
                self.step()
            except Exception:  # a bug in a step must not kill the loop: fail what ran
                log.exception("engine step failed")
                self._fail_running("internal error in the engine step (see server log)")
            if self.after_step is not None:
                try:
                    self.after_step()
                except Exception:  # e.g. the pipe to a vanished API process: the loop goes on
                    log.exception("after-step hook failed")
        self._cancel_leftovers()  # stop() gave up waiting: no handle may wait forever

    def _gather_arrivals(self) -> None:
        """(Holding the lock; work came to an idle loop.) Wait while requests keep arriving:
        until none came for `gather_s[0]`, or `gather_s[1]` in all (GATHER_QUIET_S)."""
        quiet, most = self.gather_s
        start = time.monotonic()
        seen, last = self._arrivals, start
        while not self._shutdown:
            now = time.monotonic()
            if self._arrivals != seen:
                seen, last = self._arrivals, now
            left = min(last + quiet, start + most) - now
            if left <= 0:
                return
            self._wake.wait(left)

    def _place(self, req: GenerationRequest, free: list[int]) -> tuple[int, int]:
        """The scheduler's placer (prefix caching): the free slot holding the longest prefix of
        the prompt that can resume (segment routing unless the model has no merged-expert
        layers; no routing trace, no prompt logprobs: neither exists for tokens not computed),
        else the free slot that keeps the least (`ModelRunner.free_slot_order`); (slot,
        prompt tokens it holds). A prompt that holds only part of the prompt that left what a
        slot keeps (the same system prompt as another conversation) has the part it resumes
        copied into the free slot that keeps the least instead (`_copy_prefixes`): the other
        conversation keeps its slot for its next turn."""
        p = req.params
        self._copy_from.pop(req.request_id, None)
        routed = req.routing == "segment" or not self.runner.moe  # (dense: nothing is routed)
        if routed and not p.return_routing and p.prompt_logprobs is None:
            hit = self.runner.cached_prefix(req.prompt_token_ids, free)
            if hit is not None:
                slot, n = hit
                others = [s for s in free if s != slot]
                if self.runner.continues(slot, req.prompt_token_ids) or not others:
                    return hit  # that exchange's next turn (or no other slot is free)
                self._copy_from[req.request_id] = slot
                return self.runner.free_slot_order(others)[0], n
        return self.runner.free_slot_order(free)[0], 0

    def _chunk_cost(self, req, start: int, n: int) -> int:
        """The scheduler's view of a chunk's merges (ModelRunner.chunk_cost)."""
        return self.runner.chunk_cost(req.num_prompt_tokens, req.routing, start, n)

    def warmup(self, freeze_gc: bool = True) -> None:
        """Everything a first request would otherwise pay for: the merge pool's memory
        committed (see MergeCache.prefault), the `auto` strategy's cost model measured, and
        one tiny request through every routing mode and strategy (and classification).

        Then, with `freeze_gc`, the process's heap so far (torch, transformers, the model's
        modules: ~350,000 objects) is moved out of the garbage collector's reach
        (`gc.freeze`, as vLLM does after start-up). Python's full collection walks every
        tracked object: it took 150 ms here, and when one fell inside a decode step, that
        step took 240 ms instead of 95 (GPT-2-small, 7+1 experts, fp32, 8 streams, one core)
        and every running stream saw it in its inter-token latency. Later collections scan only
        what was allocated after warm-up.

        Runs in a thread of its own, as `from_pretrained` does (engine/compute_threads.py)."""
        in_passing_thread(self._warmup, freeze_gc, name="camex-warmup")

    def _warmup(self, freeze_gc: bool) -> None:
        t0 = time.perf_counter()
        committed = self.runner.cache.prefault()
        # the cost model, measured here rather than in the first request's step (the `auto`
        # strategy and the scheduler's chunk costs use it)
        decision = (self.runner.decision_tokens
                    if self.runner.moe and self.runner.strategy != "mixture" else 0)
        log.info("warm-up: merge pool and cost model ready",
                 extra={"merge_pool_bytes": committed, "decision_tokens": decision,
                        "cost_profile": self.runner.cost_profile,
                        "seconds": round(time.perf_counter() - t0, 3)})
        if self.kind == "classifier":
            for strategy in ("merged", "mixture", self.runner.strategy):
                self.runner.strategy = strategy
                self.classify(["warmup"] if self.tokenizer else [[0]])
        else:
            self._prepare_grammars()
            self.start()
            self._warm_requests()
            with self._model_lock:  # (prefix caching) their tokens are nobody's conversation
                self.runner.forget_prefixes()
        if freeze_gc:
            gc.collect()
            gc.freeze()

    def _prepare_grammars(self) -> None:
        """Compile the vocabulary for structured output now, not in a first constrained
        request (~0.3 s for 50k tokens); a tokenizer it cannot read is logged, and such
        requests get the reason as their error."""
        if self.tokenizer is None:
            return
        t0 = time.perf_counter()
        try:
            self.grammars.prepare()
        except InputValidationError as e:
            log.warning("structured output unavailable: %s", e)
            return
        log.info("warm-up: vocabulary compiled for structured output",
                 extra={"seconds": round(time.perf_counter() - t0, 3)})

    def _warm_requests(self) -> None:
        """Both strategies in both routing modes. The merged strategy's prompts cross a segment
        boundary (the second segment's routing and merges); the mixture's are short: the code
        is the same at any length, and a boundary-crossing prompt through every expert took
        4 s of the 7+1-expert GPT-2-small's start-up per routing mode (fp32, one thread)."""
        limit = self.scheduler.config
        longest = max(1, min(limit.max_input_tokens, limit.max_total_tokens - 2))
        crossing = min(self.config.segment_len + 1, longest)
        eos = self.eos_token_id or 0
        saved = self.runner.strategy
        plan = [("merged", crossing), ("mixture", min(WARM_SHORT, crossing))]
        if self.runner.expert_deltas == "int8":  # the mixture is only the pool-full fallback
            plan = plan[:1]  # there, which dequantizes per call anyway (~6 s for GPT-2-small)
        try:
            for strategy, n in plan:
                self.runner.strategy = strategy
                for routing in ROUTING_MODES:
                    self.generate([eos] * n, max_new_tokens=2, ignore_eos=True, routing=routing)
        finally:
            self.runner.strategy = saved

    # -- requests ---------------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.config.vocab_size, prompt)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
               request_id: str | None = None) -> RequestHandle:
        """Validate and enqueue; the loop thread (see `start`) generates. `request_id`: the
        caller's (unique) id for it, else one is made."""
        if self.kind != "causal-lm":
            raise InputValidationError(f"this engine serves a {self.kind} checkpoint: "
                                       "use classify()")
        params = params or SamplingParams()
        params.validate()
        check_token_ids(params, self.config.vocab_size)
        ids = self._encode(prompt)
        self.scheduler.check_lengths(len(ids), params.max_new_tokens)
        rid = request_id or new_request_id(next(self._ids))
        handle = self.make_handle(rid, ids, self._cancel)
        req = GenerationRequest(rid, ids, params, params.routing or self.routing, handle,
                                RequestTimings(queued_at=time.monotonic()))
        if params.constraint is not None:  # compiled here: a bad grammar is the caller's error
            req.guide = self.grammars.guide(params.constraint)
        if params.bad_words:
            req.bad_word_ids = self._bad_word_ids(params.bad_words)
        if params.allowed_token_ids is not None:
            ending = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                   else set(self.eos_token_ids))
            if params.min_tokens > 0 and set(params.allowed_token_ids) <= ending:
                raise InputValidationError(
                    f"min_tokens is {params.min_tokens} but allowed_token_ids lists only ids "
                    f"that end generation (EOS or stop_token_ids): nothing could be chosen")
            req.allowed_ids = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            req.allowed_ids[list(params.allowed_token_ids)] = True
        with self._lock:
            if not self._accepting or self._shutdown:
                raise EngineStoppedError("the engine is stopping and accepts no new requests")
            self.scheduler.add(req)  # QueueFullError when the waiting queue is full
            self._arrivals += 1
            self._wake.notify_all()
        return handle

    def generate(self, prompt: str | Sequence[int], **params) -> GenerationResult:
        """Blocking, thread-safe: submit and wait (starts the loop if needed)."""
        self.start()
        return self.submit(prompt, SamplingParams(**params)).result()

    def cancel(self, request_id: str) -> None:
        """Cancel a request by id (as its handle's `cancel`); unknown ids are ignored."""
        self._cancel(request_id)

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            req = self.scheduler.running.get(request_id) or next(
                (r for r in self.scheduler.waiting if r.request_id == request_id), None)
            if req is not None:
                req.cancel_requested = True
                self._wake.notify_all()

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> int:
        """schedule -> execute -> update. Returns the number of requests that ran.

        Drives an engine whose loop thread is not running (tests, benchmarks). While the loop
        runs (`start`, `warmup` and `generate` start it) another thread's call is refused:
        two threads stepping at once would run requests twice and fail them."""
        loop = self._thread
        if loop is not None and loop.is_alive() and threading.current_thread() is not loop:
            raise RuntimeError("the engine's loop thread is running (start(), warmup() and "
                               "generate() start it): step() drives an engine without one")
        t0 = time.perf_counter()
        with self._lock:
            sched = self.scheduler.schedule(time.monotonic(), self._paced_budget())
        with self._model_lock:
            self._drop(sched)
            rows, logits = self._execute(sched)
            self._update(rows, logits)
        self.steps += 1
        self.last_batch_size = sched.batch_size
        if sched.batch_size:
            notify(self.observer, "on_step", sched.batch_size, time.perf_counter() - t0)
        return sched.batch_size

    def _drop(self, sched: SchedulerOutput) -> None:
        for req in sched.cancelled:
            self._finish(req, terminal_event(req, "cancelled"))
        for req in sched.timed_out:
            waited = time.monotonic() - req.timings.queued_at
            self._finish(req, terminal_event(
                req, "error", f"queue timeout: not scheduled within {req.params.queue_timeout_s}s "
                              f"(waited {waited:.3f}s)"))

    def _paced_budget(self) -> int | None:
        """The pacer's bound on this step's prompt work (None: no pacer). Rows about to open
        a segment make their merges inside this step's decode: that time, known before the
        step, comes off the step's prompt share. (Otherwise a stream's segment turn and a full
        prefill chunk landed in the same step: 320 ms of decode plus 90 of prefill against
        ~100 ms steps, GPT-2-small 7+1 experts, one core, the slowest steps of a long prefill.)"""
        if self.pacer is None:
            return None
        decoding = [r.slot for r in self.scheduler.decoding()]
        return self.pacer.budget(self.runner.turn_seconds(decoding) if decoding else 0.0)

    def _execute(self, sched: SchedulerOutput):
        """Run the model: the step's prefill chunks, then one decode for the running rest.
        Returns (requests, next-token logits (B, V)) in the same order: the decoding rows and
        the prompts whose prefill completed in this step."""
        now = time.monotonic()
        rows, logits = [], []
        for req, got in self._prefill(sched, now):
            if got is None:
                continue
            if req.params.max_new_tokens == 0:  # the prompt was only scored: nothing to sample
                self._finish(req, terminal_event(req, "length"))
                continue
            logits.append(got[None])  # the whole prompt is in: its first token is sampled now
            rows.append(req)
        if sched.decode:
            reqs = sched.decode
            t0 = time.perf_counter()
            logits.append(self.runner.decode([r.slot for r in reqs],
                                             [r.output_token_ids[-1] for r in reqs],
                                             [r.all_token_ids for r in reqs]))
            if self.pacer is not None:
                self.pacer.record_decode(time.perf_counter() - t0)
            rows.extend(reqs)
        return rows, (None if not logits else logits[0] if len(logits) == 1
                      else torch.cat(logits, 0))

    def _prefill(self, sched: SchedulerOutput, now: float
                 ) -> list[tuple[GenerationRequest, Tensor | None]]:
        """Run the step's prefill chunks (`sched.chunks`: prompt tokens each, None: the rest),
        packed into one forward (`runner.prefill_steps`). Returns (request, next-token logits
        (V,) once its prompt is complete, else None) for each request still running.

        A request that fails fails alone: if the packed forward raises (e.g. out of memory),
        each of its requests starts its prompt over and runs alone in this step, and only one
        that fails again gets the error."""
        reqs = []
        failed = self._copy_prefixes(sched)
        for req in sched.prefill:
            if req in failed:
                continue
            try:
                self._start_prefill(req, now, sched.cached.get(req.request_id, 0))
                reqs.append(req)
            except Exception as e:
                self._prefill_failed(req, e)
        if not reqs:
            return []
        plan = [(req.slot, sched.chunks.get(req.request_id)) for req in reqs]
        starts = [self.runner.slots[req.slot].length for req in reqs]
        t0 = time.perf_counter()
        try:
            got = self.runner.prefill_steps(plan)
        except Exception as e:
            if len(reqs) == 1:
                self._prefill_failed(reqs[0], e)
                return []
            log.exception("packed prefill of %d requests failed; each runs alone", len(reqs))
            return [out for req, (_, chunk) in zip(reqs, plan)
                    if (out := self._prefill_alone(req, chunk)) is not None]
        self._pace(reqs, plan, starts, time.perf_counter() - t0, chunked=bool(sched.decode))
        return [(req, self._prefilled(req, g)) for req, g in zip(reqs, got)]

    def _copy_prefixes(self, sched: SchedulerOutput) -> list[GenerationRequest]:
        """The step's copies of cached prefixes into the slots of the requests placed to
        resume them (`_place`), all before any prompt of the step starts: a source slot may
        be another joining request's slot, whose prompt overwrites it once it runs. Returns
        the requests whose copy failed (finished with the error)."""
        failed = []
        for req in sched.prefill:
            src = self._copy_from.pop(req.request_id, None)
            if src is None or req.timings.scheduled_at is not None:
                continue
            try:
                self.runner.copy_prefix(src, req.slot, req.prompt_token_ids,
                                        sched.cached[req.request_id])
            except Exception as e:
                failed.append(req)
                self._prefill_failed(req, e)
        return failed

    def _start_prefill(self, req: GenerationRequest, now: float, cached: int) -> None:
        """Its first chunk: the request's output state, and its slot made the prompt's, from
        token `cached` (the prompt tokens the slot holds already, prefix caching)."""
        if req.timings.scheduled_at is None:
            req.timings.scheduled_at = now
            self._procs[req.request_id] = OutputProcessor(req, self.tokenizer, self.eos_token_ids)
            self._gens[req.request_id] = make_generator(req.params, self.runner.device)
            req.cached_tokens = cached if self.prefix_caching else None
            self._restart_prefill(req)

    def _restart_prefill(self, req: GenerationRequest) -> None:
        """(Re)make the slot the prompt's, from token `req.cached_tokens`."""
        self.runner.start_prefill(req.slot, req.prompt_token_ids, req.routing,
                                  trace=req.params.return_routing,
                                  max_new_tokens=req.params.max_new_tokens,
                                  prompt_logprobs=req.params.prompt_logprobs,
                                  resume=req.cached_tokens or 0)

    def _prefill_alone(self, req: GenerationRequest, chunk: int | None):
        """After a failed forward: the prompt over from its first token, alone; (request,
        logits or None), or None when it failed (the request is finished with the error)."""
        try:
            if req.cached_tokens:  # the slot forgot what it kept when the prompt first started
                req.cached_tokens = 0
            self._restart_prefill(req)
            return req, self._prefilled(req, self.runner.prefill_step(req.slot, chunk))
        except Exception as e:  # e.g. out of memory on a long prompt: fail this request only
            self._prefill_failed(req, e)
            return None

    def _prefill_failed(self, req: GenerationRequest, e: Exception) -> None:
        log.exception("prefill failed for %s", req.request_id)
        self._finish(req, terminal_event(req, "error", f"prefill failed: {e}"))

    def _pace(self, reqs, plan, starts, seconds: float, chunked: bool) -> None:
        """The pacer's measurements of one packed prefill that carried paced work, which a
        chunked step spends from the pacer's bank: its time for its work (tokens plus chunk
        costs, the scheduler's unit), taken from prefills without routing decisions once there
        was one. A decision's merges are priced by the cost model, not timed, and
        that price is not their time (GPT-2-small, 7+1 experts, fp32, one core: 39 tokens'
        worth, ~144 ms at the prompt's token time, against ~72 ms of merges), so mixing them in
        made the token time swing from 5 to 2.6 ms and the next plain chunks run 40-50 %
        longer than paced."""
        if self.pacer is None:
            return
        work = paced = 0
        priced = False
        for req, (_, chunk), start in zip(reqs, plan, starts):
            n = req.num_prompt_tokens - start if chunk is None else chunk
            c = self._chunk_cost(req, start, n)
            work += n + c
            priced |= c != 0
            paced += n + c if self.scheduler.is_paced(req) else 0
        if paced:
            if not priced or self.pacer.token_s is None:
                self.pacer.record_prefill(work, seconds)
            if chunked:
                self.pacer.spend(paced)

    def _prefilled(self, req: GenerationRequest, got: Tensor | None) -> Tensor | None:
        """Report a chunk's progress to the scheduler; prompt logprobs once complete."""
        with self._lock:
            self.scheduler.prefilled(req, self.runner.slots[req.slot].length)
        scored = self.runner.prompt_scores(req.slot) if got is not None else None
        if scored is not None:
            req.prompt_logprobs = req.handle.prompt_logprobs = prompt_logprob_list(*scored)
        return got

    def _update(self, rows: list[GenerationRequest], logits) -> None:
        if not rows:
            return
        try:
            allowed = [self._allowed(r) for r in rows]
            sampled = list(zip(*sample_batch(
                logits, [r.params for r in rows], [r.all_token_ids for r in rows],
                [self._gens[r.request_id] for r in rows],
                [r.output_token_ids for r in rows], [self._suppressed(r) for r in rows],
                allowed if any(a is not None for a in allowed) else None)))
        except Exception:  # a per-request failure (its parameters, its logits): isolate it
            log.exception("batched sampling failed; sampling rows one by one")
            sampled = [self._sample_alone(req, logits[i:i + 1]) for i, req in enumerate(rows)]
        now = time.monotonic()
        for req, choice in zip(rows, sampled):
            if choice is None:
                continue
            if req.timings.first_token_at is None:
                req.timings.first_token_at = now
            try:
                # a grammar that allows nothing more ends the request as EOS would
                complete = req.guide is not None and req.guide.advance(choice[0])
                ev = self._procs[req.request_id].process(*choice, at=now, complete=complete)
            except Exception as e:  # e.g. detokenization: this request fails, the batch goes on
                log.exception("output processing failed for %s", req.request_id)
                self._finish(req, terminal_event(req, "error", f"output processing failed: {e}"))
                continue
            if ev.finish_reason is None:
                req.handle._publish([ev], None)
            else:
                self._finish(req, ev)

    @staticmethod
    def _allowed(req: GenerationRequest) -> Tensor | None:
        """The ids `req` may choose next (None: any): its grammar's, within its
        allowed_token_ids. A grammar that allows none of those fails the request."""
        grammar = req.guide.allowed() if req.guide is not None and req.guide.active else None
        if req.allowed_ids is None or grammar is None:
            return grammar if grammar is not None else req.allowed_ids
        both = grammar & req.allowed_ids
        if not bool(both.any()):
            raise InputValidationError("no token is both allowed by allowed_token_ids and "
                                       "allowed next by the request's grammar")
        return both

    def _suppressed(self, req: GenerationRequest) -> tuple[int, ...]:
        """The ids `req` must not choose now: those that would end it (EOS unless ignored,
        its stop_token_ids) while it has fewer than `min_tokens` new tokens, and the token that
        would complete one of its bad words."""
        p, out = req.params, req.output_token_ids
        banned = ()
        if len(out) < p.min_tokens:
            banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_token_ids))
        for word in req.bad_word_ids:
            n = len(word) - 1
            if n == 0 or (len(out) >= n and tuple(out[-n:]) == word[:-1]):
                banned += (word[-1],)
        return banned

    def _bad_word_ids(self, words) -> tuple[tuple[int, ...], ...]:
        """Each bad word as the token ids it may be generated as: alone, and after a space
        (byte-level BPE's word-initial tokens; where the space is a token of its own, the bare
        spelling already covers it). vLLM keeps the spaced spelling only when it has as many
        tokens as the bare one, which misses a word that is one token with its space."""
        if self.tokenizer is None:
            raise InputValidationError("bad_words needs the checkpoint's tokenizer; this "
                                       "engine has none")
        seqs: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            for ids in (bare, spaced):
                # a space the tokenizer keeps as a token of its own adds no new spelling
                if ids and ids not in seqs and (ids is bare or ids[1:] != bare):
                    seqs.append(ids)
        return tuple(seqs)

    def _sample_alone(self, req: GenerationRequest, logits) -> tuple | None:
        """Sample one request's row; on failure finish that request only and return None."""
        try:
            tokens, logprobs, tops = sample_batch(logits, [req.params], [req.all_token_ids],
                                                  [self._gens[req.request_id]],
                                                  [req.output_token_ids], [self._suppressed(req)],
                                                  [self._allowed(req)])
            return tokens[0], logprobs[0], tops[0]
        except Exception as e:
            log.exception("sampling failed for %s", req.request_id)
            self._finish(req, terminal_event(req, "error", f"sampling failed: {e}"))
            return None

    def _finish(self, req: GenerationRequest, last_event) -> None:
        """Free the slot and its cache references, then publish the final event + result.
        If freeing fails, the request still leaves the scheduler and its handle completes
        (then the error propagates)."""
        try:
            if req.slot is not None:
                if req.params.return_routing:
                    req.routing_trace = self.runner.routing_trace(req.slot)
                # prefix caching: what the slot computed stays for a later prompt, unless a
                # failure may have left it half written
                keep = self.prefix_caching and last_event.finish_reason != "error"
                self.runner.release(req.slot, req.all_token_ids if keep else None)
        finally:
            if req.slot is not None:
                with self._lock:
                    self.scheduler.finish(req)
            self._procs.pop(req.request_id, None)
            self._gens.pop(req.request_id, None)
            self._copy_from.pop(req.request_id, None)
            req.timings.finished_at = time.monotonic()
            req.handle._publish([last_event], req.to_result())

    def _finish_all(self, reqs: list[GenerationRequest], reason: str,
                    error: str | None = None) -> None:
        """Finish each request; one failing does not stop the rest (nor the loop thread)."""
        with self._model_lock:
            for req in reqs:
                try:
                    self._finish(req, terminal_event(req, reason, error))
                except Exception:
                    log.exception("finishing %s failed", req.request_id)

    def _fail_running(self, message: str) -> None:
        with self._lock:
            running = list(self.scheduler.running.values())
        self._finish_all(running, "error", message)

    def _cancel_leftovers(self) -> None:
        """Shutdown: cancel whatever still waits or runs once no step will run again."""
        with self._lock:
            reqs = self.scheduler.drain_waiting() + list(self.scheduler.running.values())
        self._finish_all(reqs, "cancelled")

    # -- classification, stats, info ---------------------------------------------------------
    def classify(self, texts: Sequence[str | Sequence[int]], truncate: bool = False,
                 raw_scores: bool = False, function: str | None = None
                 ) -> list[ClassificationResult]:
        """Scores per text, labels sorted by score (softmax / sigmoid / raw per problem_type,
        or `function`: "softmax", "sigmoid" or "none"; raw logits with raw_scores=True).
        Thread-safe; runs in the caller's thread."""
        if self.kind != "classifier":
            raise InputValidationError(f"this engine serves a {self.kind} checkpoint: "
                                       "classify needs a classifier")
        from camex_runtime.modeling import SCORE_FUNCTIONS

        if function not in (None, *SCORE_FUNCTIONS):
            raise InputValidationError(f"function must be one of {', '.join(SCORE_FUNCTIONS)} "
                                       f"(got {function!r})")
        return classify_texts(self, texts, truncate, raw_scores, function)

    def stats(self) -> EngineStats:
        with self._lock:
            running, waiting = self.scheduler.num_running, self.scheduler.num_waiting
        alive = self._loop_running()  # staleness: the caller compares `heartbeat` to its clock
        c = self.scheduler.config
        return EngineStats(
            running=running, waiting=waiting, max_batch_size=c.max_batch_size,
            max_waiting=c.max_waiting, steps=self.steps, last_step_batch_size=self.last_batch_size,
            heartbeat=self.heartbeat, alive=alive, cache=self.runner.cache.stats(),
            router_scores=self.runner.router_sum.tolist(),
            router_counts=list(self.runner.router_counts))

    def info(self) -> dict:
        cfg, c = self.config, self.scheduler.config
        return {
            "model": self.name, "kind": self.kind, "num_experts": cfg.num_experts,
            "moe_layers": list(self.runner.moe_layers), "segment_len": cfg.segment_len,
            "routing": self.routing, "strategy": self.runner.strategy,
            "expert_deltas": self.runner.expert_deltas if self.runner.moe else None,
            "expert_bytes": sum(m.weight_bytes for m in self.runner.moe),
            "device": str(self.runner.device),
            "dtype": str(self.runner.precision.weights).replace("torch.", ""),
            "precision": self.runner.precision.describe(), "kernels": kernels.status(),
            "max_batch_size": c.max_batch_size, "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens, "max_waiting": c.max_waiting,
            "max_batched_tokens": c.max_batched_tokens,
            "prefill_time_ratio": None if self.pacer is None else self.pacer.ratio,
            "waiting_served_ratio": c.waiting_served_ratio,
            "prefix_caching": self.prefix_caching, "prefix_cache_slots": self.prefix_cache_slots,
            # memory per engine: every slot's keys and values, and (prefix caching, merged
            # experts) the segment sums a resume inside a segment needs
            "kv_cache_bytes": 0 if self.runner.kv is None else self.runner.kv.num_bytes,
            "prefix_sums_bytes": 0 if self.runner.sum_ring is None
            else self.runner.sum_ring.numel() * self.runner.sum_ring.element_size(),
            "merge_cache_bytes": self.runner.cache.budget_bytes,
            "cost_profile": self.runner.cost_profile,
            "vocab_size": cfg.vocab_size, "eos_token_id": self.eos_token_id,
            "eos_token_ids": sorted(self.eos_token_ids), "family": cfg.family,
            "id2label": {int(k): v for k, v in (cfg.id2label or {}).items()}
            if self.kind == "classifier" else None,
            "provenance": dict(getattr(cfg, "provenance", {}) or {}),
        }


def encode_prompt(tokenizer, vocab_size: int, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text through the tokenizer, ids checked against the vocabulary."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputValidationError("this checkpoint has no tokenizer: send token ids")
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = list(prompt)
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InputValidationError(f"token id {bad[0]!r} is outside the vocabulary "
                                   f"[0, {vocab_size})")
    return ids


def new_request_id(n: int) -> str:
    return f"{n}-{uuid.uuid4().hex[:12]}"


def prompt_logprob_list(chosen, top_values, top_ids) -> list[PromptLogprob | None]:
    """The runner's prompt-logprob tensors as one entry per prompt token; the first is None
    (no logits precede it). chosen (L-1,), top_values / top_ids (L-1, k)."""
    values, ids = top_values.tolist(), top_ids.tolist()
    return [None] + [PromptLogprob(lp, tuple(zip(ids[i], values[i])))
                     for i, lp in enumerate(chosen.tolist())]


# Engines whose loop thread was started. The loop is a daemon thread (a forgotten engine must
# not keep the process alive), and Python ends daemon threads at exit by unwinding them from
# under whatever they run: a script that used an engine without `stop()` was aborted by the C++
# runtime ("terminate called without an active exception", exit status 134) in ~15 % of its
# exits (GPT-2-small, CPU). Ending the loops first makes exit plain.
_LOOPS: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _end_loops() -> None:
    for engine in list(_LOOPS):
        if engine._loop_running():
            engine.stop(grace_s=0)  # after the current step; whatever is left is cancelled
