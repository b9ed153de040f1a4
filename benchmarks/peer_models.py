"""The models of the llama.cpp peer benchmark: one set of random dense weights, three forms.

``build_models(work, quick, seed, family=...)`` writes under ``work`` (each step skipped when its
output exists, since the CAMEx export takes minutes):

- ``tokenizer/``: a GPT-2-style byte-level BPE (GPT-2's pre-tokenizer and byte decoder) trained
  on the Debian fortunes with ``tokenizers``; full size asks for GPT-2's 50,257 entries;
- the dense `transformers` directory (seeded random init, safetensors) with that tokenizer,
  what llama.cpp converts to GGUF. ``family="gpt2"``: ``gpt2/``, GPT-2 small (124 M parameters,
  tied embeddings), with ``n_ctx`` in ``config.json`` (transformers 5 no longer writes it;
  llama.cpp's converter reads it). ``family="llama"``: ``llama/``, a Llama of GPT-2 small's width
  and depth (RMSNorm, rotary positions, grouped-query attention 12/4 heads, SwiGLU FFN of 2,048
  with GPT-2's FFN parameter count, untied LM head; 153 M parameters), ``rope_theta`` written
  out. ``family="qwen3"``: ``qwen3/``, the same Llama shape as a Qwen3 (its per-head query and
  key RMSNorms added, head_dim 64 written out: Qwen3's config default is 128);
- ``camex-dense/``: the same weights as a camex checkpoint, ``upcycle_from_dense(dir,
  num_experts=0)`` + ``export`` (the dense-equivalent model);
- ``camex-7x1/``: ``upcycle_from_dense(dir, num_experts=7)`` (1 base + 7 routed experts per
  FFN) with experts spread apart and routers sharpened, so that merging does real work,
  + ``export``;
- ``prompts-<prompt_tokens>.jsonl``: distinct prompts of exactly ``prompt_tokens`` tokens
  that survive a decode/encode round trip, so every server sees the same token ids from the
  same text; one file per length, so runs with different prompt lengths share the models.

Knows nothing about servers or llama.cpp (beyond the config keys its converter reads).

    python benchmarks/peer_models.py --work ~/.cache/camex-serve/peer/full
    python benchmarks/peer_models.py --family llama --work ~/.cache/camex-serve/peer/full-llama
    python benchmarks/peer_models.py --family qwen3 --work ~/.cache/camex-serve/peer/full-qwen3
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from camex_runtime import export, upcycle_from_dense  # noqa: E402
from camex_runtime.training.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from serving_models import fortune_texts  # noqa: E402

# GPT-2 small (124 M parameters) and a tiny shape for --quick / tests.
SHAPES = {
    "full": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "quick": dict(vocab_size=1024, n_positions=256, n_embd=64, n_layer=2, n_head=4),
}
# A Llama as wide and deep as GPT-2 small: its SwiGLU FFN (3 x 768 x 2,048) holds GPT-2's FFN
# parameters (2 x 768 x 3,072), so a merge streams the same bytes; grouped-query attention and an
# untied LM head as Llama-family checkpoints have them.
LLAMA_SHAPES = {
    "full": dict(vocab_size=50257, max_position_embeddings=1024, hidden_size=768,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
    "quick": dict(vocab_size=1024, max_position_embeddings=256, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128),
}
FAMILIES = ("gpt2", "llama", "qwen3")  # qwen3: LLAMA_SHAPES plus per-head q/k norms
ROPE_THETA = 10000.0
QUICK_TEXTS = 3000  # fortunes the quick tokenizer trains on (seconds, not minutes)
EXPERT_NOISE = 0.02  # std added to every routed expert: experts differ as much as init weights
ROUTER_SCALE = 20.0  # sharpens N(0, 0.02) routers so scores differ between prompts


def context_length(family: str, quick: bool) -> int:
    """Positions the family's model of that size holds: a prompt plus its new tokens fit in it."""
    shape = (SHAPES if family == "gpt2" else LLAMA_SHAPES)["quick" if quick else "full"]
    return shape.get("n_positions") or shape["max_position_embeddings"]


def build_tokenizer(out: Path, texts: list[str], vocab_size: int):
    if not (out / "tokenizer.json").exists():
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=None)
        tok.save_pretrained(out)
        print(f"tokenizer: {len(tok)} entries in {time.perf_counter() - t0:.1f} s", flush=True)
    return load_tokenizer(out)


def build_gpt2(out: Path, tok, shape: dict, seed: int) -> dict:
    """Seeded random GPT-2 with `tok`; the model vocab is the shape's, padded past the
    tokenizer's size if it is smaller (the converter names unused ids [PADn])."""
    from transformers import GPT2Config, GPT2LMHeadModel
    if (out / "config.json").exists():
        return json.loads((out / "config.json").read_text())
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} entries, more than vocab {shape['vocab_size']}")
    cfg = GPT2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    return save_for_converter(out, model, tok, {"n_ctx": shape["n_positions"]})


