"""Tokenizer training, saving and reloading through AutoTokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from camex_runtime.training.tokenizer import (EOS_TOKEN, PAD_TOKEN, TokenizerError, load_tokenizer,
                                              train_bpe_tokenizer)

from .conftest import TOPICS

TEXTS = [d for docs in TOPICS.values() for d in docs] * 4


def test_trained_bpe_reloads_with_autotokenizer(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=64)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token == again.bos_token == EOS_TOKEN
    assert again.pad_token == PAD_TOKEN and again.pad_token_id != again.eos_token_id
    assert again.model_max_length == 64
    assert len(again) <= 300
    text = "a ripe banana, naïve café 123!"
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == text  # byte-level: unseen characters still round-trip
    # BPE merges learned from the corpus: frequent words are single tokens
    assert len(again(" the", add_special_tokens=False)["input_ids"]) == 1


def test_training_is_deterministic():
    a = train_bpe_tokenizer(TEXTS, vocab_size=290)
    b = train_bpe_tokenizer(TEXTS, vocab_size=290)
    assert a.get_vocab() == b.get_vocab()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size must be >= 258"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path / "empty")


def test_loaded_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), eos_token=EOS_TOKEN)
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id
