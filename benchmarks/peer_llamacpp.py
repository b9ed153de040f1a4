"""camex-server vs llama.cpp's llama-server on the same weights, over HTTP, at equal threads.

One command builds what it needs and prints the table of issue #15:

1. llama.cpp: ``llama-server`` built from the ``llama-cpp-python`` source package (cached
   under ``~/.cache/camex-serve/llama.cpp/``, see ``llamacpp_build.py``);
2. models (``peer_models.py``): one seeded random dense model — GPT-2 small (124 M parameters,
   full size), or with ``--family llama`` a Llama of the same width and depth (RMSNorm, rotary,
   grouped-query attention, SwiGLU; 153 M), or with ``--family qwen3`` that Llama as a Qwen3
   (per-head query/key RMSNorms) — converted to f32 and f16 GGUF by llama.cpp's own
   converter, and to camex checkpoints: the dense-equivalent model and a CAMEx 7+1-expert model
   upcycled from it;
3. for every thread count and dtype pair (fp32: f32 GGUF vs ``--dtype float32``; bf16: f16 GGUF
   vs ``--dtype bfloat16``), ``--runs`` rounds. A round starts fresh processes on 127.0.0.1 and
   keeps them up together: llama-server, camex-server on the dense model and on the CAMEx model,
   and for each camex model the engine in process (``peer_engine.py --serve``, for the
   server-overhead ratio). It measures B=1 (sequential requests) and ``--concurrency``
   concurrent requests with the same streaming client (``peer_client.py``), interleaved: at
   B=1 each prompt goes to every server and engine in turn, at the concurrent level each wave
   of requests, so that all of them see the machine of the same minute (``measure_level``);
4. writes JSON (runs, machine, load, versions, commit) and prints the tables
   (``peer_report.py``). Each HTTP level also records where the CPU went besides the engine's
   compute: ``cpu_per_token_ms`` of the server's main thread (camex-server's HTTP event loop;
   llama-server's main thread runs its slots) and of the client while its requests ran.

    python benchmarks/peer_llamacpp.py                   # the full table (~40 min on 2 cores)
    python benchmarks/peer_llamacpp.py --quick           # tiny model, short runs, still llama.cpp
    python benchmarks/peer_llamacpp.py --quick --no-llama   # camex side only (what CI runs)
    python benchmarks/peer_llamacpp.py --family llama    # the same table on a Llama-family model
    python benchmarks/peer_llamacpp.py --family qwen3    # ... and on a Qwen3 (q/k norms)

A script that measures and reports; it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import llamacpp_build  # noqa: E402
from checkouts import git_state  # noqa: E402
import peer_client  # noqa: E402
from machine import (CpuMeter, cpu_info, loadavg, main_thread_cpu_s,  # noqa: E402
                     with_descendants)
from peer_models import FAMILIES, build_models, context_length  # noqa: E402
from peer_report import DTYPE_PAIRS, LLAMA, markdown, summarize, targets  # noqa: E402
from serving import ServerProcess, end_process, free_port, signals_held  # noqa: E402

SYSTEMS = (LLAMA, "camex-dense", "camex-7x1", "camex-7x1-int8")
DEFAULT_SYSTEMS = SYSTEMS[:3]  # camex-7x1-int8 (--expert-deltas int8) when asked for
CONTENDED_OTHER_CORES = 0.25  # other processes used more than a quarter core during a level
INTERLEAVED = "slices of `concurrency` requests (B=1: request by request), systems in turn"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and short runs")
    p.add_argument("--family", choices=FAMILIES, default="gpt2",
                   help="the dense model's family: GPT-2 small, or a Llama (or a Qwen3: the "
                        "Llama with per-head q/k norms) of its width and depth")
    p.add_argument("--no-llama", action="store_true",
                   help="skip llama.cpp entirely (no build, no GGUF, no llama-server rows)")
    p.add_argument("--no-engine", action="store_true", help="skip the in-process engine runs")
    p.add_argument("--threads", default="1,2", help="compute threads, comma-separated")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"dtype pairs: {', '.join(DTYPE_PAIRS)}")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--runs", type=int, default=2, help="rounds per configuration")
    p.add_argument("--concurrency", type=int, default=8, help="the concurrent level (and -np)")
    p.add_argument("--b1-requests", type=int, default=None,
                   help="sequential requests (16; quick 2)")
    p.add_argument("--concurrent-requests", type=int, default=None,
                   help="requests at the concurrent level (4 x concurrency; quick 1 x)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (64; quick 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--client-cpus", default="auto",
                   help="CPUs the load generator (this process) is confined to while it measures: "
                        "'auto' (the first CPU, when the servers' threads leave one free), "
                        "'none', or a comma-separated list")
    p.add_argument("--client", choices=peer_client.CLIENTS, default="wire",
                   help="how the load generator reads responses: 'wire' (a lean HTTP/1.1 reader, "
                        "little CPU per token) or 'httpx' (as rounds before 2026-12 measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None,
                   help="models and GGUF files "
                        "(default ~/.cache/camex-serve/peer/<full|quick>[-llama]-seed<N>)")
    p.add_argument("--llama-cpp-python-version", default=llamacpp_build.DEFAULT_VERSION)
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: cores)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/peer-llamacpp[-llama][-quick].json)")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.systems = [s for s in args.systems.split(",") if not (args.no_llama and s == LLAMA)]
    for d in args.dtypes:
        if d not in DTYPE_PAIRS:
            p.error(f"unknown dtype pair {d!r}; use {', '.join(DTYPE_PAIRS)}")
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; use {', '.join(SYSTEMS)}")
    # 16 sequential requests: with 4, a B=1 cell moved by up to 40 % between two runs of the
    # same server on a shared VM; on the Xeon VM one request's ITL differs from the next one's
    # by up to 20 % (two processes of one engine, interleaved), so a ratio of two 8-request
    # means still moved by ~5 %
    args.b1_requests = args.b1_requests or (2 if args.quick else 16)
    # 4 waves: one wave's CAMEx/dense ratio, HTTP over engine, ranged 0.83-1.23 (GPT-2-small,
    # bf16 and fp32, one thread, 6 waves each), so with 2 waves target 2's concurrent half
    # swung by ~0.1 from run to run
    args.concurrent_requests = (args.concurrent_requests
                                or args.concurrency * (1 if args.quick else 4))
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    context = context_length(args.family, args.quick)
    if args.prompt_tokens < 1 or args.prompt_tokens + args.new_tokens > context:
        p.error(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} must fit "
                f"the model's {context} positions")
    flavour = "quick" if args.quick else "full"
    family = "" if args.family == "gpt2" else f"-{args.family}"  # GPT-2 keeps its old paths
    args.work = args.work or (Path.home() / ".cache" / "camex-serve" / "peer"
                              / f"{flavour}{family}-seed{args.seed}")
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        f"peer-llamacpp{family}{'-quick' if args.quick else ''}.json")
    return args


def client_cpus(setting: str, threads: int) -> list[int] | None:
    """Where the client runs while it measures (None: anywhere). On a small machine the
    client's per-token work lands next to a server's compute thread or not, by chance: on two
    cores at one compute thread, the same camex-server's B=1 inter-token latency was 9.9-10.5 ms
    with the client confined to one CPU and 10.2-12.4 ms unconfined. 'auto' confines it to the
    first CPU when the servers' compute threads leave at least one CPU free, so both servers
    see the same placement."""
    available = sorted(os.sched_getaffinity(0))
    if setting == "none":
        return None
    if setting == "auto":
        return available[:1] if threads < len(available) else None
    cpus = [int(c) for c in setting.split(",")]
    if not set(cpus) <= set(available):
        raise SystemExit(f"--client-cpus {setting}: this process may run on {available} only")
    return cpus


@contextlib.contextmanager
def confined(cpus: list[int] | None):
    """This process (the client) on `cpus` for the block; the servers were started before
    and keep theirs."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def prompts_needed(args: argparse.Namespace) -> int:
    """Measured prompts of both levels, then the concurrent level's warm-up prompts."""
    return args.b1_requests + args.concurrent_requests + args.concurrency


