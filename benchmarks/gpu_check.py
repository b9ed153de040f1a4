"""GPU check: the engine's correctness invariants on CUDA in bf16 and fp32, then the decode
benchmark (benchmarks/decode.py) in each dtype. The GPU path is the CPU code with another
`device`/`dtype`; this script is how we know that holds.

Invariants (tiny model, random weights, T=4, prompts shorter and longer than T):
1. incremental decode == one full forward of the model code (tokens, logprobs), both modes;
2. continuous batching (staggered) == each request alone;
3. merged == mixture.
fp32 must agree to 1e-4 with identical greedy tokens; bf16 is reported (token agreement and
max |Δ logprob|) and passes at >= 90% agreement (rounding can flip near-ties).

    python benchmarks/gpu_check.py                 # cuda, bf16 + fp32, full decode benchmark
    python benchmarks/gpu_check.py --quick         # decode benchmark on tiny shapes
    python benchmarks/gpu_check.py --device cpu --dtypes float32 --skip-bench   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import RESULTS, folded_model, print_table
from camex_runtime import Engine, SamplingParams

TINY = dict(vocab_size=97, d_model=64, n_layer=2, n_head=4, d_ff=128,
            max_position_embeddings=128, num_experts=3, segment_len=4)


def tiny_pair(device, dtype):
    """(reference model, engine) over the same random folded weights."""
    torch.manual_seed(0)
    ref = folded_model(TINY, device, dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif ".router." in name:
                p.mul_(8.0)
    return ref


def run_alone(engine: Engine, prompt, params) -> object:
    h = engine.submit(prompt, params)
    while not h.done:
        engine.step()
    return h.result()


def check_incremental(ref, engine, mode: str) -> tuple[float, float]:
    """(greedy token agreement, max |logprob - reference|) over several prompts."""
    agree = total = 0
    worst = 0.0
    T = TINY["segment_len"]
    for plen in (1, 3, 4, 7, 9):
        prompt = torch.randint(0, 96, (plen,),
                               generator=torch.Generator().manual_seed(plen)).tolist()
        res = run_alone(engine, prompt, SamplingParams(max_new_tokens=13, ignore_eos=True,
                                                       routing=mode))
        ids = torch.tensor([prompt + res.token_ids], device=engine.runner.device)
        with torch.no_grad():
            lp = torch.log_softmax(ref(ids, routing=mode, route1_len=min(plen, T),
                                       prompt_len=plen).logits[0].float(), -1)
        pos = torch.arange(plen - 1, ids.shape[1] - 1, device=lp.device)
        want = lp[pos].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(want, res.token_ids))
        total += len(want)
        got_lp = torch.tensor(res.logprobs, device=lp.device)
        worst = max(worst, float((got_lp - lp[pos, torch.tensor(res.token_ids, device=lp.device)])
                                 .abs().max()))
    return agree / total, worst


def check_batched(engine: Engine) -> float:
    prompts = [[1, 2, 3], list(range(10, 19)), [5], [40, 41, 42, 43, 44]]
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [run_alone(engine, p, sp).token_ids for p in prompts]
    hs = []
    for _i, p in enumerate(prompts):  # staggered arrivals
        hs.append(engine.submit(p, sp))
        engine.step()
    while not all(h.done for h in hs):
        engine.step()
    pairs = [(a, b) for h, want in zip(hs, alone) for a, b in zip(h.result().token_ids, want)]
    return sum(a == b for a, b in pairs) / len(pairs)


def invariants(device: str, dtype: torch.dtype) -> list[dict]:
    ref = tiny_pair(device, dtype)
    rows = []
    tokens = {}
    for strategy in ("merged", "mixture"):
        engine = Engine(copy.deepcopy(ref), None, max_batch_size=4, strategy=strategy)
        for mode in ("segment", "prompt"):
            agree, worst = check_incremental(ref, engine, mode)
            rows.append(dict(check=f"incremental==full {mode}", strategy=strategy,
                             agreement=agree, max_dlogprob=worst))
        rows.append(dict(check="batched==alone", strategy=strategy,
                         agreement=check_batched(engine), max_dlogprob=""))
        tokens[strategy] = run_alone(engine, list(range(1, 12)),
                                     SamplingParams(max_new_tokens=16, ignore_eos=True))
    a, b = tokens["merged"], tokens["mixture"]
    rows.append(dict(check="merged==mixture", strategy="-",
                     agreement=sum(x == y for x, y in zip(a.token_ids, b.token_ids)) / 16,
                     max_dlogprob=max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))))
    exact = dtype == torch.float32
    for r in rows:
        lp_ok = r["max_dlogprob"] == "" or r["max_dlogprob"] <= (1e-4 if exact else 0.1)
        r["ok"] = (r["agreement"] == 1.0 if exact else r["agreement"] >= 0.9) and \
            (lp_ok or not exact)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--quick", action="store_true", help="decode benchmark on tiny shapes")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON files go")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (use --device cpu for a smoke test)")
    report = {"device": args.device, "invariants": {}, "benchmarks": {}}
    ok = True
    for name in args.dtypes.split(","):
        rows = invariants(args.device, getattr(torch, name))
        print(f"\n== invariants, {args.device} {name}")
        print_table(rows, ["check", "strategy", "agreement", "max_dlogprob", "ok"])
        report["invariants"][name] = rows
        ok &= all(r["ok"] for r in rows)
    if not args.skip_bench:
        here = Path(__file__).resolve().parent
        for name in args.dtypes.split(","):
            out = args.out_dir / f"gpu-decode-{name}{'-quick' if args.quick else ''}.json"
            cmd = [sys.executable, str(here / "decode.py"), "--device", args.device,
                   "--dtype", name, "--out", str(out)] + (["--quick"] if args.quick else [])
            print(f"\n== decode benchmark, {name}: {' '.join(cmd)}")
            subprocess.run(cmd, check=True, cwd=here)
            report["benchmarks"][name] = str(out)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"gpu-check-{args.device}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {path}; invariants {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
