"""The camex engine's own generation rate, in process (no HTTP), for the server-overhead ratio.

Loads a checkpoint into ``camex_runtime.Engine`` with camex-server's defaults (batch 8, waiting
queue 64, merge cache sized by the engine, strategy ``auto``, ``torch.set_num_threads`` before
loading), starts its step loop, warms it up, then runs the same plan as the HTTP client of
``peer_llamacpp.py``: per level, ``concurrency`` client threads each submit the next prompt and
read its token events until it finishes. Records are ``loadtest.records.RequestRecord`` and the
statistics ``loadtest.report.build_report``, exactly as over HTTP, so
HTTP tok/s / engine tok/s is the cost of the server between the engine and the wire.

Runs as its own process, so thread settings and memory are the same as a fresh server's. Either
one plan, start to end:

    python benchmarks/peer_engine.py --model DIR --dtype float32 --threads 1 \\
        --plan plan.json --out engine.json

or, with ``--serve`` (what ``peer_llamacpp.py`` uses, to interleave the engine's requests with
the servers'), as a worker: one JSON line on stdout when ready (``{"ready_s": ...}``), then per
JSON line on stdin (``{"prompts": [...], "concurrency": c, "max_new_tokens": n}``) one closed
loop and one JSON line back: the level with its records (``LevelResult.from_dict`` reads it) and
``cpu``, the worker's CPU use during it. End of input stops the engine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from camex_runtime import Engine, SamplingParams  # noqa: E402
from loadtest.records import RequestRecord  # noqa: E402
from loadtest.report import build_report  # noqa: E402
from machine import CpuMeter  # noqa: E402
from peer_client import LevelResult  # noqa: E402


def one_request(engine: Engine, prompt: str, max_new_tokens: int, rec: RequestRecord,
                t0: float, ids: list[int]) -> int:
    """Fill `rec` and `ids` (generated token ids); returns the prompt's token count as the
    engine tokenized it."""
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    for ev in handle:
        now = time.perf_counter() - t0
        if ev.error:
            rec.fail("engine_error", now, ev.error)
            break
        rec.token_times.append(now)
        rec.output_tokens += 1
        ids.append(ev.token_id)
        if ev.finish_reason is not None:
            rec.ok, rec.end, rec.finish_reason = True, now, ev.finish_reason
    if not rec.ok:
        rec.fail("bad_response", time.perf_counter() - t0, "no final event")
    return len(handle.prompt_token_ids)


def closed_loop(engine: Engine, prompts: list[str], concurrency: int, max_new_tokens: int,
                client_cpus: list[int] | None = None):
    """`concurrency` threads send `prompts` back to back, as peer_client does over HTTP, each
    confined to `client_cpus` (None: anywhere) as the HTTP client is, while the engine's own
    thread may run anywhere. Unconfined, the 8 readers, woken every step, preempted the engine
    thread on its core: the dense model at one thread made 86.0 tok/s with 8 streams against
    89.4 with its readers on CPU 0 (GPT-2-small, fp32, 9 waves each, alternating), and its
    server, whose client was confined, measured above its engine."""
    records: list[RequestRecord] = []
    prompt_counts: list[int] = []
    token_ids: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    lock, queue = threading.Lock(), iter(enumerate(prompts))
    t0 = time.perf_counter()

    def worker() -> None:
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)  # Linux: the calling thread only
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            i, prompt = item
            rec = RequestRecord(index=i, kind="stream", start=time.perf_counter() - t0,
                                prompt_chars=len(prompt))
            with lock:
                records.append(rec)
            n = one_request(engine, prompt, max_new_tokens, rec, t0, token_ids[i])
            with lock:
                prompt_counts.append(n)

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, len(prompts)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run = {"api": "engine", "mode": "closed", "concurrency": concurrency,
           "max_new_tokens": max_new_tokens}
    return LevelResult(build_report(records, len(prompts), run), prompt_counts, token_ids)


def run_plan(engine: Engine, plan: dict, client_cpus: list[int] | None) -> list[dict]:
    """Every level of the plan: its warm-up (unmeasured), then the measured requests."""
    levels = []
    for level in plan["levels"]:
        c = level["concurrency"]
        closed_loop(engine, level["warmup_prompts"], c, plan["warmup_new_tokens"], client_cpus)
        with CpuMeter() as cpu:
            result = closed_loop(engine, level["prompts"], c, plan["max_new_tokens"],
                                 client_cpus)
        levels.append({"concurrency": c, **result.to_dict(), "cpu": cpu.result})
        print(f"engine c={c}: {result.report.output_token_throughput:.1f} tok/s", flush=True)
    return levels


def serve(engine: Engine, ready_s: float, client_cpus: list[int] | None) -> None:
    """The worker loop of ``--serve``. The protocol gets the process's stdout; everything else
    written to fd 1 (a library's print, native code) goes to stderr, the log. The ready line
    carries the engine's start-up cost profile, which steers its scheduling (the servers' is
    in their `/info`), so a round can compare the two."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    protocol.write(json.dumps({"ready_s": ready_s,
                               "cost_profile": engine.info()["cost_profile"]}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        with CpuMeter() as cpu:
            result = closed_loop(engine, cmd["prompts"], int(cmd["concurrency"]),
                                 int(cmd["max_new_tokens"]), client_cpus)
        protocol.write(json.dumps({**result.to_dict(),
                                   "report": result.report.to_dict(with_records=True),
                                   "cpu": cpu.result}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", required=True, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--expert-deltas", default="full", choices=["full", "int8"])
    p.add_argument("--plan", type=Path, help="levels and prompts (JSON)")
    p.add_argument("--out", type=Path, help="the plan's results (JSON)")
    p.add_argument("--serve", action="store_true",
                   help="a worker: closed loops asked for on stdin, answered on stdout")
    p.add_argument("--client-cpus", default=None,
                   help="CPUs the client threads run on, comma-separated (default: anywhere)")
    args = p.parse_args(argv)
    if args.serve == bool(args.plan or args.out) or bool(args.plan) != bool(args.out):
        p.error("give either --plan and --out, or --serve")
    cpus = [int(c) for c in args.client_cpus.split(",")] if args.client_cpus else None
    # the engine's own log lines (kernels chosen, warm-up and its cost profile) to stderr,
    # which is the round's log file for this worker
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device="cpu", dtype=args.dtype,
                                    max_batch_size=args.max_batch_size, max_waiting=64,
                                    expert_deltas=args.expert_deltas)
    engine.start()
    engine.warmup()
    ready_s = time.perf_counter() - t0
    try:
        if args.serve:
            serve(engine, ready_s, cpus)
            return 0
        levels = run_plan(engine, json.loads(args.plan.read_text()), cpus)
    finally:
        engine.stop(grace_s=5.0)
    args.out.write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                    "threads": torch.get_num_threads(), "ready_s": ready_s,
                                    "levels": levels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
