"""Preallocated key/value cache: one row per batch slot, `max_total_tokens` long.

Sized once at start-up (gpt-fast / litgpt style `register_buffer(..., persistent=False)`), so
decoding never allocates cache memory. Per-slot lengths live with the caller (the model
runner), which writes K/V for new positions and reads back a slot range for attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import nn

from camex_runtime.memory import huge_page_empty


class KVCache(nn.Module):
    def __init__(self, n_layer: int, num_slots: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        shape = (n_layer, num_slots, n_head, max_len, head_dim)
        for name in ("k", "v"):  # read every decode step: on huge pages where the CPU has them
            self.register_buffer(name, huge_page_empty(shape, dtype, device).zero_(),
                                 persistent=False)
        self.max_len = max_len

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot `dst`'s first n positions become slot `src`'s, every layer."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_prefill(self, layer: int, slot: int, start: int, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """k, v (H, n, hd) -> positions [start, start+n) of `slot`."""
        n = k.shape[1]
        self.k[layer, slot, :, start:start + n] = k
        self.v[layer, slot, :, start:start + n] = v

    def write_decode(self, layer: int, rows: DecodeRows, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """k, v (B, H, hd): one new position per row."""
        if rows.range is not None and rows.position is not None:  # a plain strided copy
            self.k[layer, rows.range, :, rows.position] = k
            self.v[layer, rows.range, :, rows.position] = v
            return
        self.k[layer][rows.slots_t, :, rows.positions_t] = k  # advanced dims first: (B, H, hd)
        self.v[layer][rows.slots_t, :, rows.positions_t] = v

    def read(self, layer: int, rows: DecodeRows,
             length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (B, H, length, hd) of the rows' slots: a view when the slots are a contiguous
        ascending range (the scheduler hands out the lowest free slot first and decodes in slot
        order, so this is the common case), else a gathered copy."""
        if rows.range is not None:
            return self.k[layer, rows.range, :, :length], self.v[layer, rows.range, :, :length]
        return (self.k[layer, :, :, :length].index_select(0, rows.slots_t),
                self.v[layer, :, :, :length].index_select(0, rows.slots_t))


@dataclass(frozen=True)
class DecodeRows:
    """Where one decode step's rows live in the cache, worked out once per step (not per
    layer): the slots as a slice when they are a contiguous ascending range, and the common
    position when every row writes the same one (then writes are strided copies, not
    scatters)."""
    slots_t: torch.Tensor  # (B,) long
    positions_t: torch.Tensor  # (B,) long
    range: slice | None
    position: int | None

    @classmethod
    def of(cls, slots: Sequence[int], positions: Sequence[int], slots_t: torch.Tensor,
           positions_t: torch.Tensor) -> DecodeRows:
        lo = slots[0]
        contiguous = list(slots) == list(range(lo, lo + len(slots)))
        same = min(positions) == max(positions)
        return cls(slots_t, positions_t, slice(lo, lo + len(slots)) if contiguous else None,
                   positions[0] if same else None)