def make_plan(args: argparse.Namespace, prompts: list[str]) -> dict:
    """The workload every server and the engine get: distinct prompts per level (no prompt is
    measured twice in one run, so no cache anywhere can serve it), warm-up prompts apart."""
    n1, nc, c = args.b1_requests, args.concurrent_requests, args.concurrency
    if prompts_needed(args) > len(prompts):
        raise SystemExit(f"need {prompts_needed(args)} prompts, have {len(prompts)}")
    return {"max_new_tokens": args.new_tokens, "warmup_new_tokens": 4,
            "levels": [{"concurrency": 1, "prompts": prompts[:n1], "warmup_prompts": prompts[-1:]},
                       {"concurrency": c, "prompts": prompts[n1:n1 + nc],
                        "warmup_prompts": prompts[-c:]}]}


def server_command(system: str, pair: str, threads: int, port: int, paths: dict,
                   args: argparse.Namespace) -> tuple[list[str], str]:
    """(command, readiness path) of one server."""
    if system == LLAMA:
        per_slot = args.prompt_tokens + args.new_tokens + 32
        ctx = -(-args.concurrency * per_slot // 256) * 256
        return [str(paths["llama_server"]), "-m", str(paths[f"gguf_{DTYPE_PAIRS[pair][0]}"]),
                "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
                "--threads-batch", str(threads), "-np", str(args.concurrency),
                "-c", str(ctx)], "/health"
    # no prompt cache on either side (llama-server: `cache_prompt: false` per request): every
    # request prefills its whole prompt
    return [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(camex_model(system, paths)), "--threads", str(threads),
            "--dtype", DTYPE_PAIRS[pair][1], "--max-batch-size", str(args.concurrency),
            "--no-prefix-caching", *delta_args(system)], "/ready"


def camex_model(system: str, paths: dict) -> Path:
    return paths["camex_dense" if system == "camex-dense" else "camex_7x1"]


def delta_args(system: str) -> list[str]:
    """camex-7x1-int8: the 7+1 model served with int8 expert deltas."""
    return ["--expert-deltas", "int8"] if system.endswith("-int8") else []


@dataclass
class Unit:
    """One thing measured in a round: a server over HTTP, or the engine in its worker process."""
    kind: str  # "http" | "engine"
    system: str
    cmd: list[str]
    ready_s: float
    # (prompts, concurrency, max new tokens) -> the level and the CPU use during it
    measure: Callable[[list[str], int, int], tuple[peer_client.LevelResult, dict]]
    client_cpus: list[int] | None = None  # where the client (engine: its threads) ran
    # camex: the start-up cost profile (None for a dense model), and for the server whether its
    # engine ran in a process of its own (engine_process)
    notes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.system if self.kind == "http" else f"{self.system} (engine)"


class EngineWorker:
    """``peer_engine.py --serve`` as a child process: loads the model once, then runs the closed
    loops it is sent (its stdout is the protocol, its stderr the log); always ended on exit."""

    def __init__(self, cmd: list[str], log_path: Path, startup_timeout_s: float,
                 level_timeout_s: float = 1800.0):
        self.cmd, self.log_path = cmd, log_path
        self.startup_timeout_s, self.level_timeout_s = startup_timeout_s, level_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EngineWorker:
        self.log = self.log_path.open("w")
        try:
            with signals_held():  # no signal between the fork and holding its handle
                self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self.log, text=True)
            ready = self._reply(self.startup_timeout_s)
            self.ready_s, self.cost_profile = ready["ready_s"], ready.get("cost_profile")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _reply(self, timeout_s: float) -> dict:
        """The worker's next line (one per request: nothing waits in the reader's buffer)."""
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if readable else None
        if line is None:
            raise RuntimeError(f"engine worker silent for {timeout_s:.0f} s; see {self.log_path}")
        if not line:
            raise RuntimeError(f"engine worker exited ({self.proc.wait()}); see {self.log_path}")
        return json.loads(line)

    def measure(self, prompts: list[str], concurrency: int,
                max_new_tokens: int) -> tuple[peer_client.LevelResult, dict]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "concurrency": concurrency,
                                          "max_new_tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(self.level_timeout_s)
        return peer_client.LevelResult.from_dict(reply), reply["cpu"]

    def __exit__(self, *exc) -> None:
        end_process(self.proc, self._end_input)
        self.log.close()

    @staticmethod
    def _end_input(proc: subprocess.Popen) -> None:
        """End of input: the worker stops its engine and exits."""
        with contextlib.suppress(OSError):  # it may have died under us
            proc.stdin.close()


