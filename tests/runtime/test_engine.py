"""The Engine facade as the server uses it (docs/INTERFACES.md §2)."""
from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.engine import WARM_SHORT
from camex_runtime.errors import (EngineStoppedError, InputValidationError, QueueFullError,
                                  QueueTimeoutError)
from engine_models import build_folded, reference


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("api") / "lm")


@pytest.fixture()
def engine(path):
    e = Engine.from_pretrained(path, max_batch_size=2, max_waiting=4, max_total_tokens=48,
                               max_input_tokens=32)
    yield e
    e.stop(grace_s=0)


def test_info_and_kind(engine):
    info = engine.info()
    assert engine.kind == "causal-lm" and info["kind"] == "causal-lm"
    assert info["num_experts"] == 3 and info["moe_layers"] == [0, 1] and info["segment_len"] == 4
    assert info["max_total_tokens"] == 48 and info["max_input_tokens"] == 32
    assert info["routing"] == "segment" and info["strategy"] == "auto"


def test_step_is_refused_while_the_loop_thread_runs(engine):
    """Stepping beside the loop would schedule and run the same requests from two threads;
    the call is refused and the loop's request is untouched."""
    handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.step()  # no loop yet: the caller drives the engine
    engine.start()
    with pytest.raises(RuntimeError, match="loop thread is running"):
        engine.step()
    result = handle.result()
    assert result.finish_reason == "length" and len(result.token_ids) == 3


def test_validation_errors_name_the_numbers(engine):
    with pytest.raises(InputValidationError, match="33 tokens; max_input_tokens is 32"):
        engine.submit(list(range(33)))
    with pytest.raises(InputValidationError, match="exceeds max_total_tokens"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=47))
    with pytest.raises(InputValidationError, match="outside the vocabulary"):
        engine.submit([1, 999])
    with pytest.raises(InputValidationError, match="no tokenizer"):
        engine.submit("text needs a tokenizer")
    with pytest.raises(InputValidationError, match="classify needs a classifier"):
        engine.classify(["x"])


def test_queue_full_and_queue_timeout(engine):
    hs = [engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, queue_timeout_s=0.001))
          for _ in range(6)]  # 2 free slots + max_waiting 4
    with pytest.raises(QueueFullError):
        engine.submit([1])
    import time
    time.sleep(0.01)
    engine.step()  # every waiting request is past its deadline
    for h in hs:
        with pytest.raises(QueueTimeoutError, match="queue timeout"):
            h.result()
        ev = list(h)[-1]
        assert ev.finish_reason == "error" and ev.token_id == -1


def test_async_iteration_and_cancel(engine):
    """The steps are driven here and hold after the third token until the reader has
    cancelled: with the engine's own loop, a loaded machine let it produce all 30 tokens
    before the reader woke (the test then saw `length`, not `cancelled`)."""
    h = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))
    cancelled = threading.Event()

    def drive() -> None:
        while not h.done:
            if len(h.events()) >= 3 and not cancelled.wait(30):
                return  # (the reader never cancelled: the assertions below say so)
            engine.step()

    driver = threading.Thread(target=drive)
    driver.start()

    async def main():
        got = []
        async for ev in h.aiter():
            got.append(ev)
            if len(got) == 3:
                h.cancel()
                cancelled.set()
        return got

    got = asyncio.run(main())
    driver.join(30)
    assert [ev.finish_reason for ev in got] == [None, None, None, "cancelled"]
    res = h.result(timeout=0)
    assert res.finish_reason == "cancelled" and len(res.token_ids) == 3
    assert engine.runner.cache.referenced == 0 and engine.stats().running == 0


