"""Attention contexts of the serving engine: where a forward's keys and values live.

The model's attention (layers.CamexAttention) computes the new queries, keys and values of the
tokens it is given and hands them to a context (`attend(layer, q, k, v)`); these contexts write
the new keys/values into the preallocated KV cache and attend over the cached prefix.

- `PrefillAttention`: tokens [start, start+n) of one sequence (a whole prompt, or one chunk of
  it); causal over everything cached before them plus themselves.
- `PackedPrefillAttention`: chunks of several sequences packed along the token axis, each
  attending within its own sequence.
- `DecodeAttention`: one new token for each of B sequences at their own positions; a ragged
  batch masks every row's unused cache positions.

Queries may have more heads than keys/values (grouped-query attention); the cache holds the
key/value heads only. A block with sliding-window attention passes its window: every context
then hides the keys that fell out of it (the cache keeps them; they are only not attended). A
model with soft-capped scores (Gemma 2) passes its cap, one with attention sinks (GPT-OSS) its
sink logits, which every context applies.
Knows nothing about routing, requests or sampling.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from camex_runtime import kernels
from camex_runtime.engine.kv_cache import DecodeRows, KVCache
from camex_runtime.layers import fused_sinks, sdpa, sees


# A whole prompt's causal attention on a CPU. torch's CPU flash kernel multiplies every block of
# queries by whole 512-key blocks of keys and masks the excess, so up to a few hundred tokens a
# causal call costs what a full one does. Blocks of CAUSAL_BLOCK queries, each against only the
# keys it can see, do about half of that work: 0.66-0.76x the attention time at 256-512 tokens
# on one thread, 0.80-0.94x on two (GPT-2-small's heads, Zen 4); a 512-token prefill
# 0.92-0.97x. Longer prompts keep one call: the kernel's waste is a smaller share there and the
# blocks' smaller products parallelise worse (1.04-1.4x on two threads at 768-2,048 tokens; one
# thread still gains to ~1,024, 0.98-0.99x of a prefill, not worth a rule per thread count).
# Same softmax sums per query, rounded in another order (differences ~1e-7).
CAUSAL_BLOCK = 64
CAUSAL_BLOCKED_TOKENS = range(3 * CAUSAL_BLOCK, 10 * CAUSAL_BLOCK + 1)
# Soft-capped scores (Gemma 2) and, off the CPU, scores with sinks (GPT-OSS) are materialised
# (no fused kernel caps them or adds a sink; on a CPU layers.sink_attention adds sinks to
# torch's fused kernel): in blocks of this
# many queries, each against the keys it can see, a prompt's score tensor stays (H, block, n)
# instead of (H, n, n), and the causal half and the keys outside a window are never computed.
# A sliding window shorter than the prompt goes in the same blocks, capped or not: each block
# reads at most window + block - 1 keys instead of all n with a mask (a 2,048-token first
# token with a 512-token window, Gemma-3-shaped, Xeon: 0.75-0.85x the one masked call on one
# or two threads; 1,024 tokens 0.9-1.05x).
CAPPED_BLOCK = 256


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None = None,
                     softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """`sdpa(q, k, v, is_causal=True)` for one sequence's new tokens (q (1, H, n, hd), k and v
    (1, KV, n, hd)); on a CPU, in query blocks where that is faster (above); with a window
    shorter than the tokens, capped scores or sinks, in query blocks of CAPPED_BLOCK (any
    device)."""
    n = q.shape[2]
    scored = softcap is not None or sinks is not None and not fused_sinks(q)  # materialised
    if (scored or window is not None and window < n) and n > CAPPED_BLOCK:
        return query_blocks(q, k, v, CAPPED_BLOCK, window, softcap, sinks)
    if window is not None and window < n:
        pos = torch.arange(n, device=q.device)
        return sdpa(q, k, v, attn_mask=sees(pos, pos, window), softcap=softcap, sinks=sinks)
    if q.device.type != "cpu" or n not in CAUSAL_BLOCKED_TOKENS:
        return sdpa(q, k, v, is_causal=True, softcap=softcap, sinks=sinks)
    return query_blocks(q, k, v, CAUSAL_BLOCK, softcap=softcap, sinks=sinks)


def query_blocks(q: Tensor, k: Tensor, v: Tensor, block: int, window: int | None = None,
                 softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Causal attention of n new tokens `block` queries at a time, each block against only the
    keys its queries can see (from the window's start of its first query to its last)."""
    B, H, n, hd = q.shape
    out = q.new_empty(B, n, H, hd).transpose(1, 2)  # the layout sdpa returns: heads merge free
    pos = torch.arange(n, device=q.device)
    for a in range(0, n, block):
        b = min(n, a + block)
        lo = 0 if window is None else max(0, a + 1 - window)
        out[:, :, a:b] = sdpa(q[:, :, a:b], k[:, :, lo:b], v[:, :, lo:b],
                              attn_mask=sees(pos[a:b], pos[lo:b], window), softcap=softcap,
                              sinks=sinks)
    return out


