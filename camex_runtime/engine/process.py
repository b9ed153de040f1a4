"""An engine in its own process, behind the `Engine` interface the server uses.

Why: in one process the HTTP event loop and the engine's step loop share one GIL. Every torch
op releases it and must take it back, so each token the event loop turns into an SSE frame
(~160 µs of Python: uvicorn's send, pydantic, the wake-up) is time the step waits for. With
one compute thread that cost the dense GPT-2-small model 4-6 % of its decode rate over HTTP
(bf16, one thread, 8 streams: ~1.3 ms of every ~50 ms step). vLLM V1 splits its API server and
its engine core into processes for the same reason; so does this.

    API process (EngineProcess)                  engine process (run_engine_process)
      submit: validate, tokenize  ── call ──▶      Engine.submit (the id is the caller's)
      cancel                      ── cancel ─▶     Engine.cancel
      stats / warmup / stop       ── call ──▶      Engine.stats / warmup / stop
      RequestHandle._publish      ◀── step ──      every event, prompt logprobs and observer
      observer (metrics) replay                    call of one step, in one message

One message per engine step carries everything that step produced, so the API process wakes
once per step, not once per token. In the server the API process's event loop reads the pipe
itself (`loop=`): a step's message wakes the loop once and its tokens go out from there, with
no reader thread to wake first and no second hop into the loop (at B=1 the hop and the thread's
wake-up were ~0.2 ms of CPU per token, on a core the engine shares at two threads). Without a
loop (benchmarks, scripts) a reader thread reads it.

The pipe carries our own plain objects (ids, sampling parameters, events, results, stats)
between two processes of one server; weights never cross it (the engine process loads the
checkpoint itself, from safetensors).

If the engine process dies, every open request ends with an error, calls raise
`EngineStoppedError`, and `stats().alive` turns False (the server's /health reports it).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable, Sequence
from pathlib import Path

from camex_runtime.engine.engine import Engine, encode_prompt, new_request_id
from camex_runtime.engine.outputs import (EngineStats, GenerationResult, MergeCacheStats,
                                          RequestTimings, TokenEvent)
from camex_runtime.engine.request import RequestHandle, SamplingParams, check_token_ids
from camex_runtime.engine.runner import notify
from camex_runtime.errors import EngineStoppedError, InputValidationError

log = logging.getLogger("camex.engine")
CALL_TIMEOUT_S = 30.0  # submit / stats: a wedged engine process must not hang the caller
STOP_MARGIN_S = 20.0  # beyond the stop's grace: the step running then, the exit itself
_HOOKS = ("on_step", "on_merge", "on_route", "on_evict")
READ_BYTES = 1 << 18  # per read of the pipe: a step's message at B=8 is a few KiB
LOOP_CHECK_S = 0.2  # a call waiting on a loop-read reply checks this often that the loop runs


class Frames:
    """`multiprocessing.connection.Connection`'s framing, parsed from bytes as they arrive: a
    4-byte big-endian signed length (-1: an 8-byte unsigned length follows), then the pickled
    message. The engine process writes with `Connection.send`; this side reads the socket
    without blocking, so a message split over reads waits here for its rest."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes, in order (their pickled bytes)."""
        buf = self._buf
        buf += data
        out, at = [], 0
        while len(buf) - at >= 4:
            (n,), head = struct.unpack_from("!i", buf, at), 4
            if n == -1:
                if len(buf) - at < 12:
                    break
                (n,), head = struct.unpack_from("!Q", buf, at + 4), 12
            if len(buf) - at < head + n:
                break
            out.append(bytes(buf[at + head:at + head + n]))
            at += head + n
        if at:
            del buf[:at]
        return out

    @property
    def pending(self) -> int:
        """Bytes of a message not complete yet."""
        return len(self._buf)


