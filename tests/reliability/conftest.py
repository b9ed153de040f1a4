"""Checkpoints for the reliability scenarios, built once per session.

- `long_lm_dir`: the tiny LM with 8192 positions, so a request with `ignore_eos` holds its slot
  (and its connection) for seconds even where a decode step takes well under a millisecond.
- `wide_classifier_dir`: a classifier wider and longer than the tiny one (d=128, 4 layers,
  256 positions), so a call of 32 texts costs enough that a queue forms and memory moves.
"""

import pytest

from tests.conftest import build_tiny

# ~220 characters: close to the wide classifier's 256 positions with the tiny tokenizer
LONG_TEXT = "the quick brown fox jumps over the lazy dog, a merged expert for each text " * 3


@pytest.fixture(scope="session")
def long_lm_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "long-lm", "lm",
                      max_position_embeddings=8192)


@pytest.fixture(scope="session")
def wide_classifier_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "wide-clf", "classifier", d_model=128,
                      n_layer=4, d_ff=512, max_position_embeddings=256)
