"""What the engine hands back to its callers: per-token events, results, stats.

Plain dataclasses, no tensors: everything here is safe to pass to another thread or to
serialise. The engine fills them; the server turns them into JSON and Prometheus metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Why a request stopped. "cancelled" and "error" never come from the model itself.
FINISH_REASONS = ("length", "eos_token", "stop_sequence", "cancelled", "error")

# {"mode": "segment"|"prompt", "layers": [{"layer": int, "segments":
#   [{"start": int, "end": int, "scores": [float] * E}]}]}  -- see docs/INTERFACES.md §2
RoutingTrace = dict[str, Any]


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the newly decodable text piece ("" while a multi-byte character is incomplete)
    logprob: float  # log p(token) under the model's (unprocessed) distribution
    index: int  # 0-based position among the generated tokens
    finish_reason: str | None = None  # set on the last event only
    error: str | None = None  # set when finish_reason == "error"
    # SamplingParams.logprobs best alternatives as (token_id, logprob), best first; raw model
    # distribution like `logprob`. Empty when none were asked for.
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # on the last event of a request a stop ended: the stop string, or the `stop_token_ids`
    # id, that ended it (vLLM's `stop_reason`); None for EOS, a complete grammar, a length
    stop_reason: int | str | None = None
    # time.monotonic() when the engine produced it (one clock for every process of a machine),
    # so a caller that reads the events only at the end still knows their spacing. Not part of
    # an event's identity: the same tokens compare equal whenever they came.
    at: float = field(default=0.0, compare=False, repr=False)


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token's log-probability given the tokens before it (the prefill's logits)."""
    logprob: float
    # the SamplingParams.prompt_logprobs most likely tokens at this position, best first
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestTimings:
    """time.monotonic() stamps; None until the stage happened."""
    queued_at: float
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float]
    routing: RoutingTrace | None
    timings: RequestTimings
    error: str | None = None  # why, when finish_reason == "error"
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # per token
    # aligned with prompt_token_ids, first entry None (nothing precedes it); None unless asked
    prompt_logprobs: list[PromptLogprob | None] | None = None
    # prompt tokens resumed from a cached prefix, not computed again (None: prefix caching off)
    cached_tokens: int | None = None
    # the stop string or stop_token_ids id that ended it (TokenEvent.stop_reason)
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class ClassificationResult:
    scores: list[tuple[str, float]]  # (label, score), sorted by score, highest first
    num_tokens: int  # tokens actually fed to the model (after truncation)


@dataclass(frozen=True)
class MergeCacheStats:
    hits: int
    misses: int
    evictions: int
    fallbacks: int  # merges refused for lack of pool space: served by the mixture strategy
    bytes_used: int  # bytes held by live (referenced or LRU) entries
    bytes_budget: int
    merges: int
    merge_seconds: float  # building them; a merge_apply (short prompt segment) includes the apply


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    max_waiting: int
    steps: int
    last_step_batch_size: int
    heartbeat: float  # monotonic time of the last loop iteration (the server's liveness signal)
    alive: bool
    cache: MergeCacheStats
    router_scores: list[list[float]] = field(default_factory=list)  # per MoE layer, per expert
    router_counts: list[int] = field(default_factory=list)  # per MoE layer: routing decisions
