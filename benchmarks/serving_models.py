"""Build the serving-benchmark inputs: GPT-2-small-shaped CAMEx checkpoints, random weights.

Writes under ``--out`` (default ``artifacts/serving``, gitignored):

- ``tokenizer/``: a byte-level BPE (``vocab_size=50257`` asked for) trained on the local
  fortune files; the model vocab is 50257 whatever the tokenizer reaches, so generated ids
  beyond the tokenizer decode to ``""`` (the server must cope);
- ``camex/``: folded CAMEx LM, 12 layers, d=768, d_ff=3072, 12 heads, 1 base + 7 routed
  experts in every block, T=256, fp32, random init (experts spread apart so routing matters);
- ``dense/``: the same shape with ``num_experts=0`` (the dense-equivalent model);
- ``prompts.jsonl``: prompts of 64..128 tokens (cut from fortunes, by this tokenizer) with
  ``max_new_tokens``, for ``camex-loadtest --prompts``.

Each checkpoint goes through ``camex_runtime.export`` (the product path: fold + verify).
Existing outputs are kept (``--force`` rebuilds). Knows nothing about servers or HTTP.

    python benchmarks/serving_models.py --out artifacts/serving
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from camex_runtime import CamexConfig, CamexForCausalLM, export  # noqa: E402
from camex_runtime.training.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")


def fortune_texts(root: Path = FORTUNES) -> list[str]:
    """Every fortune (files without .dat/.u8 suffix), split on the '%' separator lines."""
    texts = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.suffix):
        texts += [t.strip() for t in f.read_text(errors="replace").split("\n%\n") if t.strip()]
    if not texts:
        raise SystemExit(f"no fortunes under {root}: apt-get install -y fortunes")
    return texts


def build_tokenizer(out: Path, texts: list[str], force: bool) -> dict:
    if (out / "tokenizer.json").exists() and not force:
        return {"reused": True, "vocab": len(load_tokenizer(out))}
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(texts, vocab_size=50257, model_max_length=1024)
    seconds = time.perf_counter() - t0
    tok.save_pretrained(out)
    chars = sum(map(len, texts))
    print(f"tokenizer: {len(tok)} entries from {chars / 1e6:.1f} M chars in {seconds:.1f} s")
    return {"reused": False, "vocab": len(tok), "train_chars": chars, "train_seconds": seconds}


def build_lm(out: Path, tok_dir: Path, num_experts: int, force: bool) -> dict:
    if (out / "config.json").exists() and not force:
        return {"reused": True}
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = CamexConfig.from_preset("gpt2-small", num_experts=num_experts,
                                  eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model = CamexForCausalLM(cfg).eval()
    with torch.no_grad():  # spread experts apart and sharpen routers: merges really differ
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * 0.02)
            elif ".router." in name:
                p.mul_(20.0)
    t0 = time.perf_counter()
    report = export(model, out, tokenizer=tok,
                    provenance={"training_data": "random init (serving benchmark)"})
    params = sum(p.numel() for p in model.parameters())
    print(f"{out.name}: {params / 1e6:.0f} M training-form parameters, exported in "
          f"{time.perf_counter() - t0:.0f} s (max rel error {report.max_rel_error:.1e})")
    return {"reused": False, "training_form_params": params}


def write_prompts(path: Path, tok_dir: Path, texts: list[str], n: int, lo: int, hi: int,
                  max_new_tokens: int, seed: int = 0) -> None:
    """`n` prompts of lo..hi tokens: consecutive fortunes joined, cut at a token count."""
    tok, rng = load_tokenizer(tok_dir), random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            ids: list[int] = []
            while len(ids) < hi:
                ids += tok.encode(rng.choice(texts) + "\n", add_special_tokens=False)
            prompt = tok.decode(ids[:rng.randint(lo, hi)])
            f.write(json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="artifacts/serving")
    p.add_argument("--only", choices=("tokenizer", "camex", "dense", "prompts"), action="append")
    p.add_argument("--prompts", type=int, default=256, help="prompts to write")
    p.add_argument("--prompt-tokens", default="64:128", help="LO:HI tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    out, todo = Path(args.out), set(args.only or ("tokenizer", "camex", "dense", "prompts"))
    out.mkdir(parents=True, exist_ok=True)
    texts, meta = fortune_texts(), {}
    if "tokenizer" in todo:
        meta["tokenizer"] = build_tokenizer(out / "tokenizer", texts, args.force)
    for name, experts in (("camex", 7), ("dense", 0)):
        if name in todo:
            meta[name] = build_lm(out / name, out / "tokenizer", experts, args.force)
    if "prompts" in todo:
        lo, hi = map(int, args.prompt_tokens.split(":"))
        write_prompts(out / "prompts.jsonl", out / "tokenizer", texts, args.prompts, lo, hi,
                      args.max_new_tokens)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
