"""Model runner: executes the folded CAMEx model for the engine (prefill, decode, classify).

Every forward goes through the model's own block loop (`CamexModel.run`), for every family; the
runner only supplies the two contexts that make serving differ from a full forward:
- attention contexts over a preallocated KV cache (engine/attention.py; one slot per running
  sequence, key/value heads only);
- routing contexts (`_PrefillRouting`, `_DecodeRouting`) that keep per-sequence routing state
  (current scores and the running FFN-input sum of the current segment, per MoE layer) and
  serve merged weights from the content-addressed `MergeCache`. Each MoE layer is applied per
  step with the `merged` or `mixture` strategy (`auto`: the cost model decides).

Knows nothing about requests, sampling, tokenizers or threads; the engine calls it from its
loop thread only.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from camex_runtime import kernels
from camex_runtime.engine.attention import (DecodeAttention, PackedPrefillAttention,
                                            PrefillAttention)
from camex_runtime.engine.cost_model import CostModel, StrategyProfile
from camex_runtime.engine.fused_decode import FFNSpec, FusedDecode
from camex_runtime.engine.kv_cache import DecodeRows, KVCache
from camex_runtime.engine.merge_cache import MergeCache, entry_bytes, ffn_layout
from camex_runtime.engine.moe import MoEWeights, apply_merged, apply_mixture
from camex_runtime.engine.precision import Precision, prepare
from camex_runtime.engine.routing_state import (FALLBACK, NO_MERGE, LayeredChunk,
                                                PromptSegment, RetainedPrefix, SlotRouting,
                                                common_prefix_len, routing_digest)
from camex_runtime.memory import on_huge_pages, release_freed_memory


log = logging.getLogger("camex.engine")
MIN_MERGE_CACHE_BYTES = 256 << 20


def notify(observer, name: str, *args) -> None:
    """Call `observer.<name>(*args)` if it has that hook. Observers are metrics code: an
    exception there is logged and swallowed, never allowed to fail a request or a step."""
    fn = getattr(observer, name, None)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("observer %s failed", name)


def default_merge_cache_bytes(cfg, num_slots: int, moe_layers: int, dtype: torch.dtype) -> int:
    """At least 256 MiB (room for finished segments and shared prefixes to stay resident), and
    at least one merged FFN per MoE layer for every slot plus one per layer for the transient
    merge of a long prompt's earlier segments, so no sequence of a full batch falls back to the
    mixture for lack of space, and a conversation kept in a slot beyond the batch (prefix
    caching) finds its segment's merges when it resumes. (GPT-2-small shape, 12 MoE layers,
    fp32: ~227 MB per slot.)"""
    entry = entry_bytes(cfg.d_model, cfg.d_ff, dtype, **ffn_layout(cfg))
    return max(MIN_MERGE_CACHE_BYTES, (num_slots + 1) * moe_layers * entry)


# prompt tokens at the end of a kept request's prompt that its next turn may have re-tokenized
CONTINUES_SLACK = 1


class ModelRunner:
    def __init__(self, model, *, num_slots: int, max_len: int,
                 merge_cache_bytes: int | None, strategy: str = "auto", observer=None,
                 profile: StrategyProfile | None = None, precision: Precision | None = None,
                 expert_deltas: str = "full", prefix_caching: bool = False):
        self.model = model.eval()
        self.expert_deltas = expert_deltas
        self.cfg = model.config
        tr = model.transformer
        self.tr = tr
        p = next(model.parameters())
        self.precision = precision or Precision(p.dtype, p.dtype)
        # activations, KV cache and (biases of) merged weights; weights stay in precision.weights
        self.device, self.dtype = p.device, self.precision.compute
        self.blocks = list(tr.h)
        self.moe_layers = [i for i, b in enumerate(self.blocks) if b.is_moe]
        self.moe_of = {layer: m for m, layer in enumerate(self.moe_layers)}
        self.moe = self._take_expert_weights()
        prepare(model, self.precision)
        with torch.no_grad():  # weights a decode step streams: on huge pages (memory.py)
            for param in model.parameters():
                param.data = on_huge_pages(param.data)
        self.strategy = strategy
        # a forward's missing merges of one layer built in one pass (`_merge_together`); False:
        # each segment and packed piece merges its own (what the benchmarks compare against)
        self.merge_together = True
        self.observer = observer
        self.T = self.cfg.segment_len
        d, M = self.cfg.d_model, len(self.moe)
        E = max(1, self.cfg.num_experts)
        is_lm = hasattr(model, "lm_head")
        weights = self.precision.weights
        if merge_cache_bytes is None:  # (every slot's: a kept conversation's merges too)
            merge_cache_bytes = default_merge_cache_bytes(self.cfg, num_slots, M, weights)
        # classification merges serve one sequence once and are never cached: no pool
        self.cache = MergeCache(d, self.cfg.d_ff, merge_cache_bytes if M and is_lm else 0,
                                self.device, weights, bias_dtype=self.dtype,
                                **ffn_layout(self.cfg))
        self.kv = None
        if is_lm:  # key/value heads only (grouped-query attention shares them)
            self.kv = KVCache(self.cfg.n_layer, num_slots, self.cfg.num_key_value_heads, max_len,
                              self.cfg.head_dim, self.device, self.dtype)
        # decode steps of up to fused.max_rows rows through fused native blocks, where they
        # apply (CPU, fp32 activations); else, and for larger batches, the model's block loop
        self.fused = None if self.kv is None else FusedDecode.build(model, self.kv, self.dtype)
        # per slot and MoE layer: scores of the current segment, FFN-input sum of the segment
        self.scores = torch.zeros(num_slots, M, E, device=self.device)  # fp32
        self.seg_sum = torch.zeros(num_slots, M, d, device=self.device)  # fp32
        self.slots: list[SlotRouting | None] = [None] * num_slots
        # Prefix caching (docs/DESIGN.md §4): what finished sequences left in free slots, and
        # per slot, segment and MoE layer the scores of every segment-mode decision made there,
        # so a later prompt sharing the prefix resumes at any segment boundary of it
        self.retained: list[RetainedPrefix | None] = [None] * num_slots
        self._retained_count = 0
        K = -(-max_len // self.T) + 1 if is_lm and M else 0
        self.history = torch.zeros(num_slots, K, M, E, device=self.device)  # fp32
        # With `prefix_caching`, per slot and MoE layer the segment's FFN-input sum after each
        # of the last T positions computed there (position p at p % T), so that a prompt
        # sharing a prefix ending inside one of them resumes right there, not back at the
        # segment's boundary (slots x T x MoE layers x d_model x 4 bytes: 75 MB for GPT-2
        # small's 7+1 with 8 slots, an eighth of its KV cache at 1,024 positions)
        self.sum_ring = (torch.zeros(num_slots, self.T, M, d, device=self.device)
                         if prefix_caching and is_lm and M else None)
        self.router_sum = torch.zeros(M, E, device=self.device)
        self.router_counts = [0] * M
        self._profile = profile
        self._cost: CostModel | None = None

    @property
    def cost(self) -> CostModel:
        """Strategy timings of the real layer shapes on this device (see cost_model), measured
        the first time the `auto` strategy needs them."""
        if self._cost is None:
            # int8 deltas: the mixture would dequantize the stacks on every call (a fallback)
            self._cost = CostModel(self._profile or StrategyProfile.measure(
                self.moe[0], dtype=self.dtype, mixture=self.moe[0].deltas == "full"))
        return self._cost

    @property
    def cost_profile(self) -> dict | None:
        """The cost model's timings in ms once measured (None before, and without MoE)."""
        return None if self._cost is None else self._cost.p.describe()

    @functools.cached_property
    def decision_tokens(self) -> int:
        """Prompt tokens' worth of one routing decision: the merge it builds at every MoE layer,
        against the time a prompt token takes through every layer (FFN plus attention
        projections, weighted by their parameter counts). What a prefill chunk that opens a
        segment costs beyond its tokens, for the scheduler's budget; 0 without MoE layers.
        (GPT-2-small, 12 MoE layers, fp32 on one Zen 4 core: about 40 tokens.)"""
        if not self.moe:
            return 0
        c = self.cfg
        attn = c.d_model * (c.n_head + 2 * c.num_key_value_heads) * c.head_dim \
            + c.n_head * c.head_dim * c.d_model
        ffn = self.moe[0].ffn_params
        per_layer = 1.0 + attn / ffn  # a token's layer in units of its FFN
        return round(len(self.moe) * self.cost.merge_in_tokens() / (len(self.blocks) * per_layer))

    def layered_tokens(self, num_prompt_tokens: int, mode: str, start: int) -> int:
        """Tokens a prefill chunk starting at `start` runs layer by layer when its budget is
        smaller than them (0: none, the chunk runs whole tokens through every layer):
        - at 0, the first routing decision's span (segment 1's first `route1_len` tokens; in
          prompt mode the whole prompt): its scores at a layer need every token of the span
          there, so a smaller chunk cannot run ahead of it;
        - in segment mode, at each later segment start while the strategy merges: the first
          `decision_tokens` tokens of the segment (at most its length), so the decision's
          merges, one per MoE layer, are spread over steps with the layers instead of landing
          in one step (12 merges took ~100 ms, GPT-2-small fp32 on one core, beside ~125 ms
          decode steps of 8 streams)."""
        L, T = num_prompt_tokens, self.T
        if start == 0:
            return L if mode == "prompt" else min(L, T)
        J = 0 if self.strategy == "mixture" else self.decision_tokens
        if mode == "segment" and J and start % T == 0 and start < L:
            return min(L - start, T, J)
        return 0

    def layered_steps(self, budget: int, layered: int) -> int:
        """Layers a chunk of `budget` tokens runs of a `layered`-token span that advances by
        layers: the whole layers its tokens pay for (`budget * n_layer / layered`), at least one.
        Rounded down and never carried over to the next step: a budget paying for 1.45 layers
        of a 256-token span, accumulated, ran 1 and 2 layers in turn, and the 2-layer steps
        (with short prompts' chunks beside them) were the slowest of a long prefill (Llama
        shape, 7+1 experts, fp32, one core: 186-205 ms against ~140)."""
        return max(1, budget * len(self.blocks) // layered)

    def chunk_cost(self, num_prompt_tokens: int, mode: str, start: int, n: int) -> int:
        """Extra work, in prompt tokens, of prefilling tokens [start, start+n) of a prompt: the
        routing decisions made in that chunk (see `decision_tokens`). Segment mode decides
        segment 1 once its first span is in and every later segment at its first token; prompt
        mode once, from the whole prompt. A chunk smaller than its `layered_tokens` advances
        them by layers (`prefill_step`, `layered_steps`): its work is those layers' share of
        the span's tokens and of the decision's merges, here the part of it beyond `n`
        (negative where `n` pays for part of a layer it does not run: the scheduler's room
        keeps that part)."""
        J = 0 if self.strategy == "mixture" else self.decision_tokens
        if not J or n <= 0:
            return 0
        L, T = num_prompt_tokens, self.T
        layered = self.layered_tokens(L, mode, start)
        if n < layered:  # the layers it runs: their share of the span's tokens and merges
            N = len(self.blocks)
            return -(-self.layered_steps(n, layered) * (layered + J) // N) - n
        if mode == "prompt":
            return J if start == 0 else 0
        end = min(L, start + n)
        first = -(-start // T)  # the first segment starting at or after `start`
        return J * max(0, (end - 1) // T - first + 1)

    def _take_expert_weights(self) -> list[MoEWeights]:
        """Stack [E_m; Δ] per MoE layer once (docs/DESIGN.md §3: Δ computed at load), dropping
        the model's own expert tensors layer by layer so the peak memory stays about one
        copy of the experts (the runner owns the model from here on). With
        `expert_deltas="int8"` the deltas are int8 with per-row scales (engine/moe.py)."""
        if not self.cfg.folded:
            raise ValueError("the engine serves folded checkpoints (config.folded=True); "
                             "run camex-export first")
        weights = []
        with torch.no_grad():
            for layer in self.moe_layers:
                ffn = self.blocks[layer].ffn
                moe = MoEWeights.from_folded(ffn, self.expert_deltas)
                weights.append(moe.to_compute(self.dtype) if self.precision.mixed else moe)
                ffn.experts, ffn.base = None, None
                release_freed_memory()  # the old layout's pages, before the next layer's stack
        return weights

    # -- bookkeeping ------------------------------------------------------------------------
    def _notify(self, name: str, *args) -> None:
        notify(self.observer, name, *args)

    def _record_routing(self, m: int, st: SlotRouting | None, starts: Sequence[int],
                        scores: Tensor) -> None:
        """scores (n, E): n routing decisions of MoE layer m (stats, trace, observer)."""
        self.router_sum[m] += scores.sum(0)
        self.router_counts[m] += scores.shape[0]
        want_obs = getattr(self.observer, "on_route", None) is not None
        if not (want_obs or (st is not None and st.trace)):
            return
        rows = scores.tolist()
        if st is not None and st.trace:
            st.decisions[m].extend(zip(starts, rows))
        if want_obs:
            for r in rows:
                self._notify("on_route", self.moe_layers[m], r)

    def _acquire(self, m: int, key, scores: Tensor, x: Tensor | None = None
                 ) -> tuple[int | None, Tensor | None]:
        """Pool slot holding the merge for `key` (merging on a miss), or None: pool full; and
        with a prompt segment's rows x (n, d), their FFN output where the merge made here
        applied it in the same pass (else None: the caller applies it)."""
        slots, y = self._acquire_many(m, [key], scores.reshape(1, -1), x)
        return slots[0], y

    def _acquire_many(self, m: int, keys: list, scores: Tensor, x: Tensor | None = None
                      ) -> tuple[list[int | None], Tensor | None]:
        """`_acquire` for several rows (scores (S, E)): the missing merges are built in one
        pass over layer m's expert stack (MoEWeights.merge_many_into). Rows sharing a key
        share its entry, as with `_acquire`. With x (one key only), a merge made here goes
        through MoEWeights.merge_apply, whose output (or None) is returned beside the slots."""
        t0 = time.perf_counter()
        ev0 = self.cache.evictions
        slots: dict = {}  # key -> pool slot (None: the pool is full), in first-seen order
        new: list[int] = []  # rows whose key this call merges
        for j, key in enumerate(keys):
            if key in slots:
                continue
            got = self.cache.acquire(key)
            slots[key] = None if got is None else got.slot
            if got is not None and not got.hit:
                new.append(j)
        if self.cache.evictions != ev0:
            self._notify("on_evict", self.cache.evictions - ev0)
        y = None
        if new:
            outs = [self.cache.weights(slots[keys[j]]) for j in new]
            try:
                if x is not None:
                    y = self.moe[m].merge_apply(x, scores[new[0]], outs[0])
                if y is None:
                    self.moe[m].merge_many_into(scores[new], outs)
            except BaseException:  # nothing taken here stays referenced
                merging = {keys[j] for j in new}
                for key, slot in slots.items():
                    if key in merging:
                        self.cache.discard(key)
                    elif slot is not None:
                        self.cache.release(key)
                raise
        seconds = time.perf_counter() - t0
        if new:
            self.cache.record_merge(len(new), seconds)
        per_merge = seconds / max(1, len(new))  # a batch's time, shared by its merges
        built = {keys[j] for j in new}
        out, seen = [], set()
        for key in keys:
            out.append(slots[key])
            if slots[key] is None:  # the pool is full: this row falls back to the mixture
                continue
            hit = key in seen or key not in built
            if key in seen:  # a second row on the same entry
                self.cache.acquire(key)
            seen.add(key)
            self._notify("on_merge", self.moe_layers[m], 0.0 if hit else per_merge, hit)
        return out, y

    def release(self, slot: int, tokens: Sequence[int] | None = None) -> None:
        """Forget a finished or cancelled sequence: drop its merge-cache references. With
        `tokens` (all its token ids: prompt and generated) the slot keeps what its KV cache
        holds for a later prompt to resume from (`cached_prefix`), where that is exact: no
        prefill step half done, and with merged-expert layers segment routing with a whole
        first segment in the prompt (`route1_len == T`: a longer prompt routes segment 1 the
        same way). Any other call (the next `start_prefill` in the slot makes one) forgets
        what the slot kept."""
        self.retained[slot] = None
        st = self.slots[slot]
        if st is None:
            return
        for m, key in enumerate(st.keys):
            if key is not None and st.pool_slots[m] >= 0:
                self.cache.release(key)
        self.slots[slot] = None
        routed = not self.moe or (st.mode == "segment" and st.route1_len == self.T
                                  and st.length >= self.T)
        if tokens is not None and self.kv is not None and st.partial is None and routed \
                and st.length > 0:
            self._retained_count += 1
            self.retained[slot] = RetainedPrefix(list(tokens[:st.length]), self._retained_count,
                                                 min(st.prompt_len, st.length),
                                                 ring_from=max(st.ring_from, st.length - self.T))

    def resume_point(self, slot: int, token_ids: Sequence[int]) -> int:
        """Prompt tokens of `token_ids` (a segment-mode prompt) that can resume from what free
        `slot` kept (0: none). All the slot's tokens, with its routing state as it stands, when
        the prompt continues them (a chat's next turn); else the whole shared prefix (at least
        T tokens) where its last token is among the last T the slot computed
        (`sum_ring` holds the segment's FFN-input sum there: a chat's next turn whose answer
        came back re-tokenized); else the last segment boundary (at least T) within the
        shared prefix. Either way the segment's scores are restored from the slot's
        decisions. Without merged-expert layers nothing is routed: the whole shared prefix.
        Always less than the prompt, whose last token must run to give the next-token
        logits."""
        kept = self.retained[slot]
        return 0 if kept is None else self._resume(kept, token_ids)[0]

    def _resume(self, kept: RetainedPrefix, token_ids: Sequence[int]) -> tuple[int, int]:
        """(`resume_point` of `token_ids` in what `kept` holds, the tokens they share)."""
        n, L, T = len(kept.tokens), len(token_ids), self.T
        shared = common_prefix_len(kept.tokens, token_ids)
        if not self.moe:
            return min(shared, L - 1), shared
        if shared == n and L > n:
            return n, shared
        r = min(shared, L - 1)
        if r < T:
            return 0, shared
        if r % T and self.sum_ring is not None and r - 1 >= kept.ring_from:
            return r, shared
        return r // T * T, shared

    def cached_prefix(self, token_ids: Sequence[int], slots: Sequence[int]
                      ) -> tuple[int, int] | None:
        """Among free `slots`, the one to resume the segment-mode prompt `token_ids` from:
        (slot, prompt tokens it holds), the most tokens, then the longest shared prefix (two
        chats with one system prompt resume it from either: the one this prompt continues
        shares more), then the most recently kept; None when none holds any."""
        best, key = None, (0, 0, 0)
        for slot in slots:
            kept = self.retained[slot]
            if kept is None:
                continue
            r, shared = self._resume(kept, token_ids)
            if r:
                k = (r, shared, kept.order)
                if k > key:
                    best, key = (slot, r), k
        return best

    def continues(self, slot: int, token_ids: Sequence[int]) -> bool:
        """Whether `token_ids` holds the prompt of the request that left what free `slot` keeps
        (its next turn, however its answer was sent back), rather than a part of it. All of
        it but possibly its last token: an answer sent back as text can re-tokenize with the
        prompt's end (a prompt ending in a newline and an answer starting with a tab: one
        token for both in GPT-2's BPE); counted as another conversation, that turn was copied
        into the least recently kept slot, and the conversation kept there lost its slot."""
        kept = self.retained[slot]
        return kept is not None and \
            common_prefix_len(kept.tokens, token_ids) >= kept.prompt_len - CONTINUES_SLACK

    def copy_prefix(self, src: int, dst: int, token_ids: Sequence[int], n: int) -> None:
        """Free slot `dst` keeps the first n tokens of what free slot `src` keeps, as if it had
        computed them itself — their keys and values, the decisions recorded up to them, and
        in a merged-expert model the routing state after token n: the segment holding it
        routed by its recorded scores, its FFN-input sum (0 at a boundary, else from
        `sum_ring`, copied whole) — so that a prompt sharing only part of `src`'s tokens
        (another conversation with the same system prompt) resumes without taking that
        conversation's slot. n must be `resume_point(src, token_ids)`, less than all of
        `src`'s tokens; `src` keeps what it kept."""
        kept = self.retained[src]
        if (src == dst or kept is None or self.slots[dst] is not None or not 0 < n < len(
                kept.tokens) or self.resume_point(src, token_ids) != n):
            raise ValueError(f"cannot copy {n} tokens of slot {src} into slot {dst}")
        self.release(dst)  # what it kept itself is replaced
        self.kv.copy_prefix(src, dst, n)
        boundary = bool(self.moe) and n % self.T == 0
        if self.moe:
            k = n // self.T
            self.history[dst, :k + 1] = self.history[src, :k + 1]
            self.scores[dst] = self.history[src, k]
            self.seg_sum[dst] = 0.0 if boundary else self.sum_ring[src, (n - 1) % self.T]
            if self.sum_ring is not None:
                self.sum_ring[dst] = self.sum_ring[src]
        self._retained_count += 1
        self.retained[dst] = RetainedPrefix(list(kept.tokens[:n]), self._retained_count, n,
                                            decided=boundary, ring_from=kept.ring_from)

    def free_slot_order(self, slots: Sequence[int]) -> list[int]:
        """Free `slots` in the order a prompt resuming nothing should take them: those that
        keep nothing first (lowest first), then the least recently kept. (Lowest first among
        those too, which keeps a running batch on a contiguous range of slots, overwrote the
        conversation that had just finished whenever every free slot kept one: with four
        chats in four slots, two resumed and two never did.)"""
        return sorted(slots, key=lambda s: (0, s) if self.retained[s] is None
                      else (1, self.retained[s].order))

    def forget_prefixes(self) -> None:
        """Free slots keep nothing any more (after warm-up: its requests' tokens are no
        conversation's, and would take the place of one)."""
        self.retained = [None] * len(self.retained)

    def routing_trace(self, slot: int) -> dict | None:
        """Decisions over the tokens the model processed (the last sampled token never is)."""
        st = self.slots[slot]
        return None if st is None else st.routing_trace(self.moe_layers, st.length)

    def _set_segment(self, st: SlotRouting, m: int, key, pool_slot: int) -> None:
        """Make (key, pool_slot) the current segment's merge of layer m, releasing the old."""
        old = st.keys[m]
        if old is not None and st.pool_slots[m] >= 0:
            self.cache.release(old, passed=True)
        st.keys[m], st.pool_slots[m] = key, pool_slot

    # -- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], mode: str, trace: bool = False,
                max_new_tokens: int = 1) -> Tensor:
        """Run a whole prompt into `slot`; returns the next-token logits (V,)."""
        self.start_prefill(slot, token_ids, mode, trace, max_new_tokens)
        return self.prefill_step(slot, None)

    def start_prefill(self, slot: int, token_ids: Sequence[int], mode: str, trace: bool = False,
                      max_new_tokens: int = 1, prompt_logprobs: int | None = None,
                      resume: int = 0) -> None:
        """Make `slot` the prompt's: routing state, the identity of each segment's routing
        decision (merge-cache keys). `max_new_tokens` only informs the `auto` strategy (how long
        merges will be reused). `prompt_logprobs` k (not None): score the prompt itself as its
        chunks complete (`prompt_scores`). `resume`: the prompt's first tokens are those the
        slot kept (`resume_point(slot, token_ids)` exactly; segment mode, no trace, no prompt
        logprobs: neither exists for tokens not computed). `prefill_step` then computes the
        rest."""
        L, T = len(token_ids), self.T
        kept = self.retained[slot]
        if resume:
            if self.moe and mode != "segment" or trace or prompt_logprobs is not None:
                raise ValueError("only a segment-mode prompt without a routing trace or prompt "
                                 "logprobs resumes from a cached prefix")
            if self.resume_point(slot, token_ids) != resume:
                raise ValueError(f"slot {slot} cannot resume this prompt at token {resume}")
        self.release(slot)
        st = SlotRouting(mode, L, min(L, T), len(self.moe), L + max_new_tokens, trace)
        K = 1 if mode == "prompt" else -(-L // T)
        st.prompt = list(token_ids)
        st.digests = [routing_digest(mode, token_ids, k, T, st.route1_len, L) for k in range(K)]
        st.score_k = prompt_logprobs
        if resume:
            st.length = resume
            st.ring_from = min(kept.ring_from, resume)  # what sum_ring holds of the tokens
            if self.moe and resume < len(kept.tokens):  # a position it passed: its decision
                self.scores[slot] = self.history[slot, resume // T]
                if resume % T:  # the segment's sum up to there (its first chunk is carried)
                    self.seg_sum[slot] = self.sum_ring[slot, (resume - 1) % T]
                else:  # the segment opening there is routed already
                    self.seg_sum[slot] = 0.0
                    st.decided = resume
            elif kept.decided:  # copied up to a boundary: its decision is in place already
                st.decided = resume
        self.slots[slot] = st

    @torch.inference_mode()
    def prefill_step(self, slot: int, budget: int | None) -> Tensor | None:
        """Compute about `budget` prompt tokens' worth of the prefill in `slot` (None: all that
        is left). Returns the next-token logits (V,) once the whole prompt is in, else None.

        Chunks are exact (docs/DESIGN.md, chunked prefill): a chunk is any run of tokens, with
        segment routing carried across its boundary by the same running sums decode uses. When
        the budget is smaller than the chunk's `layered_tokens` (the first decision's span;
        a later segment's opening tokens while merging), those tokens advance by layers
        instead: the whole layers the budget pays for (`layered_steps`, at least one), the
        hidden states kept in between, so one step makes only its layers' merges."""
        return self.prefill_steps([(slot, budget)])[0]

    @torch.inference_mode()
    def prefill_steps(self, chunks: Sequence[tuple[int, int | None]]) -> list[Tensor | None]:
        """`prefill_step` for several slots of one engine step, (slot, budget) each, in order.
        Their token chunks run as one forward, packed along the token axis: the projections
        multiply all their rows in one pass over the weights (an engine step of 8 prompts of 32
        tokens: 320-380 ms against 600-615 ms one by one, GPT-2-small fp32 on 2 CPU threads),
        attention and merged-expert routing stay per sequence. A chunk advancing by layers
        runs alone. The next-token logits of the prompts completed by this step come from one
        head call (up to 8 rows: the batch-invariant decode kernel, the same bits as one
        row alone)."""
        got: dict[int, Tensor | None] = {}
        plain = []  # (slot, st, start, end) of chunks of whole tokens through every layer
        for slot, budget in chunks:
            st = self.slots[slot]
            if st.partial is None and budget is not None:
                layered = self.layered_tokens(st.prompt_len, st.mode, st.length)
                if budget < layered:
                    st.partial = LayeredChunk(st.length, st.length + layered)
            if st.partial is not None:
                got[slot] = self._prefill_layers(slot, st, budget)
                if got[slot] is not None or budget is not None:
                    continue
                # "all that is left": the layered tokens are in, the tokens after them follow
            L, done = st.prompt_len, st.length
            plain.append((slot, st, done, L if budget is None else min(L, done + budget)))
        if plain:
            hidden = self._prefill_tokens_packed(plain)
            ends = [(slot, h[-1:]) for (slot, st, _, end), h in zip(plain, hidden)
                    if end == st.prompt_len]
            for i in range(0, len(ends), 8):
                group = ends[i:i + 8]
                logits = self.model.logits(torch.cat([h for _, h in group]))  # (k, V)
                got.update({slot: logits[j] for j, (slot, _) in enumerate(group)})
            got.update({slot: None for slot, st, _, end in plain if end != st.prompt_len})
        return [got[slot] for slot, _ in chunks]

    def _prefill_tokens(self, slot: int, st: SlotRouting, start: int, end: int,
                        layers: tuple[int, int] | None = None,
                        hidden: Tensor | None = None) -> Tensor:
        """Tokens [start, end) of the prompt through `layers` (default all); returns the hidden
        states after them ((1, n, d); final-normed once the last layer ran)."""
        ids = torch.tensor([st.prompt[start:end]], device=self.device)  # (1, n)
        positions = torch.arange(start, end, device=self.device)
        out = self.tr.run(ids, positions, PrefillAttention(self.kv, slot, start),
                          _PrefillRouting(self, slot, st, start), layers=layers, hidden=hidden)
        if layers is None or layers[1] == len(self.blocks):
            self._tokens_done(st, start, end, out[0])
        return out

    def _prefill_tokens_packed(self, pieces: list[tuple[int, SlotRouting, int, int]]
                               ) -> list[Tensor]:
        """(slot, st, start, end) chunks through every layer in one forward; the final hidden
        states of each ((n, d) per chunk). One chunk alone is `_prefill_tokens`."""
        if len(pieces) == 1:
            slot, st, start, end = pieces[0]
            return [self._prefill_tokens(slot, st, start, end)[0]]
        ids = torch.tensor([[t for _, st, a, b in pieces for t in st.prompt[a:b]]],
                           device=self.device)  # (1, N)
        positions = torch.cat([torch.arange(a, b) for _, _, a, b in pieces]).to(self.device)
        lengths = [b - a for _, _, a, b in pieces]
        attn = PackedPrefillAttention([PrefillAttention(self.kv, slot, a)
                                       for slot, _, a, _ in pieces], lengths)
        moe = _PackedRouting([_PrefillRouting(self, slot, st, a) for slot, st, a, _ in pieces],
                             lengths)
        out = self.tr.run(ids, positions, attn, moe)[0].split(lengths)  # n_i x (n_i, d)
        for (_, st, a, b), h in zip(pieces, out):
            self._tokens_done(st, a, b, h)
        return list(out)

    def _tokens_done(self, st: SlotRouting, start: int, end: int, hidden: Tensor) -> None:
        """Tokens [start, end) went through every layer (final hidden states (n, d)): they
        count as computed, and are scored where prompt logprobs were asked for."""
        st.length = end
        last = min(end, st.prompt_len - 1)  # the prompt's last position predicts no prompt token
        if st.score_k is not None and last > start:
            targets = torch.tensor(st.prompt[start + 1:last + 1], device=self.device)
            st.scored.append(score_prompt(self.model.logits, hidden[:last - start], targets,
                                          st.score_k))

    def prompt_scores(self, slot: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The prompt's logprobs once its prefill is complete (see `score_prompt`), or None when
        they were not asked for: chosen (L-1,), top-k values and ids (L-1, k), on the CPU."""
        st = self.slots[slot]
        if st is None or st.score_k is None:
            return None
        if not st.scored:  # a one-token prompt: nothing before it to score
            empty = torch.empty(0, st.score_k)
            return torch.empty(0), empty, empty.long()
        return tuple(torch.cat(parts) for parts in zip(*st.scored))

    def _prefill_layers(self, slot: int, st: SlotRouting, budget: int | None
                        ) -> Tensor | None:
        """Advance the layered chunk `st.partial` by some layers (see prefill_step)."""
        p, n_layer = st.partial, len(self.blocks)
        if budget is None:
            last = n_layer
        else:
            last = min(n_layer, p.layer + self.layered_steps(budget, p.end - p.start))
        hidden = self._prefill_tokens(slot, st, p.start, p.end, (p.layer, last), p.hidden)
        if last < n_layer:
            p.hidden, p.layer = hidden, last
            return None
        st.partial = None
        return self.model.logits(hidden[0, -1:])[0] if p.end == st.prompt_len else None

    def _prefill_moe(self, m: int, h: Tensor, slot: int, st: SlotRouting, start: int) -> Tensor:
        """h (n, d): FFN inputs of prompt tokens [start, start+n) at MoE layer m. Each segment
        the chunk touches goes through its merged expert (the missing merges of several built
        in one pass, `_merge_together`); the last one stays the slot's current segment (it
        continues in the next chunk, or serves decode)."""
        segments = self._route_prefill(m, h, slot, st, start)
        return self._segments_ffn(m, h, st, segments, self._merge_together(m, [(st, segments)])[0])

    def _route_prefill(self, m: int, h: Tensor, slot: int, st: SlotRouting, start: int
                       ) -> list[PromptSegment]:
        """The routing half of `_prefill_moe`: makes (and records) the decisions the chunk's
        tokens h (n, d) call for at MoE layer m, keeps the slot's current scores and segment
        sum, and returns the segments the chunk touches, in order, the last one kept."""
        moe, T, n = self.moe[m], self.T, h.shape[0]
        end = start + n
        if st.mode == "prompt":  # one decision from the whole prompt (always one chunk)
            scores = moe.scores(h.mean(0, keepdim=True))  # (1, E)
            self._record_routing(m, st, [0], scores)
            self.scores[slot, m] = scores[0]
            return [PromptSegment(0, n, scores[0], (st.digests[0], m), True, True)]
        first, last = start // T, (end - 1) // T
        # the segment `first` is routed already: earlier tokens of it were computed (their sum
        # carried), or a resumed prompt starts at its boundary with the scores restored
        carried = self.seg_sum[slot, m] if start % T or start == st.decided else None
        bounds = [(max(k * T, start) - start, min((k + 1) * T, end) - start)
                  for k in range(first, last + 1)]  # local [a, b) of each touched segment
        # routing inputs of the decisions this chunk makes (a carried segment's is made)
        means, new = [], []
        for i, k in enumerate(range(first, last + 1)):
            if k == first and carried is not None:
                continue
            if k == 0:  # segment 1 routes on its own first route1_len tokens
                means.append(h[:st.route1_len].mean(0))
            elif i == 0:  # opens at the chunk start: the previous segment is all in seg_sum
                means.append((self.seg_sum[slot, m] / T).to(h.dtype))
            else:
                a, b = bounds[i - 1]
                prev = h[a:b].float().sum(0)
                if i == 1 and carried is not None:
                    prev = prev + carried
                means.append((prev / T).to(h.dtype))
            new.append(i)
        scores = {0: self.scores[slot, m].clone()} if carried is not None else {}
        if new:
            got = moe.scores(torch.stack(means))  # (len(new), E)
            self._record_routing(m, st, [max((first + i) * T, start) for i in new], got)
            self.history[slot, torch.tensor([first + i for i in new], device=self.device),
                         m] = got.float()
            scores.update({i: got[j] for j, i in enumerate(new)})
        if self.sum_ring is not None:  # (before seg_sum changes: `carried` is a view of it)
            self._ring_prefill(m, h, slot, start, bounds, carried)
        a, b = bounds[-1]
        tail = h[a:b].float().sum(0)
        self.seg_sum[slot, m] = tail + carried if len(bounds) == 1 and carried is not None else tail
        self.scores[slot, m] = scores[len(bounds) - 1]
        last = len(bounds) - 1
        return [PromptSegment(a, b, scores[i], (st.digests[first + i], m), i == last,
                              i == last and end == st.prompt_len)
                for i, (a, b) in enumerate(bounds)]

    def _ring_prefill(self, m: int, h: Tensor, slot: int, start: int,
                      bounds: list[tuple[int, int]], carried: Tensor | None) -> None:
        """`sum_ring` at MoE layer m after the chunk's last T tokens: each one's segment sum up
        to it (h (n, d) the chunk's FFN inputs, `bounds` its segments as `_route_prefill`
        split it, `carried` the sum its first segment had before it)."""
        T, n = self.T, h.shape[0]
        lo = max(0, n - T)  # earlier positions' entries would be overwritten in this chunk
        for i, (a, b) in enumerate(bounds):
            if b <= lo:
                continue
            sums = h[a:b].float().cumsum(0)
            if i == 0 and carried is not None:
                sums = sums + carried
            a2 = max(a, lo)
            at = torch.arange(start + a2, start + b, device=self.device) % T
            self.sum_ring[slot, at, m] = sums[a2 - a:]

    def _segments_ffn(self, m: int, h: Tensor, st: SlotRouting, segments: list[PromptSegment],
                      ready: list[int | None]) -> Tensor:
        """h (n, d) through the merged experts of its `segments` (`_route_prefill`); `ready`:
        per segment, the pool slot `_merge_together` made its merge in (None: not made)."""
        if len(segments) == 1:
            return self._segment_ffn(m, h, segments[0], st, ready[0])
        out = torch.empty_like(h)
        for i, seg in enumerate(segments):
            try:
                out[seg.a:seg.b] = self._segment_ffn(m, h[seg.a:seg.b], seg, st, ready[i])
            except BaseException:
                self._drop_ready(segments[i + 1:], ready[i + 1:])
                raise
        return out

    def _drop_ready(self, segments: list[PromptSegment], ready: list[int | None]) -> None:
        """Release the merges made ready for segments that will not run (a failure before
        them): a kept segment's belongs to its slot (`release` frees it), the others' here."""
        for seg, ps in zip(segments, ready):
            if ps is not None and ps >= 0 and not seg.keep:
                self.cache.release(seg.key)

    def _segment_strategy(self, seg: PromptSegment, st: SlotRouting) -> str:
        """`merged` or `mixture` for a prompt segment (`auto`: the cost model's choice; the
        prompt's last segment's merge also serves decode steps)."""
        if self.strategy != "auto":
            return self.strategy
        future = st.future_uses(st.prompt_len - 1, self.T) if seg.serves_decode else 0
        return self.cost.choose_segment(seg.b - seg.a, future, seg.key not in self.cache)

    def _merge_together(self, m: int, routed: list[tuple[SlotRouting, list[PromptSegment]]]
                        ) -> list[list[int | None]]:
        """The prefill chunks of one forward (each one's routing state and segments at MoE
        layer m; one chunk, or several packed): where two or more of the merges their segments
        use are missing, build them all in one pass over the layer's expert stack
        (`_acquire_many`: one merge's read and a write each, against a read each merging
        segment by segment; a 512-token prompt opens two 256-token segments per layer, whose
        two merges took 12.8 ms one by one, GPT-2-small fp32, one core) and make the kept
        segments the slots' current ones. Returns, per chunk and segment, the pool slot of its
        merge made here (FALLBACK: the pool was full), or None: it goes through `_segment_ffn`
        as before (a single missing merge keeps `merge_apply`'s pass, which applies it as it
        is made). Segments the chunk ends (not kept) join only where the pool can place every
        missing merge at once: one by one, each can reuse the entry the one before released."""
        ready: list[list[int | None]] = [[None] * len(segs) for _, segs in routed]
        if not self.merge_together:
            return ready
        picks = [(i, j, st, seg) for i, (st, segs) in enumerate(routed)
                 for j, seg in enumerate(segs) if self._segment_strategy(seg, st) == "merged"]
        if any(not seg.keep for *_, seg in picks) and not self.cache.can_place(
                [seg.key for *_, seg in picks]):
            picks = [pick for pick in picks if pick[3].keep]
        if len({seg.key for *_, seg in picks if seg.key not in self.cache}) < 2:
            return ready
        slots, _ = self._acquire_many(m, [seg.key for *_, seg in picks],
                                      torch.stack([seg.scores for *_, seg in picks]))
        for (i, j, st, seg), got in zip(picks, slots):
            ready[i][j] = FALLBACK if got is None else got
            if seg.keep:
                self._set_segment(st, m, seg.key, ready[i][j])
        return ready

    def _segment_ffn(self, m: int, x: Tensor, seg: PromptSegment, st: SlotRouting,
                     ready: int | None) -> Tensor:
        """x (n, d) of one prompt segment (or its part in this chunk) through its merged expert;
        `seg.keep`: it stays the slot's current segment after this chunk. `ready`: the pool
        slot `_merge_together` made its merge in (FALLBACK: the pool was full; a kept
        segment's is its slot's current already)."""
        key, keep, scores = seg.key, seg.keep, seg.scores
        ps, y = NO_MERGE if ready is None else ready, None
        if ready is None:
            if self._segment_strategy(seg, st) == "merged":  # a merge made now is applied in
                got, y = self._acquire(m, key, scores, x)  # the same pass where it can
                ps = FALLBACK if got is None else got
            if keep:  # recorded before use: if applying fails, `release(slot)` still frees it
                self._set_segment(st, m, key, ps)
        try:
            if y is not None:
                return y
            if ps >= 0:
                return apply_merged(x, self.cache.weights(ps), self.moe[m].kind)
            return apply_mixture(x, self.moe[m], scores.expand(x.shape[0], -1))
        finally:
            if not keep and ps >= 0:
                self.cache.release(key, passed=True)

    # -- decode -----------------------------------------------------------------------------
    def _opens_segment(self, st: SlotRouting) -> bool:
        """Whether the slot's next decoded token opens a segment (routed afresh at every MoE
        layer, one merge per layer unless cached)."""
        return st.mode == "segment" and st.length % self.T == 0

    def turn_seconds(self, slots: Sequence[int]) -> float:
        """What the next decode of `slots` takes beyond a plain step: the merges of the rows
        that open a segment (the cost model's one merge, per MoE layer and row; the mixture
        strategy makes none). An estimate, for the prefill pacer."""
        if not self.moe or self.strategy == "mixture":
            return 0.0
        rows = sum(self._opens_segment(self.slots[s]) for s in slots)
        return rows * len(self.moe) * self.cost.merge_seconds if rows else 0.0

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int],
               histories: Sequence[Sequence[int]]) -> Tensor:
        """One new token per running sequence. `tokens[b]` is the last sampled token of
        `slots[b]`, `histories[b]` all its token ids so far. Returns logits (B, V)."""
        B, T = len(slots), self.T
        sts = [self.slots[s] for s in slots]
        pos = [st.length for st in sts]
        # slots, positions and tokens in one tensor (one host-to-device copy; after a step's
        # weight stream each torch call runs from cold caches, tens of us apiece on a CPU)
        slots_t, pos_t, ids = torch.tensor([slots, pos, tokens], device=self.device).unbind(0)
        # sequences whose new token opens a segment: routed afresh at every MoE layer
        turn = [b for b in range(B) if self._opens_segment(sts[b])]
        digests = {b: routing_digest("segment", histories[b], pos[b] // T, T,
                                     sts[b].route1_len, sts[b].prompt_len) for b in turn}
        moe = _DecodeRouting(self, sts, slots, slots_t, pos, turn, digests)
        if self.fused is not None and self.fused.serves(B, max(pos)):
            hidden = self.fused.run(ids, pos_t, slots_t, moe, self.seg_sum)  # (B, d)
        else:
            attn = DecodeAttention(self.kv, DecodeRows.of(slots, pos, slots_t, pos_t),
                                   max(pos) + 1)
            hidden = self.tr.run(ids.unsqueeze(1), pos_t.unsqueeze(1), attn, moe)[:, 0]
        if self.sum_ring is not None and self.moe:  # each row's segment sums up to its token
            self.sum_ring[slots_t, pos_t % T] = self.seg_sum[slots_t]
        for st in sts:
            st.length += 1
        return self.model.logits(hidden)  # (B, V)

    def _route_new_segments(self, m: int, sts: list[SlotRouting], slots_t: Tensor,
                            pos: list[int], turn: list[int], digests: dict) -> None:
        """Rows opening a segment: scores from the finished segment's mean, sums restart."""
        tt = slots_t[turn]
        scores = self.moe[m].scores(self.seg_sum[tt, m] / self.T)  # (n, E)
        self.scores[tt, m] = scores
        self.seg_sum[tt, m] = 0.0
        self.history[tt, torch.tensor([pos[b] // self.T for b in turn], device=self.device),
                     m] = scores.float()
        for j, b in enumerate(turn):
            self._set_segment(sts[b], m, (digests[b], m), NO_MERGE)
            self._record_routing(m, sts[b], [pos[b]], scores[j:j + 1])

    def _plan_decode_moe(self, m: int, sts: list[SlotRouting], slots_t: Tensor,
                         pos: list[int], turn: list[int], digests: dict) -> dict[int, list[int]]:
        """MoE layer m's FFN for a decode step, before its input exists: rows opening a segment
        routed, the strategy chosen, missing merges made. Returns the row groups: pool slot
        (or NO_MERGE: the mixture) -> rows. Nothing here reads the step's hidden states, so
        every layer can be planned before the step runs (the fused step does)."""
        if turn:
            self._route_new_segments(m, sts, slots_t, pos, turn, digests)
        if self._decode_strategy(m, sts) != "merged":
            return {NO_MERGE: list(range(len(sts)))}
        # Rows still without their merge get it now, all of them in one pass over the expert
        # stack (`_acquire_many`). Streams that started together open segments together: one
        # merge per row made 96 merges in one step for 8 rows (0.87 s against 0.13 s decode
        # steps, GPT-2-small fp32 on one core); batched, a layer's 8 merges cost about one
        # merge's read plus their writes.
        rows = [b for b, st in enumerate(sts) if st.pool_slots[m] == NO_MERGE]
        if rows:
            got, _ = self._acquire_many(m, [sts[b].keys[m] for b in rows],
                                        self.scores[slots_t[rows], m])
            for b, ps in zip(rows, got):
                sts[b].pool_slots[m] = FALLBACK if ps is None else ps
        groups: dict[int, list[int]] = {}
        for b, st in enumerate(sts):  # rows without a merge: one mixture group
            groups.setdefault(max(st.pool_slots[m], NO_MERGE), []).append(b)
        return groups

    def _native_decode_moe(self, m: int, groups: dict[int, list[int]],
                           acc_slots: Tensor | None) -> FFNSpec | None:
        """The planned FFN of MoE layer m as the fused step's spec, where every row has its
        merged expert and the kernels take its activation; else None. acc_slots (B,): each
        row's slot where its segment sum takes the FFN input, -1 where none (None: no row)."""
        kind = self.moe[m].kind
        if NO_MERGE in groups or kind.activation not in kernels.NATIVE_ACTIVATIONS:
            return None
        whole = len(groups) == 1
        spec = []
        for ps, rows in groups.items():
            w = self.cache.weights(ps)
            spec.append([None if whole else torch.tensor(rows), None, None, w["fc1_weight"],
                         w.get("fc1_bias"), w["fc2_weight"], w.get("fc2_bias")])
        return FFNSpec(spec, stacked=kind.activation in kernels.NATIVE_GATES, moe_index=m,
                       acc_slots=acc_slots)

    def _decode_moe(self, m: int, h: Tensor, sts: list[SlotRouting], slots_t: Tensor,
                    groups: dict[int, list[int]]) -> Tensor:
        """h (B, d) -> (B, d) through the row groups `_plan_decode_moe` made (each row's
        merged expert, or the mixture); the segment sums take h first."""
        seg_rows = [b for b, st in enumerate(sts) if st.mode == "segment"]
        if len(seg_rows) == len(sts):
            self.seg_sum[:, m].index_add_(0, slots_t, h.float())
        elif seg_rows:
            self.seg_sum[:, m].index_add_(0, slots_t[seg_rows], h[seg_rows].float())
        if len(groups) == 1:  # common fast path: one kernel pair for the whole batch
            (ps, _), = groups.items()
            return self._apply_group(m, h, ps, slots_t)
        out = torch.empty_like(h)
        for ps, rows in groups.items():
            out[rows] = self._apply_group(m, h[rows], ps, slots_t[rows])
        return out

    def _apply_group(self, m: int, h: Tensor, ps: int, slots_t: Tensor) -> Tensor:
        if ps >= 0:
            return apply_merged(h, self.cache.weights(ps), self.moe[m].kind)
        return apply_mixture(h, self.moe[m], self.scores[slots_t, m])

    def _decode_strategy(self, m: int, sts: list[SlotRouting]) -> str:
        if self.strategy != "auto":
            return self.strategy
        counts: dict = {}
        new = 0.0  # merges to make, each amortised over the steps that will reuse it
        fallbacks = 0  # rows the pool refused: they run the mixture whichever is chosen
        for st in sts:
            ps = st.pool_slots[m]
            if ps == FALLBACK:
                fallbacks += 1
                continue
            if ps == NO_MERGE and st.keys[m] not in self.cache:
                new += 1.0 / (1 + st.future_uses(st.length, self.T))
            counts[st.keys[m]] = counts.get(st.keys[m], 0) + 1
        if not counts:
            return "mixture"
        return self.cost.choose(list(counts.values()), new, mixture_rows=fallbacks)


class _PrefillRouting:
    """Routing context of one prefill chunk: per-segment merges (cached when kept)."""

    def __init__(self, runner: ModelRunner, slot: int, st: SlotRouting, start: int):
        self.runner, self.slot, self.st, self.start = runner, slot, st, start

    def apply(self, layer: int, h: Tensor) -> Tensor:  # h (1, n, d)
        r = self.runner
        return r._prefill_moe(r.moe_of[layer], h[0], self.slot, self.st, self.start)[None]


class _PackedRouting:
    """Routing context of packed prefill chunks: each piece routed on its own tokens, the
    merges they are missing built together (`ModelRunner._merge_together`), each piece through
    its own merged experts."""

    def __init__(self, pieces: list[_PrefillRouting], lengths: list[int]):
        self.pieces, self.lengths = pieces, lengths

    def apply(self, layer: int, h: Tensor) -> Tensor:  # h (1, N, d)
        r = self.pieces[0].runner
        m = r.moe_of[layer]
        parts = h[0].split(self.lengths)
        routed = [(p.st, r._route_prefill(m, x, p.slot, p.st, p.start))
                  for p, x in zip(self.pieces, parts)]
        ready = r._merge_together(m, routed)
        outs = []
        for k, (x, (st, segs)) in enumerate(zip(parts, routed)):
            try:
                outs.append(r._segments_ffn(m, x, st, segs, ready[k]))
            except BaseException:  # the later pieces' merges made ready here would be held
                for (_, later), held in zip(routed[k + 1:], ready[k + 1:]):
                    r._drop_ready(later, held)
                raise
        return torch.cat(outs)[None]


class _DecodeRouting:
    """Routing context of one decode step: each row's current merge (or the mixture)."""

    def __init__(self, runner: ModelRunner, sts: list[SlotRouting], slots: Sequence[int],
                 slots_t: Tensor, pos: list[int], turn: list[int], digests: dict):
        self.runner, self.sts, self.slots, self.slots_t = runner, sts, slots, slots_t
        self.pos, self.turn, self.digests = pos, turn, digests
        self.groups: dict[int, dict[int, list[int]]] = {}  # planned, not yet applied

    @functools.cached_property
    def acc_slots(self) -> Tensor | None:
        """(B,): each row's slot, whose segment sums take its FFN inputs; -1 for a row in
        prompt mode (None: no row sums), the same for every layer of the step."""
        acc = [s if st.mode == "segment" else -1 for s, st in zip(self.slots, self.sts)]
        return None if max(acc) < 0 else torch.tensor(acc)

    def plan(self, layer: int) -> FFNSpec | None:
        """Plan the layer's FFN now (in layer order, before the step runs); its native spec,
        or None: `apply` runs it."""
        r, m = self.runner, self.runner.moe_of[layer]
        groups = r._plan_decode_moe(m, self.sts, self.slots_t, self.pos, self.turn,
                                    self.digests)
        self.groups[m] = groups
        return r._native_decode_moe(m, groups, self.acc_slots)

    def apply(self, layer: int, h: Tensor) -> Tensor:  # h (B, 1, d)
        r, m = self.runner, self.runner.moe_of[layer]
        groups = self.groups.pop(m, None)
        if groups is None:  # the block loop plans each layer as it reaches it
            groups = r._plan_decode_moe(m, self.sts, self.slots_t, self.pos, self.turn,
                                        self.digests)
        return r._decode_moe(m, h[:, 0], self.sts, self.slots_t, groups)[:, None]


PROMPT_LOGPROBS_CHUNK = 256  # positions per head pass (256 x 50k vocab x fp32 = 51 MB)


def score_prompt(head, x: Tensor, targets: Tensor, k: int,
                 chunk: int = PROMPT_LOGPROBS_CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of prompt tokens from the prefill's final (normed) hidden states, a
    chunk of positions at a time, so (L, V) fp32 logits never exist at once (2,048 x 50k =
    400 MB). x (n, d): hidden states of n positions; targets (n,): the token at each next
    position. Returns on the CPU: chosen (n,), top-k values (n, k), top-k ids (n, k)."""
    chosen, values, ids = [], [], []
    for a in range(0, x.shape[0], chunk):
        lp = torch.log_softmax(head(x[a:a + chunk]).float(), dim=-1)  # (c, V)
        chosen.append(lp.gather(1, targets[a:a + chunk, None])[:, 0])
        top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(chosen).cpu(), torch.cat(values).cpu(), torch.cat(ids).cpu()


def build_model(ckpt) -> torch.nn.Module:
    """The folded model of a validated `FoldedCheckpoint`, without a random init pass: built on
    the meta device, then the checkpoint's tensors are assigned (tied lm_head re-tied). The
    model takes the tensors over (``ckpt.state_dict`` is emptied): as their only owner it can
    free each MoE layer's checkpoint layout as soon as the runner has restacked it."""
    from camex_runtime.checkpoint import model_class
    with torch.device("meta"):
        model = model_class(ckpt.kind)(ckpt.config)
    state, ckpt.state_dict = ckpt.state_dict, {}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if hasattr(model, "lm_head") and "lm_head.weight" in missing:
        model.lm_head.weight = model.transformer.wte.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:  # load_folded validated the names; this guards the assignment
        raise RuntimeError(f"folded state mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
