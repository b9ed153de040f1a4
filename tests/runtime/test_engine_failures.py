"""Failures inside the engine stay contained: a failed prefill frees its merge-cache
references, a raising observer fails no request, a failing finish does not kill the loop
thread, and `stop()` leaves no handle waiting forever."""
from __future__ import annotations

import threading
import time

import pytest

import camex_runtime.engine.runner as runner_mod
from camex_runtime import Engine, SamplingParams, kernels
from camex_runtime.engine.moe import MoEWeights
from camex_runtime.errors import RequestFailedError
from engine_models import build_folded

PARAMS = dict(max_new_tokens=5, ignore_eos=True)
ENTRY_BYTES = 4 * (2 * 32 * 64 + 64 + 32)  # one merged FFN of build_folded's shape, fp32


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("failures") / "lm")


def run_to_end(engine, handle, max_steps=100):
    for _ in range(max_steps):
        if handle.done:
            return
        engine.step()
    raise AssertionError("request did not finish")


def refcounts(engine):
    return [e.refcount for e in engine.runner.cache._entries.values()]


# 10 tokens, T=4: three segments per MoE layer, whose three merges are built in one pass over
# the layer's expert stack (merge_many_into); then apply calls 1-2 are the earlier segments
# (released after use) and call 3 the kept segment (recorded for the decode steps). A 3-token
# prompt has one segment, whose merge is applied in the same pass (MoEWeights.merge_apply,
# where the kernels take it). Any of them may fail.
@pytest.mark.parametrize("where,failing_call", [("merge_many_into", 1), ("apply_merged", 1),
                                                ("apply_merged", 2), ("apply_merged", 3),
                                                ("merge_apply", 1)])
def test_failed_prefill_releases_merge_cache_references(path, monkeypatch, failing_call, where):
    e = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    calls = {"n": 0}
    real = {"apply_merged": runner_mod.apply_merged, "merge_apply": MoEWeights.merge_apply,
            "merge_many_into": MoEWeights.merge_many_into}[where]

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("simulated out of memory")
        return real(*args)

    if where == "apply_merged":
        monkeypatch.setattr(runner_mod, "apply_merged", failing)
    elif where == "merge_many_into":
        monkeypatch.setattr(MoEWeights, "merge_many_into", failing)
    else:
        if kernels.native() is None:
            pytest.skip(f"no native kernels here: {kernels.status()}")
        monkeypatch.setattr(MoEWeights, "merge_apply", failing)
    prompt = list(range(1, 4 if where == "merge_apply" else 11))
    h = e.submit(prompt, SamplingParams(**PARAMS))
    run_to_end(e, h)
    with pytest.raises(RequestFailedError, match="simulated out of memory"):
        h.result(timeout=0)
    assert calls["n"] >= failing_call  # the failure happened where it was meant to
    assert e.runner.cache.referenced == 0 and set(refcounts(e)) <= {0}
    assert e.runner.slots == [None, None] and e.stats().running == 0

    ok = e.submit(prompt, SamplingParams(**PARAMS))
    run_to_end(e, ok)
    assert ok.result(timeout=0).finish_reason == "length"
    assert e.runner.cache.referenced == 0


class Raising:
    """An observer whose every hook raises (a broken metrics exporter)."""

    def __init__(self, hooks):
        self.hooks, self.calls = hooks, dict.fromkeys(hooks, 0)

    def __getattr__(self, name):
        if name not in self.hooks:
            raise AttributeError(name)

        def hook(*args):
            self.calls[name] += 1
            raise RuntimeError(f"observer {name} is broken")
        return hook


@pytest.mark.parametrize("hooks", [("on_step",), ("on_route",), ("on_merge",),
                                   ("on_step", "on_merge", "on_route", "on_evict")])
def test_raising_observer_fails_no_request(path, hooks):
    plain = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    want = plain.generate([1, 2, 3, 4, 5], **PARAMS).token_ids
    plain.stop(grace_s=0)

    obs = Raising(hooks)
    small = 2 * ENTRY_BYTES if "on_evict" in hooks else None  # small enough to evict
    e = Engine.from_pretrained(path, max_batch_size=2, strategy="merged", observer=obs,
                               merge_cache_bytes=small)
    e.start()
    try:
        for _ in range(2):
            res = e.submit([1, 2, 3, 4, 5], SamplingParams(**PARAMS)).result(timeout=30)
            assert res.finish_reason == "length" and res.token_ids == want
        assert e.stats().alive
        assert e.runner.cache.referenced == 0
    finally:
        e.stop(grace_s=0)
    assert all(obs.calls[h] > 0 for h in hooks)


def test_failing_finish_does_not_kill_the_loop(path, monkeypatch):
    e = Engine.from_pretrained(path, max_batch_size=2)
    real_decode, real_release = e.runner.decode, e.runner.release
    fail = {"decode": 1, "release": 0}

    def decode(*args, **kw):
        if fail["decode"]:  # the step fails, then so does failing its first request
            fail["decode"], fail["release"] = 0, 1
            raise RuntimeError("simulated step bug")
        return real_decode(*args, **kw)

    def release(slot, tokens=None):
        if fail["release"]:
            fail["release"] -= 1
            raise RuntimeError("simulated release bug")
        return real_release(slot, tokens)

    monkeypatch.setattr(e.runner, "decode", decode)
    monkeypatch.setattr(e.runner, "release", release)
    hs = [e.submit([1, 2, 3], SamplingParams(**PARAMS)) for _ in range(2)]
    e.start()
    try:
        for h in hs:  # both fail (the one whose finish raised too) and nobody hangs
            with pytest.raises(RequestFailedError, match="internal error"):
                h.result(timeout=10)
        assert e.stats().alive and e.stats().running == 0
        res = e.submit([1, 2, 3], SamplingParams(**PARAMS)).result(timeout=30)
        assert res.finish_reason == "length"
        assert e.runner.cache.referenced == 0
    finally:
        e.stop(grace_s=0)


def test_stop_cancels_what_a_slow_step_left(path, monkeypatch):
    """The loop is stuck in one step past stop()'s waits: the requests left running and
    waiting are cancelled when the loop exits instead of blocking their callers forever."""
    e = Engine.from_pretrained(path, max_batch_size=1, max_total_tokens=90)
    real_decode, decoding = e.runner.decode, threading.Event()

    def slow_decode(*args, **kw):  # one step outlasts stop()'s grace and wait
        decoding.set()
        deadline = time.monotonic() + 30
        while not e._shutdown and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_decode(*args, **kw)

    monkeypatch.setattr(e.runner, "decode", slow_decode)
    running = e.submit([1, 2], SamplingParams(max_new_tokens=80, ignore_eos=True))
    waiting = e.submit([3], SamplingParams(max_new_tokens=80, ignore_eos=True))
    e.start()
    assert decoding.wait(20)  # `running` decodes, `waiting` waits for its slot
    stopper = threading.Thread(target=e.stop, kwargs={"grace_s": 0})
    stopper.start()
    try:
        assert running.result(timeout=20).finish_reason == "cancelled"
        assert waiting.result(timeout=5).finish_reason == "cancelled"
    finally:
        stopper.join(20)
    assert not stopper.is_alive() and not e.stats().alive
    assert e.stats().running == e.stats().waiting == 0
    assert e.runner.cache.referenced == 0
