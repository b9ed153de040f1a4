"""Multi-turn conversations over HTTP: time to first token of each turn with and without
prefix caching, camex-server (``--prefix-caching``) beside llama.cpp's llama-server
(``cache_prompt``), on the same weights at equal threads.

Each conversation is a system prompt (``--system-tokens``, fortunes) followed by turns: a user
message (``--user-tokens``), the server's greedy answer (``--new-tokens``, EOS ignored), the next
user message, and so on; every turn's prompt is the whole conversation so far, as a chat client
sends it. The conversations run side by side (turn 1 of each, then turn 2 of each, ...), so a
server keeps several in its slots at once (camex ``--max-batch-size`` and llama-server ``-np``
are the number of conversations, or ``--batch``; with fewer slots than conversations a slot's
conversation is overwritten by another's turn unless camex keeps it in one of
``--prefix-cache-slots`` more). Four servers are up together and every turn goes to each in
turn, so all see the machine of the same minute: camex-server with and without prefix caching,
llama-server with ``cache_prompt`` true and false (two processes: a request that does not cache
would overwrite the slot the other one kept). Each server continues its own answers; camex's two
must be the same tokens (greedy, and a resumed prompt is the cold one up to rounding).

Models, GGUF files and llama-server come from the peer benchmark's cache (``peer_models.py``,
``llamacpp_build.py``; built on first use). The camex model is the 7+1-expert one
(``--model camex-dense`` for the dense-equivalent); its segment length is 256 tokens (GPT-2
small), and a prompt resumes only once its first segment is whole, hence the default 320-token
system prompt. ``--quick`` upcycles its tiny model with 16-token segments (its context is 256).

    python benchmarks/prefix_cache.py                       # GPT-2 small, fp32, 1 thread
    python benchmarks/prefix_cache.py --dtype bf16 --threads 2
    python benchmarks/prefix_cache.py --shared-system      # one system prompt for all chats
    python benchmarks/prefix_cache.py --conversations 8 --batch 4 --prefix-cache-slots 4
    python benchmarks/prefix_cache.py --quick --no-llama    # tiny model, camex only (tests)

A script that measures and reports; it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import llamacpp_build  # noqa: E402
import peer_client  # noqa: E402
from machine import cpu_info, loadavg  # noqa: E402
from peer_models import build_camex, build_models, write_prompts  # noqa: E402
from peer_report import DTYPE_PAIRS  # noqa: E402
from serving import ServerProcess, free_port, git_commit  # noqa: E402
from serving_models import fortune_texts  # noqa: E402

from camex_runtime.training.tokenizer import load_tokenizer  # noqa: E402

CAMEX, CAMEX_COLD = "camex (prefix caching)", "camex (no cache)"
LLAMA, LLAMA_COLD = "llama.cpp (cache_prompt)", "llama.cpp (no cache)"
QUICK_SEGMENT = 16


class LlamaTurnDialect(peer_client.LlamaCppDialect):
    """llama-server's ``/completion`` with or without its slot prompt cache; also returns the
    generated token ids and how many prompt tokens it computed (``timings.prompt_n``)."""

    def __init__(self, cache: bool):
        self.cache = cache
        self.computed: int | None = None

    def body(self, prompt: str, max_new_tokens: int) -> dict:
        return {**super().body(prompt, max_new_tokens), "cache_prompt": self.cache,
                "return_tokens": True}

    def read(self, event: dict, produced: int) -> peer_client.Event:
        if event.get("stop") and isinstance(event.get("timings"), dict):
            self.computed = event["timings"].get("prompt_n")
        return super().read(event, produced)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, short conversations")
    p.add_argument("--no-llama", action="store_true", help="camex-server only")
    p.add_argument("--model", choices=("camex-7x1", "camex-dense"), default="camex-7x1")
    p.add_argument("--dtype", choices=list(DTYPE_PAIRS), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="compute threads of every server")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--batch", type=int, default=None,
                   help="running sequences of every server (camex --max-batch-size, llama-server "
                        "-np; default: --conversations)")
    p.add_argument("--prefix-cache-slots", type=int, default=0,
                   help="camex-server's slots beyond --batch that only keep conversations")
    p.add_argument("--shared-system", action="store_true",
                   help="every conversation starts with the same system prompt (a deployment's "
                        "one instruction block): the later conversations' first turns may "
                        "resume it from the first's")
    p.add_argument("--turns", type=int, default=None, help="turns per conversation (5; quick 3)")
    p.add_argument("--system-tokens", type=int, default=None,
                   help="system prompt (320; quick 40: both past the first segment)")
    p.add_argument("--user-tokens", type=int, default=None, help="each user message (32; quick 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="each answer (32; quick 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None,
                   help="the peer benchmark's models (default ~/.cache/camex-serve/peer/"
                        "<full|quick>-seed<N>)")
    p.add_argument("--llama-cpp-python-version", default=llamacpp_build.DEFAULT_VERSION)
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: cores)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/prefix-cache[-quick].json)")
    args = p.parse_args(argv)
    q = args.quick
    args.turns = args.turns or (3 if q else 5)
    args.system_tokens = args.system_tokens or (40 if q else 320)
    args.user_tokens = args.user_tokens or (8 if q else 32)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.batch = args.batch or args.conversations
    if args.batch < 1 or args.prefix_cache_slots < 0:
        p.error("--batch must be >= 1 and --prefix-cache-slots >= 0")
    args.work = args.work or (Path.home() / ".cache" / "camex-serve" / "peer"
                              / f"{'quick' if q else 'full'}-seed{args.seed}")
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        f"prefix-cache{'-quick' if q else ''}.json")
    return args


def conversations(args: argparse.Namespace, tok) -> list[dict]:
    """Per conversation: a system prompt and one user message per turn (fortunes, each exactly
    its token count and stable under decode -> encode)."""
    texts = fortune_texts()
    n = args.conversations
    systems = write_prompts(args.work / f"system-{args.system_tokens}.jsonl", tok, texts, n,
                            args.system_tokens, args.seed + 101)
    users = write_prompts(args.work / f"user-{args.user_tokens}.jsonl", tok, texts,
                          n * args.turns, args.user_tokens, args.seed + 202)
    return [{"system": systems[0 if args.shared_system else c]["prompt"],
             "users": [u["prompt"] for u in users[c * args.turns:(c + 1) * args.turns]]}
            for c in range(n)]


def prompt_of(conv: dict, answers: list[str], turn: int) -> str:
    """The conversation up to turn `turn`'s user message, as one prompt."""
    parts = [conv["system"]]
    for t in range(turn):
        parts += [conv["users"][t], answers[t]]
    parts.append(conv["users"][turn])
    return "\n".join(parts) + "\n"


