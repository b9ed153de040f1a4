"""Chunked prefill: a long prompt next to running streams is prefilled over several steps,
interleaved with their decodes, and every chunking gives exactly the unchunked outputs (segment
routing and merged weights carried across chunk boundaries; the first routing span advanced by
layers when a chunk is smaller than it)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.scheduler import OLDEST_PASSES, PrefillPacer, Scheduler, SchedulerConfig
from engine_models import build_folded, reference

T = 4


@dataclass(eq=False)
class Req:
    request_id: str
    num_prompt_tokens: int = 4
    queue_deadline: float | None = None
    cancel_requested: bool = False
    slot: int | None = None


def decoding_then(prompt: Req, budget: int, chunk_cost=None, batch: int = 4
                  ) -> tuple[Scheduler, Req]:
    """A scheduler with one row decoding ("a": its 1-token prompt went in whole) and
    `prompt` queued behind it; returns it and the decoding request."""
    s = Scheduler(SchedulerConfig(max_batch_size=batch, max_input_tokens=100,
                                  max_total_tokens=128, max_batched_tokens=budget),
                  chunk_cost=chunk_cost)
    a = Req("a", 1)
    s.add(a)
    s.schedule(0.0)
    s.add(prompt)
    return s, a


def test_scheduler_shares_the_token_budget_with_decoding_rows():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_input_tokens=100, max_total_tokens=128,
                                  max_batched_tokens=10))
    a, long_, short = Req("a", 3), Req("long", 40), Req("short", 2)
    s.add(a)
    assert s.schedule(0.0).chunks == {"a": None}  # nothing decodes: whole prompts
    s.add(long_)
    out = s.schedule(1.0)
    assert out.decode == [a] and out.prefill == [long_] and out.chunks == {"long": 9}
    s.prefilled(long_, 9)
    s.add(short)
    out = s.schedule(2.0)  # crowded: the long prompt takes half, the short one fits in the rest
    assert out.decode == [a] and out.chunks == {"long": 4, "short": 2}
    s.prefilled(long_, 13)
    out = s.schedule(3.0)  # short decodes now; the long prompt continues alone
    assert out.decode == [a, short] and out.chunks == {"long": 8}
    computed = 21
    s.prefilled(long_, computed)
    for _ in range(2):
        out = s.schedule(4.0)
        assert long_ not in out.decode
        computed += out.chunks["long"]
        s.prefilled(long_, computed)
    out = s.schedule(5.0)
    assert out.chunks == {"long": 3}  # 40 - 37 left: this chunk completes it ...
    assert s.schedule(6.0).decode == [a, long_, short]  # ... and it decodes next step


def test_joins_per_step_bound_how_many_waiting_requests_join_next_to_decodes():
    """Each joining CAMEx sequence merges one FFN per MoE layer in its first step: with
    max_joins_per_step=1, three short prompts arriving together next to a decoding stream join
    one per step (FIFO) instead of all in one step; with nothing decoding they join at once."""
    def run(joins):
        s = Scheduler(SchedulerConfig(max_batch_size=5, max_input_tokens=100,
                                      max_total_tokens=128, max_batched_tokens=32,
                                      max_joins_per_step=joins))
        a = Req("a", 3)
        s.add(a)
        s.schedule(0.0)
        shorts = [Req(f"s{i}", 2) for i in range(3)]
        for r in shorts:
            s.add(r)
        return [[r.request_id for r in s.schedule(float(t)).prefill] for t in (1, 2, 3)]

    assert run(None) == [["s0", "s1", "s2"], [], []]
    assert run(1) == [["s0"], ["s1"], ["s2"]]
    idle = Scheduler(SchedulerConfig(max_batch_size=4, max_input_tokens=100,
                                     max_total_tokens=128, max_batched_tokens=32,
                                     max_joins_per_step=1))
    for i in range(3):
        idle.add(Req(f"w{i}", 2))
    assert len(idle.schedule(0.0).prefill) == 3  # nothing decodes: whole prompts, no bound
    with pytest.raises(ValueError, match="max_joins_per_step"):
        SchedulerConfig(max_joins_per_step=0)


def test_queue_pressure_lets_short_prompts_join_together():
    """Once the requests that could join are at least `waiting_served_ratio` times the running
    ones (rounded down, as TGI does), short prompts join whole in one step beside the decoding
    rows, past the join bound and the pacer's hold; below the ratio, with a prefill in
    progress, or behind a long first prompt, the chunked path (one join per step here)
    applies."""
    def decision(req, start, n):  # merged-expert prompts: a routing decision at token 0
        return 5 if start == 0 else 0

    def sched(ratio, batch=8):
        s = Scheduler(SchedulerConfig(max_batch_size=batch, max_input_tokens=100,
                                      max_total_tokens=128, max_batched_tokens=32,
                                      max_joins_per_step=1, waiting_served_ratio=ratio),
                      chunk_cost=decision)
        s.add(Req("a", 3))
        s.schedule(0.0)  # "a" decodes from now on
        return s

    def joins(s, n, prompt=2, paced=None):
        for i in range(n):
            s.add(Req(f"w{i}", prompt))
        out = s.schedule(1.0, paced)
        assert out.decode and out.decode[0].request_id == "a"  # the stream keeps decoding
        return [r.request_id for r in out.prefill]

    assert joins(sched(1.2), 3) == ["w0", "w1", "w2"]  # 3 waiting >= 1.2 x 1 running, whole
    assert joins(sched(1.2), 3, paced=0) == ["w0", "w1", "w2"]  # past the pacer's hold too
    assert joins(sched(None), 3) == ["w0"]  # off: one join per step
    assert joins(sched(None), 1, paced=0) == []  # (off, the pacer holds a paced join)
    assert joins(sched(1.2), 1, paced=0) == ["w0"]  # floor(1.2 x 1) = 1
    assert joins(sched(1.2, batch=3), 5) == ["w0", "w1"]  # as many as there are free slots
    long_first = sched(1.2)
    assert joins(long_first, 3, prompt=40) == ["w0"]  # longer than the budget: chunked
    assert "w0" in long_first.prefilling  # (its first chunk only)

    def running(n):
        s = sched(1.2)
        for i in range(n - 1):
            s.add(Req(f"r{i}", 2))
            s.schedule(0.5)
        assert len(s.running) == n
        return s

    assert joins(running(2), 2) == ["w0", "w1"]  # floor(1.2 x 2) = 2
    assert joins(running(3), 2) == ["w0"]  # 2 < floor(1.2 x 3) = 3
    assert joins(running(4), 4) == ["w0", "w1", "w2", "w3"]  # 4 = floor(1.2 x 4)
    busy = sched(1.2)  # a prefill in progress: the queue behind it joins the chunked way
    busy.add(Req("long", 40))
    busy.schedule(0.5)
    assert "long" in busy.prefilling
    assert joins(busy, 3) == ["long", "w0"]
    with pytest.raises(ValueError, match="waiting_served_ratio"):
        SchedulerConfig(waiting_served_ratio=0)


def test_a_camex_engine_lets_one_request_join_per_decoding_step(lm):
    path, _ = lm  # (without queue pressure: three waiting next to one running would join at once)
    engine = Engine.from_pretrained(path, max_batch_size=4, waiting_served_ratio=None)
    assert engine.scheduler.config.max_joins_per_step == 1
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = engine.submit([1, 2, 3], sp)
    engine.step()
    later = [engine.submit([4 + i, 5 + i], sp) for i in range(3)]
    joined = [0]
    while joined[-1] < 3 and len(joined) < 12:  # a join may take more than one step: its
        engine.step()  # first span advances by layers when its merges outweigh the budget
        joined.append(sum(1 for h in later if h._events))
    assert joined[-1] == 3 and all(b - a <= 1 for a, b in zip(joined, joined[1:])), joined
    while not all(h.done for h in (first, *later)):
        engine.step()


def test_a_burst_next_to_one_stream_joins_in_one_step_with_the_solo_outputs(lm):
    """Requests that arrive together reach the engine one by one: the first step seats one,
    and the rest, more than `waiting_served_ratio` (1.2) times the running, join together in
    the next step. Each generates what it generates alone."""
    path, _ = lm
    engine = Engine.from_pretrained(path, max_batch_size=4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    first = engine.submit(prompts[0], sp)
    engine.step()
    later = [engine.submit(p, sp) for p in prompts[1:]]
    engine.step()
    assert all(len(h._events) == 1 for h in later)  # every first token from this step
    while not all(h.done for h in (first, *later)):
        engine.step()
    alone = Engine.from_pretrained(path, max_batch_size=1)
    for p, h in zip(prompts, (first, *later)):
        solo = alone.submit(p, sp)
        while not solo.done:
            alone.step()
        assert h.result().token_ids == solo.result().token_ids


def test_chunks_count_their_merges_against_the_budget():
    """With a chunk cost (a merged-expert engine: each routing decision's merges, in prompt
    tokens), a chunk that would open a segment is cut so tokens + cost fit the budget; a
    waiting request's join is planned before the chunk in progress takes the rest; the
    prompt in progress still advances every step."""
    SEG, DECISION = 12, 6

    def cost(req, start, n):  # decisions at every multiple of SEG in [start, start + n)
        return DECISION * sum(1 for p in range(start, start + n) if p % SEG == 0)

    s, _ = decoding_then(long_ := Req("long", 40), 17, cost)
    # budget 16 (one decoding row): from 0 the chunk decides at 0 (and at 12 if it reached
    # it), so 10 tokens + 6; then from 10 (decides at 12) and from 20 (at 24) the same
    for start in (0, 10, 20):
        assert s.schedule(1.0).chunks == {"long": 10}
        s.prefilled(long_, start + 10)
    short = Req("short", 2)
    s.add(short)
    out = s.schedule(4.0)  # crowded, share 8: the join takes 2 + 6 first; the long prompt
    assert out.chunks == {"short": 2, "long": 6}  # then stops before its decision at 36
    s.prefilled(long_, 36)
    s.prefilled(short, 2)
    hog = Req("hog", 40)
    s.add(hog)  # budget 15, share 7: hog 7 + 6 leaves 2, less than the long one's decision
    out = s.schedule(5.0)
    assert out.chunks == {"hog": 7}  # ... so it waits a step (its least chunk is 1 + 6)
    s.prefilled(hog, 7)
    out = s.schedule(6.0)  # the long one now has least left: planned first, then the hog fits
    # what is left; the step's work stays within the budget
    assert out.chunks == {"long": 4, "hog": 5}, out.chunks
    assert sum(n + cost(r, r.num_prompt_tokens - left, n) for r, left in
               ((long_, 4), (hog, 33)) for n in [out.chunks[r.request_id]]) <= 15



def test_the_oldest_prefill_waits_at_most_its_passes_then_goes_first():
    """Shorter prompts that keep arriving take each step's room before the oldest prefill,
    whose least chunk (one token plus a layer's share of its merges: 10 here) then does not fit:
    it is passed over, but never more than OLDEST_PASSES steps in a row, and the step where it
    goes first sets its least chunk aside before the join is planned, so that step's work is
    within the budget too."""
    def cost(req, start, n):  # the long prompt's every chunk works at least 10
        return max(0, 10 - n) if req.request_id == "long" else 0

    s, a = decoding_then(long_ := Req("long", 100), 13, cost, batch=32)
    budget = 12  # 13 less the decoding row
    out = s.schedule(0.0)
    assert out.chunks == {"long": 12}  # alone, it takes the budget
    s.prefilled(long_, 12)
    advanced, computed = [], 12
    for step in range(1, 13):
        short = Req(f"s{step}", budget)  # fills the room; joins are planned first
        s.add(short)
        out = s.schedule(float(step))
        work = sum(n + cost(r, 0 if r is short else computed, n)
                   for r in out.prefill for n in [out.chunks[r.request_id]])
        if "long" in out.chunks:
            advanced.append(step)
            assert work <= budget, (step, out.chunks)  # its least chunk set aside first
            computed += out.chunks["long"]
            s.prefilled(long_, computed)
        else:
            assert out.chunks == {short.request_id: budget}
        s.prefilled(short, out.chunks[short.request_id])
        s.finish(short)  # the shorts leave: one decoding row throughout
    gaps = [b - a for a, b in zip([0, *advanced], advanced)]
    assert advanced and max(gaps) == OLDEST_PASSES + 1, advanced


def test_a_due_oldest_prefill_keeps_its_room_from_a_shorter_one():
    """When the oldest goes first, a shorter prefill whose least chunk does not fit what the
    oldest left waits, even as the first one planned: the step's work stays within budget."""
    def cost(req, start, n):  # least chunks: the long prompt's 10, the shorter one's 4
        return max(0, (10 if req.request_id == "long" else 4) - n)

    s, _ = decoding_then(long_ := Req("long", 100), 13, cost, batch=8)
    assert s.schedule(0.0).chunks == {"long": 12}  # alone: the whole budget (12)
    s.prefilled(long_, 12)
    s.add(mid := Req("mid", 40))
    # the join goes first (half the budget when crowded: 6), the long one's 10 does not fit
    assert s.schedule(1.0).chunks == {"mid": 6}
    s.prefilled(mid, 6)
    assert s.schedule(2.0).chunks == {"mid": 6}  # shortest first: passed over again
    s.prefilled(mid, 12)
    out = s.schedule(3.0)  # due: its 10 set aside; mid's least 4 does not fit the 2 left
    assert out.chunks == {"long": 6}, out.chunks
    assert 6 + cost(long_, 12, 6) <= 12


def test_expensive_joins_do_not_starve_prefills_in_progress():
    """A small budget and decisions worth more than it (a join's first span then goes layer by
    layer): short prompts that joined behind a long one still complete while more wait."""
    def cost(req, start, n):  # the first span (8 tokens) holds a decision worth 48 tokens
        return 48 * n // 8 if start == 0 and n < 8 else (48 if start == 0 else 0)

    s = Scheduler(SchedulerConfig(max_batch_size=8, max_input_tokens=100, max_total_tokens=128,
                                  max_batched_tokens=16), chunk_cost=cost)
    streams = [Req(f"d{i}", 3) for i in range(4)]
    for r in streams:
        s.add(r)
    s.schedule(0.0)
    long_, shorts = Req("long", 90), [Req(f"s{i}", 8) for i in range(3)]
    for r in (long_, *shorts):
        s.add(r)
    done: dict[str, int] = {}
    computed = {r.request_id: 0 for r in (long_, *shorts)}
    for step in range(1, 80):
        out = s.schedule(float(step))
        for r in out.prefill:
            n = out.chunks[r.request_id]
            # the runner's rule: a chunk under the 8-token span advances layers, not tokens
            # (here 1 of 8 layers per token); the span completes once 8 layers are in
            computed[r.request_id] += n
            got = computed[r.request_id] if r is long_ else (
                r.num_prompt_tokens if computed[r.request_id] >= 8 else 0)
            s.prefilled(r, min(got, r.num_prompt_tokens))
            if got >= r.num_prompt_tokens:
                done.setdefault(r.request_id, step)
        if len(done) == 4:
            break
    assert set(done) == {"long", "s0", "s1", "s2"}, done
    # the long prompt's share leaves less room than a short's one-layer minimum (1 + 6 > 6):
    # the first short still advances every step, and completes long before the long one
    assert done["s0"] < done["long"], done


def test_the_runner_prices_the_decisions_a_chunk_makes(lm):
    path, _ = lm
    engine = Engine.from_pretrained(path, max_batch_size=2)
    r = engine.runner
    J = r.decision_tokens
    assert J > 0 and r.T == T
    cost = r.chunk_cost
    # segment mode, a 3T + 1 prompt: segment 1 decides once its first span (T tokens) is in,
    # segments 2.. at their first token
    assert cost(3 * T + 1, "segment", 0, T) == J
    assert cost(3 * T + 1, "segment", 0, 2 * T) == 2 * J
    assert cost(3 * T + 1, "segment", 1, T - 1) == 0  # ends just before segment 2
    assert cost(3 * T + 1, "segment", 1, T) == J  # touches token T: segment 2's decision
    assert cost(3 * T + 1, "segment", T, 2 * T + 1) == 3 * J
    # a chunk under the span advances it by whole layers (here 1 of 2): its work is that
    # layer's share of the span's tokens and merges
    half = -(-(T + J) // 2)
    assert r.layered_steps(T // 2, T) == 1 and r.layered_steps(T - 1, T) == 1
    assert cost(3 * T + 1, "segment", 0, T // 2) == half - T // 2
    assert cost(3 * T + 1, "segment", 0, 1) == half - 1  # the least chunk: the same layer
    # a later segment's opening tokens (its first min(T, J) tokens; here J > T) advance by
    # layers too when the chunk is smaller; a one-token last segment cannot
    assert J > T and r.layered_tokens(3 * T + 1, "segment", T) == T
    assert cost(3 * T + 1, "segment", T, T // 2) == half - T // 2
    assert cost(3 * T + 1, "segment", 3 * T, 1) == J
    assert r.layered_tokens(3 * T + 1, "segment", T + 1) == 0  # not a segment start
    # prompt mode: one decision, from the whole prompt (by layers until all of it is in)
    assert cost(3 * T, "prompt", 0, 3 * T) == J
    assert cost(3 * T, "prompt", 0, T) == -(-(3 * T + J) // 2) - T  # still one layer of two
    r.strategy = "mixture"  # nothing merges: later segments run whole tokens
    assert cost(3 * T + 1, "segment", 0, 2 * T) == 0
    assert r.layered_tokens(3 * T + 1, "segment", T) == 0
    assert r.layered_tokens(3 * T + 1, "segment", 0) == T  # routing still needs the span


def test_a_segment_decision_spreads_its_merges_over_steps(lm):
    """A chunk under budget that opens a later segment advances its opening tokens by layers,
    so the decision's merges (one per MoE layer) land in different steps, and the prefill
    still equals the whole one."""
    path, _ = lm
    prompt = torch.randint(0, 60, (3 * T + 2,), generator=torch.Generator().manual_seed(4)).tolist()
    want = whole_prefill_logits(path, prompt, "segment")
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    r = engine.runner
    assert len(r.moe_layers) == len(r.blocks) == 2 and r.decision_tokens > T
    r.start_prefill(0, prompt, "segment")
    per_step, layered_at, got = [], set(), None
    while got is None:
        before = r.cache.merges
        got = r.prefill_step(0, 1)
        per_step.append(r.cache.merges - before)
        if r.slots[0].partial is not None:
            layered_at.add(r.slots[0].partial.start)
    assert layered_at == {0, T, 2 * T, 3 * T}  # every segment opening went by layers
    assert max(per_step) == 1 and sum(per_step) == 4 * 2  # 4 decisions x 2 MoE layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_span_runs_the_whole_layers_its_budget_pays_for_every_step(tmp_path):
    """A budget paying for 1.5 layers of the first span runs one layer every step, never one
    and two in turn (a budget carried over did: the two-layer steps were a long prefill's
    slowest), the work the scheduler is charged is that layer's, and the prefill still equals
    the whole one."""
    path = build_folded(tmp_path / "lm4", T=8, n_layer=4)
    prompt = torch.randint(0, 60, (8 + 3,), generator=torch.Generator().manual_seed(6)).tolist()
    want = whole_prefill_logits(path, prompt, "segment")
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    r = engine.runner
    N, J = len(r.blocks), r.decision_tokens
    assert N == 4 and len(r.moe_layers) == 4 and r.layered_tokens(len(prompt), "segment", 0) == 8
    budget = 3  # 3 x 4 / 8 = 1.5 layers' worth
    assert r.layered_steps(budget, 8) == 1
    assert budget + r.chunk_cost(len(prompt), "segment", 0, budget) == -(-(8 + J) // N)
    r.start_prefill(0, prompt, "segment")
    layers, merges = [], []
    while r.slots[0].length == 0:
        before, m0 = r.slots[0].partial, r.cache.merges
        l0 = 0 if before is None else before.layer
        r.prefill_step(0, budget)
        after = r.slots[0].partial
        layers.append((N if after is None else after.layer) - l0)
        merges.append(r.cache.merges - m0)
    assert layers == [1, 1, 1, 1] and merges == [1, 1, 1, 1]
    got = r.prefill_step(0, None)  # the tokens after the span
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_layer_by_layer_first_span_keeps_its_chunks_coming():
    """computed stays 0 while the first routing span advances by layers: the scheduler keeps
    giving the request chunks, never a decode slot, until its prompt is complete."""
    s, a = decoding_then(b := Req("b", 20), 4, batch=2)
    for step in range(3):
        out = s.schedule(1.0 + step)
        assert out.decode == [a] and out.chunks == {"b": 3}
        s.prefilled(b, 0)


def test_a_last_chunk_that_did_not_complete_the_prompt_keeps_the_request_prefilling():
    """The scheduler hands out "the rest" (no decoders left: whole prefills), the engine reports
    fewer tokens in: the request stays out of the decode rows and gets the next chunk."""
    s, a = decoding_then(b := Req("b", 20), 4, batch=2)
    s.schedule(1.0)
    s.prefilled(b, 0)
    s.finish(a)
    out = s.schedule(2.0)
    assert out.decode == [] and out.chunks == {"b": None}
    s.prefilled(b, 8)  # only the first routing span got in
    out = s.schedule(3.0)
    assert out.decode == [] and out.chunks == {"b": None}
    s.prefilled(b, 20)
    assert s.schedule(4.0).decode == [b]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = build_folded(tmp_path_factory.mktemp("chunk") / "lm", T=T)
    return path, reference(path)


def whole_prefill_logits(path, prompt, mode):
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    return engine.runner.prefill(0, prompt, mode)


@pytest.mark.parametrize("mode", ["segment", "prompt"])
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9])
def test_every_chunking_equals_the_whole_prefill(lm, mode, budget):
    path, _ = lm
    prompt = torch.randint(0, 60, (3 * T + 2,), generator=torch.Generator().manual_seed(3)).tolist()
    want = whole_prefill_logits(path, prompt, mode)
    for strategy in ("merged", "mixture"):
        engine = Engine.from_pretrained(path, max_batch_size=1, strategy=strategy)
        runner = engine.runner
        runner.start_prefill(0, prompt, mode)
        steps, got = 0, None
        while got is None:
            got = runner.prefill_step(0, budget)
            steps += 1
        assert steps > 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        runner.release(0)
        assert runner.cache.referenced == 0


@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_long_prompt_interleaves_with_decodes_and_matches_alone(lm, mode):
    """Streams keep decoding one token per step while a long prompt arrives in chunks; every
    request's tokens equal the unchunked engine's (contract 3 under chunking)."""
    path, _ = lm
    gen = torch.Generator().manual_seed(5)
    streams = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (3, 6)]
    long_prompt = torch.randint(0, 60, (5 * T + 1,), generator=gen).tolist()
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True, routing=mode)
    alone = Engine.from_pretrained(path, max_batch_size=1, max_batched_tokens=None)
    alone.start()
    try:
        want = [alone.submit(p, sp).result().token_ids for p in (*streams, long_prompt)]
    finally:
        alone.stop()
    engine = Engine.from_pretrained(path, max_batch_size=3, max_batched_tokens=4)
    handles = [engine.submit(p, sp) for p in streams]
    engine.step()  # the streams' prefills (nothing decodes yet: whole)
    long_handle = engine.submit(long_prompt, sp)
    prefill_steps = 0
    while not long_handle._events:  # until its first token
        before = [len(h._events) for h in handles]
        engine.step()
        prefill_steps += 1
        for h, b in zip(handles, before):  # every unfinished stream got its token
            if b < sp.max_new_tokens:
                assert len(h._events) == b + 1
    # segment mode: the first segment by layers, then 2 tokens per step (4 minus 2 decoding
    # rows); prompt mode: the whole prompt is one routing span, so one layer per step
    assert prefill_steps >= (5 if mode == "segment" else 2)
    while not all(h.done for h in (*handles, long_handle)):
        engine.step()
    assert [h.result().token_ids for h in (*handles, long_handle)] == want
    assert engine.runner.cache.referenced == 0


def test_a_layer_by_layer_span_completes_when_the_decoders_finish(lm):
    """The streams finish while the long prompt's first span is half-way through its layers:
    the next step has nothing decoding and hands it the rest of its prompt at once. The span's
    remaining layers and the tokens after it must both run before it decodes (a request that
    decoded with no token of its own used to fail the whole step)."""
    path, _ = lm
    gen = torch.Generator().manual_seed(7)
    streams = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (3, 5)]
    long_prompt = torch.randint(0, 60, (3 * T + 3,), generator=gen).tolist()
    short, long_sp = (SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 6))
    alone = Engine.from_pretrained(path, max_batch_size=1, max_batched_tokens=None)
    alone.start()
    try:
        want = [alone.submit(p, short).result().token_ids for p in streams]
        want.append(alone.submit(long_prompt, long_sp).result().token_ids)
    finally:
        alone.stop()
    engine = Engine.from_pretrained(path, max_batch_size=3, max_batched_tokens=4)
    handles = [engine.submit(p, short) for p in streams]
    engine.step()  # whole prefills: each stream has its first token
    long_handle = engine.submit(long_prompt, long_sp)
    engine.step()  # the streams' last tokens; the long prompt's first span gets some layers
    assert all(h.done for h in handles) and not long_handle._events
    assert any(st is not None and st.partial is not None for st in engine.runner.slots)
    for _ in range(20):
        if long_handle.done:
            break
        engine.step()
    assert [h.result().token_ids for h in (*handles, long_handle)] == want
    assert engine.runner.cache.referenced == 0


def test_the_pacer_sizes_prompt_work_to_the_decode_time():
    """The sustained rate is (ratio x decode time - the last decode's excess over it) / time
    per prompt token of work per step, from the fastest recent decode and the average token
    time; steps without prompt work bank
    their rate up to the burst, which the next step with prompt work may spend at once; no
    bound until both times were measured."""
    p = PrefillPacer(1.0, burst=64, alpha=0.5, window=3)
    assert p.budget() is None
    p.record_decode(0.100)
    assert p.budget() is None
    p.record_prefill(20, 0.080)  # 4 ms per token of work
    assert p.rate() == pytest.approx(25)
    assert p.budget() == 64  # idle until now: one short prompt may join at once
    p.spend(50)
    assert p.budget() == 25  # a prefill in progress: the sustained rate, whatever is left
    p.spend(25)
    assert p.budget() == 25
    p.spend(0)  # a step without prompt work banks its rate
    assert p.budget() == 50
    p.spend(3)
    p.record_decode(0.130)  # a slower decode (more rows, noise): the baseline stays, and
    p.record_prefill(10, 0.080)  # its excess comes off the prompt work; prefill got slower
    assert p.decode_s == 0.100  # too: the average moves halfway
    assert p.rate() == pytest.approx((0.1 - 0.03) / 0.006)
    assert p.budget() == 11
    p.spend(11)
    p.record_decode(0.300)  # a decode beyond (1 + ratio) baselines: no prompt work but the
    assert p.rate() == 0 and p.budget() == 1  # token every prefill advances by
    p.record_decode(0.100)
    assert p.rate() == pytest.approx(0.1 / 0.006)
    for _ in range(3):  # the batch grew for good: the window forgets the old baseline
        p.record_decode(0.200)
    assert p.rate() == pytest.approx(0.2 / 0.006)
    p.record_prefill(0, 1.0)  # no work: no information
    assert p.rate() == pytest.approx(0.2 / 0.006)
    for _ in range(5):  # idle steps: the bank is capped at the burst
        p.budget()
    assert p.budget() == 64
    slow = PrefillPacer(0.5, burst=8, alpha=1.0)
    slow.record_decode(0.1)
    slow.record_prefill(10, 1.0)  # slower than a decode per token: still one token a step
    slow.spend(8)
    assert slow.budget() == 1
    with pytest.raises(ValueError, match="ratio"):
        PrefillPacer(0.0, burst=8)


def test_a_step_whose_decode_takes_the_share_gets_no_paced_work_once():
    """A budget is at least one token (a prefill always advances), except in a step whose
    known decode excess (a segment turn's merges) leaves less than a token: 0, never twice in a
    row; an excess from the past alone (a slow last decode) still leaves one token."""
    p = PrefillPacer(1.0, burst=64, alpha=1.0)
    p.record_decode(0.100)
    p.record_prefill(10, 0.040)  # 4 ms per token of work
    p.spend(64)
    assert p.budget(extra_s=0.080) == 5  # 20 ms left: 5 tokens
    p.spend(5)
    assert p.budget(extra_s=0.120) == 0  # the turn takes more than the share: nothing
    assert p.budget(extra_s=0.120) == 1  # but never two steps in a row
    p.spend(1)
    assert p.budget(extra_s=0.120) == 0
    assert p.budget() == 25  # the bank kept what the held step did not spend
    p.spend(25)
    p.record_decode(0.300)  # a slow decode, past: one token, as before
    assert p.budget() == 1


def test_a_held_step_neither_advances_nor_admits_paced_prompts():
    """With a bound of 0, paced prompts (long ones, merged-expert ones) wait a step, the
    oldest prefill too; a short prompt without merges still joins whole."""
    def cost(req, start, n):
        return 6 if start == 0 and req.request_id == "m" else 0

    s, _ = decoding_then(long_ := Req("long", 40), 32, cost)
    assert s.schedule(1.0, max_prefill_work=10).chunks == {"long": 10}
    s.prefilled(long_, 10)
    s.add(m := Req("m", 12))
    assert s.schedule(2.0, max_prefill_work=0).chunks == {}  # held: long waits, m stays queued
    assert s.num_waiting == 1
    s.add(Req("d", 5))
    assert s.schedule(3.0, max_prefill_work=0).chunks == {}  # d waits behind m (FIFO)
    m.cancel_requested = True  # m leaves: d is first, and not paced
    assert s.schedule(4.0, max_prefill_work=0).chunks == {"d": 5}  # all of it
    assert s.schedule(5.0, max_prefill_work=10).chunks == {"long": 10}  # next step: on


def test_a_paced_budget_bounds_the_chunked_steps_work():
    """The scheduler takes the pacer's bound under its token budget: prompt work (tokens plus
    chunk costs) per chunked step stays within it; without decoders nothing is paced."""
    def cost(req, start, n):  # "short" makes no merges (its routing decision is cached)
        return 6 if start == 0 and req.request_id != "short" else 0

    s = Scheduler(SchedulerConfig(max_batch_size=4, max_input_tokens=100, max_total_tokens=128,
                                  max_batched_tokens=32), chunk_cost=cost)
    a, long_ = Req("a", 3), Req("long", 40)
    s.add(a)
    assert s.schedule(0.0, max_prefill_work=5).chunks == {"a": None}  # whole: nothing decodes
    s.add(long_)
    out = s.schedule(1.0, max_prefill_work=10)
    assert out.chunks == {"long": 4}  # 4 tokens + 6 of cost
    s.prefilled(long_, 4)
    assert s.schedule(2.0, max_prefill_work=10).chunks == {"long": 10}
    s.prefilled(long_, 14)
    # a short prompt (within the token budget) without merges to make is not paced: it joins
    # whole (12 tokens, beyond the bound of 10), planned first; the long one takes the bound.
    # A short prompt with merges is paced (they spread over steps by layers).
    s.add(Req("short", 12))
    assert s.is_paced(long_) and not s.is_paced(Req("short", 12)) and s.is_paced(Req("m", 12))
    assert s.schedule(2.5, max_prefill_work=10).chunks == {"short": 12, "long": 10}
    s.prefilled(long_, 24)
    assert s.schedule(3.0, max_prefill_work=100).chunks == {"long": 16}  # the rest


def test_short_prompts_without_merges_join_whole_or_wait():
    """A short prompt that makes no merges is never cut for its share of the budget: a piece
    and a rest of a few tokens would each pay a pass over all the weights. It joins whole
    where it fits, else waits for the next step, where it is planned first."""
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_input_tokens=100, max_total_tokens=128,
                                  max_batched_tokens=64))
    s.add(Req("d", 3))
    assert s.schedule(0.0).chunks == {"d": None}  # nothing decodes: whole
    for name in "abc":
        s.add(Req(name, 32))
    assert s.schedule(1.0).chunks == {"a": 32}  # 63 tokens of budget, 31 a share: b waits
    assert s.schedule(2.0).chunks == {"b": 32}
    assert s.schedule(3.0).chunks == {"c": 32}
    assert not s.prefilling and s.num_waiting == 0


