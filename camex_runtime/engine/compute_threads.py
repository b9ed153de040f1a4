"""Where torch's parallel work runs, and why set-up work runs in a thread of its own.

torch's CPU operations and the native kernels split their work with OpenMP (libgomp in the
Linux wheels). Every thread that starts a parallel region gets a pool of worker threads of its
own, and the pool lives as long as that thread. libgomp counts every worker of every pool, and
while there are more of them than CPUs, a thread waiting at the end of a parallel region spins
only ~1,000 times before it sleeps in the kernel (instead of ~300,000): each of the step's ~50
products then ends in a sleep and a wake-up. Loading a model on the main thread and decoding
on the engine's loop thread leaves exactly that: two pools on two cores. Measured on a 2-core
Zen 3 VM, GPT-2-small's one-row fp32 products at two threads took 17-21 ms from the thread
that had the only pool and 24-40 ms from a second thread while the first one's pool lived
(the engine's B=1 step 18 ms against 24-41 ms).

So the engine's set-up (loading, building, warming up) runs in `in_passing_thread`: a thread
that ends when the work does, and with it its pool. The thread that decodes is then the only
one with a pool of its own, as long as nothing else in the process runs parallel torch work on
a long-lived thread (a caller that builds its own model on its main thread keeps that pool: it
can build it in `in_passing_thread` too).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args, name: str = "camex-setup", **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends with it; returns its value or raises its
    exception (with its traceback). The calling thread waits: this changes where the work runs,
    not when."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller, raised there
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box.pop("error")
    return box["value"]
