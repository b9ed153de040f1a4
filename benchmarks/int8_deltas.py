"""What serving with int8 expert deltas (`--expert-deltas int8`) costs in quality and saves in
memory, measured on folded checkpoints in the model code (no engine, no timing).

For each checkpoint, the model as exported and the same model with every expert replaced by
E_m + its dequantized int8 delta (`camex_runtime.engine.moe.with_int8_deltas`: exactly what an
engine with int8 deltas serves, which the tests pin) score the same texts, one full forward
each, segment routing as the checkpoint was trained with:
- per token: the log-probability of the actual next token, both models (perplexity of each,
  the largest and the mean absolute difference), and whether both pick the same top-1 token;
- the expert stacks' resident bytes in either layout (`MoEWeights.weight_bytes`).
The texts are the demo LM's own held-out fortunes (the preset's split) by default, or a text
file given with `--texts` (one document per blank-line-separated paragraph).

The speed side is measured over HTTP by the llama.cpp peer benchmark, whose
`--systems camex-dense,camex-7x1,camex-7x1-int8` serves the 7+1 model both ways side by side.

    python -m camex_runtime.training.demo               # the demo LM, if not built yet
    python benchmarks/int8_deltas.py                    # the demo LM (default location)
    python benchmarks/int8_deltas.py --model DIR --model DIR2 --out results.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from camex_runtime.checkpoint import load_folded  # noqa: E402
from camex_runtime.engine.moe import MoEWeights, with_int8_deltas  # noqa: E402
from camex_runtime.engine.runner import build_model  # noqa: E402
from checkouts import git_state  # noqa: E402
from machine import cpu_info, loadavg  # noqa: E402


def held_out_demo_texts(limit: int) -> list[str]:
    """The demo LM preset's held-out fortunes (its own split), the first `limit`."""
    from camex_runtime.training.data import load_examples, split_examples
    from camex_runtime.training.presets import preset

    cfg = preset("demo-lm")
    _, held = split_examples(load_examples(cfg.data, "lm"), cfg.eval_fraction, cfg.seed)
    return [e.text for e in held[:limit]]


def file_texts(path: Path, limit: int) -> list[str]:
    parts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return [p for p in parts if p][:limit]


def expert_bytes(model, deltas: str) -> int:
    return sum(MoEWeights.from_folded(b.ffn, deltas).weight_bytes
               for b in model.transformer.h if b.is_moe)


def score(model, ids: list[int]) -> torch.Tensor:
    """log-probabilities (L-1, V) of tokens 1.. given their prefixes, one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def compare(path: Path, texts: list[str], min_tokens: int) -> dict:
    ckpt = load_folded(path)
    full = build_model(ckpt).eval()
    q8 = with_int8_deltas(build_model(load_folded(path))).eval()
    if ckpt.tokenizer_dir is None:
        raise SystemExit(f"{path} has no tokenizer: give a checkpoint with its tokenizer")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    limit = full.config.max_position_embeddings
    nll_full, nll_q8, diffs, agree, tokens, docs = [], [], [], 0, 0, 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=limit)["input_ids"]
        if len(ids) < min_tokens:
            continue
        a, b = score(full, ids), score(q8, ids)
        nxt = torch.tensor(ids[1:])
        la, lb = a[torch.arange(len(nxt)), nxt], b[torch.arange(len(nxt)), nxt]
        nll_full.extend((-la).tolist())
        nll_q8.extend((-lb).tolist())
        diffs.extend((la - lb).abs().tolist())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        tokens += len(nxt)
        docs += 1
    if not tokens:
        raise SystemExit(f"no text of at least {min_tokens} tokens for {path}")
    cfg = full.config
    return {
        "model": str(path), "num_experts": cfg.num_experts, "d_model": cfg.d_model,
        "d_ff": cfg.d_ff, "n_layer": cfg.n_layer, "family": cfg.family,
        "dtype": str(next(full.parameters()).dtype).replace("torch.", ""),
        "texts": docs, "tokens": tokens,
        "ppl_full": math.exp(statistics.fmean(nll_full)),
        "ppl_int8": math.exp(statistics.fmean(nll_q8)),
        "logprob_diff_mean": statistics.fmean(diffs), "logprob_diff_max": max(diffs),
        "top1_agreement": agree / tokens,
        "expert_bytes_full": expert_bytes(full, "full"),
        "expert_bytes_int8": expert_bytes(full, "int8"),
    }


def render(rows: list[dict]) -> str:
    head = ("| model | experts | texts / tokens | perplexity full → int8 | |Δ log p| mean / max "
            "| same top-1 | expert bytes full → int8 |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} ({r['dtype']}) | {r['num_experts']} | "
            f"{r['texts']} / {r['tokens']} | {r['ppl_full']:.3f} → {r['ppl_int8']:.3f} | "
            f"{r['logprob_diff_mean']:.5f} / {r['logprob_diff_max']:.4f} | "
            f"{100 * r['top1_agreement']:.2f} % | "
            f"{r['expert_bytes_full'] / 2**20:.1f} → {r['expert_bytes_int8'] / 2**20:.1f} MiB "
            f"({r['expert_bytes_int8'] / r['expert_bytes_full']:.2f}×) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", type=Path,
                   help="folded causal-LM checkpoint (repeatable; default: the demo LM)")
    p.add_argument("--texts", type=Path, default=None,
                   help="text file of documents separated by blank lines (default: the demo "
                        "LM's held-out fortunes)")
    p.add_argument("--limit", type=int, default=300, help="documents at most")
    p.add_argument("--min-tokens", type=int, default=8, help="shorter documents are skipped")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: none)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model
    if not models:
        from camex_runtime.training.demo import LM_NAME, default_root
        models = [default_root() / LM_NAME]
    for m in models:
        if not (m / "config.json").is_file():
            p.error(f"{m} is not a folded checkpoint (no config.json); build the demo LM with "
                    "`python -m camex_runtime.training.demo` or give --model")
    texts = file_texts(args.texts, args.limit) if args.texts else held_out_demo_texts(args.limit)
    t0 = time.perf_counter()
    rows = [compare(m, texts, args.min_tokens) for m in models]
    print(render(rows))
    if args.out:
        code = git_state()
        doc = {"benchmark": "int8_deltas", "commit": code["short"], "dirty": code["dirty"],
               "machine": cpu_info(),
               "loadavg": loadavg(), "torch": torch.__version__,
               "texts": str(args.texts) if args.texts else "demo-lm held-out fortunes",
               "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
