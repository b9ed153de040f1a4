"""Prefix caching: a finished sequence's tokens stay in its free slot's KV cache, and a later
segment-mode prompt that starts with them resumes there instead of computing them again. The
resumed sequence must be the sequence a cold prefill gives (logits equal up to rounding, the
same greedy tokens): its routing state is either the slot's own (the prompt continues all its
tokens), or restored from the slot's recorded decisions and segment sums where the shared
prefix ends among the last T tokens computed, or from the decisions at a segment boundary."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.scheduler import Scheduler, SchedulerConfig
from engine_models import build_folded

T = 4
PROMPT = [5, 17, 3, 44, 21, 9, 30, 12, 7, 51]  # 10 tokens: two whole segments and a half


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("prefix") / "m", T=T)


def runner_of(path, strategy="auto", slots=3, prefix_caching=True):
    return Engine.from_pretrained(path, max_batch_size=slots, strategy=strategy,
                                  prefix_caching=prefix_caching).runner


def leave(runner, slot: int, prompt: list[int], new_tokens: int, budget: int | None = None
          ) -> list[int]:
    """Prefill `prompt` in `slot` (in chunks of about `budget` tokens), decode `new_tokens`
    greedily, release the slot keeping its tokens; returns every token id (the last one
    sampled, never computed)."""
    runner.start_prefill(slot, prompt, "segment", max_new_tokens=new_tokens + 1)
    logits, ids = None, list(prompt)
    while logits is None:
        logits = runner.prefill_step(slot, budget)
    for _ in range(new_tokens):
        ids.append(int(logits.argmax()))
        logits = runner.decode([slot], [ids[-1]], [ids])[0]
    ids.append(int(logits.argmax()))
    runner.release(slot, ids)
    return ids


def continue_both(runner, warm: tuple[int, torch.Tensor], cold: tuple[int, torch.Tensor],
                  prompt: list[int], steps: int = 8) -> tuple[float, list[int], list[int]]:
    """Greedy-decode the resumed and the cold sequence side by side; the largest logit gap
    and both token lists."""
    (ws, wl), (cs, cl) = warm, cold
    gap = float((wl - cl).abs().max())
    wi, ci = list(prompt), list(prompt)
    for _ in range(steps):
        wi.append(int(wl.argmax()))
        ci.append(int(cl.argmax()))
        wl, cl = runner.decode([ws, cs], [wi[-1], ci[-1]], [wi, ci])
        gap = max(gap, float((wl - cl).abs().max()))
    return gap, wi, ci


def resumes_as_cold(runner, warm: int, cold: int, prompt: list[int], resume: int,
                    steps: int = 8, mode: str = "segment") -> None:
    """`prompt` resumed in slot `warm` at token `resume` continues as a cold prefill of it in
    slot `cold` does: logits within 1e-4 over `steps` greedy tokens, the same tokens."""
    runner.start_prefill(cold, prompt, mode, max_new_tokens=9)
    cold_logits = runner.prefill_step(cold, None)
    runner.start_prefill(warm, prompt, mode, max_new_tokens=9, resume=resume)
    gap, warm_ids, cold_ids = continue_both(runner, (warm, runner.prefill_step(warm, None)),
                                            (cold, cold_logits), prompt, steps)
    assert gap < 1e-4 and warm_ids == cold_ids


def other(token: int) -> int:
    return (token + 1) % 60


CASES = {  # name -> (tokens decoded before the slot is left, the new prompt, tokens resumed)
    # the next turn of a chat: every computed token (the slot's own routing state),
    # mid-segment ...
    "continues": (5, lambda ids: ids + [8, 2, 40], 15),
    # ... and at a segment boundary (12 computed): its decision from the slot's segment sum
    "continues at a boundary": (2, lambda ids: ids + [8, 2], 12),
    # shares part of the computed tokens, up to one of the last T = 4 computed (11-14 of 15):
    # resumes after the whole shared part, the segment's scores and sum restored from the
    # slot's records (the sum after token 12 recorded by a decode step ...
    "diverges": (5, lambda ids: ids[:13] + [other(ids[13]), 2], 13),
    # ... after token 8 by the prefill (11 computed: the ring holds 7-10) ...
    "diverges inside the prompt": (1, lambda ids: PROMPT[:9] + [1, 1, 2], 9),
    # ... after token 13, the segment 12-15 recorded before one opened at 16 (17 computed))
    "diverges past a boundary": (7, lambda ids: ids[:14] + [other(ids[14]), 2], 14),
    # its last token must run (the next-token logits): all but the last of the 15
    "exactly the computed tokens": (5, lambda ids: ids[:15], 14),
    "the same prompt again": (1, lambda ids: list(PROMPT), 9),
    # shares up to a token older than the last T: back to the last boundary in the shared
    # part, where the slot's recorded decision routes the segment
    "diverges before the last T": (5, lambda ids: PROMPT[:9] + [1, 1, 2], 8),
    "diverges at the edge of the last T": (7, lambda ids: ids[:13] + [other(ids[13]), 2], 12),
    "a prefix of the computed tokens": (5, lambda ids: ids[:12], 8),
    "the same prompt after a longer answer": (5, lambda ids: list(PROMPT), 8),
}


@pytest.mark.parametrize("strategy", ["auto", "merged", "mixture"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_prompt_continues_as_a_cold_prefill(path, strategy, case):
    new_tokens, make, resumed = CASES[case]
    runner = runner_of(path, strategy)
    prompt = make(leave(runner, 0, PROMPT, new_tokens))
    assert runner.cached_prefix(prompt, [0, 1, 2]) == (0, resumed)
    runner.start_prefill(1, prompt, "segment", max_new_tokens=9)
    cold = runner.prefill_step(1, None)
    runner.start_prefill(0, prompt, "segment", max_new_tokens=9, resume=resumed)
    assert runner.slots[0].length == resumed and runner.retained[0] is None
    warm = runner.prefill_step(0, None)
    gap, warm_ids, cold_ids = continue_both(runner, (0, warm), (1, cold), prompt)
    assert gap < 1e-4 and warm_ids == cold_ids
    runner.release(0)
    runner.release(1)
    assert runner.cache.referenced == 0


@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_a_dense_model_resumes_at_any_shared_token(tmp_path, mode):
    """Without merged-expert layers nothing is routed: the whole shared prefix resumes, in
    either routing mode, wherever it ends."""
    runner = runner_of(build_folded(tmp_path / "dense", T=T, num_experts=0))
    assert not runner.moe
    runner.start_prefill(0, PROMPT[:3], mode, max_new_tokens=8)
    logits, ids = runner.prefill_step(0, None), PROMPT[:3]
    for _ in range(5):
        ids = ids + [int(logits.argmax())]
        logits = runner.decode([0], [ids[-1]], [ids])[0]
    runner.release(0, ids + [int(logits.argmax())])  # 8 computed
    prompt = ids[:7] + [other(ids[7]), 4, 4]
    assert runner.cached_prefix(prompt, [0, 1]) == (0, 7)
    resumes_as_cold(runner, 0, 1, prompt, 7, mode=mode)


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_segment_sums_recorded_by_a_chunked_prefill_resume_as_well(path, budget):
    """The sums the ring holds for prompt tokens come from the prefill's chunks (here [0, 4)
    then 1, 3 or 6 tokens a chunk: carrying the segment's sum so far, or opening a segment
    inside the chunk, or longer than T), and resuming after any of the last T prompt tokens
    continues as a cold prefill does."""
    runner = runner_of(path, "mixture")
    kept = PROMPT + [3]
    leave(runner, 0, kept, 0, budget)  # 11 computed: the ring holds 7-10
    for shared in (8, 9, 10):  # the boundary, then after tokens 8 and 9 (chunk ends differ)
        prompt = kept[:shared] + [other(kept[shared])] * 2
        assert runner.cached_prefix(prompt, [0]) == (0, shared)
        resumes_as_cold(runner, 0, 1, prompt, shared, steps=3)
        runner.release(1)
        runner.release(0)
        leave(runner, 0, kept, 0, budget)


def test_without_the_sums_a_prompt_resumes_only_at_a_boundary(path):
    """A runner built without prefix caching records no segment sums (`sum_ring`), so its
    kept tokens (runner-level callers may keep them) resume only at segment boundaries; and
    with them, the restored sum is what makes a mid-segment resume the cold sequence."""
    runner = runner_of(path, "mixture", prefix_caching=False)
    assert runner.sum_ring is None
    ids = leave(runner, 0, PROMPT, 5)
    assert runner.cached_prefix(ids[:13] + [other(ids[13]), 2], [0]) == (0, 12)
    runner = runner_of(path, "mixture")
    ids = leave(runner, 0, PROMPT, 5)
    prompt = ids[:13] + [other(ids[13]), 2]
    runner.start_prefill(1, prompt, "segment", max_new_tokens=9)
    cold = runner.prefill_step(1, None)
    runner.start_prefill(0, prompt, "segment", max_new_tokens=9, resume=13)
    assert runner.seg_sum[0].abs().sum() > 0
    runner.seg_sum[0] = 0.0  # as if resumed at a boundary
    gap, _, _ = continue_both(runner, (0, runner.prefill_step(0, None)), (1, cold), prompt)
    assert gap > 1e-3


def test_a_resumed_sequence_keeps_only_the_sums_still_in_the_ring(path):
    """A slot resumed after its token 13 (the ring held 11-14) and left after 14 tokens holds
    the sums of 11-13 from before and of 13 anew; 10's entry is 14's of the old sequence, so
    a prompt sharing 11 tokens goes back to the boundary at 8; one sharing 13 resumes on the
    sum of 12 the first sequence left."""
    runner = runner_of(path, "mixture")
    kept = leave(runner, 0, PROMPT, 5)  # 15 computed
    again = kept[:13] + [other(kept[13])]
    runner.start_prefill(0, again, "segment", max_new_tokens=1, resume=13)
    runner.prefill_step(0, None)
    runner.release(0, again + [1])  # 14 computed
    assert runner.retained[0].ring_from == 11
    assert runner.cached_prefix(kept[:11] + [other(kept[11]), 2], [0]) == (0, 8)
    prompt = kept[:13] + [other(other(kept[13])), 2]
    assert runner.cached_prefix(prompt, [0]) == (0, 13)
    resumes_as_cold(runner, 0, 1, prompt, 13)


def test_the_boundary_case_needs_the_recorded_decision(path):
    """Resuming at a boundary the slot went past restores that segment's scores from the
    decisions the slot recorded: with the current scores left as they were (those of the
    slot's last segment), the resumed sequence is another one. (The mixture strategy applies
    the scores themselves; a merged one would find the segment's merge cached by its key.)"""
    runner = runner_of(path, "mixture")
    leave(runner, 0, PROMPT, 5)
    prompt = PROMPT[:9] + [1, 1, 2]  # resumes at 8, a segment before the slot's last one (12)
    runner.start_prefill(1, prompt, "segment", max_new_tokens=9)
    cold = runner.prefill_step(1, None)
    last_segment = runner.scores[0].clone()
    runner.start_prefill(0, prompt, "segment", max_new_tokens=9, resume=8)
    assert not torch.equal(runner.scores[0], last_segment)  # the record differs: restored
    runner.scores[0] = last_segment
    gap, _, _ = continue_both(runner, (0, runner.prefill_step(0, None)), (1, cold), prompt)
    assert gap > 1e-3


def test_what_a_slot_keeps_and_forgets(path):
    runner = runner_of(path)
    short = leave(runner, 0, PROMPT[:3], 6)  # prompt < T: segment 1 routed by 3 tokens only
    assert runner.retained[0] is None and runner.cached_prefix(short + [1], [0]) is None
    runner.start_prefill(1, PROMPT, "prompt")  # prompt mode: one decision from the whole prompt
    runner.prefill_step(1, None)
    runner.release(1, PROMPT + [3])
    assert runner.retained[1] is None
    kept = leave(runner, 2, PROMPT, 2)
    assert runner.retained[2].tokens == kept[:-1]  # the last sampled token was never computed
    assert runner.cached_prefix(PROMPT[:3] + [0] * 8, [2]) is None  # shares fewer than T
    assert runner.cached_prefix(kept + [1], [0, 1]) is None  # not among the free slots given
    with pytest.raises(ValueError, match="cannot resume"):
        runner.start_prefill(2, kept + [1], "segment", resume=8)  # 12 is the resume point
    with pytest.raises(ValueError, match="routing trace"):
        runner.start_prefill(2, kept + [1], "segment", trace=True, resume=12)
    runner.start_prefill(2, [1] * 12, "segment")  # another prompt takes the slot: forgotten
    assert runner.retained[2] is None and runner.cached_prefix(kept + [1], [2]) is None


def test_the_longest_and_then_the_newest_prefix_is_chosen(path):
    runner = runner_of(path)
    a = leave(runner, 0, PROMPT, 1)
    b = leave(runner, 1, PROMPT, 3)
    c = leave(runner, 2, PROMPT, 1)
    assert runner.cached_prefix(b + [7], [0, 1, 2]) == (1, len(b) - 1)
    assert runner.cached_prefix(a[:-1] + [7, 7], [0, 2]) == (2, len(a) - 1)  # a == c: newest
    assert c == a and runner.free_slot_order([2, 0, 1]) == [0, 1, 2]  # all keep: oldest first
    leave(runner, 0, PROMPT, 2)
    assert runner.free_slot_order([2, 0, 1]) == [1, 2, 0]
    runner.release(2)
    assert runner.free_slot_order([2, 0, 1]) == [2, 1, 0]  # one that keeps nothing first


@dataclass(eq=False)
class Req:
    request_id: str
    num_prompt_tokens: int
    queue_deadline: float | None = None
    cancel_requested: bool = False
    slot: int | None = None


def test_the_scheduler_budgets_only_the_tokens_left_to_compute():
    """A placed request takes the slot the placer names and is planned from its cached
    tokens on: a 40-token prompt with 36 cached joins whole beside a decoding row (4 tokens:
    short, not paced) where a cold one is paced to the pacer's 2 tokens, and its slot leaves
    the free list."""
    cached = {"warm": (2, 36), "cold": (0, 0)}

    def placer(req, free):
        slot, start = cached[req.request_id]
        assert slot in free
        return slot, start

    def run(name):
        s = Scheduler(SchedulerConfig(max_batch_size=4, max_input_tokens=100,
                                      max_total_tokens=128, max_batched_tokens=10),
                      placer=lambda req, free: (1, 0) if req.request_id == "a" else placer(
                          req, free))
        s.add(Req("a", 1))
        s.schedule(0.0)
        req = Req(name, 40)
        s.add(req)
        return s, req, s.schedule(1.0, max_prefill_work=2)

    s, warm, out = run("warm")
    assert warm.slot == 2 and out.cached == {"warm": 36}
    assert out.chunks == {"warm": 4} and "warm" not in s.prefilling
    assert sorted(s._free_slots) == [0, 3]
    assert s.schedule(2.0).decode == [s.running["a"], warm]  # its prompt is in
    s.finish(warm)
    assert sorted(s._free_slots) == [0, 2, 3]
    s, cold, out = run("cold")
    assert cold.slot == 0 and out.cached == {} and out.chunks == {"cold": 2}
    s.prefilled(cold, 2)
    assert s.prefilling["cold"] == (cold, 38)


def test_with_nothing_decoding_a_placed_prompt_joins_whole_from_its_cached_tokens():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_input_tokens=100, max_total_tokens=128,
                                  max_prefill_tokens=24),
                  placer=lambda req, free: (free[-1], 30 if req.request_id == "b" else 0))
    a, b = Req("a", 12), Req("b", 40)
    s.add(a)
    s.add(b)
    out = s.schedule(0.0)  # 12 + (40 - 30) tokens fit the 24 together only because of the cache
    assert out.prefill == [a, b] and out.cached == {"b": 30} and (a.slot, b.slot) == (1, 0)