def test_wait_done_wakes_the_loop_once_at_the_end():
    """A caller that wants only the end (a non-streaming response) is not woken per token."""
    from camex_runtime.engine.outputs import GenerationResult, RequestTimings, TokenEvent
    from camex_runtime.engine.request import RequestHandle

    h = RequestHandle("r", [1, 2], cancel=lambda rid: None)
    events = [TokenEvent(token_id=t, text="x", logprob=0.0, index=i, at=float(i))
              for i, t in enumerate((7, 8, 9))]

    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
        waiting = asyncio.ensure_future(h.wait_done())
        await asyncio.sleep(0)  # registered
        def publish(evs, res):  # from another thread, as the engine does
            t = threading.Thread(target=h._publish, args=(evs, res))
            t.start()
            t.join()

        for ev in events[:2]:
            publish([ev], None)
        await asyncio.sleep(0.05)
        assert not waiting.done() and not wakes
        result = GenerationResult(request_id="r", prompt_token_ids=[1, 2], token_ids=[7, 8, 9],
                                  text="xxx", finish_reason="length", logprobs=[0.0] * 3,
                                  routing=None, timings=RequestTimings(queued_at=0.0))
        publish([events[2]], result)
        await asyncio.wait_for(waiting, 5)
        return wakes

    wakes = asyncio.run(main())
    assert len(wakes) == 1
    assert h.events() == events and [e.at for e in h.events()] == [0.0, 1.0, 2.0]


def test_events_are_stamped_when_produced(engine):
    engine.start()
    h = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos=True))
    res = h.result(timeout=60)
    stamps = [ev.at for ev in h.events()]
    assert len(stamps) == 6 and stamps == sorted(stamps)
    assert res.timings.first_token_at <= stamps[0] <= stamps[-1] <= res.timings.finished_at


def test_generate_is_thread_safe_and_batches(engine):
    engine.start()
    want = engine.generate([9, 8, 7], max_new_tokens=8, ignore_eos=True).token_ids
    results = [None] * 4  # max_waiting=4: all of them fit the queue at once

    def worker(i):
        results[i] = engine.generate([9, 8, 7], max_new_tokens=8, ignore_eos=True).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [want] * 4
    s = engine.stats()
    assert s.alive and s.running == 0 and s.steps > 0 and s.max_batch_size == 2


