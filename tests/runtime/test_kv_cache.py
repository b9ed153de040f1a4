"""KV cache: preallocated buffers, per-slot writes, view vs gathered reads."""
from __future__ import annotations

import torch

from camex_runtime.engine.kv_cache import DecodeRows, KVCache


def rows(slots, positions) -> DecodeRows:
    return DecodeRows.of(slots, positions, torch.tensor(slots), torch.tensor(positions))


def make() -> KVCache:
    return KVCache(n_layer=2, num_slots=3, n_head=2, max_len=8, head_dim=4,
                   device=torch.device("cpu"), dtype=torch.float32)


def test_buffers_are_preallocated_and_not_persistent():
    kv = make()
    assert kv.k.shape == (2, 3, 2, 8, 4) and kv.num_bytes == 2 * 2 * 3 * 2 * 8 * 4 * 4
    assert kv.state_dict() == {}


def test_prefill_then_decode_writes_land_per_slot():
    kv = make()
    k = torch.randn(2, 5, 4)
    kv.write_prefill(1, slot=2, start=0, k=k, v=-k)
    new = torch.randn(2, 2, 4)  # rows for slots 2 and 0 at positions 5 and 0: a scatter
    kv.write_decode(1, rows([2, 0], [5, 0]), new, -new)
    assert torch.equal(kv.k[1, 2, :, :5], k) and torch.equal(kv.k[1, 2, :, 5], new[0])
    assert torch.equal(kv.v[1, 0, :, 0], -new[1])
    assert kv.k[0].abs().sum() == 0  # other layers untouched
    same = torch.randn(2, 2, 4)  # slots 0 and 1 at position 6: a strided copy
    r = rows([0, 1], [6, 6])
    assert r.range == slice(0, 2) and r.position == 6
    kv.write_decode(1, r, same, -same)
    assert torch.equal(kv.k[1, 0, :, 6], same[0]) and torch.equal(kv.v[1, 1, :, 6], -same[1])
    assert torch.equal(kv.v[1, 0, :, 0], -new[1])  # earlier writes kept


def test_read_is_a_view_for_contiguous_slots_else_a_gather():
    kv = make()
    kv.k.normal_()
    k, _ = kv.read(0, rows([1, 2], [5, 3]), 6)
    assert k.shape == (2, 2, 6, 4) and k.data_ptr() == kv.k[0, 1].data_ptr()  # a view
    g, _ = kv.read(0, rows([2, 0], [5, 5]), 6)
    assert torch.equal(g[0], kv.k[0, 2, :, :6]) and torch.equal(g[1], kv.k[0, 0, :, :6])