def test_the_token_time_comes_from_chunks_without_routing_decisions(lm, monkeypatch):
    """A chunk that makes a routing decision is priced by the cost model, not timed: once a
    plain chunk gave the token time, decision chunks do not move it (before one, they are all
    there is to measure)."""
    path, _ = lm
    engine = Engine.from_pretrained(path, max_batch_size=2)
    costs = {0: 30}  # a chunk starting at 0 makes a decision worth 30 tokens

    class Req:
        num_prompt_tokens = 100
    monkeypatch.setattr(engine, "_chunk_cost", lambda req, start, n: costs.get(start, 0))
    monkeypatch.setattr(engine.scheduler, "is_paced", lambda req: True)
    pacer = engine.pacer
    engine._pace([Req()], [(None, 10)], [0], 0.080, True)  # 40 work tokens: the bootstrap
    assert pacer.token_s == pytest.approx(0.002)
    engine._pace([Req()], [(None, 10)], [10], 0.050, True)  # plain chunks are timed
    first = (pacer.fixed_s, pacer.token_s)
    assert first != (0.0, 0.002)
    engine._pace([Req()], [(None, 10)], [0], 0.010, True)  # a cheap decision: not timed
    assert (pacer.fixed_s, pacer.token_s) == first and pacer.credit == 0  # its work is spent


