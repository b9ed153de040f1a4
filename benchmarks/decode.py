"""Decode throughput: the engine on CAMEx (auto / merged / mixture) vs the engine on the
dense-equivalent model vs `transformers` generate on dense GPT-2 and on the training-form
CAMEx model (no KV cache, deltas recomputed every step: the research-code baseline).

Decode tokens/s = B * (N - 1) / (time of the N - 1 decode steps), prefill excluded (the
engine: the first step prefills every request and is not timed; `generate`: time(N tokens)
minus time(1 token)). Each point also gets its roofline bound (benchmarks/roofline.py) from
peaks measured in this run, and achieved/bound.

    python benchmarks/decode.py --quick                 # seconds: checks the script
    python benchmarks/decode.py --batch-sizes 1,8,32    # GPT-2-small shape, 7+1 experts, T=256
    python benchmarks/decode.py --shape tinyllama-1b --dtype bfloat16 --batch-sizes 1 \
        --strategies auto,merged --skip train          # Llama family, ~1B dense + CAMEx layers
"""
from __future__ import annotations

import time

import torch

from common import (base_parser, best_time, folded_model, print_table, setup, shape, sync,
                    training_model, write_results)
from roofline import bound, decode_step_cost, fused_bound, measure_peaks
from camex_runtime import Engine, SamplingParams
from camex_runtime import CamexConfig
from camex_runtime.engine.merge_cache import entry_bytes, ffn_layout


def hf_dense_name(cfg: dict) -> str:
    """Row name of transformers generate on the dense model of the same shape."""
    return f"hf-{cfg.get('family', 'gpt2')}-dense"

COLS = ["system", "strategy", "B", "tok_s", "bound_tok_s", "achieved", "achieved_fused",
        "fallbacks"]


def make_engine(model, B: int, P: int, N: int, cache_bytes: int, strategy="auto") -> Engine:
    return Engine(model, None, max_batch_size=B, max_waiting=B, max_input_tokens=P,
                  max_total_tokens=P + N + 1, merge_cache_bytes=cache_bytes, strategy=strategy)


def engine_decode_time(engine: Engine, B: int, P: int, N: int, vocab: int, reps: int) -> float:
    gen = torch.Generator().manual_seed(B)
    best = float("inf")
    for _ in range(reps + 1):  # first run warms up
        hs = [engine.submit(torch.randint(0, vocab, (P,), generator=gen).tolist(),
                            SamplingParams(max_new_tokens=N, ignore_eos=True)) for _ in range(B)]
        engine.step()  # prefills all B requests: not part of decode
        sync(engine.runner.device)
        t0 = time.perf_counter()
        while not all(h.done for h in hs):
            engine.step()
        sync(engine.runner.device)
        best = min(best, time.perf_counter() - t0)
    return best


def hf_decode_time(model, B: int, P: int, N: int, vocab: int, reps: int, device) -> float:
    ids = torch.randint(0, vocab, (B, P), device=device)
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return max(1e-9, best_time(lambda: gen(N), device, reps)
               - best_time(lambda: gen(1), device, reps))


