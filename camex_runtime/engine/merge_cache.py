"""Merged-expert weight cache: a preallocated pool under a byte budget, content-addressed.

One entry holds one merged FFN for one MoE layer and one routing decision, in the serving
layout of engine/moe.py: `fc1` (the input projection(s) fused: GPT-2's fc1, SwiGLU's [gate; up]),
`fc2` (the output projection), and their biases when the family has them. Keys are chosen by
the caller so that equal keys mean equal merged
weights (layer, routing mode, digest of the token ids that decided the scores, ...); two
sequences with the same routing prefix therefore share one entry, counted by reference.
Unreferenced entries stay resident in LRU order and are evicted only when a new merge needs
their slot, those of segments their sequences have passed first (`release(key, passed=True)`:
a finished request's current segment is what its next turn resumes); when every slot is
referenced, `acquire` answers None and the caller serves that sequence with the mixture
strategy instead (a "fallback"), so the budget is never exceeded.

Knows nothing about routing or models: shapes in, slots and views out. Not thread-safe (the
engine thread owns it).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Hashable, Iterable, Mapping
from types import MappingProxyType

import torch

from camex_runtime.engine.outputs import MergeCacheStats
from camex_runtime.memory import huge_page_empty

# Parts of one merged FFN, in pool order (the bias parts only when the FFN has biases).
PARTS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


@dataclass
class _Entry:
    slot: int
    refcount: int


@dataclass(frozen=True)
class Acquired:
    slot: int
    hit: bool  # False: the caller must merge into `slot` before using it


def merged_ffn_shapes(d_model: int, d_ff: int, *, gated: bool = False,
                      bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Shape of each part of one merged FFN, in pool order (PARTS). `gated`: a SwiGLU FFN, whose
    fused fc1 holds gate and up (2·d_ff rows); `bias`: the FFN's projections have biases."""
    rows = 2 * d_ff if gated else d_ff
    shapes = {"fc1_weight": (rows, d_model), "fc1_bias": (rows,),
              "fc2_weight": (d_model, d_ff), "fc2_bias": (d_model,)}
    return shapes if bias else {k: v for k, v in shapes.items() if not k.endswith("_bias")}


def ffn_layout(config) -> dict[str, bool]:
    """merged_ffn_shapes' keyword arguments for a model config (GPT-2 when it names no family)."""
    family = getattr(config, "family", "gpt2")
    return {"gated": family == "llama", "bias": bool(getattr(config, "mlp_bias", True))}


def entry_bytes(d_model: int, d_ff: int, dtype: torch.dtype, bias_dtype: torch.dtype | None = None,
                **layout: bool) -> int:
    """Bytes of one pool entry: one merged FFN (biases in `bias_dtype`, default `dtype`)."""
    def elem(part: str) -> int:
        t = (bias_dtype or dtype) if part.endswith("_bias") else dtype
        return torch.empty((), dtype=t).element_size()
    return sum(int(torch.Size(s).numel()) * elem(p)
               for p, s in merged_ffn_shapes(d_model, d_ff, **layout).items())