def build_llama(out: Path, tok, shape: dict, seed: int, family: str = "llama") -> dict:
    """Seeded random Llama (or Qwen3: `family`) with `tok` (vocab padded as in `build_gpt2`)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    if (out / "config.json").exists():
        return json.loads((out / "config.json").read_text())
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} entries, more than vocab {shape['vocab_size']}")
    config_cls, model_cls, extra = (LlamaConfig, LlamaForCausalLM, {}) if family == "llama" \
        else (Qwen3Config, Qwen3ForCausalLM,
              {"head_dim": shape["hidden_size"] // shape["num_attention_heads"]})
    cfg = config_cls(**shape, **extra, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # transformers 5 keeps rope_theta inside rope_parameters; the converter's transformers 4
    # reads the top-level key (and would silently assume 10,000 without it)
    return save_for_converter(out, model, tok, {"rope_theta": ROPE_THETA})


def save_for_converter(out: Path, model, tok, config_keys: dict) -> dict:
    """Weights, tokenizer and config.json (plus `config_keys`) as llama.cpp's converter reads
    them; returns the config."""
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_keys)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # transformers 5 names the tokenizer class "TokenizersBackend", which the converter's
    # transformers 4 does not know; PreTrainedTokenizerFast reads the same tokenizer.json in both.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    print(f"{out.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
          flush=True)
    return config


def build_camex(out: Path, dense_dir: Path, tok, num_experts: int, seed: int,
                **overrides) -> dict:
    """Upcycle the dense directory and export it (fold + verify) as a camex checkpoint
    (`overrides`: CAMEx config knobs, e.g. segment_len)."""
    if (out / "config.json").exists():
        return {"reused": True}
    t0 = time.perf_counter()
    model = upcycle_from_dense(dense_dir, num_experts=num_experts, **overrides).eval()
    if num_experts:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # τ_i != 0 and routers that discriminate: merges differ
            for name, p in model.named_parameters():
                if ".experts." in name:
                    p.add_(torch.randn(p.shape, generator=gen) * EXPERT_NOISE)
                elif ".router." in name:
                    p.mul_(ROUTER_SCALE)
    report = export(model, out, tokenizer=tok,
                    provenance={"training_data": "random init (llama.cpp peer benchmark)"})
    print(f"{out.name}: exported in {time.perf_counter() - t0:.0f} s "
          f"(max rel error {report.max_rel_error:.1e})", flush=True)
    return {"reused": False, "export_seconds": report.seconds}


def prompts_path(work: Path, length: int) -> Path:
    return work / f"prompts-{length}.jsonl"


def write_prompts(path: Path, tok, texts: list[str], n: int, length: int, seed: int) -> list[dict]:
    """At least `n` distinct prompts of exactly `length` tokens, stable under decode -> encode,
    each cut from randomly drawn fortunes joined by newlines (as many as its length takes: a
    512-token prompt spans a dozen). An existing file of `n` or more prompts of that length is
    kept whole. The sequence depends only on the seed and the length, so a file with fewer is
    written again, longer, and its prompts keep their places; a file of another length is
    written again."""
    if path.exists():
        have = [json.loads(line) for line in path.read_text().splitlines()]
        if len(have) >= n and all(p["prompt_tokens"] == length for p in have):
            return have
    rng, prompts, seen = random.Random(seed), [], set()
    for _ in range(100 * n):
        parts = [rng.choice(texts), rng.choice(texts)]
        ids = tok.encode("\n".join(parts), add_special_tokens=False)
        while len(ids) < length:
            parts.append(rng.choice(texts))
            ids = tok.encode("\n".join(parts), add_special_tokens=False)
        start = rng.randrange(len(ids) - length + 1)
        text = tok.decode(ids[start:start + length])
        again = tok.encode(text, add_special_tokens=False)
        if len(again) == length and text.strip() and text not in seen:
            seen.add(text)
            prompts.append({"prompt": text, "prompt_tokens": length})
            if len(prompts) == n:
                break
    else:
        raise RuntimeError(f"found only {len(prompts)} of {n} round-trip-stable prompts")
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return prompts


def build_models(work: Path, quick: bool, seed: int = 0, num_prompts: int = 64,
                 prompt_tokens: int = 32, family: str = "gpt2") -> dict:
    """Everything above under `work`; returns the paths and a description for the results.
    ``dense`` is the directory llama.cpp converts (also under the family's name)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    work.mkdir(parents=True, exist_ok=True)
    flavour = "quick" if quick else "full"
    shape = (SHAPES if family == "gpt2" else LLAMA_SHAPES)[flavour]
    texts = fortune_texts()
    tok = build_tokenizer(work / "tokenizer", texts[:QUICK_TEXTS] if quick else texts,
                          shape["vocab_size"])
    dense = work / family
    if family == "gpt2":
        build_gpt2(dense, tok, shape, seed)
    else:
        build_llama(dense, tok, shape, seed, family)
    build_camex(work / "camex-dense", dense, tok, 0, seed)
    build_camex(work / "camex-7x1", dense, tok, 7, seed)
    prompts = write_prompts(prompts_path(work, prompt_tokens), tok, texts, num_prompts,
                            prompt_tokens, seed)
    return {"work": str(work), "family": family, "shape": shape, "seed": seed,
            "tokenizer_entries": len(tok), "prompt_tokens": prompt_tokens,
            "num_prompts": len(prompts), "expert_noise": EXPERT_NOISE,
            "router_scale": ROUTER_SCALE, "dense": str(dense), family: str(dense),
            "camex_dense": str(work / "camex-dense"), "camex_7x1": str(work / "camex-7x1"),
            "prompts": str(prompts_path(work, prompt_tokens))}


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--family", choices=FAMILIES, default="gpt2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(build_models(args.work, args.quick, args.seed, family=args.family),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
