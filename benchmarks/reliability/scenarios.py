"""The reliability scenarios. Each starts the servers it needs, measures, stops them, and
returns a dict: its figures, the `targets` it is held to and `pass`.

Targets are those of the issue that asked for this suite: nothing lost, server metrics equal
to client counts, RSS growth < 5 % from minute 2 of the soak, probes answered < 1 s under
floods, RSS back within 10 % after classify bursts, cut requests answered at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness import (ROOT, Workload, client, client_counts, closed_loop, free_port,
                     longest_generation, metric, open_loop, percentile, requests_by_route, send,
                     settle, start_server, summarise, wait_until_ready, with_probes)

MIX = {"stream": 0.4, "generate": 0.3, "completions": 0.2, "classify": 0.1}
PROBE_TARGET_S = 1.0


@dataclass
class Context:
    model: str
    classifier: str
    out_dir: Path  # server logs
    quick: bool  # durations cut ~10x: a smoke run of the script itself
    server_args: tuple[str, ...] = ("--threads", "1")

    def args(self, *extra: str) -> list[str]:
        return ["--model", self.model, "--classifier", self.classifier, *self.server_args,
                *extra]

    def seconds(self, full: float) -> float:
        return max(2.0, full / 10) if self.quick else full


def rss_sampler(server, interval: float, stop: threading.Event, out: list) -> None:
    start = time.monotonic()
    while not stop.wait(interval):
        try:
            out.append((round(time.monotonic() - start, 1), round(server.rss_mib(), 1)))
        except (FileNotFoundError, ProcessLookupError):
            return


# -- capacity and soak ----------------------------------------------------------------------
def capacity(ctx: Context) -> dict:
    """Completed requests/s of the mix with clients = 2x the batch size, back to back."""
    server = start_server(ctx.args(), ctx.out_dir, "capacity")
    try:
        outcomes = asyncio.run(closed_loop(server.base_url, Workload(MIX), clients=16,
                                           seconds=ctx.seconds(60)))
        ok = [o for o in outcomes if o.status == 200]
        span = max(o.sent_at + o.seconds for o in outcomes) - min(o.sent_at for o in outcomes)
        return {"req_per_s": round(len(ok) / span, 2), **summarise(outcomes),
                "pass": bool(ok) and not any(o.lost for o in outcomes)}
    finally:
        server.stop()


def soak(ctx: Context, rate: float, minutes: float) -> dict:
    """Open-loop mix at `rate` for `minutes`; every request answered, metrics == client."""
    server = start_server(ctx.args(), ctx.out_dir, "soak")
    try:
        before = requests_by_route(server.metrics())
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=rss_sampler, args=(server, 5.0, stop, samples))
        sampler.start()
        seconds = ctx.seconds(minutes * 60)
        try:
            outcomes, probes = asyncio.run(with_probes(
                open_loop(server.base_url, Workload(MIX), rate, seconds), server.base_url,
                interval=1.0))
        finally:
            stop.set()
            sampler.join()
        settle(server)
        time.sleep(1.0)  # the last access-log/metric updates follow the responses
        after = requests_by_route(server.metrics())
        server_counts = {k: v - before.get(k, 0) for k, v in after.items()
                         if k[0] in {o.route for o in outcomes} and v - before.get(k, 0)}
        mine = dict(client_counts(outcomes))
        from_2min = [rss for t, rss in samples if t >= min(120.0, seconds / 5)]
        growth = (from_2min[-1] / from_2min[0] - 1) * 100 if len(from_2min) > 1 else None
        stats = summarise(outcomes)
        return {"rate_per_s": round(rate, 2), "seconds": seconds, **stats,
                "metrics_equal_client_counts": server_counts == mine,
                "server_counts": {f"{r} {s}": v for (r, s), v in sorted(server_counts.items())},
                "rss_mib": {"start": samples[0][1] if samples else None,
                            "at_2min": from_2min[0] if from_2min else None,
                            "end": from_2min[-1] if from_2min else None,
                            "max": max((r for _, r in samples), default=None)},
                "rss_growth_from_2min_pct": None if growth is None else round(growth, 2),
                "rss_samples_s_mib": samples,  # the merge cache fills its budget first
                "probes": probes.summary(),
                "targets": {"lost": 0, "metrics_equal_client_counts": True,
                            "rss_growth_from_2min_pct": "< 5"},
                "pass": stats["lost"] == 0 and server_counts == mine and
                growth is not None and growth < 5.0}
    finally:
        server.stop()


# -- overload -------------------------------------------------------------------------------
def overload(ctx: Context, rate: float, factor: float) -> dict:
    """Open-loop generation at `factor` x capacity: fast 429s, no 5xx, nothing lost."""
    server = start_server(ctx.args(), ctx.out_dir, f"overload-{factor:g}x")
    try:
        work = Workload({"stream": 0.5, "generate": 0.3, "completions": 0.2})
        outcomes, probes = asyncio.run(with_probes(
            open_loop(server.base_url, work, rate, ctx.seconds(30)), server.base_url))
        rejected = [o.seconds for o in outcomes if o.status == 429]
        # the server's own view (middleware in to response out), next to the client's, which
        # on a shared 2-core machine includes this process's event-loop lag
        server_429 = [r["duration_ms"] / 1e3 for r in server.access_log() if r["status"] == 429]
        ok = [o for o in outcomes if o.status == 200]
        span = max(o.sent_at + o.seconds for o in outcomes) - min(o.sent_at for o in outcomes)
        # 504 (waited longer than the queue timeout) is an overload answer by design
        five = [o for o in outcomes if isinstance(o.status, int) and o.status >= 500
                and o.status != 504]
        p = probes.summary()
        return {"factor": factor, "rate_per_s": round(rate, 2), **summarise(outcomes),
                "served_per_s": round(len(ok) / span, 2),
                "rejected_429": len(rejected),
                "rejected_p99_s": round(percentile(rejected, 99), 3) if rejected else None,
                "rejected_server_p99_s": round(percentile(server_429, 99), 3)
                if server_429 else None,
                "status_504": sum(o.status == 504 for o in outcomes),
                "status_5xx_not_504": len(five), "probes": p,
                "targets": {"lost": 0, "status_5xx_not_504": 0,
                            "probe_max_s": f"< {PROBE_TARGET_S}"},
                "pass": not any(o.lost for o in outcomes) and not five and p["not_200"] == 0
                and p["max_s"] < PROBE_TARGET_S}
    finally:
        server.stop()


# -- classify flood, memory ------------------------------------------------------------------
LONG_TEXT = ("Love is the only force capable of transforming an enemy into a friend, and a "
             "merged expert is the only thing capable of serving every segment. ") * 3


def classify_flood(ctx: Context, clients: int = 80, texts: int = 32, bursts: int = 3) -> dict:
    """`clients` x `texts` long texts back to back, in bursts; probes, a generate every
    second, RSS and threads before, after each burst and after a short idle."""
    server = start_server(ctx.args(), ctx.out_dir, "classify-flood")
    try:
        time.sleep(2.0)
        rss0, threads0 = server.rss_mib(), server.threads()
        rounds = []
        for b in range(bursts):
            outcomes, gens, probes, peak = asyncio.run(_flood(server, clients, texts,
                                                              ctx.seconds(20)))
            after = server.rss_mib()
            time.sleep(5.0)
            rounds.append({"burst": b, **summarise(outcomes), "probes": probes.summary(),
                           "generate_during_flood": summarise(gens),
                           "rss_after_mib": round(after, 1),
                           "rss_idle_mib": round(server.rss_mib(), 1),
                           "threads_peak": peak, "threads_idle": server.threads()})
        worst_probe = max(r["probes"]["max_s"] for r in rounds)
        worst_rss = max(r["rss_idle_mib"] for r in rounds)
        return {"clients": clients, "texts_per_call": texts, "rss_start_mib": round(rss0, 1),
                "threads_start": threads0, "rounds": rounds,
                "probe_max_s": worst_probe,
                "rss_idle_vs_start_pct": round((worst_rss / rss0 - 1) * 100, 2),
                "targets": {"probe_max_s": f"< {PROBE_TARGET_S}",
                            "rss_idle_vs_start_pct": "<= 10", "lost": 0},
                "pass": worst_probe < PROBE_TARGET_S and worst_rss <= 1.10 * rss0 and
                all(r["lost"] == 0 and r["probes"]["not_200"] == 0 for r in rounds)}
    finally:
        server.stop()


async def _flood(server, clients: int, texts: int, seconds: float):
    stop_at = time.monotonic() + seconds
    body = {"inputs": [LONG_TEXT] * texts, "truncate": True}
    outcomes, gens, peak = [], [], [0]
    async with client(server.base_url) as c:
        async def flooder():
            while time.monotonic() < stop_at:
                o = await send(c, "classify", body)
                outcomes.append(o)
                if o.status == 429:
                    await asyncio.sleep(0.2)

        async def generator():
            while time.monotonic() < stop_at:
                gens.append(await send(c, "generate", {"inputs": "A fortune:", "parameters": {
                    "max_new_tokens": 8}}))
                peak[0] = max(peak[0], server.threads())
                await asyncio.sleep(1.0)

        async def both():
            await asyncio.gather(*(flooder() for _ in range(clients)), generator())
        _, probes = await with_probes(both(), server.base_url,
                                      paths=("/health", "/ready", "/metrics"))
    return outcomes, gens, probes, peak[0]


# -- disconnects ----------------------------------------------------------------------------
def disconnect_storm(ctx: Context, n: int = 300) -> dict:
    """`n` generations whose clients leave after 0-1 s; the engine must end up idle, count
    them as dropped and serve the next request."""
    server = start_server(ctx.args(), ctx.out_dir, "disconnect-storm")
    try:
        before = server.metrics()
        rss0 = server.rss_mib()
        n = max(20, n // 10) if ctx.quick else n

        async def storm():
            rng = random.Random(0)
            longest = longest_generation(server)
            work = Workload({"stream": 0.5, "generate": 0.3, "completions": 0.2},
                            new_tokens=(longest // 2, longest), prompt_words=(2, 6))
            async with client(server.base_url) as c:
                async def leaver(i):
                    kind = work.draw(rng)
                    task = asyncio.create_task(send(c, kind, work.request(kind, rng)))
                    done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.05, 1.0))
                    if done:
                        return "finished"
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return "left"
                return await asyncio.gather(*(leaver(i) for i in range(n)))

        results = asyncio.run(storm())
        idle_after = settle(server)
        time.sleep(1.0)
        after = server.metrics()
        left = results.count("left")
        dropped = metric(after, "camex_failures_total", reason="dropped") - \
            metric(before, "camex_failures_total", reason="dropped")
        check = httpx.post(server.base_url + "/generate", json={
            "inputs": "still there?", "parameters": {"max_new_tokens": 4}}, timeout=60)
        # 499: the server saw the client leave (generations cancelled, counted as dropped);
        # 429s that were still on their way when their client left are the rest of "left"
        statuses = Counter(str(r["status"]) for r in server.access_log()
                           if r["route"] in ("/generate", "/generate_stream", "/v1/completions"))
        return {"requests": n, "clients_left": left, "dropped_counted": int(dropped),
                "server_statuses": dict(sorted(statuses.items())),
                "seconds_to_idle": round(idle_after, 2),
                "rss_before_mib": round(rss0, 1), "rss_after_mib": round(server.rss_mib(), 1),
                "next_request_status": check.status_code,
                "targets": {"idle": True, "next_request_status": 200},
                # a client may leave while its response is already on the wire: never more
                # drops than leavers
                "pass": check.status_code == 200 and dropped <= left}
    finally:
        server.stop()


# -- slowloris ------------------------------------------------------------------------------
def slowloris(ctx: Context, sockets: int = 1500, hold_s: float = 30.0) -> dict:
    """`sockets` connections that send a header byte every few seconds and never finish,
    above the connection cap; probes and a real client must still get through."""
    cap = 1000
    server = start_server(ctx.args("--max-connections", str(cap)), ctx.out_dir, "slowloris")
    try:
        sockets = sockets // 10 if ctx.quick else sockets
        stop = threading.Event()
        stats = {"opened": 0, "open_failed": 0, "closed_by_server": 0}
        attacker = threading.Thread(target=_slowloris, args=(server.port, sockets, stop, stats))
        fds = []

        async def watch():
            t_end = time.monotonic() + ctx.seconds(hold_s)
            gens = []
            async with client(server.base_url) as c:
                while time.monotonic() < t_end:
                    fds.append(server.fds())
                    gens.append(await send(c, "generate", {"inputs": "hello", "parameters": {
                        "max_new_tokens": 4}}))
                    await asyncio.sleep(1.0)
            return gens

        attacker.start()
        try:
            gens, probes = asyncio.run(with_probes(watch(), server.base_url))
        finally:
            stop.set()
            attacker.join()
        m = server.metrics()
        closed = {r: int(metric(m, "camex_connections_closed_total", reason=r))
                  for r in ("header_timeout", "evicted", "over_capacity")}
        p = probes.summary()
        return {"sockets": sockets, "max_connections": cap, **stats, "server_closed": closed,
                "server_fds_max": max(fds) if fds else None, "probes": p,
                "generate_during_attack": summarise(gens),
                "targets": {"probe_max_s": f"< {PROBE_TARGET_S}", "probes_not_200": 0},
                "pass": p["not_200"] == 0 and p["max_s"] < PROBE_TARGET_S and
                all(o.status == 200 for o in gens)}
    finally:
        server.stop()


def _slowloris(port: int, n: int, stop: threading.Event, stats: dict) -> None:
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            while len(socks) < n and not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    s.setblocking(False)
                    socks.append(s)
                    stats["opened"] += 1
                except OSError:
                    stats["open_failed"] += 1
                    break
            alive = []
            for s in socks:  # one more header byte each: no idle timeout would ever fire
                try:
                    s.send(b"X")
                    alive.append(s)
                except OSError:
                    stats["closed_by_server"] += 1
                    s.close()
            socks = alive
            stop.wait(2.0)
    finally:
        for s in socks:
            s.close()


# -- shutdown and restart ---------------------------------------------------------------------
def sigterm(ctx: Context, grace_s: float = 2.0) -> dict:
    """Mixed work in flight, SIGTERM, a short grace: every request answered (done, or 503 /
    in-stream `shutdown`), exit 0, no tracebacks."""
    server = start_server(ctx.args("--grace-s", str(grace_s)), ctx.out_dir, "sigterm")
    longest = longest_generation(server)
    work = Workload({"stream": 0.4, "generate": 0.3, "completions": 0.2, "classify": 0.1},
                    new_tokens=(longest // 2, longest), prompt_words=(2, 6))

    async def scenario():
        rng = random.Random(1)
        async with client(server.base_url) as c:
            tasks = []
            for _ in range(40):
                kind = work.draw(rng)
                tasks.append(asyncio.create_task(send(c, kind, work.request(kind, rng))))
            await asyncio.sleep(1.0)
            sent = time.monotonic()
            server.signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*tasks)
            return outcomes, sent

    outcomes, sent = asyncio.run(scenario())
    code = server.proc.wait(120)
    drain_s = time.monotonic() - sent
    log = server.log()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    drained = next((r for r in records if r.get("msg") == "drained"), {})
    stats = summarise(outcomes)
    return {"grace_s": grace_s, **stats, "exit_code": code,
            "exit_after_sigterm_s": round(drain_s, 2),
            "drained_log": {k: drained.get(k) for k in ("in_flight", "cut", "seconds")},
            "tracebacks_in_log": log.count("Traceback"),
            "non_json_log_lines": sum(not line.startswith("{") for line in log.splitlines()),
            "targets": {"lost": 0, "exit_code": 0, "tracebacks_in_log": 0},
            "pass": stats["lost"] == 0 and code == 0 and "Traceback" not in log and
            all(o.status in (200, 503) for o in outcomes)}


def kill9_restart(ctx: Context) -> dict:
    """kill -9 with requests in flight, then a restart on the same port: seconds to
    listening (/health answers), to /ready, to the first 200."""
    first = start_server(ctx.args(), ctx.out_dir, "kill9-before")
    port = first.port

    async def in_flight():
        async with client(first.base_url) as c:
            longest = longest_generation(first)
            work = Workload({"stream": 0.5, "generate": 0.5}, new_tokens=(longest // 2, longest),
                            prompt_words=(2, 6))
            rng = random.Random(2)
            tasks = [asyncio.create_task(send(c, k, work.request(k, rng)))
                     for k in (work.draw(rng) for _ in range(8))]
            await asyncio.sleep(1.0)
            first.signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    killed = asyncio.run(in_flight())
    first.proc.wait(30)
    again = start_server(ctx.args(), ctx.out_dir, "kill9-after", port=port, wait_ready=False)
    try:
        listening = None
        while listening is None:
            if again.proc.poll() is not None:
                raise RuntimeError(again.log()[-2000:])
            try:
                httpx.get(again.base_url + "/health", timeout=1)
                listening = time.monotonic() - again.started_at
            except httpx.HTTPError:
                time.sleep(0.05)
        ready = wait_until_ready(again, 900)
        r = httpx.post(again.base_url + "/generate", json={"inputs": "back", "parameters": {
            "max_new_tokens": 4}}, timeout=60)
        first_ok = time.monotonic() - again.started_at
        return {"in_flight_at_kill": len(killed),
                "in_flight_lost_at_kill": sum(o.lost for o in killed),
                "restart_to_listening_s": round(listening, 2),
                "restart_to_ready_s": round(ready, 2), "restart_to_first_200_s": round(first_ok, 2),
                "first_status": r.status_code, "same_port": True,
                "targets": {"first_status": 200},
                "pass": r.status_code == 200}
    finally:
        again.stop()


# -- corrupt checkpoints ---------------------------------------------------------------------
def corrupt_checkpoints(ctx: Context) -> dict:
    """Broken checkpoints and wrong paths: a non-zero exit, one error line, no traceback."""
    work = ctx.out_dir / "corrupt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cases = _corrupt_cases(Path(ctx.model), Path(ctx.classifier), work)
    if ctx.quick:  # one load failure, one bad tensor, one pre-flight refusal
        cases = {k: cases[k] for k in ("truncated_weights", "nan_tensor", "classifier_as_model")}
    results = {}
    for name, args in cases.items():
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(free_port()),
                               *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        lines = proc.stderr.strip().splitlines()
        errors = [line for line in lines if not line.startswith("{") or
                  json.loads(line).get("level") == "error"]
        results[name] = {"exit_code": proc.returncode,
                         "seconds_to_exit": round(time.monotonic() - start, 2),
                         "error_lines": len(errors), "traceback": "Traceback" in proc.stderr,
                         "all_lines_json_or_one_plain": all(line.startswith("{") for line in lines)
                         or len(lines) == 1,
                         "error": (errors[0][:300] if errors else None)}
    ok = all(r["exit_code"] in (1, 2) and r["error_lines"] == 1 and not r["traceback"] and
             r["all_lines_json_or_one_plain"] for r in results.values())
    return {"cases": results,
            "targets": {"exit_code": "1 (load) or 2 (pre-flight)", "error_lines": 1,
                        "traceback": False},
            "pass": ok}


def _corrupt_cases(lm: Path, clf: Path, work: Path) -> dict[str, list[str]]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    def copy(name: str) -> Path:
        dst = work / name
        shutil.copytree(lm, dst)
        return dst

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    nan = copy("nan-tensor")
    with safe_open(nan / "model.safetensors", "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(state)[0]
    state[first] = state[first].clone().fill_(float("nan"))
    save_file(state, nan / "model.safetensors", metadata=meta)
    shape = copy("wrong-shape")
    cfg = json.loads((shape / "config.json").read_text())
    cfg["d_ff"] = cfg.get("d_ff", 512) * 2
    (shape / "config.json").write_text(json.dumps(cfg))
    garbage = copy("garbage-config")
    (garbage / "config.json").write_text("{not json")
    no_weights = copy("no-weights")
    (no_weights / "model.safetensors").unlink()
    return {"truncated_weights": ["--model", str(truncated)],
            "nan_tensor": ["--model", str(nan)],
            "shape_mismatch": ["--model", str(shape)],
            "garbage_config": ["--model", str(garbage)],
            "missing_weights": ["--model", str(no_weights)],
            "missing_directory": ["--model", str(work / "nope")],
            "classifier_as_model": ["--model", str(clf)],
            "lm_as_classifier": ["--classifier", str(lm)]}