def test_stop_finishes_in_flight_then_refuses(engine):
    engine.start()
    h = engine.submit([1, 2], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.stop(grace_s=10)
    assert h.result().finish_reason == "length"
    with pytest.raises(EngineStoppedError):
        engine.submit([1, 2])
    assert not engine.stats().alive


def test_stop_after_grace_cancels(path):
    e = Engine.from_pretrained(path, max_batch_size=1, max_total_tokens=90)
    h = e.submit([1, 2], SamplingParams(max_new_tokens=80, ignore_eos=True))
    waiting = e.submit([3], SamplingParams(max_new_tokens=80, ignore_eos=True))
    e.step()
    e.stop(grace_s=0)  # no loop thread: stop cancels everything itself
    assert h.result().finish_reason == "cancelled"
    assert waiting.result().finish_reason == "cancelled"


# Run as a script that never calls stop(): an atexit handler registered before the engine
# module (so it runs after the engine's own, atexit being last-in first-out) reports what is
# left when the interpreter starts tearing down.
FORGOTTEN_ENGINE = """
import atexit, sys, threading

@atexit.register
def report():
    alive = [t.name for t in threading.enumerate() if t.name == "camex-engine"]
    print("loops alive at teardown:", alive, "| in flight:", handle.result().finish_reason)

from camex_runtime import Engine, SamplingParams
engine = Engine.from_pretrained(sys.argv[1], max_batch_size=1, max_total_tokens=90)
print(engine.generate([1, 2], max_new_tokens=3, ignore_eos=True).finish_reason)
handle = engine.submit([1, 2], SamplingParams(max_new_tokens=80, ignore_eos=True))
next(iter(handle))  # decoding when the script ends
"""


def test_a_forgotten_engine_ends_its_loop_before_interpreter_teardown(path):
    """Python ends daemon threads at exit from under whatever they run; with the engine's loop
    still alive there, GPT-2-small scripts were aborted ("terminate called without an active
    exception", status 134) in ~15 % of exits. The loop ends first, cancelling what is left."""
    out = subprocess.run([sys.executable, "-c", FORGOTTEN_ENGINE, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "length", "loops alive at teardown: [] | in flight: cancelled"], out.stdout


def test_routing_trace_matches_reference_scores(path):
    e = Engine.from_pretrained(path, max_batch_size=1)
    ref = reference(path)
    for mode in ("segment", "prompt"):
        h = e.submit([4, 5, 6, 7, 8, 9], SamplingParams(max_new_tokens=7, ignore_eos=True,
                                                        return_routing=True, routing=mode))
        while not h.done:
            e.step()
        res = h.result()
        tr = res.routing
        ids = torch.tensor([res.prompt_token_ids + res.token_ids])
        with torch.no_grad():
            out = ref(ids, routing=mode, route1_len=4, prompt_len=6)
        assert tr["mode"] == mode and [layer["layer"] for layer in tr["layers"]] == [0, 1]
        for layer in tr["layers"]:
            want = out.router_scores[layer["layer"]][0]  # (K, E)
            segs = layer["segments"]
            if mode == "segment":
                # 13 tokens, the last one sampled but never fed back: no decision at 12
                assert [(s["start"], s["end"]) for s in segs] == [(0, 4), (4, 8), (8, 12)]
            else:
                assert [(s["start"], s["end"]) for s in segs] == [(0, 12)]
            torch.testing.assert_close(torch.tensor([s["scores"] for s in segs]),
                                       want[:len(segs)], atol=1e-5, rtol=0)


class Recorder:
    def __init__(self):
        self.calls = {"on_step": 0, "on_merge": 0, "on_route": 0, "on_evict": 0}

    def __getattr__(self, name):
        if name.startswith("on_"):
            def hook(*args):
                self.calls[name] += 1
            return hook
        raise AttributeError(name)


def test_observer_and_stats(path):
    rec = Recorder()
    e = Engine.from_pretrained(path, max_batch_size=2, strategy="merged", observer=rec,
                               merge_cache_bytes=0)
    e.start()
    try:
        e.generate([1, 2, 3, 4, 5], max_new_tokens=6, ignore_eos=True)
    finally:
        e.stop()
    assert rec.calls["on_step"] == 6 and rec.calls["on_route"] == 2 * 3  # 2 layers x 3 segments
    s = e.stats()
    assert s.router_counts == [3, 3] and len(s.router_scores[0]) == 3
    assert abs(sum(s.router_scores[0]) - 3.0) < 1e-5  # each decision's scores sum to 1
    assert s.cache.fallbacks > 0 and s.cache.bytes_budget == 0


def test_warmup_runs_every_path(path):
    e = Engine.from_pretrained(path, max_batch_size=2)
    assert e.runner._cost is None  # measured lazily, unless warm-up does it
    runs = []
    generate = e.generate

    def recorded(prompt, **params):
        runs.append((e.runner.strategy, params["routing"], len(prompt)))
        return generate(prompt, **params)

    e.generate = recorded
    e.warmup()
    try:
        s = e.stats()
        assert s.alive and s.cache.merges > 0 and s.running == 0
        assert e.runner.strategy == "auto"
        assert e.runner._cost is not None  # the first request does not pay for the probes
        seg, short = e.config.segment_len, min(WARM_SHORT, e.config.segment_len + 1)
        # both strategies in both routing modes; the merged prompts cross a segment boundary,
        # the mixture's (every expert on every token) stay short
        assert runs == [("merged", "segment", seg + 1), ("merged", "prompt", seg + 1),
                        ("mixture", "segment", short), ("mixture", "prompt", short)]
    finally:
        e.stop()


def test_warmup_moves_the_startup_heap_out_of_the_collectors_reach(path):
    """A full collection walks every tracked object (150 ms with a GPT-2-small engine loaded);
    after warm-up it should only walk what requests allocate."""
    gc.unfreeze()
    e = Engine.from_pretrained(path, max_batch_size=2)
    try:
        e.warmup(freeze_gc=False)
        assert gc.get_freeze_count() == 0
        e.warmup()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        assert not any(obj is e.__dict__ for obj in gc.get_objects())  # frozen: not scanned
        assert e.generate([1, 2, 3], max_new_tokens=2).token_ids  # and still serves
    finally:
        e.stop()


@pytest.mark.parametrize("precision", ["chosen", "pure"])
def test_bfloat16_engine_runs_and_agrees_roughly(path, precision, monkeypatch):
    """dtype is honoured end to end: the weights are bf16; activations and the KV cache are
    fp32 where the native CPU kernels run, else bf16 (CAMEX_PRECISION=pure forces bf16, as on
    a GPU; engine/precision.py)."""
    if precision == "pure":
        monkeypatch.setenv("CAMEX_PRECISION", "pure")
    e = Engine.from_pretrained(path, dtype=torch.bfloat16, max_batch_size=2)
    assert e.runner.precision.weights == torch.bfloat16
    assert e.runner.kv.k.dtype == e.runner.dtype == e.runner.precision.compute
    if precision == "pure":
        assert e.runner.dtype == torch.bfloat16
    e.start()
    try:
        res = e.generate([1, 2, 3, 4, 5, 6], max_new_tokens=5, ignore_eos=True)
    finally:
        e.stop()
    assert len(res.token_ids) == 5 and all(lp <= 0 for lp in res.logprobs)


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("clf") / "clf", kind="classifier")


@pytest.mark.parametrize("strategy", ["merged", "mixture", "auto"])
def test_classify_matches_reference_with_padding(clf_path, strategy):
    e = Engine.from_pretrained(clf_path, strategy=strategy, max_input_tokens=10,
                               max_total_tokens=11)
    assert e.kind == "classifier"
    texts = [[1, 2, 3], list(range(5, 15)), [7], [8, 9, 10, 11, 12]]
    got = e.classify(texts)
    ref = reference(clf_path)
    for ids, res in zip(texts, got):
        with torch.no_grad():
            probs = torch.softmax(ref(torch.tensor([ids])).logits[0], -1)  # alone, unpadded
        labels = ["a", "b", "c"]
        want = sorted(zip(labels, probs.tolist()), key=lambda p: -p[1])
        assert [label for label, _ in res.scores] == [label for label, _ in want]
        torch.testing.assert_close(torch.tensor([s for _, s in res.scores]),
                                   torch.tensor([s for _, s in want]), atol=1e-5, rtol=0)
        assert res.num_tokens == len(ids)
    with pytest.raises(InputValidationError, match="11 tokens; max_input_tokens is 10"):
        e.classify([list(range(11))])
    assert e.classify([list(range(11))], truncate=True)[0].num_tokens == 10
    raw = e.classify([[1, 2, 3]], raw_scores=True)[0]
    with torch.no_grad():
        logits = ref(torch.tensor([[1, 2, 3]])).logits[0]
    assert max(s for _, s in raw.scores) == pytest.approx(float(logits.max()), abs=1e-5)
    with pytest.raises(InputValidationError):
        e.submit([1, 2])


def test_classify_score_function_overrides_the_problem_type(clf_path):
    """`function` scores the same logits with softmax, sigmoid or nothing (the HTTP layer's
    `function_to_apply`): softmax is the single-label default, bit for bit."""
    e = Engine.from_pretrained(clf_path)
    texts = [[1, 2, 3], [4, 5, 6, 7]]
    logits = [dict(r.scores) for r in e.classify(texts, raw_scores=True)]
    assert [r.scores for r in e.classify(texts, function="softmax")] == \
        [r.scores for r in e.classify(texts)]
    assert [dict(r.scores) for r in e.classify(texts, function="none")] == logits
    for got, raw in zip(e.classify(texts, function="sigmoid"), logits):
        labels = list(raw)
        want = torch.sigmoid(torch.tensor([raw[k] for k in labels])).tolist()
        assert dict(got.scores) == pytest.approx(dict(zip(labels, want)), abs=1e-6)
        assert [s for _, s in got.scores] == sorted((s for _, s in got.scores), reverse=True)
    with pytest.raises(InputValidationError, match="function must be one of softmax, sigmoid"):
        e.classify(texts, function="tanh")


def test_classify_mixture_in_token_chunks(clf_path, monkeypatch):
    import camex_runtime.engine.classify as classify_mod
    e = Engine.from_pretrained(clf_path, strategy="mixture")
    texts = [[1, 2, 3], list(range(5, 15)), [7]]
    want = e.classify(texts)
    monkeypatch.setattr(classify_mod, "MIXTURE_CHUNK", 4)  # chunks cut through sequences
    got = e.classify(texts)
    for a, b in zip(want, got):
        assert [label for label, _ in a.scores] == [label for label, _ in b.scores]
        torch.testing.assert_close(torch.tensor([s for _, s in a.scores]),
                                   torch.tensor([s for _, s in b.scores]), atol=1e-6, rtol=0)
