"""Prefill throughput (prompt tokens/s, one prompt at a time): the engine's runner on CAMEx
(auto / merged / mixture) vs the dense-equivalent model, with roofline bounds.

Every repetition uses a fresh random prompt, so content-addressed merges never hit: the time
includes one merge per segment and MoE layer, as for a new user prompt.

Prompts longer than one routing segment also run with the merged strategy twice: the merges
of a layer's segments built in one pass over its expert stack (`together`, the runner as it
is) against segment by segment (`each`: the runner's shared pass switched off, as before
the change that added it).

The dense model's prompts also run with their causal attention as the runner does it (in query
blocks at the lengths where that is faster on a CPU, engine/attention.py) and as one causal
call (`attention` in the JSON; lengths outside the blocked range time the same code twice).

`--packed 2,4,8`: also S short prompts (`--packed-tokens`, default 32) prefilled in one packed
step, as prompts that join together are, with the merges they are missing built in one pass
over each layer's expert stack (`together`) against each prompt merging its own (`each`: the
shared pass switched off, the runner before dfc8af7).

    python benchmarks/prefill.py --quick
    python benchmarks/prefill.py --lengths 256,1024
    python benchmarks/prefill.py --shape tinyllama-1b --dtype bfloat16 --lengths 256,1024
"""
from __future__ import annotations

import contextlib
import time

import torch

from common import base_parser, folded_model, print_table, setup, shape, sync, write_results
from roofline import bound, fused_bound, measure_peaks, prefill_cost
from camex_runtime import Engine
from camex_runtime import CamexConfig
from camex_runtime.engine import attention
from camex_runtime.engine.merge_cache import entry_bytes, ffn_layout

COLS = ["system", "strategy", "tokens", "tok_s", "bound_tok_s", "achieved", "achieved_fused"]
PACKED_COLS = ["prompts", "tokens", "each_ms", "together_ms", "together_vs_each"]
SEGMENT_COLS = ["tokens", "segments", "each_ms", "together_ms", "together_vs_each"]
ATTENTION_COLS = ["tokens", "blocked", "one_call_ms", "runner_ms", "runner_vs_one_call"]


@contextlib.contextmanager
def merging(runner, together: bool):
    """The runner as it is (`together`), or with every segment and packed piece merging on its
    own (`ModelRunner.merge_together` off for the block)."""
    runner.merge_together = together
    try:
        yield
    finally:
        runner.merge_together = True


@contextlib.contextmanager
def one_causal_call():
    """Every prompt's causal attention as one sdpa call (no query blocks) for the block."""
    blocked = attention.CAUSAL_BLOCKED_TOKENS
    attention.CAUSAL_BLOCKED_TOKENS = range(0)
    try:
        yield
    finally:
        attention.CAUSAL_BLOCKED_TOKENS = blocked


def attention_row(engine: Engine, n: int, vocab: int, reps: int) -> dict:
    """An n-token prefill with the runner's causal attention and with one causal call, fresh
    prompts for each, alternating (the better of two rounds each)."""
    one, runner = float("inf"), float("inf")
    for r in range(2):
        with one_causal_call():
            one = min(one, prefill_time(engine, n, vocab, reps, seed=10 * n + 2 * r))
        runner = min(runner, prefill_time(engine, n, vocab, reps, seed=10 * n + 2 * r + 1))
    return dict(tokens=n, blocked=n in attention.CAUSAL_BLOCKED_TOKENS, one_call_ms=1e3 * one,
                runner_ms=1e3 * runner, runner_vs_one_call=runner / one)


def each_and_together(time_of) -> dict:
    """`time_of(together)` with the shared merge pass off, then on: both in ms and their ratio."""
    each, together = time_of(False), time_of(True)
    return dict(each_ms=1e3 * each, together_ms=1e3 * together, together_vs_each=together / each)


def prefill_time(engine: Engine, n: int, vocab: int, reps: int, together: bool = True,
                 seed: int | None = None) -> float:
    """The best time of prefilling a fresh n-token prompt (drawn from a generator seeded with
    `seed`, default n: timings that must not find each other's merges in the cache pass
    different seeds)."""
    gen = torch.Generator().manual_seed(n if seed is None else seed)
    best = float("inf")
    with merging(engine.runner, together):
        for i in range(reps + 1):  # first run warms up
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            sync(engine.runner.device)
            t0 = time.perf_counter()
            engine.runner.prefill(0, ids, "segment")
            sync(engine.runner.device)
            if i:
                best = min(best, time.perf_counter() - t0)
            engine.runner.release(0)
    return best


