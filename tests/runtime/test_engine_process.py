"""The engine in its own process (`EngineProcess`) behaves as the engine in this one: the same
tokens, text, logprobs and routing, the same errors for the same mistakes, cancellation, and
nothing left waiting when the process stops or dies, whether a thread reads its pipe or an
event loop does (as in the server). Real processes, ended by PID."""

import asyncio
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.checkpoint import CheckpointError
from camex_runtime.engine.process import EngineProcess, Frames
from camex_runtime.errors import (ContextLengthError, EngineStoppedError, InputValidationError,
                                  QueueFullError, RequestFailedError)
from tests.runtime.engine_models import build_folded

LIMITS = dict(max_batch_size=2, max_waiting=2, max_total_tokens=96)
CASES = [
    ("greedy", [5, 9, 11, 3, 7], SamplingParams(max_new_tokens=12, ignore_eos=True)),
    ("sampled", [1, 2, 3], SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.8,
                                          top_k=20, seed=7, ignore_eos=True, logprobs=3)),
    ("scored", [4, 4, 8, 15, 16, 23, 42], SamplingParams(max_new_tokens=5, prompt_logprobs=2,
                                                         return_routing=True)),
    ("prompt-routed", list(range(1, 12)), SamplingParams(max_new_tokens=6, routing="prompt",
                                                         return_routing=True)),
    ("only-scored", [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=0, prompt_logprobs=1)),
]


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def on_step(self, batch_size, seconds):
        self.calls.append(("on_step", batch_size))

    def on_route(self, layer, scores):
        self.calls.append(("on_route", layer))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("proc") / "lm")


@pytest.fixture(scope="module")
def local(lm_dir):
    # one thread, as the engine process below: torch's CPU attention kernel (prefill) gives
    # other bits at two threads (scaled_dot_product_attention, causal, 4 heads x 11 tokens:
    # up to 1e-8 apart), and the "prompt-routed" case's third logprob then differed in its
    # last bits (-3.80607963 vs -3.80607939)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(lm_dir, **LIMITS)
    engine.start()
    yield engine
    engine.stop(grace_s=0)
    torch.set_num_threads(threads)


class LoopThread:
    """An event loop (uvloop, as uvicorn runs) in a thread of its own, as the server's."""

    def __init__(self):
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, close: bool = True):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if close:
            self.loop.close()


def make_remote(lm_dir, read_by: str, **kw) -> EngineProcess:
    """An EngineProcess whose pipe a thread reads ("thread") or an event loop ("loop"; the
    loop's thread is `engine.loop_thread`)."""
    if read_by == "thread":
        return EngineProcess(lm_dir, threads=1, **kw)
    lt = LoopThread()
    try:
        engine = EngineProcess(lm_dir, threads=1, loop=lt.loop, **kw)
    except BaseException:
        lt.stop()
        raise
    engine.loop_thread = lt
    return engine


def stop_remote(engine: EngineProcess) -> None:
    engine.stop(grace_s=0)
    lt = getattr(engine, "loop_thread", None)
    if lt is not None and not lt.loop.is_closed():
        lt.stop()


@pytest.fixture(scope="module", params=["thread", "loop"])
def remote(lm_dir, request):
    observer = Recorder()
    engine = make_remote(lm_dir, request.param, observer=observer, **LIMITS)
    engine.observed = observer
    engine.warmup(freeze_gc=False)
    yield engine
    stop_remote(engine)


def run(engine, prompt, params):
    handle = engine.submit(prompt, params)
    events = list(handle)
    return events, handle.result(timeout=60), handle.prompt_logprobs


def same_result(a, b):
    fields = ("prompt_token_ids", "token_ids", "text", "finish_reason", "logprobs",
              "top_logprobs", "prompt_logprobs", "routing", "error")
    return {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}


@pytest.mark.parametrize("name,prompt,params", CASES, ids=[c[0] for c in CASES])
def test_a_request_gives_what_it_gives_in_process(local, remote, name, prompt, params):
    ev_local, res_local, plp_local = run(local, prompt, params)
    ev_remote, res_remote, plp_remote = run(remote, prompt, params)
    assert ev_remote == ev_local
    assert same_result(res_remote, res_local)
    assert plp_remote == plp_local  # streaming callers read them from the handle
    assert res_remote.timings.first_token_at is None or \
        res_remote.timings.queued_at <= res_remote.timings.first_token_at <= \
        res_remote.timings.finished_at