def conversation(engine, turns: int, first: list[int], user, **params) -> list:
    """A chat: each turn's prompt is the last prompt, its answer and a new user message."""
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, **params)
    prompt, results = list(first), []
    for t in range(turns):
        r = engine.submit(prompt, sp).result()
        results.append(r)
        prompt = prompt + r.token_ids + user(t)
    return results


@pytest.mark.parametrize("chunked", [False, True])
def test_a_chat_resumes_every_turn_and_answers_as_without_the_cache(path, chunked):
    """Turn k+1's prompt continues turn k's tokens: it resumes after all of them computed
    (the prompt, the answer but its last token), and the answers are those of a server
    without prefix caching. Chunked: a small token budget and a stream decoding beside."""
    user = lambda t: [(7 * t + j) % 50 for j in range(5)]  # noqa: E731
    kwargs = dict(max_batched_tokens=6) if chunked else {}
    outs = {}
    for cache in (False, True):
        engine = Engine.from_pretrained(path, max_batch_size=3, prefix_caching=cache, **kwargs)
        engine.start()
        try:
            side = engine.submit([3] * 6, SamplingParams(max_new_tokens=60, ignore_eos=True))
            outs[cache] = conversation(engine, 4, PROMPT, user)
            side.result()
            assert engine.runner.cache.referenced == 0
        finally:
            engine.stop()
    assert [r.token_ids for r in outs[True]] == [r.token_ids for r in outs[False]]
    assert [r.cached_tokens for r in outs[False]] == [None] * 4
    sizes = [len(PROMPT)] + [len(PROMPT) + 11 * t for t in range(1, 4)]
    assert [r.cached_tokens for r in outs[True]] == [0] + [n - 6 for n in sizes[1:]]