def combine_cpu(parts: list[dict]) -> dict:
    """CpuMeter results of consecutive slices as one: cores' worth weighted by wall time."""
    wall = sum(p["wall_s"] for p in parts)
    out = {"loadavg_before": parts[0]["loadavg_before"],
           "loadavg_after": parts[-1]["loadavg_after"], "wall_s": round(wall, 3)}
    for key in ("busy_cores", "own_cores", "other_cores", "steal_cores"):
        if wall > 0 and all(key in p for p in parts):
            out[key] = round(sum(p[key] * p["wall_s"] for p in parts) / wall, 3)
    if "other_cores" in out:
        out["other_cores_slice_max"] = max(p["other_cores"] for p in parts)
    if all("cpu_s" in p for p in parts):
        out["cpu_s"] = {name: round(sum(p["cpu_s"][name] for p in parts), 4)
                        for name in parts[0]["cpu_s"]}
    return out


def cpu_per_token_ms(cpu: dict, tokens: int) -> dict[str, float]:
    """`cpu_s` parts (the server's main thread, the client) as milliseconds per generated
    token: what the HTTP side costs a token, next to the engine's compute."""
    if not tokens or "cpu_s" not in cpu:
        return {}
    return {name: round(1e3 * seconds / tokens, 3) for name, seconds in cpu["cpu_s"].items()}


