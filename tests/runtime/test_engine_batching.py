"""Contract 3: continuous batching (staggered arrivals, different lengths, modes and
parameters) gives each request exactly the tokens it gets when decoded alone."""
from __future__ import annotations

import time

import pytest

from camex_runtime import Engine, SamplingParams
from engine_models import build_folded

REQUESTS = [  # (arrival step, prompt, params)
    (0, [3, 4, 5, 6, 7, 8, 9], SamplingParams(max_new_tokens=14, ignore_eos=True)),
    (0, [1], SamplingParams(max_new_tokens=6, ignore_eos=True, routing="prompt")),
    (2, [10, 11, 12], SamplingParams(max_new_tokens=11, ignore_eos=True,
                                     repetition_penalty=1.3)),
    (3, list(range(20, 33)), SamplingParams(max_new_tokens=5, do_sample=True, seed=7,
                                            top_k=8, temperature=0.9, ignore_eos=True)),
    (5, [3, 4, 5, 6, 7, 8, 9], SamplingParams(max_new_tokens=9, ignore_eos=True)),  # shares
    (9, [42, 43], SamplingParams(max_new_tokens=12, ignore_eos=True, routing="prompt")),
]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("batch") / "lm")


def run_alone(path, strategy):
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy=strategy)
    engine.start()
    try:
        return [engine.submit(p, sp).result().token_ids for _, p, sp in REQUESTS]
    finally:
        engine.stop()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("strategy", ["merged", "mixture", "auto"])
def test_staggered_batch_equals_alone(path, strategy, native, monkeypatch):
    """Also with torch's kernels only: the path CUDA and CPUs without the extension take."""
    if not native:
        from camex_runtime import kernels
        monkeypatch.setattr(kernels, "native", lambda: None)
    alone = run_alone(path, strategy)
    engine = Engine.from_pretrained(path, max_batch_size=3, strategy=strategy)
    handles, step = {}, 0
    while len(handles) < len(REQUESTS) or not all(h.done for h in handles.values()):
        for i, (arrival, prompt, sp) in enumerate(REQUESTS):
            if arrival == step:
                handles[i] = engine.submit(prompt, sp)
        engine.step()
        step += 1
        assert engine.scheduler.num_running <= 3
    for i in range(len(REQUESTS)):
        assert handles[i].result().token_ids == alone[i], f"request {i}"
    assert engine.runner.cache.referenced == 0
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


def test_batch_on_noncontiguous_slots(path):
    """Slots freed out of order force the gathered (non-view) KV read path."""
    engine = Engine.from_pretrained(path, max_batch_size=3, strategy="merged")
    sp = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)  # noqa: E731
    a = engine.submit([1, 2, 3], sp(2))
    b = engine.submit([4, 5, 6, 7, 8], sp(12))
    c = engine.submit([9, 10], sp(12))
    while not a.done:
        engine.step()
    assert [engine.runner.slots[s] is not None for s in range(3)] == [False, True, True]
    d = engine.submit([11, 12, 13, 14], sp(3))  # takes slot 0 again; then b, c continue
    while not (b.done and c.done and d.done):
        engine.step()
    alone = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    alone.start()
    try:
        for h, (p, n) in ((b, ([4, 5, 6, 7, 8], 12)), (c, ([9, 10], 12)),
                          (d, ([11, 12, 13, 14], 3))):
            assert h.result().token_ids == alone.submit(p, sp(n)).result().token_ids
    finally:
        alone.stop()



@pytest.mark.parametrize("gather", [True, False], ids=["gathering", "not-gathering"])
def test_an_idle_engine_gathers_a_burst_into_one_prefill_step(path, gather):
    """Woken from idle, an engine with merged-expert layers waits while requests keep coming
    (GATHER_QUIET_S between two, at most GATHER_MAX_S): a burst's first tokens come from one
    step. Without it the first request starts at once and the second joins a later step."""
    engine = Engine.from_pretrained(path, max_batch_size=3)
    assert engine.gather_s[0] > 0  # the default for a model with merged experts
    engine.gather_s = (1.0, 5.0) if gather else (0.0, 0.0)  # wide: 0.2 s between submissions
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        first = engine.submit([3, 4, 5], params)
        time.sleep(0.2)  # many steps of this model: not gathering, the first has started
        second = engine.submit([6, 7, 8], params)
        assert len(first.result().token_ids) == len(second.result().token_ids) == 3
    finally:
        engine.stop()
    assert (first.events()[0].at == second.events()[0].at) == gather


def test_gathering_is_bounded_and_dense_engines_do_not_gather(path, tmp_path):
    """A lone request waits GATHER_QUIET_S at most (here the bound, 0.2 s, comes first); a model
    without merged experts starts at once."""
    engine = Engine.from_pretrained(path, max_batch_size=3)
    engine.gather_s = (10.0, 0.2)
    engine.start()
    try:
        t0 = time.monotonic()
        first = engine.submit([3, 4, 5], SamplingParams(max_new_tokens=2, ignore_eos=True))
        first.result()
    finally:
        engine.stop()
    assert first.events()[0].at - t0 >= 0.2  # the bound, not the 10 s quiet time
    dense = Engine.from_pretrained(build_folded(tmp_path / "dense", num_experts=0))
    assert dense.gather_s == (0.0, 0.0)