def test_requests_that_need_every_position_do_not_resume(path):
    """A routing trace and prompt logprobs describe every prompt token: those requests compute
    the whole prompt (and a prompt-mode request routes on all of it)."""
    engine = Engine.from_pretrained(path, max_batch_size=2, prefix_caching=True)
    engine.start()
    try:
        first = conversation(engine, 1, PROMPT, lambda t: [])[0]
        again = PROMPT + first.token_ids  # 15 of its 16 tokens computed, kept in slot 0
        for params in (dict(return_routing=True), dict(prompt_logprobs=1),
                       dict(routing="prompt")):
            r = engine.submit(again, SamplingParams(max_new_tokens=2, **params)).result()
            assert r.cached_tokens == 0 and r.routing is not None or "return_routing" not in params
        # the prompt-logprobs request ran in slot 0 (the oldest kept) and left all 16 tokens
        # and one it generated there: the same prompt again resumes all but its last token
        r = engine.submit(again, SamplingParams(max_new_tokens=2)).result()
        assert r.cached_tokens == 15
    finally:
        engine.stop()


@pytest.mark.parametrize("chats", [2, 3])
def test_as_many_chats_as_slots_each_resume_from_their_own(path, chats):
    """Interleaved conversations each resume from the slot their last turn left: a request
    that resumes nothing takes a slot that keeps nothing, else the one kept longest ago, and
    what warm-up requests left is forgotten (three chats in three slots: two slots held
    warm-up tokens, and with the lowest such slot taken first the third chat overwrote the
    second's every turn)."""
    engine = Engine.from_pretrained(path, max_batch_size=chats, prefix_caching=True)
    engine.warmup(freeze_gc=False)
    try:
        assert engine.runner.retained == [None] * chats
        sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
        prompts = [[9] * c + PROMPT for c in range(chats)]
        cached = []
        for t in range(3):
            for c in range(chats):
                r = engine.submit(prompts[c], sp).result()
                cached.append(r.cached_tokens)
                prompts[c] = prompts[c] + r.token_ids + [t + 1, 2]
        assert cached[:chats] == [0] * chats and all(n > 0 for n in cached[chats:])
    finally:
        engine.stop()