def test_requests_batched_together_give_what_they_give_alone(local, remote):
    prompts = [[i, i + 1, i + 2, i + 3] for i in range(1, 5)]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    alone = [local.generate(p, max_new_tokens=9, ignore_eos=True).token_ids for p in prompts]
    results: dict[int, list] = {}

    def go(i):  # four at once: two run, two wait (LIMITS), all join batches mid-flight
        results[i] = remote.submit(prompts[i], params).result(timeout=60).token_ids

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(4)] == alone
    assert max(b for hook, b in remote.observed.calls if hook == "on_step") == 2


def test_text_needs_a_tokenizer_here_too(remote):
    assert remote.tokenizer is None  # engine_models checkpoints have none
    with pytest.raises(InputValidationError, match="no tokenizer"):
        remote.submit("hello", SamplingParams(max_new_tokens=2))


def test_client_mistakes_raise_what_the_engine_raises(remote):
    with pytest.raises(InputValidationError, match="top_k"):
        remote.submit([1, 2], SamplingParams(top_k=0))
    with pytest.raises(InputValidationError, match="outside the vocabulary"):
        remote.submit([1, 10_000])
    with pytest.raises(ContextLengthError, match="96") as err:  # checked in the engine process
        remote.submit([1] * 90, SamplingParams(max_new_tokens=20))
    # it crossed the pipe as itself, numbers and all (the OpenAI routes word it from them)
    assert (err.value.prompt_tokens, err.value.max_new_tokens) == (90, 20)
    assert err.value.max_total_tokens == 96 and not err.value.prompt_too_long
    assert remote.stats().running == 0  # nothing was left behind
    assert remote.generate([1, 2], max_new_tokens=2).finish_reason == "length"


def test_a_full_queue_is_refused_and_cancelled_requests_free_their_slots(remote):
    long = SamplingParams(max_new_tokens=80, ignore_eos=True)
    handles = [remote.submit([1, 2, 3], long) for _ in range(4)]  # 2 running + 2 waiting
    with pytest.raises(QueueFullError):
        remote.submit([1, 2, 3], long)
    first = next(iter(handles[0]))  # it runs
    assert first.index == 0
    for h in handles:
        h.cancel()
    reasons = {h.result(timeout=60).finish_reason for h in handles}
    assert reasons <= {"cancelled", "length"} and "cancelled" in reasons
    deadline = time.monotonic() + 30
    while remote.stats().running or remote.stats().waiting:
        assert time.monotonic() < deadline, "slots were not freed"
        time.sleep(0.02)


def test_observer_calls_arrive_in_this_process(remote):
    before = len(remote.observed.calls)
    remote.generate([7, 7, 7, 7, 7, 7, 7, 7, 7], max_new_tokens=4)
    hooks = {hook for hook, _ in remote.observed.calls[before:]}
    assert hooks == {"on_step", "on_route"}  # the tiny model has merged-expert layers


def test_stats_and_info_come_from_the_engine_process(remote, local):
    stats = remote.stats()
    assert stats.alive and stats.max_batch_size == 2 and stats.steps > 0
    assert time.monotonic() - stats.heartbeat < 5.0  # one clock for both processes
    info = remote.info()
    assert info["engine_pid"] == remote.pid != os.getpid()
    expected = {k: v for k, v in local.info().items() if k != "cost_profile"}
    assert {k: info[k] for k in expected} == expected


def test_a_frozen_engine_process_refuses_a_submit_in_time_and_keeps_nothing(remote,
                                                                            monkeypatch):
    from camex_runtime.engine import process

    monkeypatch.setattr(process, "CALL_TIMEOUT_S", 1.0)
    os.kill(remote.pid, signal.SIGSTOP)  # the engine process this test's fixture started
    try:
        with pytest.raises(EngineStoppedError, match="did not take the request"):
            remote.submit([1, 2, 3], SamplingParams(max_new_tokens=80, ignore_eos=True))
    finally:
        os.kill(remote.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30  # it took the request late: the cancel that followed ends it
    while remote.stats().running or remote.stats().waiting:
        assert time.monotonic() < deadline, "the refused request kept running"
        time.sleep(0.02)
    assert remote.generate([1, 2], max_new_tokens=2).finish_reason == "length"


def decoding(engine: EngineProcess):
    """The handle of a long request, once its first token came."""
    handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=80, ignore_eos=True))
    next(iter(handle))
    return handle


