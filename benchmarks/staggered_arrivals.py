"""Staggered arrivals: what the prefill pacer's ratio trades between newcomers and streams.

Merged-expert prompts arrive one at a time (default: 8 prompts of 32 tokens, 250 ms apart,
32 new tokens each, greedy) at an idle engine, so each one arrives while the earlier ones
decode and its prompt work (its tokens and its first routing decision's merges) is paced
beside their decode steps. A higher `prefill_time_ratio` lets a newcomer's prompt take more of
a step: its first token comes sooner and the running streams' inter-token gaps grow. This is
the everyday side of the trade `chunked_prefill.py` measures with one 2,000-token prompt.

Per ratio, over its waves: time to first token from each prompt's own arrival (p50 and the
slowest, and the mean of each wave's slowest), the streams' inter-token latency p50/p99 (every
gap of every request), and the wave's tokens per second (all generated tokens over the time
from the first arrival to the last token). The ratios take turns wave by wave on one engine
(the pacer's ratio is set between waves, while the engine is idle), so a slow stretch of a
shared machine falls on every ratio alike; one unmeasured wave first warms the pacer's fit.

    python benchmarks/staggered_arrivals.py --quick
    python benchmarks/staggered_arrivals.py --threads 1 --ratios 0.8,1.0,1.2 --waves 3
"""
from __future__ import annotations

import time

from chunked_prefill import follow, make_engine, percentile, release, token_ids
from common import base_parser, print_table, setup, shape, write_results
from camex_runtime import SamplingParams
from camex_runtime.engine.engine import DEFAULT_MAX_BATCHED_TOKENS, DEFAULT_PREFILL_TIME_RATIO

COLS = ["prefill_time_ratio", "waves", "ttft_p50_s", "ttft_wave_max_mean_s", "ttft_max_s",
        "itl_p50_ms", "itl_p99_ms", "tok_s_mean"]


def wave(engine, ids, arrivals: int, gap_s: float, prompt_len: int, new_tokens: int) -> dict:
    """`arrivals` prompts, one every `gap_s`, each followed to its last token: their first
    tokens' latency from their own arrival, every inter-token gap, and the wave's tokens/s."""
    stamps: list[list[float]] = [[] for _ in range(arrivals)]
    handles, readers, submitted = [], [], []
    t0 = time.perf_counter()
    for i in range(arrivals):
        time.sleep(max(0.0, t0 + i * gap_s - time.perf_counter()))
        submitted.append(time.perf_counter())
        handles.append(engine.submit(ids(prompt_len),
                                     SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
        readers.append(follow(handles[-1], stamps[i]))
    for r in readers:
        r.join(timeout=600)
    if any(len(s) != new_tokens for s in stamps):
        raise RuntimeError(f"a request ended early: {[len(s) for s in stamps]} tokens of "
                           f"{new_tokens}")
    ttft = [s[0] - a for s, a in zip(stamps, submitted)]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    wall = max(s[-1] for s in stamps) - t0
    return dict(ttft_s=ttft, ttft_max_s=max(ttft), itl_p50_ms=1e3 * percentile(gaps, 0.5),
                itl_p99_ms=1e3 * percentile(gaps, 0.99), tok_s=arrivals * new_tokens / wall,
                gaps=gaps)


def summarize(ratio: float, waves: list[dict]) -> dict:
    ttft = [t for w in waves for t in w["ttft_s"]]
    gaps = [g for w in waves for g in w["gaps"]]
    return dict(prefill_time_ratio=ratio, waves=len(waves), ttft_p50_s=percentile(ttft, 0.5),
                ttft_wave_max_mean_s=sum(w["ttft_max_s"] for w in waves) / len(waves),
                ttft_max_s=max(ttft), itl_p50_ms=1e3 * percentile(gaps, 0.5),
                itl_p99_ms=1e3 * percentile(gaps, 0.99),
                tok_s_mean=sum(w["tok_s"] for w in waves) / len(waves),
                per_wave=[{k: v for k, v in w.items() if k != "gaps"} for w in waves])


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--ratios", default=f"{DEFAULT_PREFILL_TIME_RATIO},1.0,1.2",
                   help="prefill_time_ratio values, comma list, taking turns wave by wave "
                        f"(default {DEFAULT_PREFILL_TIME_RATIO},1.0,1.2)")
    p.add_argument("--waves", type=int, default=None, help="measured waves per ratio "
                   "(default 3; quick: 1)")
    p.add_argument("--arrivals", type=int, default=8, help="prompts per wave (default 8)")
    p.add_argument("--gap-ms", type=float, default=None,
                   help="time between arrivals (default 250; quick: 2)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default 32; quick: 8")
    p.add_argument("--max-batched-tokens", type=int, default=DEFAULT_MAX_BATCHED_TOKENS,
                   help="the engine's token budget per step (default "
                        f"{DEFAULT_MAX_BATCHED_TOKENS})")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = shape(args)
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(r <= 0 for r in ratios):
        raise SystemExit(f"--ratios must all be > 0, got {args.ratios}")
    waves_each = args.waves or (1 if args.quick else 3)
    gap_s = (args.gap_ms if args.gap_ms is not None else 2 if args.quick else 250) / 1e3
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    engine = make_engine(cfg, device, dtype, args.max_batched_tokens, ratios[0], args.arrivals,
                         args.prompt_tokens)
    if engine.pacer is None:
        raise SystemExit("the engine paces prompts on the CPU only (and with a token budget): "
                         "nothing to compare here")
    ids = token_ids(cfg["vocab_size"])  # fresh prompts every wave: no merge is reused
    measured: dict[float, list[dict]] = {r: [] for r in ratios}
    try:
        wave(engine, ids, args.arrivals, gap_s, args.prompt_tokens, new_tokens)  # warm-up
        for k in range(waves_each):
            # the order turns each round, so no ratio always follows the same one
            for ratio in ratios[k % len(ratios):] + ratios[:k % len(ratios)]:
                engine.pacer.ratio = ratio  # idle between waves: read by the next step
                w = wave(engine, ids, args.arrivals, gap_s, args.prompt_tokens, new_tokens)
                measured[ratio].append(w)
                print(f"ratio {ratio}: first token p50 "
                      f"{percentile(w['ttft_s'], 0.5):.3f} s, slowest {w['ttft_max_s']:.3f} s, "
                      f"ITL p99 {w['itl_p99_ms']:.1f} ms, {w['tok_s']:.1f} tok/s", flush=True)
    finally:
        engine.stop(grace_s=1.0)
        release()
    rows = [summarize(r, measured[r]) for r in ratios]
    print()
    print_table(rows, COLS)
    write_results("staggered_arrivals", args, rows,
                  {"shape": cfg, "arrivals": args.arrivals, "gap_ms": 1e3 * gap_s,
                   "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens,
                   "max_batched_tokens": args.max_batched_tokens})


if __name__ == "__main__":
    main()
