"""Start the text-generation engine's process first, so that its start-up overlaps this one's.

When the engine runs in a process of its own (`--engine-process`, on by default where the
engine's threads leave a core free), both processes spend their first seconds importing torch,
transformers and our packages (~7 s each on a 2-core Xeon) before the engine process loads and
warms the model. Started one after the other (this process imports the app, then its loader
thread spawns the engine) those imports add up. So `camex-server` calls `launch` as soon as
its settings passed their checks, with only the standard library loaded: the engine process
imports and loads while this process imports the app, and the loader adopts it
(`EngineProcess(..., launched=...)`), after checking that it was started with exactly the
arguments the loader would have used. A launched process nobody adopted is killed at exit.

Without `--model` the server serves the demo checkpoints, built on first use (the container
image ships them built): the demo LM is launched when its build stamp is there, and the loader
adopts it only if that stamp is unchanged once `ensure_demo_models` has checked (and, when
stale, rebuilt) the demo.

Standard library only, here and in what this imports: one heavy import would put the two
start-ups back in series (tests/server/test_engine_launch.py checks).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from server.logs import configure_engine_process_logging
from server.settings import DTYPES, ServerSettings, cpu_threads, engine_in_process_of_its_own


# camex_runtime.training.demo's names, repeated so that this module stays light (a test keeps
# them in step): the demo LM's directory under the demo root, and its build stamp beside it
DEMO_LM = "demo-lm"


def demo_lm_dir(settings: ServerSettings) -> Path:
    root = settings.demo_dir or os.environ.get("CAMEX_DEMO_DIR") \
        or Path.home() / ".cache" / "camex-serve" / "demo"
    return Path(root) / DEMO_LM


def demo_stamp(lm_dir: Path) -> bytes | None:
    try:
        return (lm_dir.parent / f"{DEMO_LM}.stamp.json").read_bytes()
    except OSError:
        return None


def engine_limits(settings: ServerSettings) -> dict:
    """The engine keyword arguments the settings give (both engine kinds)."""
    limits = {k: getattr(settings, k) for k in ("max_input_tokens", "max_total_tokens")
              if getattr(settings, k) is not None}
    limits.update(
        max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting,
        merge_cache_bytes=settings.merge_cache_bytes, strategy=settings.strategy,
        expert_deltas=settings.expert_deltas, routing=settings.routing,
        prefix_caching=settings.prefix_caching, prefix_cache_slots=settings.prefix_cache_slots,
        max_batched_tokens=settings.max_batched_tokens or None,
        prefill_time_ratio=settings.prefill_time_ratio or None,
        waiting_served_ratio=settings.waiting_served_ratio or None)
    return limits


def process_args(path: str, settings: ServerSettings) -> tuple:
    """What the engine process is started with, after its pipe end (see
    camex_runtime.engine.process): path, device, dtype name, threads, log set-up, limits."""
    dtype = None if settings.dtype is None else DTYPES[settings.dtype]
    return (str(path), settings.device, dtype, cpu_threads(settings),
            (configure_engine_process_logging, (settings.log_level,)), engine_limits(settings))


@dataclass(eq=False)
class LaunchedEngine:
    """An engine process started with `args`, not yet adopted by an `EngineProcess`."""

    args: tuple
    process: multiprocessing.Process
    conn: Connection
    demo_stamp: bytes | None = None  # the demo LM's build stamp when it was launched
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _taken: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def current(self) -> bool:
        """False when it loaded a demo checkpoint that has been rebuilt since."""
        return self.demo_stamp is None or demo_stamp(Path(self.args[0])) == self.demo_stamp

    def adopt(self) -> tuple[multiprocessing.Process, Connection]:
        """The process and this end of its pipe, handed over once."""
        with self._lock:
            if self._taken:
                raise RuntimeError("this engine process was already adopted or discarded")
            self._taken = True
        return self.process, self.conn

    def discard(self) -> None:
        """Kill the process unless it was adopted (it ignores SIGTERM, see `_entry`)."""
        with self._lock:
            if self._taken:
                return
            self._taken = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


def launch(settings: ServerSettings) -> LaunchedEngine | None:
    """Start the engine process for the text-generation model (`settings.model`, else the
    built demo LM) if the server will run it in a process of its own; None otherwise (an
    in-process engine, a classifier only, a demo not built yet)."""
    if not engine_in_process_of_its_own(settings):
        return None
    path, stamp = settings.model, None
    if not path and not settings.classifier:  # the demo (see the module docstring)
        lm_dir = demo_lm_dir(settings)
        stamp = demo_stamp(lm_dir)
        if stamp is None or not (lm_dir / "config.json").is_file():
            return None  # to be built first
        path = str(lm_dir)
    if not path:
        return None
    args = process_args(path, settings)
    ctx = multiprocessing.get_context("spawn")  # fork after torch's threads is unsafe
    conn, child = ctx.Pipe()
    process = ctx.Process(target=_entry, name="camex-engine", daemon=True, args=(child, *args))
    process.start()
    child.close()
    launched = LaunchedEngine(args, process, conn, demo_stamp=stamp)
    # registered after multiprocessing's own exit handler, so it runs first: that one would
    # SIGTERM the process, which ignores it, and then wait for it forever
    atexit.register(launched.discard)
    return launched


def _entry(conn: Connection, *args) -> None:
    """The engine process's start (spawn imports this light module first, then the engine).
    Ctrl-C and SIGTERM are the API process's to handle from the start, imports included: it
    ends this process (`discard`, or its drain once adopted)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from camex_runtime.engine.process import run_engine_process

    run_engine_process(conn, *args)
