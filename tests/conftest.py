"""Shared fixtures: tiny folded checkpoints (LM and classifier) with a real BPE tokenizer.

Built once per test session in a temp dir; small enough (2 layers, d=32, T=4) that every
engine/server test runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = [
    "the quick brown fox jumps over the lazy dog.",
    "a merged expert serves each segment of tokens.",
    "curvature aware merging of experts folds into the weights.",
    "hello world, this is a tiny corpus for a tiny tokenizer!",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation ; : ? ' \" ( ) [ ]",
]


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """Engine.warmup freezes the heap (gc.freeze), as a server process should once; in the
    test process that would keep every later-dead engine's reference cycles, and their
    tensors, forever. Each test ends with the heap collectable again."""
    yield
    gc.unfreeze()


def make_tokenizer(out_dir: Path, vocab_size: int = 320):
    """A byte-level BPE trained on TINY_TEXT, saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TINY_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny(out_dir: Path, kind: str, **overrides) -> Path:
    from camex_runtime import CamexConfig, CamexForCausalLM, CamexForSequenceClassification, export

    torch.manual_seed(0)
    tok = make_tokenizer(out_dir.parent / f"{out_dir.name}-tok")
    cfg = dict(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4, d_ff=64,
               max_position_embeddings=128, num_experts=3, segment_len=4, curvature_rank=1,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    if kind == "classifier":
        cfg.update(num_labels=3, id2label={0: "animals", 1: "science", 2: "greeting"},
                   label2id={"animals": 0, "science": 1, "greeting": 2})
    cfg.update(overrides)
    config = CamexConfig(**cfg)
    model = (CamexForCausalLM if kind == "lm" else CamexForSequenceClassification)(config)
    with torch.no_grad():  # spread experts and curvature apart so routing matters
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * 0.05)
            elif ".curvature." in name:
                p.add_(torch.randn_like(p) * 0.02)
            elif ".router." in name:
                p.mul_(50.0)
    export(model, out_dir, tokenizer=tok, provenance={"training_data": "random init (tests)"})
    return out_dir


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-lm", "lm")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-clf", "classifier")
