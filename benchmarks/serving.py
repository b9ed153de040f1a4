"""Serving benchmark: start camex-server on 127.0.0.1, sweep load levels, write JSON.

For each load level (closed-loop concurrency, or open-loop rate) it runs ``loadtest.run_load``
against a freshly started server process and records the client-side report (throughput,
TTFT/TPOT/ITL/e2e percentiles, goodput) next to server-side counters read from ``/metrics``
before and after the level (mean engine batch size, queue time, merge-cache hit rate, merge
time). It talks to the server only over HTTP and never imports ``server`` or the runtime.

    python benchmarks/serving.py --model LM_DIR --concurrency 1,2,4,8 -n 64 \\
        --max-new-tokens 64 --out results/serving.json
    python benchmarks/serving.py --model LM_DIR --rates 0.5,1,2 -n 100 --slo ttft=1s,tpot=200ms

A script that prints a table and writes JSON; it asserts nothing about speed. See
``benchmarks/serving.md`` for the method and how to read the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from benchmarks.checkouts import git_state  # noqa: E402
from loadtest import LoadConfig, run_load  # noqa: E402
from loadtest.report import Slo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Server-side counters diffed around each load level: name -> sample names summed over labels.
SERVER_SAMPLES = (
    "camex_batch_size_sum", "camex_batch_size_count",
    "camex_queue_time_seconds_sum", "camex_queue_time_seconds_count",
    "camex_merge_cache_hits_total", "camex_merge_cache_misses_total",
    "camex_merge_cache_fallbacks_total", "camex_merge_cache_evictions_total",
    "camex_merge_duration_seconds_sum", "camex_merge_duration_seconds_count",
    "camex_generated_tokens_total", "camex_prompt_tokens_total",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def signals_held(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold `signums` for the block and deliver them, to the handlers they had, as it ends. A
    child is started inside it (`Popen` and keeping its handle): a handler that raises there
    (Ctrl-C's KeyboardInterrupt, `peer_llamacpp`'s SIGTERM) interrupted `Popen` after the fork,
    before anyone held the child's handle, and left it running with nobody to end it. Python
    handlers, so whichever thread the kernel signals, nothing runs before the block ends;
    outside the main thread (where no handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append((signum, frame)))
                for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum, frame in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def end_process(proc: subprocess.Popen | None, ask: Callable[[subprocess.Popen], None],
                grace_s: float = 30.0) -> None:
    """A child we started, if still running: `ask` it to stop, wait `grace_s`, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    ask(proc)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """A server on 127.0.0.1 (``python -m server.cli``, or the naive baseline); waits until
    ``ready_path`` answers 200; always terminated (by PID) on exit. `cwd`: where it starts
    (``-m server.cli`` imports that checkout's code)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, startup_timeout_s: float,
                 ready_path: str = "/ready", cwd: Path = ROOT):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd, self.ready_path, self.cwd = cmd, ready_path, cwd
        self.log_path, self.startup_timeout_s = log_path, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log = self.log_path.open("w")
        try:  # interrupted while it starts (Ctrl-C, SIGTERM), the server is ended too
            with signals_held():
                self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=self.log,
                                             stderr=subprocess.STDOUT)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0,
                             trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {self.startup_timeout_s}s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        end_process(self.proc, lambda proc: proc.send_signal(signal.SIGTERM))
        self.log.close()

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10.0, trust_env=False).json()

    def counters(self) -> dict[str, float] | None:
        """Summed SERVER_SAMPLES from /metrics; None for a server without them (naive)."""
        resp = httpx.get(self.url + "/metrics", timeout=10.0, trust_env=False)
        if resp.status_code != 200:
            return None
        text = resp.text
        totals = dict.fromkeys(SERVER_SAMPLES, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        return totals


def server_side(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Per-level server view from counter deltas (None where the level produced no samples)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in SERVER_SAMPLES}
    ratio = lambda num, den: d[num] / d[den] if d[den] else None  # noqa: E731
    lookups = d["camex_merge_cache_hits_total"] + d["camex_merge_cache_misses_total"]
    return {
        "mean_batch_size": ratio("camex_batch_size_sum", "camex_batch_size_count"),
        "engine_steps": d["camex_batch_size_count"],
        "mean_queue_time_s": ratio("camex_queue_time_seconds_sum",
                                   "camex_queue_time_seconds_count"),
        "merge_cache_hit_rate": d["camex_merge_cache_hits_total"] / lookups if lookups else None,
        "merge_cache_fallbacks": d["camex_merge_cache_fallbacks_total"],
        "merge_cache_evictions": d["camex_merge_cache_evictions_total"],
        "merge_seconds": d["camex_merge_duration_seconds_sum"],
        "generated_tokens": d["camex_generated_tokens_total"],
    }


def levels(args: argparse.Namespace) -> list[dict]:
    """The load levels to sweep, each a dict of LoadConfig overrides."""
    if args.rates:
        return [{"rate": float(r)} for r in args.rates.split(",")]
    return [{"concurrency": int(c)} for c in args.concurrency.split(",")]


def run_levels(server: ServerProcess, args: argparse.Namespace) -> list[dict]:
    results = []
    for overrides in levels(args):
        cfg = LoadConfig(url=server.url, num_requests=args.num_requests, mix=args.mix,
                         max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
                         prompts_path=args.prompts, seed=args.seed,
                         max_duration_s=args.max_duration,
                         extra_params=json.loads(args.params), slo=args.slo, progress=True,
                         request_timeout_s=args.request_timeout, **overrides)
        if args.warmup:
            run_load(cfg, num_requests=args.warmup, progress=False)
        before, load_before = server.counters(), os.getloadavg()
        report = run_load(cfg)
        finish = Counter(r.finish_reason for r in report.records if r.ok)
        results.append({"level": overrides, "report": report.to_dict(with_records=False),
                        "finish_reasons": dict(finish),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "server": server_side(before, server.counters())})
        print_row(overrides, report, results[-1]["server"])
    return results


def print_row(level: dict, r, srv: dict | None) -> None:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
    srv = srv or {"mean_batch_size": None, "merge_cache_hit_rate": None}
    name = ", ".join(f"{k}={v}" for k, v in level.items())
    batch = "-" if srv["mean_batch_size"] is None else f"{srv['mean_batch_size']:.2f}"
    hit = "-" if srv["merge_cache_hit_rate"] is None else f"{srv['merge_cache_hit_rate']:.2f}"
    print(f"{name:<18}{r.completed:>5}/{r.sent:<5}"
          f"{r.request_throughput:>9.3f}{r.output_token_throughput:>10.1f}"
          f"{ms(r.ttft.median):>9}{ms(r.ttft.p99):>9}{ms(r.tpot.median):>9}{ms(r.e2e.p99):>10}"
          f"{r.goodput_fraction:>8.2f}{batch:>7}{hit:>6}", flush=True)


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    """camex-server with the given flags, or the naive baseline on the same model."""
    if args.naive:
        if not args.model:
            raise SystemExit("--naive needs --model")
        return [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), "--model", args.model,
                "--port", str(port), *args.server_arg]
    return [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
            *(["--model", args.model] if args.model else []),
            *(["--classifier", args.classifier] if args.classifier else []), *args.server_arg]


def git_commit() -> str | None:
    """The checkout's abbreviated commit, with "+dirty" where a tracked file differs from it."""
    state = git_state(ROOT)
    return None if state["short"] is None else state["short"] + ("+dirty" if state["dirty"] else "")


