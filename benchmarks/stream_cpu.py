"""What camex-server's HTTP event loop spends per streamed token: this checkout against another.

Starts camex-server from this checkout and, with ``--compare REF``, from a temporary git worktree
of REF, one after the other (the order alternating from round to round), on the same model and
settings, and streams the same greedy requests to each (the lean client of ``peer_client``):
over TGI ``/generate_stream`` one at a time and ``--concurrency`` at once, over OpenAI
``/v1/completions`` one at a time. Per level it reports
the CPU time of the server's main thread (its HTTP event loop: SSE events, the engine's events
handed over, metrics; ``/proc/<pid>/task/<pid>/schedstat``) per streamed token, and the tokens/s;
per round, their medians, and this checkout's median over the baseline's.

Why it matters: on a machine whose cores all run compute threads, every microsecond the event
loop spends per token is taken from them (the server's rate over the engine's own, target 3 in
benchmarks/peer.md). The model is the peer benchmark's dense GPT-2 (``peer_models.py``; built on
first use, minutes at full size). Talks to 127.0.0.1 only; ends only the servers it started.

    python benchmarks/stream_cpu.py --compare HEAD~1 --threads 2 --dtype bfloat16
    python benchmarks/stream_cpu.py --quick --compare HEAD --rounds 1
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import peer_client  # noqa: E402
from checkouts import git, worktree  # noqa: E402
from common import print_table  # noqa: E402
from machine import cpu_info, main_thread_cpu_s  # noqa: E402
from peer_llamacpp import results_json  # noqa: E402
from peer_models import build_models  # noqa: E402
from serving import ServerProcess, free_port  # noqa: E402

RESULTS = HERE / "results"
COLS = ["checkout", "level", "us_per_token", "us_per_token_rounds", "tok_s", "vs_baseline"]


def server(checkout: Path, model: str, args, log: Path) -> ServerProcess:
    """camex-server started from `checkout` (its code, this interpreter) on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--threads", str(args.threads), "--dtype", args.dtype,
           "--max-batch-size", str(args.concurrency)]
    return ServerProcess(cmd, port, log, args.startup_timeout, cwd=checkout)


def measure(srv: ServerProcess, api: str, prompts: list[str], concurrency: int, requests: int,
            new_tokens: int) -> dict:
    """One closed-loop level: the main thread's CPU per streamed token, and tokens/s."""
    before = main_thread_cpu_s(srv.proc.pid)
    t0 = time.perf_counter()
    level = peer_client.measure(srv.url, api, prompts[:requests], concurrency, new_tokens)
    wall = time.perf_counter() - t0
    cpu = main_thread_cpu_s(srv.proc.pid) - before
    rep = level.report
    if rep.completed != requests:
        raise RuntimeError(f"{requests - rep.completed} of {requests} requests failed: "
                           f"{rep.failures_by_status}")
    tokens = rep.total_output_tokens
    return {"us_per_token": round(1e6 * cpu / tokens, 1), "tok_s": round(tokens / wall, 2),
            "tokens": tokens, "token_ids_digest": ids_digest(level.token_ids)}


def ids_digest(token_ids: dict[int, list[int]]) -> str:
    """One digest of every request's generated ids, in request order: greedy requests to the same
    weights read the same in every round and checkout (empty lists where the API sends no ids)."""
    ids = [token_ids[i] for i in sorted(token_ids)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def summarize(runs: list[dict], checkouts: list[str]) -> list[dict]:
    """Per checkout and level: the medians over rounds; this checkout's over the baseline's."""
    rows = []
    for name in checkouts:
        for level in dict.fromkeys(r["level"] for r in runs):
            mine = [r for r in runs if r["checkout"] == name and r["level"] == level]
            rows.append({"checkout": name, "level": level,
                         "us_per_token": round(statistics.median(r["us_per_token"] for r in mine),
                                               1),
                         "us_per_token_rounds": [r["us_per_token"] for r in mine],
                         "tok_s": round(statistics.median(r["tok_s"] for r in mine), 2)})
    if "baseline" in checkouts:
        base = {r["level"]: r["us_per_token"] for r in rows if r["checkout"] == "baseline"}
        for r in rows:
            if r["checkout"] == "this":
                r["vs_baseline"] = round(r["us_per_token"] / base[r["level"]], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", default=None, metavar="REF",
                   help="also measure the server at git REF (the baseline; a temporary "
                        "worktree)")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens")
    p.add_argument("--work", type=Path, default=None,
                   help="the peer benchmark's models (default ~/.cache/camex-serve/peer/"
                        "<full|quick>-seed0)")
    p.add_argument("--threads", type=int, default=1, help="the servers' compute threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=4, help="servers started per checkout")
    p.add_argument("--concurrency", type=int, default=8, help="the concurrent level")
    p.add_argument("--requests", type=int, default=None,
                   help="B=1 requests per round (default 8; quick 2); the concurrent level "
                        "sends twice --concurrency")
    p.add_argument("--new-tokens", type=int, default=None, help="per request (64; quick 8)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/stream-cpu[-quick].json)")
    args = p.parse_args(argv)
    requests = args.requests or (2 if args.quick else 8)
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    work = args.work or Path.home() / ".cache" / "camex-serve" / "peer" / \
        f"{'quick' if args.quick else 'full'}-seed0"
    models = build_models(work, args.quick, num_prompts=max(requests, 2 * args.concurrency, 2))
    prompts = [json.loads(line)["prompt"] for line in Path(models["prompts"]).read_text()
               .splitlines()]
    levels = [("B=1", "tgi", 1, requests),
              (f"c={args.concurrency}", "tgi", args.concurrency, 2 * args.concurrency),
              ("openai B=1", "openai", 1, requests)]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="stream-cpu-") as tmp, \
            contextlib.ExitStack() as stack:
        checkouts = {"this": ROOT}
        commits = {"this": git("rev-parse", "HEAD")}
        if args.compare:
            checkouts["baseline"] = stack.enter_context(
                worktree(args.compare, Path(tmp) / "baseline"))
            commits["baseline"] = git("rev-parse", "HEAD", cwd=checkouts["baseline"])
        for rnd in range(args.rounds):
            order = list(checkouts) if rnd % 2 == 0 else list(reversed(checkouts))
            for name in order:
                log = Path(tmp) / f"server-{name}-{rnd}.log"
                with server(checkouts[name], models["camex_dense"], args, log) as srv:
                    peer_client.measure(srv.url, "tgi", prompts[:2], 1, 4)  # warm
                    for level, api, c, n in levels:
                        got = measure(srv, api, prompts, c, n, new_tokens)
                        runs.append({"checkout": name, "round": rnd, "level": level, **got})
                        print(f"round {rnd} {name:8s} {level:10s} "
                              f"{got['us_per_token']:7.1f} us/token  "
                              f"{got['tok_s']:7.1f} tok/s", flush=True)
    rows = summarize(runs, list(checkouts))
    print()
    print_table(rows, COLS)
    out = args.out or RESULTS / f"stream-cpu{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "stream_cpu", "argv": sys.argv[1:] if argv is None else argv,
           "commits": commits, "compare": args.compare, "quick": args.quick,
           "threads": args.threads, "dtype": args.dtype, "new_tokens": new_tokens,
           "machine": cpu_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "rows": rows, "runs": runs}
    out.write_text(results_json(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
