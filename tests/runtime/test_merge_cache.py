"""Merge cache: pool accounting and LRU on its own; sharing, eviction, fallback and leaks
through the engine (outputs must not change with the budget)."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import Engine, SamplingParams, kernels
from camex_runtime.engine.merge_cache import MergeCache
from camex_runtime.engine.moe import MoEWeights
from engine_models import build_folded


def cache(slots: int) -> MergeCache:
    d, h = 4, 8
    entry = 4 * (2 * d * h + h + d)
    return MergeCache(d, h, slots * entry + entry // 2, torch.device("cpu"), torch.float32)


def test_pool_is_preallocated_under_budget():
    c = cache(3)
    assert c.num_slots == 3 and c.pool["fc1_weight"].shape == (3, 8, 4)
    assert c.num_slots * c.entry_bytes <= c.budget_bytes


def test_prefault_writes_free_slots_only():
    """Start-up commits the pool's memory by writing every free slot; an entry in use (or
    cached) keeps its weights."""
    c = cache(3)
    for t in c.pool.values():
        t.fill_(float("nan"))
    held = c.acquire("held").slot
    c.pool["fc1_weight"][held].fill_(7.0)
    assert c.prefault() == 2 * c.entry_bytes
    free = [s for s in range(3) if s != held]
    for t in c.pool.values():
        assert torch.equal(t[free], torch.zeros_like(t[free]))
    assert torch.all(c.pool["fc1_weight"][held] == 7.0)
    assert torch.isnan(c.pool["fc2_weight"][held]).all()
    assert cache(0).prefault() == 0


def test_refcounts_lru_eviction_and_fallback():
    c = cache(2)
    a = c.acquire("a")
    assert not a.hit
    assert c.acquire("a").hit and c.acquire("a").slot == a.slot  # shared: refcount 3
    b = c.acquire("b")
    assert c.acquire("c") is None  # both slots referenced: fallback, nothing evicted
    assert (c.fallbacks, c.evictions) == (1, 0)
    c.release("b")  # b unreferenced: stays resident (LRU) ...
    assert c.acquire("b").hit  # ... and can be hit again
    c.release("b")
    for _ in range(3):
        c.release("a")
    got = c.acquire("c")  # evicts the least recently released: b
    assert got.slot == b.slot and c.evictions == 1 and "b" not in c and "a" in c
    assert c.stats().bytes_used == 2 * c.entry_bytes
    with pytest.raises(RuntimeError):
        c.release("a")  # refcount already 0


def test_passed_segments_are_evicted_before_current_ones():
    """An entry released as passed (its sequence moved on to a later segment) goes before
    every entry released as current, however recently; among passed ones, the latest first
    (each is put at the front)."""
    c = cache(3)
    for key in "abc":
        c.acquire(key)
    c.release("a")  # a finished request's current segment
    c.release("b", passed=True)
    c.release("c", passed=True)
    assert c.acquire("d").slot is not None and "c" not in c  # the last passed one first
    assert c.acquire("e").slot is not None and "b" not in c and "a" in c
    c.release("d")
    c.release("e")
    c.acquire("f")  # then plain LRU among the current ones
    assert "a" not in c and "d" in c


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("mc") / "lm")


def greedy(n=10):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_can_place_counts_free_slots_and_entries_nobody_holds():
    c = cache(3)
    assert c.can_place(["a", "b", "c"]) and not c.can_place(["a", "b", "c", "d"])
    c.acquire("a")
    c.acquire("b")
    c.release("b")  # unreferenced: evictable, or a hit
    assert c.can_place(["c", "d"])  # the free slot and b's
    assert not c.can_place(["b", "c", "d"])  # b taken as a hit leaves one slot for c and d
    assert c.can_place(["a", "b", "c"])  # a and b are hits
    assert not c.can_place(["c", "d", "e"])


def test_shared_prefix_requests_hit(path):
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    engine.start()
    try:
        prompt = list(range(1, 11))  # 2.5 segments of T=4
        first = engine.submit(prompt, greedy()).result()
        misses = engine.stats().cache.misses
        again = engine.submit(prompt, greedy()).result()
        s = engine.stats().cache
        assert again.token_ids == first.token_ids
        assert s.misses == misses  # every merge of the second run was a hit
        assert s.hits >= misses
        # same tokens, different prompt length: segment 1 routes differently -> new merges
        engine.submit(prompt[:3], greedy(7)).result()
        assert engine.stats().cache.misses > misses
    finally:
        engine.stop()


@pytest.mark.parametrize("budget_entries", [0, 1, 3])
def test_tiny_budget_evicts_and_falls_back_with_identical_outputs(path, budget_entries):
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5, 5, 5, 5, 5, 5, 5, 5, 5], [30, 31]]
    big = Engine.from_pretrained(path, max_batch_size=4, strategy="merged")
    big.start()
    want = [big.submit(p, greedy(12)).result().token_ids for p in prompts]
    big.stop()
    entry = big.runner.cache.entry_bytes
    small = Engine.from_pretrained(path, max_batch_size=4, strategy="merged",
                                   merge_cache_bytes=budget_entries * entry)
    small.start()
    try:
        hs = [small.submit(p, greedy(12)) for p in prompts]
        assert [h.result().token_ids for h in hs] == want
        s = small.stats().cache
        assert s.fallbacks > 0
        assert s.bytes_used <= s.bytes_budget
        if budget_entries:
            assert s.evictions > 0
    finally:
        small.stop()


def test_no_leaks_after_cancellation(path):
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy="merged", max_waiting=8)
    hs = [engine.submit(list(range(1, 8)), greedy(40)) for _ in range(3)]
    for _ in range(5):
        engine.step()
    assert engine.runner.cache.referenced > 0
    for h in hs:
        h.cancel()
    engine.step()
    for h in hs:
        assert h.result().finish_reason == "cancelled"
        assert list(h)[-1].finish_reason == "cancelled"
    assert engine.runner.cache.referenced == 0
    assert all(s is None for s in engine.runner.slots)
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0
    assert engine.runner.cache.stats().bytes_used <= engine.runner.cache.budget_bytes


def test_default_budget_fits_a_full_batch(tmp_path):
    """merge_cache_bytes=None: max(256 MiB, one entry per MoE layer for every batch slot + 1)."""
    from camex_runtime.engine.runner import MIN_MERGE_CACHE_BYTES, default_merge_cache_bytes

    engine = Engine.from_pretrained(build_folded(tmp_path / "lm"), max_batch_size=3)
    cache = engine.runner.cache
    assert cache.budget_bytes == MIN_MERGE_CACHE_BYTES  # a tiny model: the floor
    cfg = engine.config
    cfg_big = type("C", (), {"d_model": 768, "d_ff": 3072})()  # GPT-2-small FFN: batch term wins
    per_seq = 12 * (2 * 768 * 3072 + 768 + 3072) * 4
    assert default_merge_cache_bytes(cfg_big, 8, 12, torch.float32) == 9 * per_seq
    assert default_merge_cache_bytes(cfg_big, 8, 12, torch.bfloat16) == 9 * per_seq // 2
    assert default_merge_cache_bytes(cfg, 3, 1, torch.float32) == MIN_MERGE_CACHE_BYTES


@pytest.fixture
def bf16_dot():
    """The bf16 dot kernel on for the test (a CPU with AVX512-BF16 of any family)."""
    mod = kernels.native()
    if mod is None or not mod.has_bf16_dot():
        pytest.skip("needs a CPU with AVX512-BF16")
    saved = mod.bf16_dot()
    mod.set_bf16_dot(kernels.BF16_DOT_FROM)
    yield
    mod.set_bf16_dot(saved)


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("family,dtype", [("gpt2", "float32"), ("llama", "float32"),
                                          ("gpt2", "bfloat16"), ("llama", "bfloat16"),
                                          ("gpt2", "float16")])
def test_a_prompt_gets_the_same_bits_whether_its_merges_are_made_or_cached(tmp_path, family,
                                                                           dtype, monkeypatch,
                                                                           request):
    """fp32 on the CPU, bf16 with the bf16 dot kernel, and 16-bit weights on a CPU without a
    16-bit GEMM (the prompt tiles), a prompt segment's merge is made and applied in one pass
    over the expert stack (MoEWeights.merge_apply: a chunk with one merge missing); from the
    cache the finished entry is applied by kernels.ffn; a chunk missing several merges builds
    them in one pass (merge_many_into), then applies them. The prompt must get the same bits
    every way (seeded sampling repeats only then), and the pool entry the bits of a plain
    merge. Segments of 32 and 13 tokens: rows beyond the decode kernels' 16 (fp32) and 8
    (16-bit), within merge_linear's 32."""
    if dtype == "bfloat16" and kernels.native().has_bf16_dot():
        request.getfixturevalue("bf16_dot")
    elif dtype != "float32" and not kernels.tiles_take(getattr(torch, dtype),
                                                       kernels.MERGE_LINEAR_ROWS):
        pytest.skip(f"this CPU multiplies {dtype} prompt rows with its own GEMM")
    overrides = {} if family == "gpt2" else {"family": "llama", "n_kv_head": 2}
    path = build_folded(tmp_path / family, T=32, **overrides)
    prompt = [(7 * i) % 50 + 1 for i in range(45)]  # segment 1: 32 rows, segment 2: 13
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, prompt_logprobs=2)
    fused = Engine.from_pretrained(path, max_batch_size=1, strategy="merged", dtype=dtype)
    made = []
    real = MoEWeights.merge_apply

    def spy(self, x, scores, out):
        y = real(self, x, scores, out)
        made.append(None if y is None else x.shape[0])
        return y
    monkeypatch.setattr(MoEWeights, "merge_apply", spy)
    fused.runner.merge_together = False  # each segment's merge made on its own, as where a
    # chunk is missing only one
    fused.start()
    try:
        first = fused.submit(prompt, params).result()
        assert sorted(made) == [13, 13, 32, 32]  # two segments at each of two MoE layers
        again = fused.submit(prompt, params).result()  # every merge from the cache
        assert len(made) == 4 and fused.runner.cache.stats().hits >= 4
    finally:
        fused.stop()
    assert again.token_ids == first.token_ids and again.prompt_logprobs == first.prompt_logprobs

    # the two segments' merges of a layer in one pass, then applied
    plain = Engine.from_pretrained(path, max_batch_size=1, strategy="merged", dtype=dtype)
    made.clear()
    plain.start()
    try:
        apart = plain.submit(prompt, params).result()
    finally:
        plain.stop()
    assert made == [] and plain.runner.cache.stats().merges == 4
    assert apart.token_ids == first.token_ids and apart.prompt_logprobs == first.prompt_logprobs
    made_here, merged_apart = fused.runner.cache, plain.runner.cache
    assert made_here._entries.keys() == merged_apart._entries.keys()
    for key, entry in made_here._entries.items():
        for part, view in made_here.weights(entry.slot).items():
            assert torch.equal(view, merged_apart.weights(merged_apart._entries[key].slot)[part])