def test_a_dense_engine_resumes_prompt_mode_requests_too(tmp_path):
    engine = Engine.from_pretrained(build_folded(tmp_path / "dense", T=T, num_experts=0),
                                    max_batch_size=2, prefix_caching=True)
    engine.start()
    try:
        turns = conversation(engine, 3, PROMPT[:2], lambda t: [t + 1], routing="prompt")
        assert [r.cached_tokens for r in turns] == [0, 7, 14]  # every computed token
    finally:
        engine.stop()


@pytest.mark.parametrize("experts", [3, 0])
@pytest.mark.parametrize("shared", [9, 13])
def test_a_shared_part_is_copied_and_the_source_keeps_its_own(tmp_path, experts, shared):
    """A prompt sharing only part of what a slot keeps (the same system prompt, another
    conversation) gets that part copied into another free slot: it resumes there as a cold
    prefill would run, and the slot it came from still resumes its own conversation whole.
    (The mixture applies the restored scores themselves: merged, the segment's merge would be
    found cached by its key whatever they were.)"""
    runner = runner_of(build_folded(tmp_path / "m", T=T, num_experts=experts), "mixture")
    kept = leave(runner, 0, PROMPT, 5)  # 15 computed, the last T = 4 (11-14) with their sums
    prompt = kept[:shared] + [other(kept[shared]), 1, 2]
    # shares 9: back to the boundary at 8 (merged experts) or all 9 (dense); shares 13: all
    n = 8 if experts and shared == 9 else shared
    assert runner.cached_prefix(prompt, [0, 1, 2]) == (0, n)
    with pytest.raises(ValueError, match="cannot copy"):
        runner.copy_prefix(0, 1, prompt, n + 1)
    runner.copy_prefix(0, 1, prompt, n)
    assert runner.retained[1].tokens == kept[:n] and runner.retained[0].tokens == kept[:-1]
    resumes_as_cold(runner, 1, 2, prompt, n)
    assert runner.cached_prefix(kept + [4], [0]) == (0, 15)  # the source's own next turn
    with pytest.raises(ValueError, match="cannot copy"):
        runner.copy_prefix(0, 1, prompt, n)  # slot 1 runs a sequence now


