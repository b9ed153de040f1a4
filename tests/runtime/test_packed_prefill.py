"""Packed prefill: the prompt chunks of one engine step run as one forward (their tokens side by
side along the token axis), each sequence keeping its own attention and routing. The results
equal each prompt prefilled alone; a failing packed forward fails no request by itself."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.moe import MoEWeights
from camex_runtime.errors import RequestFailedError
from engine_models import build_folded, results_alone

T = 4


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("packed") / "lm", T=T)


def prompts(seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (3 * T + 2, 5, 1, 2 * T)]


def count_forwards(monkeypatch, runner) -> list[int]:
    """Token count of every forward the runner makes from now on."""
    calls, real = [], runner.tr.run
    monkeypatch.setattr(runner.tr, "run", lambda ids, *a, **k: (calls.append(ids.shape[1]),
                                                                real(ids, *a, **k))[1])
    return calls


@pytest.mark.parametrize("strategy", ["merged", "mixture"])
@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_packed_chunks_equal_each_prompt_prefilled_alone(path, monkeypatch, mode, strategy):
    """Four prompts advance together, each by its own budget per step (chunks cross segment
    boundaries; in `prompt` mode the routing span advances by layers, alone): every prompt's
    next-token logits and KV cache equal its whole prefill alone, and the token chunks of a
    step share one forward."""
    ps = prompts()
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy=strategy).runner
    want = []
    for p in ps:
        want.append((alone.prefill(0, p, mode), alone.kv.k[:, 0, :, :len(p)].clone()))
        alone.release(0)
    runner = Engine.from_pretrained(path, max_batch_size=4, strategy=strategy).runner
    for slot, p in enumerate(ps):
        runner.start_prefill(slot, p, mode)
    budgets = {0: 3, 1: 2, 2: None, 3: 5}
    forwards = count_forwards(monkeypatch, runner)
    got: dict[int, torch.Tensor] = {}
    steps = chunks = 0
    while len(got) < len(ps):
        plan = [(s, b) for s, b in budgets.items() if s not in got]
        for (slot, _), logits in zip(plan, runner.prefill_steps(plan)):
            if logits is not None:
                got[slot] = logits
        steps, chunks = steps + 1, chunks + len(plan)
    assert steps > 1
    for slot, (logits, keys) in enumerate(want):
        torch.testing.assert_close(got[slot], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runner.kv.k[:, slot, :, :len(ps[slot])], keys,
                                   atol=1e-5, rtol=1e-5)
        assert runner.slots[slot].length == len(ps[slot])
    if mode == "segment":  # chunks of whole tokens share forwards (the first routing span of a
        # small budget advances by layers, alone)
        assert len(forwards) < chunks and max(forwards) > max(3, 2, 5)
    for slot in range(len(ps)):
        runner.release(slot)
    assert runner.cache.referenced == 0


def test_prompts_admitted_together_prefill_in_one_forward(path, monkeypatch):
    """Prompts that join in the same step (nothing decoding: whole) share one forward, and
    each request's tokens and prompt logprobs are those it gets alone."""
    ps = prompts(7)
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, prompt_logprobs=2 if i == 0
                             else None) for i in range(len(ps))]
    want = results_alone(path, ps, params, strategy="merged")
    engine = Engine.from_pretrained(path, max_batch_size=4, strategy="merged")
    forwards = count_forwards(monkeypatch, engine.runner)
    handles = [engine.submit(p, sp) for p, sp in zip(ps, params)]
    engine.step()
    assert forwards[0] == sum(len(p) for p in ps)  # the four prompts in one forward
    assert all(h._events for h in handles)  # ... and each has its first token
    while not all(h.done for h in handles):
        engine.step()
    got = [h.result() for h in handles]
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].prompt_logprobs[0] is None
    for a, b in zip(got[0].prompt_logprobs[1:], want[0].prompt_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert engine.runner.cache.referenced == 0


def test_a_failed_packed_forward_reruns_each_prompt_alone(path, monkeypatch):
    """The packed forward fails (as out of memory would): each of its prompts starts over
    alone in the same step, so none fails for another's sake; one that fails alone too gets
    the error, and only it."""
    ps = prompts(9)
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [r.token_ids for r in results_alone(path, ps, sp, strategy="merged")]
    engine = Engine.from_pretrained(path, max_batch_size=4, strategy="merged")
    runner = engine.runner
    real_steps, real_step = runner.prefill_steps, runner.prefill_step
    doomed = {}  # the slot whose prefill fails, alone too

    def packed(chunks):
        if len(chunks) > 1:
            raise RuntimeError("out of memory (simulated)")
        return real_steps(chunks)

    def step(slot, budget):
        if slot in doomed:
            raise RuntimeError("out of memory (simulated, alone)")
        return real_step(slot, budget)

    monkeypatch.setattr(runner, "prefill_steps", packed)
    monkeypatch.setattr(runner, "prefill_step", step)
    handles = [engine.submit(p, sp) for p in ps]
    doomed[3] = True  # slots are handed out lowest first: the fourth request's
    while not all(h.done for h in handles):
        engine.step()
    assert [h.result().token_ids for h in handles[:3]] == want[:3]
    with pytest.raises(RequestFailedError, match="prefill failed: out of memory"):
        handles[3].result()
    assert engine.scheduler.num_running == 0 and engine.runner.cache.referenced == 0


def short_prompts() -> list[list[int]]:
    """Prompts within one segment (T tokens or fewer): each makes one routing decision per MoE
    layer; the third repeats the first, so it routes to the same merges."""
    gen = torch.Generator().manual_seed(13)
    a, b, c = (torch.randint(0, 60, (n,), generator=gen).tolist() for n in (3, T, 2))
    return [a, b, list(a), c]


def count_merge_passes(monkeypatch) -> tuple[list[int], list[int]]:
    """Rows of every merge_many_into pass over an expert stack, and every merge_apply."""
    passes, applies = [], []
    many, apply = MoEWeights.merge_many_into, MoEWeights.merge_apply
    monkeypatch.setattr(MoEWeights, "merge_many_into", lambda self, scores, outs: (
        passes.append(len(outs)), many(self, scores, outs))[1])
    monkeypatch.setattr(MoEWeights, "merge_apply", lambda self, *a: (
        applies.append(1), apply(self, *a))[1])
    return passes, applies


def test_chunks_packed_together_build_their_merges_in_one_pass(path, monkeypatch):
    """Four short prompts prefilled in one packed forward, each making a routing decision at
    every MoE layer: the three distinct merges of a layer are built in one pass over its expert
    stack (one merge_many_into with three rows, no per-prompt merge_apply), the repeated prompt
    shares its twin's entry, and every merged FFN holds the bits a lone prompt's merge writes."""
    ps = short_prompts()
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy="merged").runner
    want = []
    for p in ps[:2] + ps[3:]:
        logits = alone.prefill(0, p, "segment")
        st = alone.slots[0]
        want.append((logits, [alone.cache.weights(s)["fc1_weight"].clone()
                              for s in st.pool_slots]))
        alone.release(0)
    want.insert(2, want[0])
    runner = Engine.from_pretrained(path, max_batch_size=4, strategy="merged").runner
    n_moe = len(runner.moe)
    for slot, p in enumerate(ps):
        runner.start_prefill(slot, p, "segment")
    passes, applies = count_merge_passes(monkeypatch)
    got = runner.prefill_steps([(slot, None) for slot in range(len(ps))])
    assert passes == [3] * n_moe and applies == []
    stats = runner.cache.stats()
    assert (stats.merges, stats.misses, stats.hits) == (3 * n_moe, 3 * n_moe, n_moe)
    for slot, (logits, merged) in enumerate(want):
        st = runner.slots[slot]
        torch.testing.assert_close(got[slot], logits, atol=1e-5, rtol=1e-5)
        for m in range(n_moe):
            assert torch.equal(runner.cache.weights(st.pool_slots[m])["fc1_weight"], merged[m])
    assert runner.slots[0].pool_slots == runner.slots[2].pool_slots
    for slot in range(len(ps)):
        runner.release(slot)
    assert runner.cache.referenced == 0