def test_the_pacer_fits_a_chunks_fixed_time_and_its_time_per_token():
    """Every chunk is a pass over all the weights: its time is affine in its work, and the
    prompt work per step is what fits after the fixed part (a time per token alone, inflated
    by small chunks, shrank the next chunks to a token a step)."""
    p = PrefillPacer(1.0, burst=64)
    p.record_decode(0.100)
    for w in (20, 20, 20):  # one size: no fixed part to tell apart, a time per token
        p.record_prefill(w, 0.035 + 0.003 * w)
    assert p.fixed_s == 0 and p.token_s == pytest.approx(0.095 / 20)
    for w in (1, 5, 30, 1, 25, 12):
        p.record_prefill(w, 0.035 + 0.003 * w)
    assert p.fixed_s == pytest.approx(0.035) and p.token_s == pytest.approx(0.003)
    assert p.rate() == pytest.approx((0.100 - 0.035) / 0.003)
    p.record_decode(0.130)  # the excess and the fixed part both come off
    assert p.rate() == pytest.approx((0.100 - 0.030 - 0.035) / 0.003)
    # merges this step's decode is known to make come off too
    assert p.rate(0.020) == pytest.approx((0.100 - 0.030 - 0.020 - 0.035) / 0.003)
    assert p.rate(0.100) == 0
    noisy = PrefillPacer(1.0, burst=64, alpha=0.5)
    noisy.record_prefill(10, 0.020)
    noisy.record_prefill(40, 0.140)  # a line through these has a negative fixed part: noise,
    assert noisy.fixed_s == 0  # so the time per token (weighted) stands
    assert noisy.token_s == pytest.approx((0.5 * 0.020 + 0.140) / (0.5 * 10 + 40))


