"""What camex-loadtest itself costs: its CPU per streamed token, and what that does to the server
it measures, for each way it can read responses.

A load generator on the machine it loads takes its CPU from the server, so its own cost per
token is part of every figure it reports there. This script starts one camex-server on
127.0.0.1 and runs the same closed-loop streamed workload through ``loadtest.run_load_async``
with each reader in turn (order rotated every round, so drift in the machine falls on all):

- ``httpx-asyncio``: httpx on the stdlib event loop (camex-loadtest before it had a choice);
- ``httpx``: httpx on uvloop (``--client httpx`` now; uvloop when it is installed);
- ``wire``: ``loadtest.wire``, the lean HTTP/1.1 reader on uvloop (the default for http://).

Per reader and level: tokens/s, the client's CPU per token (this process's during the run, as
the report records it),
the server's event-loop CPU per token (its main thread, ``/proc``) and TTFT/ITL medians, as
means over the rounds, with ratios against ``httpx-asyncio`` measured in the same run.

    python benchmarks/loadtest_client.py --model LM_DIR --server-arg=--threads=1 \\
        --client-cpus 0 --concurrency 1,8 --rounds 3 --out results/loadtest-client.json

Without ``--model`` the server serves its embedded demo model. Prints a table and writes JSON;
asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_info, loadavg, main_thread_cpu_s  # noqa: E402
from serving import ServerProcess, free_port, git_commit  # noqa: E402

from loadtest import LoadConfig, run_load_async, wire  # noqa: E402

READERS = {  # name -> (LoadConfig.client, how the run's event loop is started)
    "httpx-asyncio": ("httpx", asyncio.run),
    "httpx": ("httpx", wire.run),
    "wire": ("wire", wire.run),
}
BASELINE = "httpx-asyncio"


def measure(url: str, reader: str, concurrency: int, args: argparse.Namespace,
            server_pid: int) -> dict:
    """One level with one reader: tokens/s, CPU per token of the client and of the server's
    event loop, TTFT/ITL medians."""
    client, start = READERS[reader]
    cfg = LoadConfig(url=url, client=client, num_requests=args.num_requests * concurrency,
                     concurrency=concurrency, max_new_tokens=args.max_new_tokens,
                     prompt_len=args.prompt_len, extra_params={"ignore_eos": True},
                     seed=args.seed, request_timeout_s=args.request_timeout)
    if args.warmup:
        start(run_load_async(LoadConfig(**{**cfg.__dict__, "num_requests": args.warmup})))
    loop0 = main_thread_cpu_s(server_pid)
    report = start(run_load_async(cfg))
    client_s, loop_s = report.run["client_cpu_s"], main_thread_cpu_s(server_pid) - loop0
    tokens = report.total_output_tokens
    per_token = (lambda s: round(1e3 * s / tokens, 4) if tokens else None)  # noqa: E731
    return {"reader": reader, "concurrency": concurrency, "completed": report.completed,
            "sent": report.sent, "tokens": tokens,
            "tok_per_s": round(report.output_token_throughput, 3),
            "client_ms_per_token": per_token(client_s),
            "server_loop_ms_per_token": per_token(loop_s),
            "ttft_median_ms": None if report.ttft.median is None
            else round(1e3 * report.ttft.median, 3),
            "itl_median_ms": None if report.itl.median is None
            else round(1e3 * report.itl.median, 3),
            "run_client": report.run["client"]}


def summarize(runs: list[dict]) -> list[dict]:
    """Per (level, reader): means over the rounds, and ratios against the baseline reader."""
    keys = ("tok_per_s", "client_ms_per_token", "server_loop_ms_per_token", "ttft_median_ms",
            "itl_median_ms")
    rows = []
    for conc in sorted({r["concurrency"] for r in runs}):
        means = {}
        for reader in READERS:
            mine = [r for r in runs if r["concurrency"] == conc and r["reader"] == reader]
            if not mine:
                continue
            means[reader] = {k: statistics.fmean(r[k] for r in mine if r[k] is not None)
                             if any(r[k] is not None for r in mine) else None for k in keys}
            means[reader]["rounds"] = len(mine)
            means[reader]["failed"] = sum(r["sent"] - r["completed"] for r in mine)
        base = means.get(BASELINE)
        for reader, m in means.items():
            row = {"concurrency": conc, "reader": reader, **m}
            if base:
                for k in ("tok_per_s", "client_ms_per_token"):
                    row[f"{k}_vs_{BASELINE}"] = (m[k] / base[k] if m[k] and base[k] else None)
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"\n{'B':>3} {'reader':<14}{'tok/s':>8}{'x base':>8}{'client ms/tok':>15}"
          f"{'x base':>8}{'server loop ms/tok':>20}{'ITL p50 ms':>12}")
    for r in rows:
        print(f"{r['concurrency']:>3} {r['reader']:<14}{f(r['tok_per_s'], 1):>8}"
              f"{f(r.get('tok_per_s_vs_' + BASELINE)):>8}{f(r['client_ms_per_token'], 3):>15}"
              f"{f(r.get('client_ms_per_token_vs_' + BASELINE)):>8}"
              f"{f(r['server_loop_ms_per_token'], 3):>20}{f(r['itl_median_ms'], 1):>12}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="folded causal-LM checkpoint (none: the embedded demo model)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra camex-server flag, repeatable: --server-arg=--threads=1")
    p.add_argument("--readers", default=",".join(READERS), help="comma-separated, of "
                   + ", ".join(READERS))
    p.add_argument("--concurrency", default="1,8", help="closed-loop levels, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="rounds; reader order rotates")
    p.add_argument("-n", "--num-requests", type=int, default=8,
                   help="requests per level and worker")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each level")
    p.add_argument("--max-new-tokens", default="64")
    p.add_argument("--prompt-len", default="fixed:32", help="synthetic prompt words")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-cpus", help="CPUs this process (the client) is confined to, "
                                         "comma-separated (default: not confined)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default="benchmarks/results/loadtest-client.json")
    args = p.parse_args(argv)
    args.readers = [r for r in args.readers.split(",") if r]
    unknown = [r for r in args.readers if r not in READERS]
    if unknown or not args.readers:
        p.error(f"--readers: unknown {unknown}; choose from {', '.join(READERS)}")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if args.rounds < 1 or args.num_requests < 1 or any(c < 1 for c in args.levels):
        p.error("--rounds, -n and --concurrency levels must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
           *(["--model", args.model] if args.model else []), *args.server_arg]
    runs: list[dict] = []
    with ServerProcess(cmd, port, out.with_suffix(".server.log"), args.startup_timeout) as server:
        info = server.info()
        print(f"server ready: {info.get('model_id')} ({info.get('model_dtype')}); "
              f"readers {', '.join(args.readers)}", flush=True)
        if args.client_cpus:  # after the server started: it does not inherit the confinement
            os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
        for rnd in range(args.rounds):
            k = rnd % len(args.readers)
            order = args.readers[k:] + args.readers[:k]
            for conc in args.levels:
                for reader in order:
                    row = {"round": rnd, **measure(server.url, reader, conc, args,
                                                   server.proc.pid)}
                    runs.append(row)
                    print(f"round {rnd} B={conc} {reader:<14} {row['tok_per_s']:8.1f} tok/s  "
                          f"client {row['client_ms_per_token']} ms/tok  server loop "
                          f"{row['server_loop_ms_per_token']} ms/tok  "
                          f"{row['completed']}/{row['sent']} ok", flush=True)
    rows = summarize(runs)
    print_rows(rows)
    doc = {"benchmark": "loadtest-client", "argv": sys.argv[1:], "server_cmd": cmd,
           "server_info": info, "baseline": BASELINE,
           "host": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu": cpu_info(), "commit": git_commit(), "loadavg_end": loadavg(),
                    "client_cpus": args.client_cpus},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "rows": rows, "runs": runs}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