@dataclass
class PrefillAttention:
    kv: KVCache
    slot: int
    start: int = 0  # cache position of the first token of this forward

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
        """q (1, H, n, hd), k and v (1, KV, n, hd) -> (1, H, n, hd)."""
        n = k.shape[2]
        self.kv.write_prefill(layer, self.slot, self.start, k[0], v[0])
        if self.start == 0:  # nothing cached before: attend within the new tokens
            return causal_attention(q, k, v, window, softcap, sinks)
        end = self.start + n
        # keys before the window of the chunk's first token are never seen: not read
        first = 0 if window is None else max(0, self.start + 1 - window)
        keys = self.kv.k[layer, self.slot:self.slot + 1, :, first:end]  # (1, KV, end-first, hd)
        values = self.kv.v[layer, self.slot:self.slot + 1, :, first:end]
        # row i (position start+i) sees cache positions <= start+i (and inside its window)
        q_pos = self.start + torch.arange(n, device=q.device)
        mask = sees(q_pos, torch.arange(first, end, device=q.device), window)
        return sdpa(q, keys, values, attn_mask=mask, softcap=softcap, sinks=sinks)


@dataclass
class PackedPrefillAttention:
    """Prompt chunks of several sequences in one forward, packed one after another along the
    token axis: each piece writes and attends within its own sequence (its PrefillAttention),
    so the packing changes only how many rows the projections multiply at once."""
    pieces: list[PrefillAttention]
    lengths: list[int]  # tokens of each piece, in packing order

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
        """q (1, H, N, hd), k and v (1, KV, N, hd), N = sum(lengths) -> (1, H, N, hd)."""
        outs, a = [], 0
        for ctx, n in zip(self.pieces, self.lengths):
            outs.append(ctx.attend(layer, q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n],
                                   window, softcap, sinks))
            a += n
        return torch.cat(outs, dim=2)


@dataclass
class DecodeAttention:
    kv: KVCache
    rows: DecodeRows  # the step's slots and positions in the cache
    length: int  # max(positions) + 1: the cache prefix to read

    @functools.cached_property
    def mask(self) -> Tensor | None:
        """(B, 1, 1, length) bool hiding each row's unused cache positions in a ragged batch,
        else None; built once per step, and only on the sdpa path (the native kernel attends
        each row over its own positions)."""
        if self.rows.position is not None:  # every row at the same position
            return None
        pos = self.rows.positions_t
        keep = torch.arange(self.length, device=pos.device) <= pos[:, None]
        return keep.view(len(pos), 1, 1, self.length)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
        """q (B, H, 1, hd), k and v (B, KV, 1, hd) -> (B, H, 1, hd)."""
        out = kernels.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.kv.k, self.kv.v,
                                       layer, self.rows.slots_t, self.rows.positions_t, window,
                                       softcap, sinks)
        if out is not None:  # fp32 on a CPU with the native kernels: write + attend in one call
            return out.unsqueeze(2)
        self.kv.write_decode(layer, self.rows, k[:, :, 0], v[:, :, 0])
        keys, values = self.kv.read(layer, self.rows, self.length)
        mask = self.mask
        if window is not None and self.length > window:  # each row's own positions and window
            pos = self.rows.positions_t
            mask = sees(pos, torch.arange(self.length, device=pos.device), window)
            mask = mask.view(len(pos), 1, 1, self.length)
        return sdpa(q, keys, values, attn_mask=mask, softcap=softcap, sinks=sinks)
