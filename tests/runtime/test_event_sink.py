"""`RequestHandle.aiter(sink=...)`: while its reader waits, a sink takes the request's events on
the thread that publishes them, the reader's loop is not woken until the sink stops, and the
reader then yields every event, the sink's included, in order. (The server's `SocketSink` is
this contract writing to a socket: tests/e2e/test_stream_direct.py.)"""
from __future__ import annotations

import asyncio
import threading

import pytest

from camex_runtime.engine.outputs import GenerationResult, RequestTimings, TokenEvent
from camex_runtime.engine.request import RequestHandle


class ListSink:
    """Takes events into a list up to `stop_at` (exclusive), remembering on which threads."""

    def __init__(self, stop_at: int = 1 << 30, accept: bool = True, fail: bool = False):
        self.stop_at, self.accept, self.fail = stop_at, accept, fail
        self.taken: list[TokenEvent] = []
        self.threads: set[int] = set()
        self.attached_at: list[int] = []
        self.calls = 0
        self.end = 0

    def attach(self, start: int) -> bool:
        self.attached_at.append(start)
        self.end = start
        return self.accept

    def take(self, events, finished) -> bool:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("the sink broke")
        while self.end < len(events):
            if self.end >= self.stop_at or events[self.end].finish_reason is not None:
                return False
            self.taken.append(events[self.end])
            self.end += 1
        return not finished


def make_events(n: int) -> list[TokenEvent]:
    return [TokenEvent(token_id=10 + i, text=f"t{i}", logprob=-0.5, index=i, at=float(i),
                       finish_reason="length" if i == n - 1 else None) for i in range(n)]


def result_of(events) -> GenerationResult:
    return GenerationResult(request_id="r", prompt_token_ids=[1], token_ids=[e.token_id for e in
                                                                            events],
                            text="".join(e.text for e in events), finish_reason="length",
                            logprobs=[e.logprob for e in events], routing=None,
                            timings=RequestTimings(queued_at=0.0))


class Publisher:
    """Publishes from one other thread, as the engine does, one call at a time."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self.ident: int | None = None

    def __call__(self, events, result=None) -> None:
        def run():
            self.ident = threading.get_ident()
            self.handle._publish(events, result)
        t = threading.Thread(target=run)
        t.start()
        t.join()


async def follow(handle, sink, publish, script, wakes):
    """Read `handle` with `sink` while `script` publishes; count the reader loop's wake-ups."""
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
    got = []

    async def read():
        async for ev in handle.aiter(sink):
            got.append(ev)
    reader = asyncio.ensure_future(read())
    for step in script:
        await asyncio.sleep(0.02)  # the reader waits (and has handed over) before each step
        publish(*step)
    await asyncio.wait_for(reader, 5)
    return got


def test_the_sink_takes_events_on_the_publishing_thread_and_the_reader_sleeps_meanwhile():
    h = RequestHandle("r", [1], cancel=lambda rid: None)
    events = make_events(6)
    sink, publish, wakes = ListSink(stop_at=3), Publisher(h), []
    script = [([events[0]],), ([events[1]],), ([events[2]],), ([events[3]],), ([events[4]],),
              ([events[5]], result_of(events))]
    got = asyncio.run(follow(h, sink, publish, script, wakes))
    assert got == events  # every event once, in order: the sink's too
    assert sink.attached_at == [0]  # one hand-over, at the first wait
    assert sink.taken == events[:3] and sink.threads == {publish.ident}
    # woken when the sink stopped (at event 3), then for events 4 and 5 as a plain reader
    assert len(wakes) == 3


def test_a_sink_that_declines_leaves_the_reader_to_its_events():
    h = RequestHandle("r", [1], cancel=lambda rid: None)
    events = make_events(3)
    sink, wakes = ListSink(accept=False), []
    script = [([e],) for e in events[:-1]] + [([events[-1]], result_of(events))]
    got = asyncio.run(follow(h, sink, Publisher(h), script, wakes))
    assert got == events and sink.calls == 0 and len(wakes) == 3
    assert sink.attached_at == [0, 1, 2]  # asked at every wait, never took anything


def test_the_end_wakes_the_reader_and_its_events_come_after_the_sinks():
    h = RequestHandle("r", [1], cancel=lambda rid: None)
    events = make_events(4)
    sink, wakes = ListSink(), []
    script = [(events[:2],), (events[2:], result_of(events))]
    got = asyncio.run(follow(h, sink, Publisher(h), script, wakes))
    assert got == events and sink.taken == events[:3] and len(wakes) == 1


def test_a_failing_sink_hands_back_and_the_publisher_goes_on(caplog):
    h = RequestHandle("r", [1], cancel=lambda rid: None)
    events = make_events(3)
    sink, wakes = ListSink(fail=True), []
    script = [([e],) for e in events[:-1]] + [([events[-1]], result_of(events))]
    got = asyncio.run(follow(h, sink, Publisher(h), script, wakes))
    assert got == events and sink.calls == 1
    assert "event sink failed" in caplog.text


def test_a_cancelled_reader_detaches_its_sink():
    h = RequestHandle("r", [1], cancel=lambda rid: None)
    events = make_events(4)
    sink, publish = ListSink(), Publisher(h)

    async def main():
        async def read():
            async for _ in h.aiter(sink):
                pass
        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.02)
        publish([events[0]])
        assert sink.taken == events[:1]
        reader.cancel()  # the client left: the stream's task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await reader
        publish([events[1]])  # the engine's next step: the sink is not asked again
        publish([events[2]], None)
    asyncio.run(main())
    assert sink.taken == events[:1] and sink.calls == 1
    assert h.events() == events[:3]
