"""The benchmarks' child servers are never left running by an interrupted start: a signal that
arrives while a child is being started waits until its handle is held (`signals_held`), and a
server interrupted while it becomes ready is ended (`ServerProcess`)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import serving  # noqa: E402


class Stop(Exception):
    pass


def raising(signum, frame):
    raise Stop(signum)


def test_a_held_signal_reaches_its_handler_when_the_block_ends():
    """SIGTERM raised inside the block runs no handler there; its own handler runs (and
    raises) as the block ends, and is the signal's handler again afterwards."""
    previous = signal.signal(signal.SIGTERM, raising)
    reached = []
    try:
        with pytest.raises(Stop):
            with serving.signals_held():
                signal.raise_signal(signal.SIGTERM)
                reached.append("after the signal")
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGTERM) is raising
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_block_without_signals_leaves_the_handlers_as_they_were():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with serving.signals_held():
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_server_interrupted_while_it_starts_is_ended(tmp_path, monkeypatch):
    """Ctrl-C while the benchmark waits for the server's readiness: the server process is
    ended before the interrupt goes on (before, `__exit__` never ran and it kept running)."""
    started = []
    real = serving.subprocess.Popen

    def popen(*a, **k):
        started.append(real(*a, **k))
        return started[-1]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(serving.subprocess, "Popen", popen)
    monkeypatch.setattr(serving.httpx, "get", interrupted)
    never_ready = [sys.executable, "-c", "import time; time.sleep(120)"]
    with pytest.raises(KeyboardInterrupt):
        with serving.ServerProcess(never_ready, serving.free_port(), tmp_path / "server.log",
                                   startup_timeout_s=60):
            pass
    [proc] = started
    assert proc.poll() == -signal.SIGTERM
