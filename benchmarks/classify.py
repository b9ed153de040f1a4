"""Classification throughput (sequences/s): the engine on a CAMEx classifier (auto / merged /
mixture; one merge per sequence and MoE layer) vs the dense-equivalent classifier.

    python benchmarks/classify.py --quick
    python benchmarks/classify.py --batch-sizes 1,16,64 --seq-len 128
"""
from __future__ import annotations

import torch

from common import (base_parser, best_time, folded_model, print_table, setup, shape,
                    write_results)
from roofline import bound, classify_cost, fused_bound, measure_peaks
from camex_runtime import Engine

COLS = ["system", "strategy", "B", "seq_s", "bound_seq_s", "achieved", "achieved_fused"]


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (quick: 16)")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = shape(args)
    n = args.seq_len or (16 if args.quick else 128)
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    elem = torch.empty((), dtype=dtype).element_size()
    peaks = measure_peaks(device, dtype, args.reps)
    kw = dict(max_batch_size=max(Bs), max_input_tokens=n, max_total_tokens=n + 1,
              merge_cache_bytes=0)
    camex = Engine(folded_model(cfg, device, dtype, kind="classifier"), None,
                   kind="classifier", **kw)
    dense = Engine(folded_model(cfg, device, dtype, kind="classifier", num_experts=0), None,
                   kind="classifier", **kw)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B in Bs:
        # ragged lengths (n/2..n) so padding-awareness is part of the measurement
        texts = [torch.randint(0, cfg["vocab_size"], (int(torch.randint(n // 2, n + 1, (1,),
                 generator=gen)),), generator=gen).tolist() for _ in range(B)]
        runs = [("engine-camex", s, camex, True) for s in ("auto", "merged", "mixture")]
        runs.append(("engine-dense", "-", dense, False))
        for system, strategy, engine, moe in runs:
            if moe:
                engine.runner.strategy = strategy
            t = best_time(lambda engine=engine, texts=texts: engine.classify(texts), device,
                          args.reps)
            cost = classify_cost(cfg, B, n, moe, elem)
            b, bf = bound(cost, peaks), fused_bound(cost, peaks)
            rows.append(dict(system=system, strategy=strategy, B=B, seq_s=B / t,
                             bound_seq_s=B / b, achieved=b / t, achieved_fused=bf / t))
            print_table(rows[-1:], COLS)
    print()
    print_table(rows, COLS)
    write_results("classify", args, rows, {"peaks": peaks, "shape": cfg, "seq_len": n})


if __name__ == "__main__":
    main()