@pytest.mark.slow
@pytest.mark.parametrize("read_by", ["thread", "loop"])
def test_stop_cancels_what_is_left_and_the_process_exits(lm_dir, read_by):
    engine = make_remote(lm_dir, read_by, **LIMITS)
    try:
        handle = decoding(engine)
        engine.stop(grace_s=0)
        assert handle.result(timeout=10).finish_reason in ("cancelled", "length")
        assert not engine.alive() and engine._proc.exitcode == 0
        with pytest.raises(EngineStoppedError):
            engine.submit([1, 2])
        assert not engine.stats().alive
    finally:
        stop_remote(engine)


@pytest.mark.parametrize("read_by", ["thread", "loop"])
def test_a_dead_engine_process_fails_its_requests_and_says_so(lm_dir, read_by):
    engine = make_remote(lm_dir, read_by, **LIMITS)
    try:
        handle = decoding(engine)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(RequestFailedError, match="engine process died"):
            handle.result(timeout=30)
        events = list(handle)
        assert events[-1].finish_reason == "error" and events[-1].token_id == -1
        assert not engine.stats().alive
        with pytest.raises(EngineStoppedError, match="died"):
            engine.submit([1, 2])
    finally:
        stop_remote(engine)  # returns at once: nothing left to stop


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "camex-engine-reader"]


def test_a_loop_reads_the_pipe_itself_and_its_tasks_stream_from_there(lm_dir, local):
    prompt, params = CASES[1][1], CASES[1][2]
    expected, expected_result, _ = run(local, prompt, params)
    before = reader_threads()
    engine = make_remote(lm_dir, "loop", **LIMITS)
    try:
        assert reader_threads() == before  # no thread reads this engine's pipe
        handle = engine.submit(prompt, params)  # from this thread, as the server's workers

        async def stream():
            return [ev async for ev in handle.aiter()]

        assert engine.loop_thread.run(stream()) == expected
        assert same_result(handle.result(timeout=10), expected_result)
        assert reader_threads() == before
    finally:
        stop_remote(engine)


def test_a_call_that_waits_for_a_reply_refuses_to_run_on_the_loop_that_reads_it(lm_dir):
    engine = make_remote(lm_dir, "loop", **LIMITS)
    try:
        async def on_the_loop():
            return engine.stats()

        with pytest.raises(RuntimeError, match="from a thread"):
            engine.loop_thread.run(on_the_loop())  # instead of waiting for itself forever
        assert engine.stats().alive  # from this thread it answers
    finally:
        stop_remote(engine)


@pytest.mark.parametrize("close", [False, True], ids=["stopped", "closed"])
def test_when_the_reading_loop_goes_away_a_thread_takes_over(lm_dir, local, close):
    expected = local.generate([5, 9, 11], max_new_tokens=6, ignore_eos=True).token_ids
    engine = make_remote(lm_dir, "loop", **LIMITS)
    try:
        assert engine.generate([5, 9, 11], max_new_tokens=6,
                               ignore_eos=True).token_ids == expected
        engine.loop_thread.stop(close=close)  # e.g. the server's loop ended before its stop
        assert engine.generate([5, 9, 11], max_new_tokens=6,
                               ignore_eos=True).token_ids == expected
        assert reader_threads()  # the reply came: a thread reads now
        engine.stop(grace_s=0)
        assert engine._proc.exitcode == 0  # stopped as asked, not killed after a timeout
    finally:
        stop_remote(engine)


# -- the pipe's framing ------------------------------------------------------------------------
def written_by_connection(messages: list) -> bytes:
    """The bytes `Connection.send` writes for `messages` (a few KiB: the socket holds them),
    read raw from the other end."""
    a, b = multiprocessing.Pipe()
    for msg in messages:
        a.send(msg)
    a.close()
    out = bytearray()
    while chunk := os.read(b.fileno(), 1 << 20):
        out += chunk
    b.close()
    return bytes(out)