def hf_dense(cfg: dict, device, dtype):
    """The transformers model of the same dense shape (GPT-2 or Llama), built in `dtype`."""
    if cfg.get("family", "gpt2") == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        c = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"],
                        intermediate_size=cfg["d_ff"], num_hidden_layers=cfg["n_layer"],
                        num_attention_heads=cfg["n_head"],
                        num_key_value_heads=cfg["num_key_value_heads"],
                        max_position_embeddings=cfg["max_position_embeddings"])
        cls = LlamaForCausalLM
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        c = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["max_position_embeddings"],
                       n_embd=cfg["d_model"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                       n_inner=cfg["d_ff"])
        cls = GPT2LMHeadModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(c).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 (quick: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 24)")
    p.add_argument("--train-new-tokens", type=int, default=8,
                   help="tokens for the (slow) training-form baseline")
    p.add_argument("--train-batch-sizes", default="1,8")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="merge cache budget (default: enough for 8 sequences' merges)")
    p.add_argument("--skip", default="", help="comma list of: hf,train,dense")
    p.add_argument("--strategies", default="auto,merged,mixture",
                   help="CAMEx strategies to time (auto is the served default)")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = shape(args)
    P = args.prompt_len or (8 if args.quick else 128)
    N = args.new_tokens or (24 if args.quick else 64)
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    elem = torch.empty((), dtype=dtype).element_size()
    peaks = measure_peaks(device, dtype, args.reps)
    print(f"peaks: {peaks['peak_gflops']:.1f} GFLOP/s, {peaks['peak_gbps']:.1f} GB/s")
    ctx = P + N // 2
    rows = []

    def add(system, strategy, B, seconds, ntok, cost_strategy, fallbacks=""):
        tok_s = B * ntok / seconds
        rows.append(dict(system=system, strategy=strategy, B=B, tok_s=tok_s,
                         **step_bounds(cfg, B, ctx, cost_strategy, elem, peaks, tok_s),
                         fallbacks=fallbacks))
        print_table(rows[-1:], COLS)

    ffn_bytes = entry_bytes(cfg["d_model"], cfg["d_ff"], dtype, **ffn_layout(CamexConfig(**cfg)))
    cache_bytes = (args.cache_mb << 20) if args.cache_mb else 8 * cfg["n_layer"] * ffn_bytes
    camex = make_engine(folded_model(cfg, device, dtype), max(Bs), P, N, cache_bytes)
    for B in Bs:
        for strategy in args.strategies.split(","):
            camex.runner.strategy = strategy
            fb0 = camex.runner.cache.fallbacks
            t = engine_decode_time(camex, B, P, N, cfg["vocab_size"], args.reps)
            cost = {"auto": "best", "merged": "merged", "mixture": "mixture"}[strategy]
            add("engine-camex", strategy, B, t, N - 1, cost, camex.runner.cache.fallbacks - fb0)
    del camex
    if "dense" not in skip:
        dense = make_engine(folded_model(cfg, device, dtype, num_experts=0), max(Bs), P, N, 0)
        for B in Bs:
            add("engine-dense", "-", B, engine_decode_time(dense, B, P, N, cfg["vocab_size"],
                                                           args.reps), N - 1, "dense")
        del dense
    if "hf" not in skip:
        hf = hf_dense(cfg, device, dtype)
        for B in Bs:
            add(hf_dense_name(cfg), "generate", B,
                hf_decode_time(hf, B, P, N, cfg["vocab_size"], args.reps, device), N - 1, "dense")
        del hf
    if "train" not in skip:
        tm = training_model(cfg, device, dtype)
        n = args.train_new_tokens
        for B in [int(b) for b in args.train_batch_sizes.split(",")]:
            add("hf-camex-training-form", "generate", B,
                hf_decode_time(tm, B, P, n, cfg["vocab_size"], 1, device), n - 1, "mixture")
    summary = summarize(rows, hf_dense_name(cfg))
    print()
    print_table(rows, COLS)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    name = "decode" if args.shape == "gpt2-small" else f"decode-{args.shape}"
    write_results(name, args, rows, {"peaks": peaks, "shape": cfg, "prompt_len": P,
                                         "new_tokens": N, "summary": summary})


def step_bounds(cfg: dict, B: int, ctx: int, strategy: str, elem: int, peaks: dict,
                tok_s: float) -> dict:
    """Roofline columns of one row. strategy "best" (the `auto` rows): the lower of the merged
    and mixture bounds, since auto may run either."""
    options = ("merged", "mixture") if strategy == "best" else (strategy,)
    costs = [decode_step_cost(cfg, B, ctx, s, elem) for s in options]
    b = min(bound(c, peaks) for c in costs)
    fused = min(fused_bound(c, peaks) for c in costs)
    return dict(bound_tok_s=B / b, achieved=tok_s * b / B, achieved_fused=tok_s * fused / B)


def summarize(rows: list[dict], hf_name: str) -> dict:
    """The performance targets of docs/DESIGN.md §4 as ratios (>= 1 is met unless stated)."""
    def tok(system, strategy, B):
        return next((r["tok_s"] for r in rows if r["system"] == system
                     and r["strategy"] == strategy and r["B"] == B), None)
    out = {}
    for B in sorted({r["B"] for r in rows}):
        auto = tok("engine-camex", "auto", B)
        fixed = [tok("engine-camex", s, B) for s in ("merged", "mixture")]
        if auto and all(fixed):
            out[f"B={B} auto / best fixed (target >= 0.95)"] = auto / max(fixed)
        for name, system, strategy in (
                ("dense-in-engine (target >= 0.9 at B=1)", "engine-dense", "-"),
                ("transformers dense (target >= 1.0 at B=1)", hf_name, "generate"),
                ("training-form (target >= 10 at B=1)", "hf-camex-training-form", "generate")):
            other = tok(system, strategy, B)
            if auto and other:
                out[f"B={B} camex auto / {name}"] = auto / other
    return out


if __name__ == "__main__":
    main()