class EngineProcess:
    """Loads a folded checkpoint in a new process and serves it through the `Engine` calls the
    server makes: `submit` (a `RequestHandle`, as in process), `start`, `warmup`, `stop`,
    `stats`, `info`, and `tokenizer` / `config` / `kind` / `name` / `eos_token_ids`.

    `observer` receives the engine's observer calls (`on_step`, ...) in this process, from the
    reader thread. `log_setup`: (function, args) the engine process calls first, so its log
    lines look like this process's. `threads`: its torch CPU threads. Raises what loading
    raised (e.g. CheckpointError), or EngineStoppedError if the process died while loading.

    `loop`: an asyncio event loop that reads the pipe (`add_reader`) instead of a thread; the
    server passes its own. Events then reach `RequestHandle`s on that loop directly. The calls
    that wait for a reply (`submit`, `stats`, `warmup`, `stop`) must then come from other
    threads (they raise RuntimeError on the loop itself), and if the loop stops first (the
    server is exiting) a thread takes over the reading.

    `launched`: an engine process started earlier (`server.engine_launch`, so that its imports
    overlap the caller's), with ``args`` (what `run_engine_process` got after its pipe end),
    ``adopt()`` -> (process, pipe end) and ``discard()``. It is adopted when its args are the
    ones this call would start a process with; otherwise it is discarded and a new one
    started."""

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype=None,
                 threads: int | None = None, observer=None,
                 log_setup: tuple[Callable, tuple] | None = None, launched=None,
                 loop: asyncio.AbstractEventLoop | None = None, **limits):
        dtype_name = None if dtype is None else str(dtype).replace("torch.", "")
        args = (str(path), device, dtype_name, threads, log_setup, limits)
        self.started_early = launched is not None and launched.args == args
        if self.started_early:
            self._proc, self._conn = launched.adopt()
        else:
            if launched is not None:
                log.warning("the engine process started early had other settings; starting "
                            "another", extra={"engine_pid": launched.pid})
                launched.discard()
            ctx = multiprocessing.get_context("spawn")  # fork after torch's threads is unsafe
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=run_engine_process, name="camex-engine",
                                     daemon=True, args=(child, *args))
            self._proc.start()
            child.close()
        self.pid = self._proc.pid
        _at_exit_stop(self)
        self.observer = observer
        self._lock = threading.Lock()  # _handles, _calls, _dead
        self._send_lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._ids = itertools.count()
        self._dead: str | None = None
        self._stopping = False
        self._last_stats: EngineStats | None = None
        meta = self._await_load()
        self.kind, self.name, self.config = meta["kind"], meta["name"], meta["config"]
        self.eos_token_ids = frozenset(meta["eos_token_ids"])
        self._info = meta["info"]
        self.tokenizer = None
        if meta["tokenizer_dir"] is not None:
            from transformers import AutoTokenizer
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
            except BaseException:
                self._proc.kill()  # nobody will ever talk to it
                self._proc.join(5.0)
                raise
        # a second descriptor of this end: reads with MSG_DONTWAIT never block the loop, while
        # the descriptor's own flags stay blocking for `_send` (one description, shared flags)
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._frames = Frames()
        self._read_lock = threading.Lock()  # one reader at a time; `_reading` changes under it
        self._exited = threading.Event()  # `_on_exit` finished
        self._loop = loop
        self._reading = "thread"
        if loop is not None:
            self._reading = "loop"
            try:
                loop.call_soon_threadsafe(self._watch)
            except RuntimeError:  # closed
                self._read_here_if_loop_gone()
        else:
            self._start_reader_thread()
        log.info("engine process loaded", extra={"engine_pid": self.pid, "kind": self.kind,
                                                 "started_early": self.started_early,
                                                 "read_by": self._reading})

    def _await_load(self) -> dict:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5.0)
            raise EngineStoppedError(f"the engine process exited while loading (exit code "
                                     f"{self._proc.exitcode}); see its log lines above") from None
        if msg[0] == "load_failed":
            self._proc.join(10.0)
            raise msg[1]
        return msg[1]

    @property
    def eos_token_id(self) -> int | None:
        return min(self.eos_token_ids) if self.eos_token_ids else None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """The engine process runs its loop from the moment it loaded; this only checks."""
        if self._dead is not None:
            raise EngineStoppedError(self._dead)

    def warmup(self, freeze_gc: bool = True) -> None:
        """Engine.warmup in the engine process (no time limit: it measures the cost model and
        runs a request through every mode); then this process's heap is frozen too."""
        self._info = self._call("warmup", freeze_gc, timeout=None)
        if freeze_gc:
            gc.collect()
            gc.freeze()

    def stop(self, grace_s: float = 30.0) -> None:
        """Engine.stop in the engine process (in-flight requests finish until `grace_s`, the
        rest are cancelled), then the process exits; killed if it does not."""
        self._stopping = True
        if self._dead is None:
            try:
                self._call("stop", grace_s, timeout=grace_s + STOP_MARGIN_S)
            except (EngineStoppedError, FutureTimeout):
                log.warning("engine process did not stop in time; killing it",
                            extra={"engine_pid": self.pid})
        self._proc.join(10.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
        self._read_here_if_loop_gone()  # else nobody would see the pipe close
        self._exited.wait(5.0)
        self._conn.close()

    def alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    # -- requests ---------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
               request_id: str | None = None) -> RequestHandle:
        """As Engine.submit: validated and tokenized here, enqueued in the engine process
        (QueueFullError, EngineStoppedError and length errors come back from there)."""
        if self.kind != "causal-lm":
            raise InputValidationError(f"this engine serves a {self.kind} checkpoint: "
                                       "use classify()")
        params = params or SamplingParams()
        params.validate()
        check_token_ids(params, self.config.vocab_size)
        ids = encode_prompt(self.tokenizer, self.config.vocab_size, prompt)
        rid = request_id or new_request_id(next(self._ids))
        handle = RequestHandle(rid, ids, self.cancel)
        with self._lock:
            self._handles[rid] = handle  # before the call: the first event may beat the reply
        try:
            self._call("submit", ids, params, rid, timeout=CALL_TIMEOUT_S)
        except BaseException as exc:
            with self._lock:
                self._handles.pop(rid, None)
            if isinstance(exc, FutureTimeout):  # wedged: if it ever takes the request, drop it
                self.cancel(rid)
                raise EngineStoppedError(f"the engine process did not take the request within "
                                         f"{CALL_TIMEOUT_S:.0f} s") from None
            raise
        return handle

    def generate(self, prompt: str | Sequence[int], **params) -> GenerationResult:
        """Blocking: submit and wait."""
        return self.submit(prompt, SamplingParams(**params)).result()

    def cancel(self, request_id: str) -> None:
        try:
            self._send(("cancel", request_id))
        except EngineStoppedError:
            pass  # gone: its requests already ended

    # -- state ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine's stats (a call into its process); once it is gone, the last ones with
        `alive` False."""
        try:
            stats = self._call("stats", timeout=CALL_TIMEOUT_S)
        except EngineStoppedError:
            return dead_stats(self._last_stats)
        self._last_stats = stats
        return stats

    def info(self) -> dict:
        """Engine.info as of the warm-up (the same keys), plus `engine_pid`."""
        return {**self._info, "engine_pid": self.pid}

    # -- the pipe ---------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self._dead is not None:
            raise EngineStoppedError(self._dead)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):  # closed under us: the reader reports why
            raise EngineStoppedError(self._dead or "the engine process is gone") from None

    def _call(self, op: str, *args, timeout: float | None):
        if self._reading == "loop" and asyncio._get_running_loop() is self._loop:
            raise RuntimeError(f"EngineProcess.{op} waits for the engine process's reply, which "
                               "this event loop reads: call it from a thread (e.g. "
                               "anyio.to_thread.run_sync)")
        fut: Future = Future()
        cid = next(self._call_ids)
        with self._lock:
            if self._dead is not None:
                raise EngineStoppedError(self._dead)
            self._calls[cid] = fut
        try:
            self._send(("call", cid, op, args))
            return self._result(fut, timeout)
        finally:
            with self._lock:
                self._calls.pop(cid, None)

    def _result(self, fut: Future, timeout: float | None):
        """`fut.result(timeout)`; while the loop reads the replies, checking that it still runs
        (if it stopped, a thread takes over, and the reply still comes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._reading == "loop":
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return fut.result(LOOP_CHECK_S if left is None else
                                  max(0.0, min(LOOP_CHECK_S, left)))
            except FutureTimeout:
                if left is not None and left <= LOOP_CHECK_S:
                    raise
                self._read_here_if_loop_gone()
        return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- reading the pipe: the loop's reader callback, or a thread -----------------------
    def _watch(self) -> None:
        """On the loop: start reading the pipe there."""
        with self._read_lock:
            if self._reading == "loop":
                self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        """On the loop, when the pipe has bytes: every message they complete, in order."""
        with self._read_lock:
            if self._reading != "loop":
                return
            try:
                data = self._sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data and self._take(data):
                return
            self._reading = None
            self._loop.remove_reader(self._sock.fileno())
        # the pipe closed: `_on_exit` joins the process, which the loop must not wait for
        threading.Thread(target=self._on_exit, name="camex-engine-exit", daemon=True).start()

    def _read_here_if_loop_gone(self) -> None:
        """The loop that reads the pipe stopped or closed (the server is exiting, or never ran
        the `_watch` it was given): a thread reads from here on, from where the loop left."""
        with self._read_lock:
            loop = self._loop
            if self._reading != "loop" or (loop.is_running() and not loop.is_closed()):
                return
            self._reading = "thread"  # a stopped loop that runs again reads nothing more
        self._start_reader_thread()

    def _start_reader_thread(self) -> None:
        threading.Thread(target=self._read, name="camex-engine-reader", daemon=True).start()

    def _read(self) -> None:
        """The reader thread (no loop given, or the loop gone)."""
        while True:
            try:
                data = self._sock.recv(READ_BYTES)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            with self._read_lock:
                if not data or not self._take(data):
                    break
        self._on_exit()

    def _take(self, data: bytes) -> bool:
        """Dispatch the messages `data` completes: replies, and each step's events, prompt
        logprobs and observer calls, in the order the engine process produced them. False
        once the pipe cannot be trusted any more (the engine process is then killed)."""
        try:
            for frame in self._frames.feed(data):
                # what Connection.recv did: our own control messages from the engine process
                # this one started, over a socketpair (weights never cross it)
                msg = pickle.loads(frame)
                if msg[0] == "step":
                    self._deliver(msg[1])
                elif msg[0] == "reply":
                    _, cid, ok, value = msg
                    with self._lock:
                        fut = self._calls.get(cid)
                    if fut is not None and ok:
                        fut.set_result(value)
                    elif fut is not None:
                        fut.set_exception(value)
        except Exception:  # a message this side cannot read: the two sides no longer agree
            log.exception("engine process pipe broke; stopping the engine process")
            self._proc.kill()
            return False
        return True

    def _deliver(self, items: list) -> None:
        for item in items:
            if item[0] == "ev":
                _, rid, events, result = item
                with self._lock:
                    handle = (self._handles.pop(rid, None) if result is not None
                              else self._handles.get(rid))
                if handle is not None:
                    handle._publish(events, result)
            elif item[0] == "plp":
                with self._lock:
                    handle = self._handles.get(item[1])
                if handle is not None:
                    handle.prompt_logprobs = item[2]
            else:  # ("obs", hook, args)
                notify(self.observer, item[1], *item[2])

    def _on_exit(self) -> None:
        """The pipe closed: the process stopped (stop) or died. Nothing may wait forever."""
        try:
            self._ended()
        finally:
            self._exited.set()

    def _ended(self) -> None:
        self._sock.close()  # nobody reads it any more (the loop removed its reader)
        self._proc.join(5.0)
        code = self._proc.exitcode
        reason = (f"the engine process exited (exit code {code})" if self._stopping
                  else f"the engine process died (exit code {code})")
        with self._lock:
            self._dead = reason
            calls, self._calls = list(self._calls.values()), {}
            handles, self._handles = list(self._handles.values()), {}
        if not self._stopping:
            log.error("engine process died; failing its %d open requests", len(handles),
                      extra={"engine_pid": self.pid, "exit_code": code})
        for fut in calls:
            if not fut.done():
                fut.set_exception(EngineStoppedError(reason))
        for handle in handles:
            handle._publish(*ended_by(handle, reason))


_LIVE: weakref.WeakSet[EngineProcess] = weakref.WeakSet()
_registered = False


def _at_exit_stop(engine: EngineProcess) -> None:
    """Stop `engine` at interpreter exit if nobody did. multiprocessing's own exit handler
    would SIGTERM it, which the engine process ignores (the drain owns its end), and then
    wait for it forever. Registered after multiprocessing's, so it runs first."""
    global _registered
    _LIVE.add(engine)
    if not _registered:
        atexit.register(_stop_live)
        _registered = True


def _stop_live() -> None:
    for engine in list(_LIVE):
        if not engine._proc.is_alive():
            continue
        try:
            engine.stop(grace_s=0)
        except Exception as exc:  # e.g. one interrupted half-way through __init__: no reader
            log.warning("engine process not stopped cleanly at exit: %r; killing it", exc,
                        extra={"engine_pid": engine.pid})
        finally:  # and the next one is still stopped
            if engine._proc.is_alive():
                engine._proc.kill()


def ended_by(handle: RequestHandle, reason: str) -> tuple[list[TokenEvent], GenerationResult]:
    """The last event and the result of a request whose engine process is gone."""
    events = [e for e in handle._events if e.token_id >= 0]
    last = TokenEvent(token_id=-1, text="", logprob=0.0, index=len(events),
                      finish_reason="error", error=reason)
    now = time.monotonic()
    result = GenerationResult(
        request_id=handle.request_id, prompt_token_ids=list(handle.prompt_token_ids),
        token_ids=[e.token_id for e in events], text="".join(e.text for e in events),
        finish_reason="error", logprobs=[e.logprob for e in events], routing=None,
        timings=RequestTimings(queued_at=now, finished_at=now), error=reason,
        top_logprobs=[e.top_logprobs for e in events],
        prompt_logprobs=handle.prompt_logprobs)
    return [last], result


def dead_stats(last: EngineStats | None) -> EngineStats:
    if last is None:
        return EngineStats(running=0, waiting=0, max_batch_size=0, max_waiting=0, steps=0,
                           last_step_batch_size=0, heartbeat=0.0, alive=False,
                           cache=MergeCacheStats(0, 0, 0, 0, 0, 0, 0, 0.0))
    return dataclasses.replace(last, alive=False, running=0, waiting=0)


# -- the engine process ----------------------------------------------------------------------
class _Outbox:
    """What one step produced for the API process, shipped by `flush` after the step."""

    def __init__(self, send: Callable[[tuple], None]):
        self._send = send
        self._items: list = []
        self._lock = threading.Lock()

    def put(self, item: tuple) -> None:
        with self._lock:
            self._items.append(item)

    def flush(self) -> None:
        # taken and sent under one lock: two flushes (the loop's, a reply's) must not overtake
        # each other, or a request's last event could arrive before its previous one
        with self._lock:
            items, self._items = self._items, []
            if items:
                self._send(("step", items))


class _ForwardingHandle(RequestHandle):
    """A request submitted from the API process: its events go there, nowhere else."""

    def __init__(self, request_id, prompt_token_ids, cancel, outbox: _Outbox):
        self._outbox = outbox
        super().__init__(request_id, prompt_token_ids, cancel)

    def _publish(self, events, result) -> None:
        self._outbox.put(("ev", self.request_id, events, result))

    @property
    def prompt_logprobs(self):
        return None

    @prompt_logprobs.setter
    def prompt_logprobs(self, value) -> None:
        if value is not None:
            self._outbox.put(("plp", self.request_id, value))


class _Recorder:
    """The engine's observer in its process: each call is shipped with the step."""

    def __init__(self, outbox: _Outbox):
        for hook in _HOOKS:
            setattr(self, hook, lambda *args, _h=hook: outbox.put(("obs", _h, args)))


def portable(exc: BaseException) -> BaseException:
    """`exc` when the API process can rebuild it from its type and message (the runtime's own
    errors, built-in exceptions), else a RuntimeError naming it."""
    module = type(exc).__module__
    plain = all(isinstance(a, (str, int, float)) for a in exc.args)
    if plain and (module == "builtins" or module.startswith("camex_runtime")):
        return exc
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_engine_process(conn, path: str, device: str, dtype: str | None, threads: int | None,
                       log_setup, limits: dict) -> None:
    """The engine process: load `path` into an `Engine`, report "loaded" (or "load_failed")
    on `conn`, then serve the API process's calls until it says stop or goes away."""
    # The API process decides when this process stops (its drain, then `stop`): a Ctrl-C or
    # SIGTERM sent to the whole process group must not cut the engine from under the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_setup is not None:
        fn, args = log_setup
        fn(*args)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            conn.send(msg)

    outbox = _Outbox(send)
    try:
        engine = Engine.from_pretrained(path, device=device, dtype=dtype,
                                        observer=_Recorder(outbox), **limits)
    except Exception as exc:  # raised again in the API process, which logs it once
        with contextlib.suppress(OSError):  # ... unless it went away meanwhile
            send(("load_failed", portable(exc)))
        return
    remote: set[str] = set()

    def make_handle(rid, ids, cancel):
        if rid in remote:
            remote.discard(rid)
            return _ForwardingHandle(rid, ids, cancel, outbox)
        return RequestHandle(rid, ids, cancel)  # the engine's own (warm-up requests)

    engine.make_handle = make_handle
    engine.after_step = outbox.flush
    engine.start()
    info = engine.info()
    try:
        send(("loaded", {"kind": engine.kind, "name": engine.name, "config": engine.config,
                         "info": info, "eos_token_ids": sorted(engine.eos_token_ids),
                         "tokenizer_dir": None if engine.tokenizer_dir is None
                         else str(engine.tokenizer_dir)}))
    except OSError:  # the API process went away while this one loaded (e.g. stopped by it)
        engine.stop(grace_s=0)
        return
    log.info("engine process ready for requests",
             extra={"engine_pid": os.getpid(), "threads": torch.get_num_threads()})
    stopped = threading.Event()

    def reply(cid: int, fn: Callable, *args) -> None:
        try:
            value, ok = fn(*args), True
        except Exception as exc:
            value, ok = portable(exc), False
        outbox.flush()  # events first: a stop's cancellations precede its reply
        send(("reply", cid, ok, value))

    def submit(ids, params, rid):
        remote.add(rid)
        try:
            engine.submit(ids, params, request_id=rid)
        finally:
            remote.discard(rid)

    def warmup(freeze_gc):
        engine.warmup(freeze_gc=freeze_gc)
        return engine.info()

    def stop(grace_s):
        engine.stop(grace_s=grace_s)

    def stop_then_exit(cid: int, grace_s: float) -> None:
        reply(cid, stop, grace_s)
        stopped.set()

    ops = {"submit": submit, "stats": engine.stats, "warmup": warmup}
    while not stopped.is_set():
        try:
            if not conn.poll(0.1):
                continue
            msg = conn.recv()
        except (EOFError, OSError):  # the API process is gone: nobody to serve
            engine.stop(grace_s=0)
            return
        if msg[0] == "cancel":
            engine.cancel(msg[1])
        elif msg[2] == "stop":  # long, like warm-up: stats calls (health probes) still answer
            threading.Thread(target=stop_then_exit, args=(msg[1], *msg[3]), name="camex-stop",
                             daemon=True).start()
        elif msg[2] == "warmup":
            threading.Thread(target=reply, args=(msg[1], warmup, *msg[3]), name="camex-warmup",
                             daemon=True).start()
        else:
            reply(msg[1], ops[msg[2]], *msg[3])
    conn.close()
