"""Start-up benchmark: seconds from launching camex-server to `/ready`, and where they go.

Each round starts every variant once, in turn, on 127.0.0.1 (`python -m server.cli --model M`),
waits for `GET /ready` to answer 200, sends one `/generate` of one token, and stops it with
SIGTERM. The server's own log lines split the time: the API process done importing
(`starting`), the engine loaded (`engine process ready for requests`; only an engine in a
process of its own says so), its merge pool and cost model ready (`warm-up: ...`), and
`ready`.

Variants: `--engine-process on,off` of this checkout, and with `--compare REF` the same server
at another commit (a temporary git worktree, run with this checkout's Python environment), so
a change is measured against its baseline in the same run, interleaved.

    python benchmarks/startup.py --model DIR --rounds 5 --compare HEAD~3
    python benchmarks/startup.py --quick          # a tiny checkpoint built here: checks the script

It prints a table and writes JSON (default benchmarks/results/startup-<commit>.json); it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from benchmarks.checkouts import git, worktree  # noqa: E402
from benchmarks.machine import cpu_info, loadavg  # noqa: E402
from benchmarks.serving import end_process, free_port  # noqa: E402

PHASES = {  # log message -> phase name (seconds after the launch)
    "starting": "app_imported_s",
    "engine process ready for requests": "engine_loaded_s",
    "ready": "ready_logged_s",
}


def log_times(log_path: Path, t0: float) -> dict:
    """Seconds after t0 at which the phases' log lines were written (first of each)."""
    times: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        name = PHASES.get(rec.get("msg"))
        if name is None and str(rec.get("msg", "")).startswith("warm-up"):
            name = "warmed_s"
        if name and name not in times:
            ts = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            times[name] = round(ts - t0, 3)
    return times


def start_once(tree: Path, model: str, extra: list[str], log_path: Path,
               timeout_s: float) -> dict:
    """One start of the server in `tree`: launch -> /ready, first token, phases."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(timeout=5.0) as client:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
                    if time.time() - t0 > timeout_s:
                        raise TimeoutError(f"not ready after {timeout_s:.0f}s; see {log_path}")
                    try:
                        if client.get(url + "/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.02)
                ready = time.time() - t0
                r = client.post(url + "/generate", timeout=60.0, json={
                    "inputs": "Hello", "parameters": {"max_new_tokens": 1}})
                r.raise_for_status()
                first = time.time() - t0
        finally:
            end_process(proc, lambda p: p.send_signal(signal.SIGTERM))
    return {"ready_s": round(ready, 3), "first_token_s": round(first, 3),
            **log_times(log_path, t0)}


def quick_model(work: Path) -> str:
    from tests.conftest import build_tiny  # the test suite's tiny folded LM with a tokenizer

    return str(build_tiny(work / "tiny-lm", "lm"))


def summarize(runs: list[dict]) -> dict:
    keys = sorted({k for r in runs for k in r})
    return {k: round(statistics.median(r[k] for r in runs if k in r), 3) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="folded causal-LM checkpoint directory")
    p.add_argument("--quick", action="store_true", help="a tiny checkpoint built here")
    p.add_argument("--rounds", type=int, default=3, help="starts per variant (interleaved)")
    p.add_argument("--engine-process", default="on,off",
                   help="comma-separated --engine-process values to start")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--compare", default=None, metavar="REF",
                   help="also start the server at git REF (baseline, --engine-process auto)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /ready")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    if not args.model and not args.quick:
        p.error("give --model DIR (or --quick)")
    commit = git("rev-parse", "--short", "HEAD")
    with tempfile.TemporaryDirectory(prefix="camex-startup-") as tmp:
        work = Path(tmp)
        model = args.model or quick_model(work)
        extra = ["--threads", str(args.threads)] if args.threads else []
        variants = [(f"{commit} engine-process={mode}", ROOT, [*extra, "--engine-process", mode])
                    for mode in args.engine_process.split(",")]
        with contextlib.ExitStack() as stack:
            if args.compare:
                tree = stack.enter_context(worktree(args.compare, work / "baseline"))
                ref = git("rev-parse", "--short", args.compare)
                variants.insert(0, (f"{ref} (baseline) engine-process=auto", tree, extra))
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
            for i in range(args.rounds):
                for v, (name, tree, flags) in enumerate(variants):
                    run = start_once(tree, model, flags, work / f"server-{v}-{i}.log",
                                     args.timeout)
                    runs[name].append(run)
                    print(f"round {i + 1}/{args.rounds} {name}: ready {run['ready_s']:.2f}s",
                          flush=True)
    rows = [{"variant": name, "runs": len(r), **summarize(r)} for name, r in runs.items()]
    base = rows[0]["ready_s"]
    for row in rows:
        row["ready_vs_first"] = round(row["ready_s"] / base, 3)
    cols = ["variant", "ready_s", "ready_vs_first", "first_token_s", "app_imported_s",
            "engine_loaded_s", "warmed_s"]
    print("\nmedians over rounds, seconds after launch (first row: the reference)")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "-")) for c in cols))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"startup-{commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "startup", "commit": commit, "model": args.model or "quick (tiny)",
        "rounds": args.rounds, "threads": args.threads, "machine": cpu_info(),
        "loadavg": loadavg(), "rows": rows, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