def rotated(units: list, k: int) -> list:
    return units[k % len(units):] + units[:k % len(units)]


def measure_level(units: list[Unit], level: dict, plan: dict, rnd: int) -> dict[str, dict]:
    """One level for every unit, interleaved: the level's prompts in slices of `concurrency`
    (at B=1 one request, at c=8 one wave of 8), each slice sent to every unit in turn, the order
    rotated from slice to slice and round to round. Each unit's slices are then one level run
    back to back (`peer_client.concatenate`). On a shared VM a core's speed drifts by 10-20 %
    over minutes; a unit measured minutes after another would carry that drift into their
    ratio, interleaved they see the same machine."""
    c, prompts = level["concurrency"], level["prompts"]
    for unit in units:  # warm-up, unmeasured
        unit.measure(level["warmup_prompts"], c, plan["warmup_new_tokens"])
    slices = [prompts[i:i + c] for i in range(0, len(prompts), c)]
    parts: dict[str, list] = {u.name: [] for u in units}
    for i, batch in enumerate(slices):
        for unit in rotated(units, i + rnd):
            parts[unit.name].append(unit.measure(batch, c, plan["max_new_tokens"]))
    levels = {}
    for unit in units:
        result = peer_client.concatenate([r for r, _ in parts[unit.name]])
        cpu = combine_cpu([cpu for _, cpu in parts[unit.name]])
        # each slice's duration, so a ratio can also be read wave by wave (paired in time)
        levels[unit.name] = {"concurrency": c, **result.to_dict(), "cpu": cpu,
                             "slices": len(slices),
                             "slice_durations_s": [round(r.report.duration_s, 4)
                                                   for r, _ in parts[unit.name]]}
        if unit.kind == "http" or unit.client_cpus is not None:
            levels[unit.name]["client_cpus"] = unit.client_cpus
        rep = result.report
        per_token = cpu_per_token_ms(cpu, sum(r.output_tokens for r in rep.records))
        if per_token:
            levels[unit.name]["cpu_per_token_ms"] = per_token
        parts_note = "".join(f", {name} {ms:.3f} ms/token" for name, ms in per_token.items())
        print(f"  {unit.name:<22} round {rnd} c={c}: {rep.output_token_throughput:7.1f} tok/s, "
              f"{rep.completed}/{rep.sent} ok, other cores {cpu.get('other_cores', '-')}"
              f"{parts_note}", flush=True)
    return levels


