"""Set-up work runs in a thread that ends with it, so that the thread that decodes is the only one
with a pool of torch worker threads (engine/compute_threads.py says why that matters)."""
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from camex_runtime import Engine
from camex_runtime.engine import engine as engine_module
from camex_runtime.engine.compute_threads import in_passing_thread

ROOT = Path(__file__).resolve().parents[2]


def test_in_passing_thread_returns_the_value_and_raises_the_error_of_another_thread():
    caller = threading.current_thread()
    ran = []

    def work(a, b=0):
        ran.append(threading.current_thread())
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    assert ran[0] is not caller and not ran[0].is_alive()

    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(fail)


def test_torch_worker_threads_end_with_the_thread_that_started_them():
    """The mechanism itself, in a fresh process: a parallel torch operation on the main thread
    leaves its worker threads behind; the same operation in a passing thread does not."""
    script = textwrap.dedent("""
        import os, time, torch
        from camex_runtime.engine.compute_threads import in_passing_thread
        torch.set_num_threads(2)
        def count():
            return len(os.listdir("/proc/self/task"))
        def settled():  # threads leave /proc a moment after they end: wait up to 10 s
            deadline = time.monotonic() + 10.0
            while count() > before and time.monotonic() < deadline:
                time.sleep(0.01)
            return count()
        def work():
            return float(torch.ones(1 << 22).mul(2).sum())  # well past torch's grain size
        before = count()
        assert in_passing_thread(work) == 2.0 * (1 << 22)
        after_passing = settled()
        work()
        after_main = settled()
        print(before, after_passing, after_main)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    before, after_passing, after_main = map(int, out)
    assert after_passing == before
    assert after_main > before  # the control: this operation does start a pool


def test_loading_and_warming_up_run_in_passing_threads(tiny_lm_dir, monkeypatch):
    caller = threading.current_thread()
    seen = {}
    load, warm = Engine._load.__func__, Engine._warmup

    def spy_load(cls, *args):
        seen["load"] = threading.current_thread()
        return load(cls, *args)

    def spy_warm(self, *args):
        seen["warmup"] = threading.current_thread()
        return warm(self, *args)

    monkeypatch.setattr(engine_module.Engine, "_load", classmethod(spy_load))
    monkeypatch.setattr(engine_module.Engine, "_warmup", spy_warm)
    engine = Engine.from_pretrained(tiny_lm_dir, max_batch_size=2)
    try:
        engine.warmup(freeze_gc=False)
        assert len(engine.generate("hello", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        engine.stop(grace_s=0)
    for name in ("load", "warmup"):
        assert seen[name] is not caller and not seen[name].is_alive(), name
