"""Model runner: executes the folded CAMEx model for the engine (prefill, decode, classify).

It reuses the model's own modules (embeddings, LayerNorms, `CamexAttention` projections, dense
FFNs, heads, `segment_means`, `route_scores`, `merged_ffn`) and replaces only what a server
needs differently: a preallocated KV cache (one slot per running sequence), per-sequence
routing state (current scores and the running FFN-input sum of the current segment, per MoE
layer), and merged weights that live in the content-addressed `MergeCache`. Each MoE layer is
applied per step with the `merged` or `mixture` strategy (`auto`: the cost model decides).

Knows nothing about requests, sampling, tokenizers or threads; the engine calls it from its
loop thread only.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camex_runtime.engine.cost_model import CostModel, StrategyProfile
from camex_runtime.engine.kv_cache import KVCache
from camex_runtime.engine.merge_cache import MergeCache, entry_bytes
from camex_runtime.engine.moe import MoEWeights, apply_merged, apply_mixture
from camex_runtime.engine.routing_state import FALLBACK, NO_MERGE, SlotRouting, routing_digest
from camex_runtime.modeling import segment_means


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
    at least one merged FFN per MoE layer for every running sequence plus one per layer for
    the transient merge of a long prompt's earlier segments, so no sequence of a full batch
    falls back to the mixture for lack of space. (GPT-2-small shape, 12 MoE layers, fp32:
    ~227 MB per sequence.)"""
    entry = entry_bytes(cfg.d_model, cfg.d_ff, dtype)
    return max(MIN_MERGE_CACHE_BYTES, (num_slots + 1) * moe_layers * entry)