def test_one_missing_merge_among_packed_chunks_is_applied_as_it_is_made(path, monkeypatch):
    """Where only one of the packed prompts' merges is missing (the others are cached), it
    keeps the lone prompt's pass that merges and applies together (merge_apply)."""
    a, b, _, _ = short_prompts()
    runner = Engine.from_pretrained(path, max_batch_size=2, strategy="merged").runner
    runner.prefill(0, a, "segment")
    runner.release(0)  # a's merges stay cached, unreferenced
    for slot, p in enumerate((a, b)):
        runner.start_prefill(slot, p, "segment")
    passes, applies = count_merge_passes(monkeypatch)
    runner.prefill_steps([(0, None), (1, None)])
    n_moe = len(runner.moe)
    assert len(applies) == n_moe and passes in ([], [1] * n_moe)  # [1]: no fused kernel here
    for slot in range(2):
        runner.release(slot)
    assert runner.cache.referenced == 0


def test_a_merge_failing_for_packed_chunks_holds_no_entry_and_loses_no_request(path,
                                                                             monkeypatch):
    """The shared merge pass raises (as out of memory would) while one of the packed prompts'
    merges is a cache hit: the runner keeps no reference to any entry it took, and the engine
    reruns each prompt alone, which then gets the tokens it gets alone."""
    ps = short_prompts()
    runner = Engine.from_pretrained(path, max_batch_size=4, strategy="merged").runner
    runner.prefill(0, ps[0], "segment")
    runner.release(0)  # ps[0]'s merges are cached: a hit in the failing pass
    many = MoEWeights.merge_many_into

    def fails_together(self, scores, outs):
        if len(outs) > 1:
            raise RuntimeError("out of memory (simulated)")
        return many(self, scores, outs)

    monkeypatch.setattr(MoEWeights, "merge_many_into", fails_together)
    for slot, p in enumerate(ps):
        runner.start_prefill(slot, p, "segment")
    with pytest.raises(RuntimeError, match="simulated"):
        runner.prefill_steps([(slot, None) for slot in range(len(ps))])
    for slot in range(len(ps)):
        runner.release(slot)
    assert runner.cache.referenced == 0

    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [r.token_ids for r in results_alone(path, ps, sp, strategy="merged")]
    engine = Engine.from_pretrained(path, max_batch_size=4, strategy="merged")
    handles = [engine.submit(p, sp) for p in ps]
    while not all(h.done for h in handles):
        engine.step()
    assert [h.result().token_ids for h in handles] == want
    assert engine.runner.cache.referenced == 0


