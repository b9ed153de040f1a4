"""Tokenizers for training: load a directory, or train a GPT-2-style byte-level BPE.

A trained tokenizer is saved as a `PreTrainedTokenizerFast` directory (`tokenizer.json` +
`tokenizer_config.json`), so `AutoTokenizer.from_pretrained(dir)` loads it and the serving side
needs nothing from this module. Special tokens: `<|endoftext|>` is eos and bos (as in GPT-2; the
trainer puts it between documents), `<|pad|>` pads classifier batches (a separate id so padding is
never confused with a real end of text).

Knows nothing about models or training loops.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte must stay representable


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or trained; the message says why."""


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` entries on `texts` (deterministic)."""
    if vocab_size < MIN_VOCAB:
        raise TokenizerError(f"vocab_size must be >= {MIN_VOCAB} for a byte-level BPE, "
                             f"got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return wrap_tokenizer(bpe, model_max_length)


def wrap_tokenizer(bpe: Tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` with our special tokens, as a transformers tokenizer."""
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=None, **kwargs)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory; give it an eos and a pad token if it lacks them."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{path} holds a slow tokenizer; training needs a fast one")
    if tok.eos_token is None:
        raise TokenizerError(f"tokenizer in {path} has no eos token; "
                             f"the LM needs one between documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 convention; the attention mask tells them apart
    return tok