class ModelRunner:
    def __init__(self, model, *, num_slots: int, max_len: int,
                 merge_cache_bytes: Optional[int], strategy: str = "auto", observer=None,
                 profile: Optional[StrategyProfile] = None):
        self.model = model.eval()
        self.cfg = model.config
        tr = model.transformer
        self.tr = tr
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.blocks = list(tr.h)
        self.moe_layers = [i for i, b in enumerate(self.blocks) if b.is_moe]
        self.moe_of = {layer: m for m, layer in enumerate(self.moe_layers)}
        self.moe = self._take_expert_weights()
        self.strategy = strategy
        self.observer = observer
        self.T = self.cfg.segment_len
        d, M = self.cfg.d_model, len(self.moe)
        E = max(1, self.cfg.num_experts)
        is_lm = hasattr(model, "lm_head")
        if merge_cache_bytes is None:
            merge_cache_bytes = default_merge_cache_bytes(self.cfg, num_slots, M, self.dtype)
        # classification merges serve one sequence once and are never cached: no pool
        self.cache = MergeCache(d, self.cfg.d_ff, merge_cache_bytes if M and is_lm else 0,
                                self.device, self.dtype)
        self.kv = None
        if is_lm:
            self.kv = KVCache(self.cfg.n_layer, num_slots, self.cfg.n_head, max_len,
                              d // self.cfg.n_head, self.device, self.dtype)
        # per slot and MoE layer: scores of the current segment, FFN-input sum of the segment
        self.scores = torch.zeros(num_slots, M, E, device=self.device)  # fp32
        self.seg_sum = torch.zeros(num_slots, M, d, device=self.device)  # fp32
        self.slots: list[Optional[SlotRouting]] = [None] * num_slots
        self.router_sum = torch.zeros(M, E, device=self.device)
        self.router_counts = [0] * M
        self.cost = None
        if M:  # strategy timings of the real layer shapes on this device (see cost_model)
            self.cost = CostModel(profile or StrategyProfile.measure(self.moe[0]))

    def _take_expert_weights(self) -> list[MoEWeights]:
        """Stack [E_m; Δ] per MoE layer once (docs/DESIGN.md §3: Δ computed at load), dropping
        the model's own expert tensors layer by layer so the peak memory stays about one
        copy of the experts (the runner owns the model from here on)."""
        if not self.cfg.folded:
            raise ValueError("the engine serves folded checkpoints (config.folded=True); "
                             "run camex-export first")
        weights = []
        with torch.no_grad():
            for layer in self.moe_layers:
                ffn = self.blocks[layer].ffn
                weights.append(MoEWeights.from_bank(ffn.expert_bank()))
                ffn.experts, ffn.base = None, None
        return weights

    # -- bookkeeping ------------------------------------------------------------------------
    def _notify(self, name: str, *args) -> None:
        notify(self.observer, name, *args)

    def _record_routing(self, m: int, st: Optional[SlotRouting], starts: Sequence[int],
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

    def _acquire(self, m: int, key, scores: Tensor) -> Optional[int]:
        """Pool slot holding the merge for `key` (merging on a miss), or None: pool full."""
        t0 = time.perf_counter()
        ev0 = self.cache.evictions
        got = self.cache.acquire(key)
        if self.cache.evictions != ev0:
            self._notify("on_evict", self.cache.evictions - ev0)
        if got is None:
            return None
        if not got.hit:
            try:
                self.moe[m].merge_into(scores, self.cache.weights(got.slot))
            except BaseException:
                self.cache.discard(key)
                raise
            self.cache.record_merge(1, time.perf_counter() - t0)
        self._notify("on_merge", self.moe_layers[m], time.perf_counter() - t0, got.hit)
        return got.slot

    def release(self, slot: int) -> None:
        """Forget a finished or cancelled sequence: drop its merge-cache references."""
        st = self.slots[slot]
        if st is None:
            return
        for m, key in enumerate(st.keys):
            if key is not None and st.pool_slots[m] >= 0:
                self.cache.release(key)
        self.slots[slot] = None

    def routing_trace(self, slot: int) -> Optional[dict]:
        """Decisions over the tokens the model processed (the last sampled token never is)."""
        st = self.slots[slot]
        return None if st is None else st.routing_trace(self.moe_layers, st.length)

    def _set_segment(self, st: SlotRouting, m: int, key, pool_slot: int) -> None:
        """Make (key, pool_slot) the current segment's merge of layer m, releasing the old."""
        old = st.keys[m]
        if old is not None and st.pool_slots[m] >= 0:
            self.cache.release(old)
        st.keys[m], st.pool_slots[m] = key, pool_slot

    # -- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], mode: str, trace: bool = False,
                max_new_tokens: int = 1) -> Tensor:
        """Run a whole prompt into `slot`; returns the next-token logits (V,).
        `max_new_tokens` only informs the `auto` strategy (how long merges will be reused)."""
        L, T = len(token_ids), self.T
        st = SlotRouting(mode, L, min(L, T), len(self.moe), L + max_new_tokens, trace)
        self.release(slot)
        self.slots[slot] = st
        K = 1 if mode == "prompt" else -(-L // T)
        digests = [routing_digest(mode, token_ids, k, T, st.route1_len, L) for k in range(K)]
        ids = torch.tensor(token_ids, device=self.device)
        x = self.tr.wte(ids) + self.tr.wpe(torch.arange(L, device=self.device))  # (L, d)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.split_qkv(blk.ln_1(x).unsqueeze(0))  # (1, H, L, hd) each
            self.kv.write_prefill(i, slot, 0, k[0], v[0])
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk.attn.merge_heads(o)[0]
            h = blk.ln_2(x)  # (L, d)
            if blk.is_moe:
                x = x + self._prefill_moe(self.moe_of[i], h, slot, st, digests)
            else:
                x = x + blk.ffn(h)
        st.length = L
        return self.model.lm_head(self.tr.ln_f(x[-1:]))[0]  # (V,)

    def _prefill_moe(self, m: int, h: Tensor, slot: int, st: SlotRouting,
                     digests: list[bytes]) -> Tensor:
        moe, T, L = self.moe[m], self.T, h.shape[0]
        if st.mode == "prompt":
            scores = moe.scores(h.mean(0, keepdim=True))  # (1, E)
            bounds = [(0, L)]
        else:
            scores = moe.scores(segment_means(h.unsqueeze(0), T, st.route1_len)[0])  # (K, E)
            bounds = [(k * T, min((k + 1) * T, L)) for k in range(scores.shape[0])]
            s0 = bounds[-1][0]
            self.seg_sum[slot, m] = h[s0:].float().sum(0)
        self._record_routing(m, st, [b[0] for b in bounds], scores)
        self.scores[slot, m] = scores[-1]
        out = torch.empty_like(h)
        for k, (a, b) in enumerate(bounds):
            keep = k == len(bounds) - 1
            out[a:b] = self._segment_ffn(m, h[a:b], scores[k], (digests[k], m), st, keep)
        return out

    def _segment_ffn(self, m: int, x: Tensor, scores: Tensor, key, st: SlotRouting,
                     keep: bool) -> Tensor:
        """x (n, d) of one prompt segment through its merged expert (scores (E,))."""
        strategy = self.strategy
        if strategy == "auto":  # the kept (last) segment's merge also serves decode steps
            future = st.future_uses(st.prompt_len - 1, self.T) if keep else 0
            strategy = self.cost.choose_segment(x.shape[0], future, key not in self.cache)
        ps = NO_MERGE
        if strategy == "merged":
            got = self._acquire(m, key, scores)
            ps = FALLBACK if got is None else got
        if keep:  # recorded before use: if applying fails, `release(slot)` still frees it
            self._set_segment(st, m, key, ps)
        try:
            if ps >= 0:
                return apply_merged(x, self.cache.weights(ps))
            return apply_mixture(x, self.moe[m], scores.expand(x.shape[0], -1))
        finally:
            if not keep and ps >= 0:
                self.cache.release(key)

    # -- decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int],
               histories: Sequence[Sequence[int]]) -> Tensor:
        """One new token per running sequence. `tokens[b]` is the last sampled token of
        `slots[b]`, `histories[b]` all its token ids so far. Returns logits (B, V)."""
        B, T = len(slots), self.T
        sts = [self.slots[s] for s in slots]
        pos = [st.length for st in sts]
        slots_t = torch.tensor(slots, device=self.device)
        pos_t = torch.tensor(pos, device=self.device)
        x = self.tr.wte(torch.tensor(tokens, device=self.device)) + self.tr.wpe(pos_t)  # (B, d)
        # sequences whose new token opens a segment: routed afresh at every MoE layer
        turn = [b for b in range(B) if sts[b].mode == "segment" and pos[b] % T == 0]
        digests = {b: routing_digest("segment", histories[b], pos[b] // T, T,
                                     sts[b].route1_len, sts[b].prompt_len) for b in turn}
        Lmax = max(pos) + 1
        mask = None
        if min(pos) != max(pos):  # ragged batch: hide each row's unused cache positions
            mask = (torch.arange(Lmax, device=self.device) <= pos_t[:, None]).view(B, 1, 1, Lmax)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.split_qkv(blk.ln_1(x).unsqueeze(1))  # (B, H, 1, hd) each
            self.kv.write_decode(i, slots_t, pos_t, k[:, :, 0], v[:, :, 0])
            keys, values = self.kv.read(i, slots, slots_t, Lmax)  # (B, H, Lmax, hd)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, 1, hd)
            x = x + blk.attn.merge_heads(o)[:, 0]
            h = blk.ln_2(x)  # (B, d)
            if blk.is_moe:
                x = x + self._decode_moe(self.moe_of[i], h, sts, slots, slots_t, pos, turn,
                                         digests)
            else:
                x = x + blk.ffn(h)
        for st in sts:
            st.length += 1
        return self.model.lm_head(self.tr.ln_f(x))  # (B, V)

    def _route_new_segments(self, m: int, sts: list[SlotRouting], slots_t: Tensor,
                            pos: list[int], turn: list[int], digests: dict) -> None:
        """Rows opening a segment: scores from the finished segment's mean, sums restart."""
        tt = slots_t[turn]
        scores = self.moe[m].scores(self.seg_sum[tt, m] / self.T)  # (n, E)
        self.scores[tt, m] = scores
        self.seg_sum[tt, m] = 0.0
        for j, b in enumerate(turn):
            self._set_segment(sts[b], m, (digests[b], m), NO_MERGE)
            self._record_routing(m, sts[b], [pos[b]], scores[j:j + 1])

    def _decode_moe(self, m: int, h: Tensor, sts: list[SlotRouting], slots: Sequence[int],
                    slots_t: Tensor, pos: list[int], turn: list[int], digests: dict) -> Tensor:
        """h (B, d) -> (B, d) through each row's current merged expert of MoE layer m."""
        if turn:
            self._route_new_segments(m, sts, slots_t, pos, turn, digests)
        seg_rows = [b for b, st in enumerate(sts) if st.mode == "segment"]
        if len(seg_rows) == len(sts):
            self.seg_sum[:, m].index_add_(0, slots_t, h.float())
        elif seg_rows:
            self.seg_sum[:, m].index_add_(0, slots_t[seg_rows], h[seg_rows].float())
        if self._decode_strategy(m, sts) == "merged":
            for b, st in enumerate(sts):
                if st.pool_slots[m] == NO_MERGE:
                    got = self._acquire(m, st.keys[m], self.scores[slots[b], m])
                    st.pool_slots[m] = FALLBACK if got is None else got
            groups: dict[int, list[int]] = {}
            for b, st in enumerate(sts):
                groups.setdefault(st.pool_slots[m], []).append(b)
        else:
            groups = {NO_MERGE: list(range(len(sts)))}
        if len(groups) == 1:  # common fast path: one kernel pair for the whole batch
            (ps, _), = groups.items()
            return self._apply_group(m, h, ps, slots_t)
        out = torch.empty_like(h)
        for ps, rows in groups.items():
            out[rows] = self._apply_group(m, h[rows], ps, slots_t[rows])
        return out

    def _apply_group(self, m: int, h: Tensor, ps: int, slots_t: Tensor) -> Tensor:
        if ps >= 0:
            return apply_merged(h, self.cache.weights(ps))
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


def build_model(ckpt) -> torch.nn.Module:
    """The folded model of a validated `FoldedCheckpoint`, without a random init pass: built on
    the meta device, then the checkpoint's tensors are assigned (tied lm_head re-tied)."""
    from camex_runtime.checkpoint import model_class
    with torch.device("meta"):
        model = model_class(ckpt.kind)(ckpt.config)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False, assign=True)
    if hasattr(model, "lm_head") and "lm_head.weight" in missing:
        model.lm_head.weight = model.transformer.wte.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:  # load_folded validated the names; this guards the assignment
        raise RuntimeError(f"folded state mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
