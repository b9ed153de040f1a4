"""Per-sequence routing bookkeeping of the engine: modes, segment boundaries, cache keys.

docs/DESIGN.md §2/§4: in `segment` mode segment 1 is routed by the mean of its first
`route1_len = min(prompt_len, T)` tokens, segment k >= 2 by the mean of segment k-1; in
`prompt` mode one decision from the prompt mean serves everything. A merged-weight cache key
must capture everything the scores depend on: the layer, the mode, the token ids that came
before the routing decision, and (segment mode) `route1_len`. `routing_digest` hashes those
once per decision so the per-layer key is just `(digest, layer)`.

Tensor-free; the tensors (scores, running segment sums) live in the model runner.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Hashable, Sequence

NO_MERGE = -1  # no pool entry yet: merge lazily when a step uses the merged strategy
FALLBACK = -2  # the pool was full for this segment: mixture until the next routing decision


def routing_digest(mode: str, token_ids: Sequence[int], segment: int, T: int, route1_len: int,
                   prompt_len: int) -> bytes:
    """Identity of one routing decision (0-based `segment`; prompt mode ignores it)."""
    if mode == "prompt":
        tag, prefix = b"prompt", token_ids[:prompt_len]
    else:  # the segment index too: with route1_len == T, segments 1 and 2 share a prefix
        tag = b"segment:%d:%d" % (route1_len, segment)
        prefix = token_ids[:route1_len] if segment == 0 else token_ids[:segment * T]
    h = hashlib.blake2b(tag, digest_size=16)
    h.update(array("q", prefix).tobytes())
    return h.digest()


class PromptSegment(NamedTuple):
    """The part of a prefill chunk's rows [a, b) at one MoE layer that one segment's merged
    expert (`key`, routed by `scores` (E,)) serves; `keep`: the chunk's last segment, which
    stays the slot's current one; `serves_decode`: its merge also serves the decode steps."""
    a: int
    b: int
    scores: Any
    key: Hashable
    keep: bool
    serves_decode: bool


@dataclass
class RetainedPrefix:
    """What a finished sequence left in its free slot for a later prompt to resume from
    (prefix caching): the token ids whose keys and values the slot's KV cache still holds, and
    when it was left there (`order`: higher is more recent)."""
    tokens: list[int]
    order: int
    prompt_len: int  # of the request that left them (a prompt that holds all of it continues
    # that exchange; one that shares only part of it is another one, e.g. the same system prompt)
    # the segment opening after the last token is routed already (its scores current, its
    # FFN-input sum 0): a prefix copied from another slot, cut at a segment boundary
    decided: bool = False
    # the first position whose segment sum the runner's `sum_ring` still holds (those up to
    # the last token from there on; a prompt may resume after any of them)
    ring_from: int = 0


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


@dataclass
class LayeredChunk:
    """Prompt tokens [start, end) that a chunked prefill runs a few layers per step (a routing
    decision's merges spread over steps; see ModelRunner.prefill_step)."""
    start: int
    end: int
    hidden: Any = None  # (1, n, d) after `layer` layers; None before the first
    layer: int = 0  # the next layer to run


@dataclass
class SlotRouting:
    """Routing state of one running sequence (one KV-cache slot)."""
    mode: str  # "segment" | "prompt"
    prompt_len: int
    route1_len: int  # tokens whose mean routes segment 1 (segment mode)
    num_moe: int
    max_len: int  # prompt_len + max_new_tokens: bounds how long a merge will be reused
    trace: bool = False
    length: int = 0  # tokens processed (their K/V cached, their FFN inputs summed)
    keys: list[Hashable | None] = field(default_factory=list)  # per MoE layer
    pool_slots: list[int] = field(default_factory=list)  # per MoE layer, or NO_MERGE/FALLBACK
    decisions: list[list[tuple[int, list[float]]]] = field(default_factory=list)  # (start, scores)
    prompt: list[int] = field(default_factory=list)  # the prompt's token ids (chunked prefill)
    digests: list[bytes] = field(default_factory=list)  # routing identity of each prompt segment
    partial: LayeredChunk | None = None  # chunked prefill: a chunk advancing by layers
    score_k: int | None = None  # prompt logprobs asked for: top-k size (0: chosen only)
    scored: list[tuple] = field(default_factory=list)  # score_prompt parts, chunk by chunk
    # prefix caching: a resumed prompt's first position when the slot's current scores were
    # restored from an earlier decision (the segment opening there is routed already); -1: none
    decided: int = -1
    # prefix caching: the first position whose segment sum `sum_ring` holds (0: all it computed)
    ring_from: int = 0

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_moe
        self.pool_slots = [NO_MERGE] * self.num_moe
        self.decisions = [[] for _ in range(self.num_moe)]

    def future_uses(self, pos: int, T: int) -> int:
        """Decode steps after position `pos` that keep the merge in force at `pos` (the
        last sampled token is never processed, hence max_len - 1)."""
        left = max(0, self.max_len - 1 - (pos + 1))
        if self.mode == "prompt":
            return left
        return min(left, T - 1 - pos % T)

    def routing_trace(self, layer_ids: Sequence[int], total_len: int) -> dict:
        """INTERFACES §2 RoutingTrace; `layer_ids` are the block indices of the MoE layers,
        `total_len` the sequence length (prompt + generated) the last segment runs to."""
        layers = []
        for layer, decs in zip(layer_ids, self.decisions):
            segs = []
            for i, (start, scores) in enumerate(decs):
                end = decs[i + 1][0] if i + 1 < len(decs) else total_len
                segs.append({"start": start, "end": end, "scores": scores})
            layers.append({"layer": layer, "segments": segs})
        return {"mode": self.mode, "layers": layers}