def http_unit(system: str, server: ServerProcess, cmd: list[str], ready_s: float,
              cpus: list[int] | None, client: str) -> Unit:
    api = "llama.cpp" if system == LLAMA else "tgi"

    # camex-server's main thread is its HTTP event loop; llama-server's runs its slots
    parts = {"server_main_thread": lambda: main_thread_cpu_s(server.proc.pid)}

    def measure(prompts: list[str], c: int, n: int) -> tuple[peer_client.LevelResult, dict]:
        with confined(cpus), CpuMeter([*with_descendants(server.proc.pid), os.getpid()],
                                      parts) as cpu:
            result = peer_client.measure(server.url, api, prompts, c, n, client=client)
        # the client's CPU from its first request to its last response (not its set-up)
        cpu.result["cpu_s"]["client"] = result.report.run["client_cpu_s"]
        return result, cpu.result

    notes = {}
    if system != LLAMA:  # where its engine ran (--engine-process auto decides)
        engine = httpx.get(server.url + "/info", timeout=30).json()["models"]["causal-lm"]
        notes["engine_process"] = engine["engine_pid"] != server.proc.pid
        notes["cost_profile"] = engine.get("cost_profile")
    return Unit("http", system, cmd, ready_s, measure, cpus, notes)


def run_round(pair: str, threads: int, rnd: int, plan: dict, paths: dict,
              args: argparse.Namespace, logs: Path) -> list[dict]:
    """Every system's server (and the camex engine in process, for the overhead ratio) started
    fresh and kept up for the round, then measured interleaved (`measure_level`)."""
    units: list[Unit] = []
    cpus = client_cpus(args.client_cpus, threads)
    with contextlib.ExitStack() as stack:
        for system in args.systems:
            port = free_port()
            cmd, ready = server_command(system, pair, threads, port, paths, args)
            t0 = time.monotonic()
            server = stack.enter_context(ServerProcess(
                cmd, port, logs / f"{system}-{pair}-t{threads}-r{rnd}.log", args.startup_timeout,
                ready))
            units.append(http_unit(system, server, cmd, round(time.monotonic() - t0, 1), cpus,
                                   args.client))
            if system == LLAMA or args.no_engine:
                continue
            # its client threads where the HTTP client runs, so both leave the engine's
            # compute thread the same cores
            cmd = [sys.executable, str(HERE / "peer_engine.py"), "--model",
                   str(camex_model(system, paths)), *delta_args(system),
                   "--dtype", DTYPE_PAIRS[pair][1], "--threads", str(threads), "--serve",
                   *(["--client-cpus", ",".join(map(str, cpus))] if cpus else [])]
            worker = stack.enter_context(EngineWorker(
                cmd, logs / f"engine-{system}-{pair}-t{threads}-r{rnd}.log",
                args.startup_timeout))
            units.append(Unit("engine", system, cmd, round(worker.ready_s, 1), worker.measure,
                              cpus, {"cost_profile": worker.cost_profile}))
        per_level = [measure_level(units, level, plan, rnd) for level in plan["levels"]]
    return [{"kind": u.kind, "system": u.system, "dtype_pair": pair, "threads": threads,
             "round": rnd, "cmd": u.cmd, "ready_s": u.ready_s, **u.notes,
             "levels": [lv[u.name] for lv in per_level]} for u in units]