class MergeCache:
    def __init__(self, d_model: int, d_ff: int, budget_bytes: int, device: torch.device,
                 dtype: torch.dtype, bias_dtype: torch.dtype | None = None, **layout: bool):
        shapes = merged_ffn_shapes(d_model, d_ff, **layout)
        self.entry_bytes = entry_bytes(d_model, d_ff, dtype, bias_dtype, **layout)
        self.budget_bytes = int(budget_bytes)
        self.num_slots = self.budget_bytes // self.entry_bytes
        # (slots, *shape) per part: merge_experts writes into pool[part][slot] with out=.
        self.pool = {p: huge_page_empty((self.num_slots, *s), device=device,
                                        dtype=(bias_dtype or dtype) if p.endswith("_bias")
                                        else dtype)
                     for p, s in shapes.items()}
        # each slot's views, made once: a decode step asks for every MoE layer's (indexing
        # four tensors per call was ~90 us of a GPT-2-small 7+1 step's ~200 us of planning)
        self._views = [MappingProxyType({p: t[slot] for p, t in self.pool.items()})
                       for slot in range(self.num_slots)]
        self._entries: dict[Hashable, _Entry] = {}
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # unreferenced, oldest first
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self.hits = self.misses = self.evictions = self.fallbacks = 0
        self.merges = 0
        self.merge_seconds = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def acquire(self, key: Hashable) -> Acquired | None:
        """Take a reference to `key`'s entry; allocate one (evicting LRU) on a miss.
        None when no slot can be had: the caller falls back to the mixture strategy."""
        e = self._entries.get(key)
        if e is not None:
            if e.refcount == 0:
                del self._lru[key]
            e.refcount += 1
            self.hits += 1
            return Acquired(e.slot, hit=True)
        self.misses += 1
        slot = self._take_slot()
        if slot is None:
            self.fallbacks += 1
            return None
        self._entries[key] = _Entry(slot, 1)
        return Acquired(slot, hit=False)

    def release(self, key: Hashable, passed: bool = False) -> None:
        """Drop a reference. `passed`: the sequence went past this merge's segment, so it is
        evicted before the entries released as current segments (those of finished
        requests, which a next turn resumes with prefix caching). Eight 5-turn chats kept on
        eight slots of GPT-2-small 7+1, each turn's prompt crossing a segment boundary: in
        LRU order the passed first segments pushed out the current ones and most resumed
        turns merged their segment again (~100 ms of a ~250 ms first token, fp32)."""
        e = self._entries[key]
        if e.refcount <= 0:
            raise RuntimeError(f"merge cache: release of unreferenced entry {key!r}")
        e.refcount -= 1
        if e.refcount == 0:
            self._lru[key] = None
            if passed:
                self._lru.move_to_end(key, last=False)

    def discard(self, key: Hashable) -> None:
        """Drop a just-acquired entry whose merge failed, so nobody reads garbage."""
        e = self._entries.pop(key)
        self._lru.pop(key, None)
        self._free.append(e.slot)

    def prefault(self) -> int:
        """Write every free slot once so the operating system backs the pool with memory now,
        not during a request. A CPU pool comes from `torch.empty`, whose pages the kernel maps
        on first write: a merge into a never-written slot paid the page faults, twice the
        merge's own time or more (measured on GPT-2-small shapes: 100 ms against 48 ms for a
        prompt's 12 bf16 merges; up to 360 ms in a VM whose host had not backed the memory
        yet). The budget is memory the server means to use, so committing it at start-up also
        makes the resident size what the operator configured. Call it before requests arrive
        (`Engine.warmup` does): the engine thread owns the cache. Returns the bytes written;
        0 off the CPU, where the allocator hands out memory that is already backed."""
        if not self.num_slots or next(iter(self.pool.values())).device.type != "cpu":
            return 0
        written = 0
        for slot in list(self._free):
            for t in self.pool.values():
                t[slot].zero_()
            written += self.entry_bytes
        return written

    def can_place(self, keys: Iterable[Hashable]) -> bool:
        """Whether acquiring every key at once would refuse none: the missing ones fit in the
        free slots and the unreferenced entries that are not among the keys."""
        keys = set(keys)
        missing = sum(1 for key in keys if key not in self._entries)
        held = sum(1 for key in keys if key in self._lru)
        return missing <= len(self._free) + len(self._lru) - held

    def weights(self, slot: int) -> Mapping[str, torch.Tensor]:
        """Views of one entry: fc1_weight (k*h, d), fc2_weight (d, h) (+ fc1_bias, fc2_bias);
        a read-only mapping, the same object on every call."""
        return self._views[slot]

    def record_merge(self, count: int, seconds: float) -> None:
        self.merges += count
        self.merge_seconds += seconds

    @property
    def referenced(self) -> int:
        return sum(1 for e in self._entries.values() if e.refcount > 0)

    def stats(self) -> MergeCacheStats:
        return MergeCacheStats(
            hits=self.hits, misses=self.misses, evictions=self.evictions,
            fallbacks=self.fallbacks, bytes_used=len(self._entries) * self.entry_bytes,
            bytes_budget=self.budget_bytes, merges=self.merges,
            merge_seconds=self.merge_seconds)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._lru:
            return None
        key, _ = self._lru.popitem(last=False)
        self.evictions += 1
        return self._entries.pop(key).slot