def cached_total(url: str) -> float:
    import httpx
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("camex_prompt_tokens_cached_total "))


def one_turn(url: str, dialect, prompt: str, new_tokens: int) -> tuple[float, list[int], int]:
    """One streamed request: (time to first token in s, generated ids, prompt tokens counted)."""
    result = asyncio.run(peer_client.closed_loop(url, dialect, [prompt], 1, new_tokens, 600.0))
    rec = result.report.records[0]
    if not rec.ok:
        raise RuntimeError(f"{url}: {rec.failure}: {rec.error}")
    return rec.ttft, result.token_ids[0], (result.prompt_tokens or [0])[0]


def servers(args: argparse.Namespace, paths: dict, logs: Path) -> list[tuple[str, list[str]]]:
    model = paths["camex_7x1" if args.model == "camex-7x1" else "camex_dense"]
    gguf_type, dtype = DTYPE_PAIRS[args.dtype]
    out = []
    for name, flags in ((CAMEX, ["--prefix-caching"]), (CAMEX_COLD, ["--no-prefix-caching"])):
        out.append((name, [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port",
                           "{port}", "--model", str(model), "--threads", str(args.threads),
                           "--dtype", dtype, "--max-batch-size", str(args.batch),
                           "--prefix-cache-slots", str(args.prefix_cache_slots), *flags]))
    if not args.no_llama:
        per_slot = args.system_tokens + args.turns * (args.user_tokens + args.new_tokens) + 64
        ctx = -(-args.batch * per_slot // 256) * 256
        for name in (LLAMA, LLAMA_COLD):
            out.append((name, [str(paths["llama_server"]), "-m", str(paths[f"gguf_{gguf_type}"]),
                               "--host", "127.0.0.1", "--port", "{port}", "--threads",
                               str(args.threads), "--threads-batch", str(args.threads),
                               "-np", str(args.batch), "-c", str(ctx)]))
    return out


def run(args: argparse.Namespace, paths: dict, tok, logs: Path) -> dict:
    convs = conversations(args, tok)
    rows: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        up = []
        for name, cmd in servers(args, paths, logs):
            port = free_port()
            cmd = [c.replace("{port}", str(port)) for c in cmd]
            ready = "/health" if name.startswith("llama") else "/ready"
            slug = name.split(" ")[0] + ("-cold" if "no cache" in name else "")
            srv = stack.enter_context(ServerProcess(cmd, port, logs / f"{slug}.log",
                                                    args.startup_timeout, ready))
            up.append((name, srv))
            rows[name] = []
        answers = {name: [[] for _ in convs] for name, _ in up}
        for turn in range(args.turns):
            for c, conv in enumerate(convs):
                for name, srv in up:  # each server in turn, on its own conversation so far
                    prompt = prompt_of(conv, answers[name][c], turn)
                    if name.startswith("llama"):
                        dialect = LlamaTurnDialect(cache=name == LLAMA)
                        ttft, ids, counted = one_turn(srv.url, dialect, prompt, args.new_tokens)
                        computed = dialect.computed
                    else:
                        before = cached_total(srv.url)
                        ttft, ids, counted = one_turn(srv.url, peer_client.TgiDialect(), prompt,
                                                      args.new_tokens)
                        counted = len(tok.encode(prompt, add_special_tokens=False))
                        computed = counted - round(cached_total(srv.url) - before)
                    answers[name][c].append(tok.decode(ids))
                    rows[name].append({"conversation": c, "turn": turn + 1,
                                       "prompt_tokens": counted, "computed_tokens": computed,
                                       "ttft_s": round(ttft, 4), "token_ids": ids})
    same = [r["token_ids"] for r in rows[CAMEX]] == [r["token_ids"] for r in rows[CAMEX_COLD]]
    return {"rows": rows, "camex_same_answers": same}


def summary(rows: dict[str, list[dict]], turns: int) -> dict:
    """Per server and turn: median time to first token (ms), prompt and computed tokens."""
    out = {}
    for name, rs in rows.items():
        per_turn = []
        for t in range(1, turns + 1):
            cell = [r for r in rs if r["turn"] == t]
            computed = [r["computed_tokens"] for r in cell if r["computed_tokens"] is not None]
            per_turn.append({
                "turn": t, "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in cell), 1),
                "prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in cell)),
                "computed_tokens": round(statistics.mean(computed)) if computed else None})
        later = [r["ttft_s"] for r in rs if r["turn"] > 1]
        # turn 1 of every conversation but the first (with --shared-system: its system prompt
        # may resume from another conversation's)
        others = [r["ttft_s"] for r in rs if r["turn"] == 1 and r["conversation"] > 0]
        out[name] = {"turns": per_turn,
                     "later_turns_ttft_ms": round(1000 * statistics.median(later), 1)
                     if later else None,
                     "first_turns_after_the_first_ttft_ms":
                         round(1000 * statistics.median(others), 1) if others else None}
    return out


def markdown(doc: dict) -> str:
    s = doc["summary"]
    names = list(s)
    head = "| turn | prompt tokens | " + " | ".join(f"{n}: TTFT ms (computed)" for n in names)
    lines = [head + " |", "|---:|---:|" + "---:|" * len(names)]
    for t in range(doc["config"]["turns"]):
        cells = []
        for n in names:
            cell = s[n]["turns"][t]
            comp = "" if cell["computed_tokens"] is None else f" ({cell['computed_tokens']})"
            cells.append(f"{cell['ttft_ms']:.0f}{comp}")
        lines.append(f"| {t + 1} | {s[names[0]]['turns'][t]['prompt_tokens']} | "
                     + " | ".join(cells) + " |")
    ratios = []
    for warm, cold in ((CAMEX, CAMEX_COLD), (LLAMA, LLAMA_COLD)):
        if warm in s:
            w, c = s[warm]["later_turns_ttft_ms"], s[cold]["later_turns_ttft_ms"]
            ratios.append(f"{warm}: turns 2+ median TTFT {w:.0f} ms vs {c:.0f} ms without "
                          f"({c / w:.2f}x sooner)")
    if LLAMA in s:
        ratios.append(f"camex with prefix caching vs llama.cpp with cache_prompt, turns 2+: "
                      f"{s[LLAMA]['later_turns_ttft_ms'] / s[CAMEX]['later_turns_ttft_ms']:.2f}x")
    if doc["config"].get("shared_system"):
        firsts = ", ".join(f"{n} {s[n]['first_turns_after_the_first_ttft_ms']:.0f} ms"
                           for n in names)
        ratios.append(f"one system prompt for all: turn 1 of conversations 2+, median: {firsts}")
    ratios.append(f"camex answers the same with and without the cache: "
                  f"{doc['camex_same_answers']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in ratios)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = build_models(args.work, args.quick, args.seed, num_prompts=1,
                          prompt_tokens=args.user_tokens)
    tok = load_tokenizer(args.work / "tokenizer")
    paths = {k: Path(models[k]) for k in ("dense", "camex_dense", "camex_7x1")}
    if args.quick:  # 256 positions: segments short enough for a prompt to pass the first one
        for key, experts in (("camex_dense", 0), ("camex_7x1", 7)):
            paths[key] = args.work / f"{key.replace('_', '-')}-t{QUICK_SEGMENT}"
            build_camex(paths[key], paths["dense"], tok, experts, args.seed,
                        segment_len=QUICK_SEGMENT)
    llama = None
    if not args.no_llama:
        llama = llamacpp_build.build_server(args.llama_cpp_python_version, args.jobs)
        paths["llama_server"] = llama.server
        gguf_type = DTYPE_PAIRS[args.dtype][0]
        paths[f"gguf_{gguf_type}"] = llamacpp_build.convert_to_gguf(
            llama, paths["dense"], args.work / f"gpt2-{gguf_type}.gguf", gguf_type)
    logs = args.out.parent / "prefix-cache-logs" / str(int(time.time()))
    logs.mkdir(parents=True, exist_ok=True)
    load0, t0 = loadavg(), time.time()
    got = run(args, paths, tok, logs)
    doc = {"benchmark": "prefix_cache", "commit": git_commit(), "machine": cpu_info(),
           "python": platform.python_version(), "load_before": load0, "load_after": loadavg(),
           "seconds": round(time.time() - t0, 1),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "llama_cpp": None if llama is None else {"llama_cpp_python": llama.version,
                                                    **llama.build_info},
           "summary": summary(got["rows"], args.turns), **got}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
