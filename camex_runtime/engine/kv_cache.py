"""Preallocated key/value cache: one row per batch slot, `max_total_tokens` long.

Sized once at start-up (gpt-fast / litgpt style `register_buffer(..., persistent=False)`), so
decoding never allocates cache memory. Per-slot lengths live with the caller (the model
runner), which writes K/V for new positions and reads back a slot range for attention.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, n_layer: int, num_slots: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        shape = (n_layer, num_slots, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.max_len = max_len

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_prefill(self, layer: int, slot: int, start: int, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """k, v (H, n, hd) -> positions [start, start+n) of `slot`."""
        n = k.shape[1]
        self.k[layer, slot, :, start:start + n] = k
        self.v[layer, slot, :, start:start + n] = v

    def write_decode(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, H, hd): one new position per row; slots, positions (B,) long."""
        self.k[layer][slots, :, positions] = k  # advanced dims first: (B, H, hd)
        self.v[layer][slots, :, positions] = v

    def read(self, layer: int, slots: Sequence[int], slots_t: torch.Tensor,
             length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (B, H, length, hd) for the given slots: a view when the slots are a
        contiguous ascending range (the scheduler hands out the lowest free slot first, so
        this is the common case), else a gathered copy."""
        lo = slots[0]
        if list(slots) == list(range(lo, lo + len(slots))):
            return (self.k[layer, lo:lo + len(slots), :, :length],
                    self.v[layer, lo:lo + len(slots), :, :length])
        return (self.k[layer, :, :, :length].index_select(0, slots_t),
                self.v[layer, :, :, :length].index_select(0, slots_t))