def test_frames_parse_what_a_connection_writes_however_the_bytes_arrive():
    messages = [("step", [("ev", "r1", [1, 2, 3], None)]), ("reply", 7, True, "x" * 40_000),
                ("reply", 8, False, ValueError("no")), ("step", [])]
    raw = written_by_connection(messages)
    assert len(raw) > 40_000  # one message above Connection's 16 KiB one-write limit

    def parse(chunks):
        frames, got = Frames(), []
        for chunk in chunks:
            got += [pickle.loads(f) for f in frames.feed(chunk)]
        return got, frames.pending

    for size in (1, 3, 4, 5, 4096, len(raw)):  # byte by byte ... all at once
        got, pending = parse([raw[i:i + size] for i in range(0, len(raw), size)])
        assert [repr(m) for m in got] == [repr(m) for m in messages] and pending == 0
    got, pending = parse([raw[:-1]])  # the last byte still to come: that message waits
    assert len(got) == len(messages) - 1 and pending > 0


def test_frames_read_the_long_header_of_messages_over_2_gib():
    body = pickle.dumps(("reply", 1, True, "big"))  # Connection's -1 + 8-byte length form
    raw = struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body
    frames = Frames()
    assert frames.feed(raw[:10]) == [] and frames.pending == 10
    assert [pickle.loads(f) for f in frames.feed(raw[10:])] == [("reply", 1, True, "big")]


API_SCRIPT = """
import sys, time
from camex_runtime.engine.process import EngineProcess, Frames
if __name__ == "__main__":
    engine = EngineProcess(sys.argv[1], threads=1)
    print(engine.pid, flush=True)
    time.sleep(float(sys.argv[2]))  # then exits without stop()
"""


def start_api(lm_dir, tmp_path, linger_s: float) -> tuple[subprocess.Popen, int]:
    """A Python process that makes an EngineProcess and never stops it: (it, engine pid)."""
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    api = subprocess.Popen([sys.executable, str(script), str(lm_dir), str(linger_s)],
                           stdout=subprocess.PIPE, text=True,
                           cwd=Path(__file__).resolve().parents[2])
    try:
        return api, int(api.stdout.readline())
    except BaseException:
        os.kill(api.pid, signal.SIGKILL)
        api.wait(10)
        raise


@pytest.mark.slow
def test_the_engine_process_exits_when_its_api_process_is_killed(lm_dir, tmp_path):
    api, engine_pid = start_api(lm_dir, tmp_path, linger_s=600)
    os.kill(api.pid, signal.SIGKILL)  # no stop(), no atexit: only the pipe closes
    api.wait(10)
    deadline = time.monotonic() + 30
    while running(engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived its API process"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_script_that_never_stops_its_engine_process_still_exits(lm_dir, tmp_path):
    api, engine_pid = start_api(lm_dir, tmp_path, linger_s=0)
    try:
        assert api.wait(60) == 0
    finally:
        if api.poll() is None:
            os.kill(api.pid, signal.SIGKILL)
            api.wait(10)
    assert not running(engine_pid)


def test_the_exit_handler_ends_every_engine_process_even_if_one_stop_fails(monkeypatch):
    from camex_runtime.engine import process

    class Proc:
        def __init__(self):
            self.alive = True

        def is_alive(self):
            return self.alive

        def kill(self):
            self.alive = False

    class Half:  # as if __init__ was interrupted: stop() cannot finish
        pid, _proc = 1, Proc()

        def stop(self, grace_s):
            raise AttributeError("'EngineProcess' object has no attribute '_reading'")

    class Whole:
        pid, _proc = 2, Proc()

        def stop(self, grace_s):
            self._proc.alive = False

    engines = [Half(), Whole()]
    monkeypatch.setattr(process, "_LIVE", weakref.WeakSet(engines))
    process._stop_live()
    assert not any(e._proc.is_alive() for e in engines)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_checkpoint_that_fails_to_load_raises_its_error_here(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        EngineProcess(tmp_path, threads=1)


class TwoPartError(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def test_errors_cross_as_themselves_or_as_a_runtime_error_naming_them():
    from camex_runtime.engine.process import portable

    for exc in (CheckpointError("bad tensor 'x'"), QueueFullError("full"), ValueError("v"),
                KeyError("k")):
        assert portable(exc) is exc
    odd = portable(TwoPartError("load", "no way"))  # a type from elsewhere
    assert type(odd) is RuntimeError and str(odd) == "TwoPartError: load: no way"