def test_a_cpu_engine_paces_its_chunked_steps_by_measured_time(lm, monkeypatch):
    """The engine times its decodes and prefill chunks, and hands the scheduler the pacer's
    bound: a slow-prefill bound spreads a long prompt over more steps than the token budget
    alone, with the same tokens."""
    path, _ = lm
    assert Engine.from_pretrained(path, max_batch_size=2, prefill_time_ratio=None).pacer is None

    def run(bound):  # the mixture strategy: no merges, so chunk work is just tokens
        engine = Engine.from_pretrained(path, max_batch_size=3, max_batched_tokens=12,
                                        strategy="mixture")
        assert engine.pacer is not None and engine.pacer.budget() is None
        sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
        stream = engine.submit([1, 2, 3], sp)
        engine.step()  # its prefill (whole: nothing decodes yet)
        engine.step()  # its first decode
        # only long prompts' chunks are timed: a short one pays a whole pass over the weights
        # for few tokens, which says little about a long prefill's cost per token
        assert engine.pacer.decode_s > 0 and engine.pacer.token_s is None
        monkeypatch.setattr(engine.pacer, "budget",  # as if prefill were slow
                            lambda extra_s=0.0: bound)
        bounds, real = [], engine.scheduler.schedule
        monkeypatch.setattr(engine.scheduler, "schedule",
                            lambda now, b=None: (bounds.append(b), real(now, b))[1])
        short = engine.submit([4, 5, 6, 7, 8, 9, 10], sp)
        engine.step()
        assert short._events  # a short prompt joins in one step, paced or not
        long_handle = engine.submit(list(range(1, 4 * T + 1)), sp)  # 16 tokens: long
        steps = 0
        while not long_handle._events:
            engine.step()
            steps += 1
        assert engine.pacer.token_s > 0
        while not (stream.done and short.done and long_handle.done):
            engine.step()
        assert set(bounds) == {bound}
        return steps, long_handle.result().token_ids

    paced, unpaced = run(1), run(None)
    assert unpaced[0] <= 2 and paced[0] >= 2 * T and paced[1] == unpaced[1]