def prepare(args: argparse.Namespace) -> tuple[dict, dict, dict | None]:
    """Models, GGUF files and llama-server: (paths, model description, llama.cpp description)."""
    models = build_models(args.work, args.quick, args.seed, num_prompts=prompts_needed(args),
                          prompt_tokens=args.prompt_tokens, family=args.family)
    paths = {k: Path(models[k]) for k in ("dense", "camex_dense", "camex_7x1", "prompts")}
    if LLAMA not in args.systems:
        return paths, models, None
    llama = llamacpp_build.build_server(args.llama_cpp_python_version, args.jobs)
    paths["llama_server"] = llama.server
    for gguf_type in sorted({DTYPE_PAIRS[d][0] for d in args.dtypes}):
        paths[f"gguf_{gguf_type}"] = llamacpp_build.convert_to_gguf(
            llama, paths["dense"], args.work / f"{args.family}-{gguf_type}.gguf", gguf_type)
    return paths, models, {"llama_cpp_python": llama.version, **llama.build_info,
                           "gguf": {k: str(v) for k, v in paths.items() if k.startswith("gguf")}}


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM ends the run like Ctrl-C: the round's servers and workers are ended on the way
    out (by default SIGTERM would leave them running)."""
    raise SystemExit(128 + signum)


def results_json(doc: dict) -> str:
    """`doc` as indented JSON, but every list of plain numbers (each request's token ids, slice
    durations) on one line: a 24-wave run's document is half the size and still reads by eye."""
    packed: list[str] = []

    def pack(o):
        if isinstance(o, dict):
            return {k: pack(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            if o and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in o):
                packed.append(json.dumps(list(o), separators=(",", ":")))
                return f"\0{len(packed) - 1}\0"  # a placeholder no result string holds
            return [pack(x) for x in o]
        return o

    text = json.dumps(pack(doc), indent=1)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: packed[int(m.group(1))], text) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    load_start = loadavg()
    paths, models, llama = prepare(args)
    prompts = [json.loads(line)["prompt"] for line in paths["prompts"].read_text().splitlines()]
    plan = make_plan(args, prompts)
    logs = args.out.with_name(args.out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "plan.json").write_text(json.dumps(plan, indent=1))
    runs = []
    for threads in args.threads:
        for pair in args.dtypes:
            for rnd in range(args.runs):
                print(f"{pair}, {threads} thread(s), round {rnd}", flush=True)
                runs += run_round(pair, threads, rnd, plan, paths, args, logs)
    other = [lv["cpu"].get("other_cores", 0.0) for r in runs for lv in r["levels"]]
    doc = {"benchmark": "peer-llamacpp", "quick": args.quick, "argv": sys.argv[1:], **git_state(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {**cpu_info(), "platform": platform.platform(),
                       "python": platform.python_version(), "loadavg_start": load_start,
                       "loadavg_end": loadavg(), "other_cores_max": max(other, default=None),
                       "contended": max(other, default=0.0) > CONTENDED_OTHER_CORES},
           "llama_cpp": llama, "models": models,
           "settings": {"threads": args.threads,
                        "dtype_pairs": {d: DTYPE_PAIRS[d] for d in args.dtypes},
                        "family": args.family,
                        "systems": args.systems, "runs": args.runs, "concurrency": args.concurrency,
                        "b1_requests": args.b1_requests,
                        "concurrent_requests": args.concurrent_requests,
                        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                        "client_cpus": args.client_cpus, "client": args.client,
                        "interleaved": INTERLEAVED},
           "runs": runs}
    doc["rows"] = summarize(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(results_json(doc))
    print()
    print(markdown(doc))
    print()
    print("\n".join(targets(doc)))
    if doc["machine"]["contended"]:
        print(f"\nCONTENDED: other processes used up to {doc['machine']['other_cores_max']:.2f} "
              f"cores during a measurement (load average {load_start} -> {loadavg()})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
