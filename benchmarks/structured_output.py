"""What structured output costs the engine: the vocabulary compile at warm-up, one request's
grammar at submit, and decode throughput with every row constrained against the same rows
free, on a folded checkpoint with its tokenizer.

Constrained rows run the regular expression `[a-z ,.]*` (never complete; `min_tokens` keeps EOS
out of free and constrained rows alike, so every row makes exactly `--new-tokens` tokens); a
row's step then costs its grammar's mask on the host (llguidance) and the masked sampling. Both
runs use the same engine, alternating, best of `--reps`; the difference per row and step is the
mask's cost. Also reported: the engine process's resident memory before and after the vocabulary
compile.

    python benchmarks/structured_output.py --model DIR [--batch-sizes 1,8] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from camex_runtime import Constraint, Engine, SamplingParams  # noqa: E402
from common import print_table, write_results  # noqa: E402

FREE_TEXT = Constraint("regex", "[a-z ,.]*")
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age"]}
COLS = ["B", "free_tok_s", "constrained_tok_s", "ratio", "mask_ms_per_row_step"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def decode_seconds(engine: Engine, prompts: list[str], params: SamplingParams) -> float:
    """Seconds from the first to the last token event of a batch decoding together."""
    handles = [engine.submit(p, params) for p in prompts]
    results = [h.result() for h in handles]
    assert all(len(r.token_ids) == params.max_new_tokens for r in results), \
        [r.finish_reason for r in results]
    events = [ev for h in handles for ev in h.events() if ev.token_id >= 0]
    firsts = sorted(ev.at for ev in events if ev.index == 0)
    return max(ev.at for ev in events) - firsts[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folded checkpoint directory with a tokenizer")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    args.quick, args.device = False, "cpu"
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"{args.model} is not a folded checkpoint (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_batch_size=max(sizes))
    if engine.tokenizer is None:
        p.error(f"{args.model} has no tokenizer: structured output needs one")
    before = rss_mb()
    t0 = time.perf_counter()
    engine.grammars.prepare()
    compile_s, compile_mb = time.perf_counter() - t0, rss_mb() - before
    t0 = time.perf_counter()
    engine.grammars.guide(Constraint("json", json.dumps(SCHEMA)))
    grammar_ms = (time.perf_counter() - t0) * 1e3
    engine.start()
    prompts = ["The quick brown fox", "Once upon a time", "In the beginning",
               "A long way from home"]
    rows = []
    n = args.new_tokens
    for B in sizes:
        batch = [prompts[b % len(prompts)] for b in range(B)]
        # min_tokens = n keeps EOS out of both (with the grammar, EOS would end it early)
        free = SamplingParams(max_new_tokens=n, min_tokens=n)
        constrained = SamplingParams(max_new_tokens=n, min_tokens=n, constraint=FREE_TEXT)
        best = {"free": float("inf"), "constrained": float("inf")}
        for _ in range(args.reps):  # alternating, best of reps
            for name, params in (("free", free), ("constrained", constrained)):
                best[name] = min(best[name], decode_seconds(engine, batch, params))
        steps = n - 1
        rows.append({"B": B, "free_tok_s": B * steps / best["free"],
                     "constrained_tok_s": B * steps / best["constrained"],
                     "ratio": best["free"] / best["constrained"],
                     "mask_ms_per_row_step": (best["constrained"] - best["free"])
                     / (steps * B) * 1e3})
    engine.stop()
    print(f"vocabulary: {engine.config.vocab_size} ids, compiled in {compile_s:.3f} s, "
          f"+{compile_mb:.1f} MB resident; a 3-field JSON schema: {grammar_ms:.2f} ms")
    print_table(rows, COLS)
    write_results("structured_output", args, rows, {
        "model": args.model, "vocab_size": engine.config.vocab_size,
        "vocab_compile_s": compile_s, "vocab_compile_mb": compile_mb,
        "schema_compile_ms": grammar_ms, "new_tokens": n})
    return 0


if __name__ == "__main__":
    sys.exit(main())
