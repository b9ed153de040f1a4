"""Checkpoints the end-to-end tests share, built once per session.

- `long_lm_dir`: the tiny LM with 2048 positions, so a request with `ignore_eos` can hold its
  slot (and its stream) for ~2,000 decode steps.
"""

import pytest

from tests.conftest import build_tiny


@pytest.fixture(scope="session")
def long_lm_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "long-lm", "lm",
                      max_position_embeddings=2048)
