"""ClassifyQueue on plain callables: a fixed set of workers, FIFO waiting with a bound (429) and
a deadline (504), callers that leave, the shutdown cut (503), and the idle hook (heap trim)."""

import asyncio
import threading

import pytest

from server import errors
from server.isolation import ClassifyQueue


class Gate:
    """Callables that block their worker thread until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.order: list[int] = []

    def call(self, i: int):
        def run():
            self.order.append(i)
            self.started.release()
            assert self.release.wait(30)
            return i
        return run


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_workers_run_callers_in_arrival_order_and_hand_over_slots():
    async def go():
        q = ClassifyQueue(workers=2, max_waiting=8, queue_timeout_s=30)
        gate = Gate()
        tasks = [asyncio.create_task(q.run(gate.call(i))) for i in range(6)]
        await until(lambda: q.running == 2 and q.waiting == 4)
        assert len(gate.order) == 2  # only the workers' calls started
        gate.release.set()
        assert await asyncio.gather(*tasks) == list(range(6))
        assert sorted(gate.order[:2]) == [0, 1] and gate.order[2:] == [2, 3, 4, 5]
        await until(lambda: q.running == 0 and q.waiting == 0)
        q.shutdown()
    asyncio.run(go())


def test_full_queue_is_429_and_a_late_start_is_504():
    async def go():
        q = ClassifyQueue(workers=1, max_waiting=2, queue_timeout_s=0.3)
        gate = Gate()
        running = asyncio.create_task(q.run(gate.call(0)))
        waiting = [asyncio.create_task(q.run(gate.call(i))) for i in (1, 2)]
        await until(lambda: q.waiting == 2)
        with pytest.raises(errors.ApiError) as full:
            await q.run(gate.call(3))
        assert full.value.status == 429 and full.value.headers["Retry-After"]
        for task in waiting:  # nobody started them within 0.3 s
            with pytest.raises(errors.ApiError) as late:
                await task
            assert late.value.status == 504 and late.value.error_type == "queue_timeout"
        gate.release.set()
        assert await running == 0
        assert await q.run(lambda: "next") == "next"  # the worker is free again
        assert gate.order == [0]
        q.shutdown()
    asyncio.run(go())


def test_a_caller_that_leaves_while_waiting_frees_its_place():
    async def go():
        q = ClassifyQueue(workers=1, max_waiting=1, queue_timeout_s=30)
        gate = Gate()
        running = asyncio.create_task(q.run(gate.call(0)))
        leaving = asyncio.create_task(q.run(gate.call(1)))
        await until(lambda: q.waiting == 1)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert q.waiting == 0
        staying = asyncio.create_task(q.run(gate.call(2)))  # fits: the place was given back
        gate.release.set()
        assert (await running, await staying) == (0, 2)
        assert gate.order == [0, 2]  # the cancelled call never ran
        q.shutdown()
    asyncio.run(go())


def test_a_running_call_keeps_its_worker_until_it_really_ends():
    async def go():
        q = ClassifyQueue(workers=1, max_waiting=4, queue_timeout_s=30)
        gate = Gate()
        first = asyncio.create_task(q.run(gate.call(0)))
        await until(lambda: len(gate.order) == 1)
        first.cancel()  # the client left, but the forward cannot be interrupted
        await asyncio.gather(first, return_exceptions=True)
        second = asyncio.create_task(q.run(gate.call(1)))
        await asyncio.sleep(0.2)
        assert gate.order == [0] and q.running == 1  # still one forward at a time
        gate.release.set()
        assert await second == 1
        q.shutdown()
    asyncio.run(go())


def test_shutdown_refuses_new_calls_and_cuts_waiting_ones():
    async def go():
        q = ClassifyQueue(workers=1, max_waiting=4, queue_timeout_s=30)
        gate = Gate()
        running = asyncio.create_task(q.run(gate.call(0)))
        waiting = asyncio.create_task(q.run(gate.call(1)))
        await until(lambda: q.waiting == 1)
        q.close("shutting down")
        with pytest.raises(errors.ApiError) as refused:
            await q.run(gate.call(2))
        assert refused.value.status == 503
        cut = errors.ApiError(503, "shutdown", "cut", {"Retry-After": "1"})
        assert q.cut(cut) == 1
        with pytest.raises(errors.ApiError) as got:
            await waiting
        assert got.value is cut
        gate.release.set()
        assert await running == 0  # what already ran finishes
        q.shutdown()
    asyncio.run(go())


def test_idle_hook_runs_once_the_queue_drains(monkeypatch):
    monkeypatch.setattr("server.isolation.TRIM_IDLE_S", 0.05)
    calls = []

    async def go():
        q = ClassifyQueue(workers=2, max_waiting=4, queue_timeout_s=30,
                          on_idle=lambda: calls.append(threading.current_thread().name))
        await asyncio.gather(*(q.run(lambda: None) for _ in range(5)))
        await until(lambda: calls)
        await asyncio.sleep(0.2)
        q.shutdown()
    asyncio.run(go())
    assert len(calls) == 1 and calls[0].startswith("camex-classify")  # on a worker thread