def test_packed_chunks_merging_together_into_a_full_pool_fall_back_exactly(path):
    """The shared merge pass asks for more entries than the pool holds (room for two): the
    pieces it cannot place run the mixture, every prompt's logits are still its own alone,
    and nothing stays referenced."""
    ps = short_prompts()
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy="merged").runner
    want = []
    for p in ps:
        want.append(alone.prefill(0, p, "segment"))
        alone.release(0)
    entry = alone.cache.entry_bytes
    runner = Engine.from_pretrained(path, max_batch_size=4, strategy="merged",
                                    merge_cache_bytes=2 * entry).runner
    for slot, p in enumerate(ps):
        runner.start_prefill(slot, p, "segment")
    got = runner.prefill_steps([(slot, None) for slot in range(len(ps))])
    assert runner.cache.stats().fallbacks > 0
    assert any(ps_ < 0 for slot in range(len(ps)) for ps_ in runner.slots[slot].pool_slots)
    for slot, logits in enumerate(want):
        torch.testing.assert_close(got[slot], logits, atol=1e-5, rtol=1e-5)
    for slot in range(len(ps)):
        runner.release(slot)
    assert runner.cache.referenced == 0


def test_a_prompt_opening_several_segments_builds_their_merges_in_one_pass(path, monkeypatch):
    """One prompt of three segments, prefilled whole: at each MoE layer its three merges (two
    for segments it ends, one it keeps for decode) are built in one pass over the expert stack;
    the logits and every entry's bits are those of merging segment by segment, and once the
    slot is released nothing stays referenced."""
    prompt = prompts()[0][:3 * T]
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy="merged").runner
    alone.merge_together = False  # every segment merged on its own
    passes, applies = count_merge_passes(monkeypatch)
    want = alone.prefill(0, prompt, "segment")
    n_moe = len(alone.moe)
    assert all(rows == 1 for rows in passes) and len(passes) + len(applies) == 3 * n_moe
    passes.clear()
    applies.clear()
    runner = Engine.from_pretrained(path, max_batch_size=1, strategy="merged").runner
    got = runner.prefill(0, prompt, "segment")
    assert passes == [3] * n_moe and applies == []
    assert torch.equal(got, want)
    assert runner.cache._entries.keys() == alone.cache._entries.keys()
    for key, entry in runner.cache._entries.items():
        theirs = alone.cache.weights(alone.cache._entries[key].slot)
        for part, view in runner.cache.weights(entry.slot).items():
            assert torch.equal(view, theirs[part])
    assert runner.cache.referenced == n_moe  # the kept segments', held for decode
    runner.release(0)
    alone.release(0)
    assert runner.cache.referenced == 0


def test_segments_a_prompt_ends_merge_one_by_one_where_the_pool_cannot_place_them_all(
        path, monkeypatch):
    """A pool of three entries, two MoE layers, a prompt of three segments: the first layer's
    three merges fit the empty pool and are built in one pass. At the second, the first
    layer's kept entry holds one slot: all three at once could not be placed, and one segment
    would run the (much slower) mixture; one by one, the segments the prompt ends take a spare
    slot in turn. So they go one by one there: no fallback, the same logits."""
    prompt = prompts()[0][:3 * T]
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy="merged").runner
    want = alone.prefill(0, prompt, "segment")
    n_moe = len(alone.moe)
    runner = Engine.from_pretrained(path, max_batch_size=1, strategy="merged",
                                    merge_cache_bytes=(n_moe + 1) * alone.cache.entry_bytes).runner
    passes, applies = count_merge_passes(monkeypatch)
    got = runner.prefill(0, prompt, "segment")
    assert runner.cache.stats().fallbacks == 0
    assert n_moe == 2 and passes[0] == 3
    assert all(rows == 1 for rows in passes[1:]) and len(passes) - 1 + len(applies) == 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    runner.release(0)
    assert runner.cache.referenced == 0