@pytest.mark.parametrize("strategy", ["merged", "mixture"])
def test_a_step_whose_rows_open_segments_leaves_their_merges_time_to_them(lm, strategy):
    """A decoding row whose next token opens a segment makes one merge per MoE layer in that
    step's decode: the engine hands the pacer that time before the step, so the step's
    prompt share shrinks by it (the mixture makes no merges: nothing to take off)."""
    path, _ = lm
    engine = Engine.from_pretrained(path, max_batch_size=2, max_batched_tokens=8,
                                    strategy=strategy)
    runner, pacer = engine.runner, engine.pacer
    seen, real = [], pacer.budget
    pacer.budget = lambda extra_s=0.0: (seen.append(extra_s), real(extra_s))[1]
    sp = SamplingParams(max_new_tokens=3 * T, ignore_eos=True)
    handle = engine.submit([5, 6, 7], sp)
    positions = []  # the next decode's position (None: before the prompt's prefill)
    while not handle.done:
        positions.append(None if runner.slots[0] is None else runner.slots[0].length)
        engine.step()
    per_row = len(runner.moe) * runner.cost.merge_seconds if strategy == "merged" else 0.0
    assert len(seen) == len(positions) and positions[0] is None
    for pos, extra in zip(positions, seen):
        opens = pos is not None and pos % T == 0
        assert extra == pytest.approx(per_row if opens else 0.0), (pos, extra)
    assert sum(p is not None and p % T == 0 for p in positions) >= 2  # crossed segment starts
    if strategy == "merged":
        assert per_row > 0