def test_a_copied_prefix_brings_the_segment_sums_it_ends_among(path):
    """Copied after token 13 of a slot whose ring held 11-14, the copy holds their sums too:
    left after 16 tokens of its own, it resumes a prompt sharing 13 of them on the sum of 12
    the copy brought."""
    runner = runner_of(path, "mixture")
    kept = leave(runner, 0, PROMPT, 5)  # 15 computed
    prompt = kept[:13] + [other(kept[13]), 1, 2]
    runner.copy_prefix(0, 1, prompt, 13)
    runner.start_prefill(1, prompt, "segment", max_new_tokens=2, resume=13)
    runner.release(1, prompt + [int(runner.prefill_step(1, None).argmax())])  # 16 computed
    assert runner.retained[1].ring_from == 12
    again = prompt[:13] + [other(prompt[13]), 3]
    assert runner.cached_prefix(again, [1]) == (1, 13)
    resumes_as_cold(runner, 1, 2, again, 13)


def test_conversations_sharing_a_system_prompt_each_keep_their_slot(path):
    """Two chats with the same 10-token system prompt: the second copies the shared part
    from the first's slot instead of taking it, and both resume every later turn whole;
    the answers are those of an engine without the cache."""
    answers = {}
    for cache in (False, True):
        engine = Engine.from_pretrained(path, max_batch_size=3, prefix_caching=cache)
        engine.start()
        try:
            sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
            chats = [PROMPT + [1, 2], PROMPT + [3, 4, 5]]
            got = []
            for t in range(3):
                for c in range(2):
                    r = engine.submit(chats[c], sp).result()
                    got.append((r.token_ids, r.cached_tokens, len(chats[c])))
                    chats[c] = chats[c] + r.token_ids + [t + 6]
            answers[cache] = got
        finally:
            engine.stop()
    assert [a for a, _, _ in answers[True]] == [a for a, _, _ in answers[False]]
    cached = [(c, n) for _, c, n in answers[True]]
    assert cached[0] == (0, 12) and cached[1] == (8, 13)  # copied: back to the boundary
    assert all(c == n - 2 for c, n in cached[2:])  # then each all its last turn computed


