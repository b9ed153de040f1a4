"""The scheduler on plain Python objects: no tensors, no model."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from camex_runtime.engine.scheduler import Scheduler, SchedulerConfig
from camex_runtime.errors import InputValidationError, QueueFullError


@dataclass(eq=False)
class Req:
    request_id: str
    num_prompt_tokens: int = 4
    queue_deadline: float | None = None
    cancel_requested: bool = False
    slot: int | None = None


def sched(**kw) -> Scheduler:
    cfg = dict(max_batch_size=2, max_waiting=3, max_input_tokens=16, max_total_tokens=32)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def test_fifo_admission_into_free_slots_and_rejoin():
    s = sched()
    reqs = [Req(f"r{i}") for i in range(3)]
    for r in reqs:
        s.add(r)
    out = s.schedule(now=0.0)
    assert out.prefill == reqs[:2] and out.decode == [] and [r.slot for r in reqs[:2]] == [0, 1]
    out = s.schedule(now=1.0)
    assert out.prefill == [] and out.decode == reqs[:2]  # r2 waits: the batch is full
    s.finish(reqs[0])  # leaves after its step ...
    out = s.schedule(now=2.0)
    assert out.prefill == [reqs[2]] and reqs[2].slot == 0  # ... and r2 joins the next step
    assert out.decode == [reqs[1]]
    s.finish(reqs[0])  # idempotent
    assert s.num_running == 2


def test_decode_rows_come_in_slot_order_after_a_rejoin():
    """r3 joins into r0's freed slot 0: the next step decodes slots [0, 1, 2] in order (the
    KV cache reads a contiguous ascending range as a view), not in arrival order [1, 2, 0]."""
    s = sched(max_batch_size=3)
    reqs = [Req(f"r{i}") for i in range(4)]
    for r in reqs[:3]:
        s.add(r)
    s.schedule(now=0.0)
    s.finish(reqs[0])
    s.add(reqs[3])
    assert s.schedule(now=1.0).prefill == [reqs[3]] and reqs[3].slot == 0
    out = s.schedule(now=2.0)
    assert [r.slot for r in out.decode] == [0, 1, 2]
    assert out.decode == [reqs[3], reqs[1], reqs[2]]


def test_bounded_queue_counts_only_requests_without_a_free_slot():
    s = sched(max_batch_size=2, max_waiting=2)
    for name in "abcd":  # two will be seated by the next step, two wait for a slot
        s.add(Req(name))
    with pytest.raises(QueueFullError, match="2/2 waiting"):
        s.add(Req("e"))
    s.schedule(now=1.0)  # a and b run: the slots are taken, c and d still wait
    assert len(s.running) == 2 and len(s.waiting) == 2
    with pytest.raises(QueueFullError, match="2/2 waiting"):
        s.add(Req("f"))


def test_queue_timeout_and_cancellation():
    s = sched(max_batch_size=1, max_waiting=4)
    running, late, cancelled, patient = Req("run"), Req("late", queue_deadline=5.0), \
        Req("cancel"), Req("patient", queue_deadline=100.0)
    for r in (running, late, cancelled, patient):
        s.add(r)
    assert s.schedule(now=0.0).prefill == [running]
    cancelled.cancel_requested = True
    out = s.schedule(now=6.0)
    assert out.timed_out == [late] and out.cancelled == [cancelled]
    assert [r.request_id for r in s.waiting] == ["patient"]
    running.cancel_requested = True  # a running request leaves and frees its slot at once
    out = s.schedule(now=7.0)
    assert out.cancelled == [running] and out.prefill == [patient] and patient.slot == 0
    assert out.decode == []


def test_prefill_token_budget_keeps_fifo():
    s = sched(max_batch_size=4, max_prefill_tokens=10)
    a, b, c = Req("a", 8), Req("b", 8), Req("c", 1)
    for r in (a, b, c):
        s.add(r)
    assert s.schedule(0.0).prefill == [a]  # b does not fit the budget; c must not overtake b
    assert s.schedule(1.0).prefill == [b, c]


def test_oversized_prompt_still_admitted_alone():
    s = sched(max_batch_size=2, max_prefill_tokens=4)
    big = Req("big", 12)
    s.add(big)
    assert s.schedule(0.0).prefill == [big]


def test_length_checks_name_the_numbers():
    s = sched()
    with pytest.raises(InputValidationError, match="17 tokens; max_input_tokens is 16"):
        s.check_lengths(17, 1)
    with pytest.raises(InputValidationError, match=r"\(16\) \+ max_new_tokens \(17\) = 33"):
        s.check_lengths(16, 17)
    with pytest.raises(InputValidationError, match="empty"):
        s.check_lengths(0, 1)
    s.check_lengths(16, 16)


def test_config_rejects_inconsistent_limits():
    with pytest.raises(ValueError, match="max_input_tokens"):
        SchedulerConfig(max_input_tokens=32, max_total_tokens=32)
    with pytest.raises(ValueError, match="max_batch_size"):
        SchedulerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match=r"num_slots \(3\) must be >= max_batch_size \(4\)"):
        SchedulerConfig(max_batch_size=4, num_slots=3)


def test_more_slots_than_the_batch_run_only_the_batch():
    """Slots beyond max_batch_size (prefix caching keeps finished requests' tokens there):
    the placer may seat a request in any free slot, but no more than the batch run, in
    whole-prompt and in chunked steps, and a finished request's slot is free again."""
    seen = []

    def placer(req, free):
        seen.append(list(free))
        return free[-1], 0  # the highest: beyond the batch's first slots

    for chunked in (None, 8):
        seen.clear()
        s = Scheduler(SchedulerConfig(max_batch_size=2, num_slots=5, max_waiting=8,
                                      max_input_tokens=16, max_total_tokens=32,
                                      max_batched_tokens=chunked), placer=placer)
        reqs = [Req(f"r{i}") for i in range(4)]
        for r in reqs:
            s.add(r)
        out = s.schedule(now=0.0)
        assert out.prefill == reqs[:2] and [r.slot for r in reqs[:2]] == [4, 3]
        assert seen == [[0, 1, 2, 3, 4], [0, 1, 2, 3]]
        for step in range(3):  # the batch is full: nobody joins, whatever slots are free
            out = s.schedule(now=1.0 + step)
            assert out.prefill == [] and s.num_running == 2
        s.finish(reqs[0])
        out = s.schedule(now=5.0)
        assert out.prefill == [reqs[2]] and reqs[2].slot == 4 and s.num_running == 2
