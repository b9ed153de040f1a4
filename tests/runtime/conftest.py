"""Fixtures shared by the runtime tests (the tiny LM itself comes from tests/conftest.py)."""
from __future__ import annotations

import pytest

from camex_runtime import Engine


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    """The tiny LM in an engine of 4 slots, started (modules that need another engine define
    their own `engine`)."""
    e = Engine.from_pretrained(tiny_lm_dir, max_batch_size=4)
    e.start()
    yield e
    e.stop()