def test_on_a_tie_the_slot_sharing_more_wins_and_only_a_whole_prompt_continues(path):
    """A prompt continues what a slot keeps when it holds that request's whole prompt, or all
    but its last token (which the answer, sent back as text, may have re-tokenized)."""
    runner = runner_of(path)
    b = leave(runner, 1, PROMPT[:9] + [1, 1, 2], 2)
    a = leave(runner, 0, PROMPT, 5)  # kept more recently
    prompt = PROMPT[:9] + [1, 7, 7]  # resumes at 8 from either; shares 10 tokens with slot 1
    assert runner.cached_prefix(prompt, [0, 1, 2]) == (1, 8)
    assert runner.continues(0, a + [3]) and runner.continues(0, PROMPT + [3])
    assert runner.continues(0, prompt)  # all of slot 0's prompt but its last token
    assert not runner.continues(0, PROMPT[:8] + [1, 7, 7]) and not runner.continues(1, prompt)
    assert runner.continues(1, b[:12] + [0]) and not runner.continues(2, PROMPT)


@pytest.mark.parametrize("changed, cached", [(2, 12), (3, 13), (1, 11), (0, 8)])
def test_a_next_turn_whose_answer_came_back_changed_takes_its_own_slot(path, changed, cached):
    """The answer sent back differs from the generated ids (re-tokenized text): the prompt
    still holds the whole earlier prompt, so it is that exchange's next turn and takes its
    slot, rather than copying into another and evicting it. It resumes after every token it
    shares with the 14 computed when that is one of the last T (10-13: the segment's sum is
    recorded there), else at the last boundary; and answers as without the cache."""
    answers = []
    for cache in (True, False):
        engine = Engine.from_pretrained(path, max_batch_size=3, prefix_caching=cache)
        engine.start()
        try:
            sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
            first = engine.submit(PROMPT, sp).result().token_ids
            answer = first[:changed] + [other(first[changed])] + first[changed + 1:]
            r = engine.submit(PROMPT + answer + [7], sp).result()
            answers.append(r.token_ids)
            if cache:
                assert r.cached_tokens == cached
                kept = engine.runner.retained
                assert kept[0].tokens[:16] == PROMPT + answer + [7] and kept[1] is kept[2] is None
        finally:
            engine.stop()
    assert answers[0] == answers[1]


