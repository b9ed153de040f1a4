"""The reliability suite, long form: abuse and failure scenarios against a real camex-server,
written to one results JSON (git commit, machine, load average) and printed as a table.

    python benchmarks/reliability/run.py                       # everything, ~25 min on 2 cores
    python benchmarks/reliability/run.py --only overload,slowloris
    python benchmarks/reliability/run.py --quick --model LM --classifier CLF   # a smoke run

Scenarios (see scenarios.py): capacity (closed loop, the mix), soak (the mix at 70 % of that
capacity for --soak-minutes), overload at 4x and 20x capacity, classify flood (80 clients x 32
long texts, bursts), disconnect storm, slowloris (1,500 stalled sockets over a 1,000 cap),
SIGTERM with work in flight, kill -9 and restart, corrupt checkpoints. Without --model /
--classifier it serves the demo models (built if missing). The quick versions of these
scenarios that run in CI are tests/reliability (pytest -m reliability).

A shared machine disturbs the figures: the load average is recorded at the start and end of
every scenario, so a reader can tell a busy run from a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios as sc  # noqa: E402
import harness  # noqa: E402
from harness import ROOT  # noqa: E402
from benchmarks.checkouts import git_state  # noqa: E402  (harness puts the checkout on sys.path)

ORDER = ("capacity", "soak", "overload_4x", "overload_20x", "classify_flood",
         "disconnect_storm", "slowloris", "sigterm", "kill9_restart", "corrupt_checkpoints")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu_model": cpu, "mem_total": mem}


def run_all(ctx: sc.Context, only: list[str], soak_minutes: float, out: Path,
            update: bool) -> dict:
    code = git_state(ROOT)
    doc = {"git_commit": code["commit"], "git_dirty": code["dirty"],
           "machine": machine(), "started_at": now(), "load_avg_start": os.getloadavg(),
           "quick": ctx.quick, "model": Path(ctx.model).name,
           "classifier": Path(ctx.classifier).name,
           "server_root": harness.SERVER_ROOT or "this checkout", "scenarios": {}}
    if update and out.exists():  # re-run some scenarios, keep the others' results
        old = json.loads(out.read_text())
        doc["scenarios"] = {k: v for k, v in old["scenarios"].items() if k not in only}
    cap = None
    for name in (n for n in ORDER if n in only):
        if name in ("soak", "overload_4x", "overload_20x") and cap is None:
            print("capacity (needed for the rates) ...", flush=True)
            doc["scenarios"]["capacity"] = timed(lambda: sc.capacity(ctx))
            cap = doc["scenarios"]["capacity"].get("req_per_s")
        if name == "capacity" and cap is not None:
            continue
        print(f"{name} ...", flush=True)
        doc["scenarios"][name] = timed(
            lambda name=name, cap=cap: scenario(name, ctx, cap, soak_minutes))
        if name == "capacity":
            cap = doc["scenarios"][name].get("req_per_s")
        doc["load_avg_end"] = os.getloadavg()
        out.write_text(json.dumps(doc, indent=2) + "\n")  # partial results survive a crash
        print(f"  {'pass' if doc['scenarios'][name].get('pass') else 'FAIL'}", flush=True)
    return doc


def scenario(name: str, ctx: sc.Context, cap: float | None, soak_minutes: float) -> dict:
    if name == "capacity":
        return sc.capacity(ctx)
    if name == "soak":
        return sc.soak(ctx, 0.7 * cap, soak_minutes)
    if name.startswith("overload_"):
        factor = float(name.split("_")[1].rstrip("x"))
        return sc.overload(ctx, factor * cap, factor)
    return getattr(sc, name)(ctx)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def timed(fn) -> dict:
    load, start, started_at = os.getloadavg(), time.monotonic(), now()
    try:
        result = fn()
    except Exception as exc:  # a scenario that crashes is a failed scenario, not a lost run
        result = {"pass": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {**result, "git_commit": git_state(ROOT)["commit"], "started_at": started_at,
            "wall_s": round(time.monotonic() - start, 1),
            "load_avg_before": [round(x, 2) for x in load],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def table(doc: dict) -> str:
    rows = ["| scenario | result | target | pass |", "|---|---|---|---|"]
    for name, r in doc["scenarios"].items():
        rows.append(f"| {name} | {headline(name, r)} | {targets(r)} | "
                    f"{'yes' if r.get('pass') else '**no**'} |")
    return "\n".join(rows)


def headline(name: str, r: dict) -> str:
    if "error" in r:
        return "crashed: " + r["error"][:80]
    f = {
        "capacity": lambda: f"{r['req_per_s']} req/s completed",
        "soak": lambda: (f"{r['requests']} requests at {r['rate_per_s']}/s for "
                         f"{r['seconds'] / 60:.0f} min, {r['lost']} lost, metrics == client: "
                         f"{r['metrics_equal_client_counts']}, RSS from min 2 "
                         f"{r['rss_growth_from_2min_pct']} %"),
        "classify_flood": lambda: (f"probes max {r['probe_max_s']} s, RSS after idle "
                                   f"{r['rss_idle_vs_start_pct']:+} %, threads "
                                   f"{r['threads_start']}→"
                                   f"{max(x['threads_peak'] for x in r['rounds'])}"),
        "disconnect_storm": lambda: (f"{r['clients_left']} left, {r['dropped_counted']} "
                                     f"counted dropped, idle after {r['seconds_to_idle']} s"),
        "slowloris": lambda: (f"{r['opened']} stalled sockets, probes max "
                              f"{r['probes']['max_s']} s, server fds max {r['server_fds_max']}"),
        "sigterm": lambda: (f"{r['requests']} in flight: {r['by_kind_status']}, exit "
                            f"{r['exit_code']} after {r['exit_after_sigterm_s']} s, "
                            f"{r['tracebacks_in_log']} tracebacks"),
        "kill9_restart": lambda: (f"listening {r['restart_to_listening_s']} s, ready "
                                  f"{r['restart_to_ready_s']} s, first 200 "
                                  f"{r['restart_to_first_200_s']} s"),
        "corrupt_checkpoints": lambda: ", ".join(
            f"{k}: exit {v['exit_code']}" for k, v in r["cases"].items()),
    }.get(name)
    if f is None and name.startswith("overload"):
        return (f"{r['rate_per_s']} req/s offered, {r['served_per_s']} served, "
                f"{r['rejected_429']} × 429 (p99 {r['rejected_server_p99_s']} s in the server, "
                f"{r['rejected_p99_s']} s at the client), "
                f"{r['status_504']} × 504, {r['status_5xx_not_504']} other 5xx, {r['lost']} lost, "
                f"probes max {r['probes']['max_s']} s")
    return f() if f else ""


def targets(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.get("targets", {}).items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="folded LM directory (default: the demo LM)")
    p.add_argument("--classifier", help="folded classifier directory (default: the demo one)")
    p.add_argument("--only", default=",".join(ORDER), help="comma-separated scenarios")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="~10x shorter: checks the script runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability.json"))
    p.add_argument("--logs", default=None, help="server logs (default: next to --out)")
    p.add_argument("--server-root", default=None,
                   help="a directory holding another version's `server` package to run instead "
                        "of this checkout's (e.g. `git archive OLD server | tar -x -C DIR`), "
                        "for before/after comparisons")
    p.add_argument("--update", action="store_true",
                   help="keep the other scenarios' results already in --out (each scenario "
                        "records its own commit, start time and load average)")
    args = p.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(only) - set(ORDER)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(ORDER)}")
    model, clf = args.model, args.classifier
    if not (model and clf):
        from camex_runtime.training.demo import ensure_demo_models
        lm_dir, clf_dir = ensure_demo_models()
        model, clf = model or str(lm_dir), clf or str(clf_dir)
    out = Path(args.out)
    logs = Path(args.logs) if args.logs else out.with_suffix("").parent / (out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    ctx = sc.Context(model=model, classifier=clf, out_dir=logs, quick=args.quick)
    if args.server_root:
        harness.SERVER_ROOT = str(Path(args.server_root).resolve())
    doc = run_all(ctx, only, args.soak_minutes, out, args.update)
    doc["scenarios"] = {k: doc["scenarios"][k] for k in ORDER if k in doc["scenarios"]}
    doc["load_avg_end"] = os.getloadavg()
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwrote {out} (server logs in {logs})")
    return 0 if all(r.get("pass") for r in doc["scenarios"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