def packed_time(engine: Engine, prompts: int, n: int, vocab: int, reps: int,
                together: bool, gen: torch.Generator) -> float:
    """The best time of one packed step prefilling `prompts` n-token prompts whole, drawn from
    `gen` (never seen before: every merge is made, none found in the cache)."""
    runner = engine.runner
    best = float("inf")
    with merging(runner, together):
        for i in range(reps + 1):  # first run warms up
            for slot in range(prompts):
                runner.start_prefill(slot, torch.randint(0, vocab, (n,), generator=gen).tolist(),
                                     "segment")
            sync(runner.device)
            t0 = time.perf_counter()
            runner.prefill_steps([(slot, None) for slot in range(prompts)])
            sync(runner.device)
            if i:
                best = min(best, time.perf_counter() - t0)
            for slot in range(prompts):
                runner.release(slot)
    return best


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--lengths", default=None, help="default 256,1024 (quick: 32,128)")
    p.add_argument("--packed", default=None,
                   help="prompt counts, comma list: short prompts prefilled in one packed step, "
                        "merging together and each alone (default: not measured)")
    p.add_argument("--packed-tokens", type=int, default=32)
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = shape(args)
    lengths = [int(x) for x in
               (args.lengths or ("32,128" if args.quick else "256,1024")).split(",")]
    elem = torch.empty((), dtype=dtype).element_size()
    peaks = measure_peaks(device, dtype, args.reps)
    rows = []
    kw = dict(max_batch_size=1, max_input_tokens=max(lengths), max_total_tokens=max(lengths) + 1)
    ffn_bytes = entry_bytes(cfg["d_model"], cfg["d_ff"], dtype, **ffn_layout(CamexConfig(**cfg)))
    camex = Engine(folded_model(cfg, device, dtype), None,
                   merge_cache_bytes=2 * cfg["n_layer"] * ffn_bytes, **kw)
    dense = Engine(folded_model(cfg, device, dtype, num_experts=0), None, merge_cache_bytes=0, **kw)
    for n in lengths:
        runs = [("engine-camex", s, camex, True) for s in ("auto", "merged", "mixture")]
        runs.append(("engine-dense", "-", dense, False))
        for system, strategy, engine, moe in runs:
            if moe:
                engine.runner.strategy = strategy
            t = prefill_time(engine, n, cfg["vocab_size"], args.reps)
            cost = prefill_cost(cfg, n, moe, elem)
            b, bf = bound(cost, peaks), fused_bound(cost, peaks)
            rows.append(dict(system=system, strategy=strategy, tokens=n, tok_s=n / t,
                             bound_tok_s=n / b, achieved=b / t, achieved_fused=bf / t))
            print_table(rows[-1:], COLS)
    print()
    print_table(rows, COLS)
    segments = []
    camex.runner.strategy = "merged"
    for n in lengths:
        count = -(-n // camex.runner.T)
        if count < 2:
            continue
        segments.append(dict(tokens=n, segments=count, **each_and_together(
            lambda t, n=n: prefill_time(camex, n, cfg["vocab_size"], args.reps, t,
                                        seed=n + 1 + t))))
        print_table(segments[-1:], SEGMENT_COLS)
    if segments:
        print()
        print_table(segments, SEGMENT_COLS)
    blocks = [attention_row(dense, n, cfg["vocab_size"], args.reps) for n in lengths]
    print()
    print_table(blocks, ATTENTION_COLS)
    packed = []
    if args.packed:
        counts = [int(x) for x in args.packed.split(",")]
        n, most = args.packed_tokens, max(counts)
        engine = Engine(folded_model(cfg, device, dtype), None, max_batch_size=most,
                        max_input_tokens=n, max_total_tokens=n + 1,
                        merge_cache_bytes=(most + 1) * cfg["n_layer"] * ffn_bytes)
        engine.warmup()  # as the server does: the pool's pages are backed before timing
        gen = torch.Generator().manual_seed(n)
        for s in counts:
            packed.append(dict(prompts=s, tokens=n, **each_and_together(
                lambda t, s=s: packed_time(engine, s, n, cfg["vocab_size"], args.reps, t, gen))))
            print_table(packed[-1:], PACKED_COLS)
        print()
        print_table(packed, PACKED_COLS)
    name = "prefill" if args.shape == "gpt2-small" else f"prefill-{args.shape}"
    write_results(name, args, rows, {"peaks": peaks, "shape": cfg, "segments": segments,
                                     "attention": blocks, "packed": packed})


if __name__ == "__main__":
    main()