@pytest.mark.parametrize("extra", [0, 2])
def test_slots_beyond_the_batch_keep_more_conversations(path, extra):
    """Three chats taking turns on an engine that runs one sequence at a time: with two
    slots more, each keeps its own and resumes every later turn; without them each turn
    finds the one slot holding another chat and computes its prompt whole. The answers are
    those of an engine without the cache either way."""
    answers = {}
    for cache in (False, True):
        engine = Engine.from_pretrained(path, max_batch_size=1, prefix_caching=cache,
                                        prefix_cache_slots=extra)
        engine.start()
        try:
            assert len(engine.runner.retained) == 1 + (extra if cache else 0)
            sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
            chats = [[9 + c] * 3 + PROMPT for c in range(3)]
            got = []
            for t in range(3):
                for c in range(3):
                    r = engine.submit(chats[c], sp).result()
                    got.append((r.token_ids, r.cached_tokens))
                    chats[c] = chats[c] + r.token_ids + [t + 1]
            answers[cache] = got
            info = engine.info()
            assert info["prefix_cache_slots"] == (extra if cache else 0)
            per_slot = info["kv_cache_bytes"] // len(engine.runner.retained)
            assert info["kv_cache_bytes"] == per_slot * (1 + info["prefix_cache_slots"])
        finally:
            engine.stop()
    assert [a for a, _ in answers[True]] == [a for a, _ in answers[False]]
    later = [n for _, n in answers[True][3:]]
    assert all(n > 0 for n in later) if extra else all(n == 0 for n in later)


def test_a_next_turn_that_re_tokenized_the_prompt_end_keeps_the_other_chats_slots(path):
    """Chat B's next turn holds all its first prompt but the last token (its text merged with
    the answer's first character when tokenized again): it is B's continuation and takes B's
    slot, rather than a copy into the least recently kept slot, chat C's, which then resumed
    nothing on its next turn."""
    engine = Engine.from_pretrained(path, max_batch_size=3, prefix_caching=True)
    engine.start()
    try:
        sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
        first = [[9 + c] * 3 + PROMPT for c in range(3)]
        answers = [engine.submit(p, sp).result().token_ids for p in first]
        nexts = [p + a + [7] for p, a in zip(first, answers)]
        nexts[1] = first[1][:-1] + [other(first[1][-1])] + answers[1] + [7]
        cached = [engine.submit(p, sp).result().cached_tokens for p in nexts]
        assert cached[1] == 12  # its own slot, back to the boundary before the changed token
        assert cached[0] == cached[2] == len(first[0]) + 2  # all they computed
    finally:
        engine.stop()
