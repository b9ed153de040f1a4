"""A small random dense Llama, made locally, to try the upcycling path without downloading one.

    python -m camex_runtime.training.random_dense runs/tiny-llama-dense

writes a transformers `LlamaForCausalLM` directory (config.json, model.safetensors,
generation_config.json) with grouped-query attention, plus a byte-level BPE tokenizer trained on
the Debian fortunes and a minimal chat template: the same files a downloaded Llama-family model
has. `camex-train --from-dense random-llama:DIR` (what the `llama-upcycle` preset does) builds
one in DIR on first use. Random weights: it exists to exercise upcycle -> camex-train ->
camex-export -> camex-server, not to generate good text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# A template with the shape of common chat templates (role headers, an end-of-turn token).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] "
    "+ eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}")


RANDOM_PREFIX = "random-llama:"


def resolve_dense(spec: str) -> Path:
    """The dense model directory a `from_dense` value names: a directory, or
    `random-llama:DIR` (built there first if it is not yet)."""
    if spec.startswith(RANDOM_PREFIX):
        return ensure_random_llama(spec[len(RANDOM_PREFIX):])
    return Path(spec)


def ensure_random_llama(path: str | Path, vocab_size: int = 2048, hidden: int = 128,
                        layers: int = 4, seed: int = 0) -> Path:
    """`path` holding the dense model, built if it is not there yet."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .data import load_examples
    from .fortunes import fortune_files
    from .tokenizer import train_bpe_tokenizer

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    texts = [e.text for e in load_examples([str(p) for p in fortune_files()], "lm")]
    tok = train_bpe_tokenizer(texts, vocab_size, model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m camex_runtime.training.random_dense",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write (kept if it already holds a model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args(argv)
    print(ensure_random_llama(args.out, hidden=args.hidden, layers=args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