def compare(a_path: Path, b_path: Path, out: Path) -> int:
    """Per-level ratios B/A of two saved runs (levels paired in order): > 1 on a throughput
    row means B serves more; < 1 on a latency row means B is faster."""
    a, b = (json.loads(p.read_text()) for p in (a_path, b_path))
    rows = []
    for la, lb in zip(a["levels"], b["levels"]):
        ra, rb = la["report"], lb["report"]
        ratio = lambda x, y: y / x if x else None  # noqa: E731
        row = {"level_a": la["level"], "level_b": lb["level"],
               "completed": [ra["completed"], rb["completed"]],
               "req_per_s": [ra["request_throughput"], rb["request_throughput"]],
               "tok_per_s": [ra["output_token_throughput"], rb["output_token_throughput"]],
               "e2e_p99_s": [ra["e2e"]["p99"], rb["e2e"]["p99"]],
               "ttft_p99_s": [ra["ttft"]["p99"], rb["ttft"]["p99"]]}
        row["ratios_b_over_a"] = {k: ratio(*row[k]) for k in
                                  ("req_per_s", "tok_per_s", "e2e_p99_s", "ttft_p99_s")}
        rows.append(row)
        print(f"{la['level']} -> {lb['level']}: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in row["ratios_b_over_a"].items() if v is not None))
    out.write_text(json.dumps({"benchmark": "serving-compare", "a": str(a_path), "b": str(b_path),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="folded causal-LM checkpoint (none: the server's demo models)")
    p.add_argument("--classifier",
                   help="folded classifier checkpoint (needed for classify in --mix)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra camex-server flag, repeatable: --server-arg=--max-batch-size=16")
    p.add_argument("--naive", action="store_true",
                   help="start benchmarks/naive_server.py (transformers generate, one request at "
                        "a time) on --model instead of camex-server")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="no run: per-level ratios B/A of two saved runs, written to --out")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1,2,4,8",
                      help="closed-loop levels, comma-separated")
    load.add_argument("--rates", help="open-loop Poisson rates (req/s), comma-separated")
    p.add_argument("-n", "--num-requests", type=int, default=64, help="requests per level")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each level")
    p.add_argument("--mix", default="stream=1")
    p.add_argument("--max-new-tokens", default="64")
    p.add_argument("--prompt-len", default="fixed:32", help="synthetic prompt words")
    p.add_argument("--prompts", help="JSONL/text prompts instead of synthetic ones")
    p.add_argument("--params", default='{"ignore_eos": true}',
                   help="extra generation parameters (JSON); ignore_eos keeps output lengths fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", help="e.g. ttft=1s,tpot=200ms (goodput column)")
    p.add_argument("--max-duration", type=float, default=600.0, help="time cap per level (s)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="per-request cap (s); long, so an overloaded server shows as latency")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds to wait for /ready")
    p.add_argument("--out", default="benchmarks/results/serving.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(*map(Path, args.compare), Path(args.out))
    from loadtest.workload import parse_mix
    args.mix = parse_mix(args.mix)
    args.slo = Slo.parse(args.slo) if args.slo else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with ServerProcess(server_command(args, port), port, out.with_suffix(".server.log"),
                       args.startup_timeout, "/health" if args.naive else "/ready") as server:
        info = server.info()
        print(f"server ready: {info.get('model_id')} ({info.get('model_device_type')}, "
              f"{info.get('model_dtype')}), max_batch_size {info.get('max_batch_size')}")
        print(f"{'level':<18}{'done/sent':<11}{'req/s':>9}{'tok/s':>10}{'ttft50':>9}{'ttft99':>9}"
              f"{'tpot50':>9}{'e2e99':>10}{'good':>8}{'batch':>7}{'hit':>6}   (ms)")
        results = run_levels(server, args)
    doc = {"benchmark": "serving", "argv": sys.argv[1:], "server_cmd": server.cmd,
           "server_info": info,
           "host": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "commit": git_commit(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "slo": asdict(args.slo) if args.slo else None, "levels": results}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
