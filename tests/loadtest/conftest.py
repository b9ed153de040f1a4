"""Fixtures for the load-tester tests: a real HTTP fake server on 127.0.0.1."""

from __future__ import annotations

import pytest
from loadtest_fake_server import FakeServer


@pytest.fixture(scope="module")
def fake():
    with FakeServer() as server:
        yield server


@pytest.fixture
def fresh_fake(fake):
    """The module's fake server with its request log emptied."""
    fake.received.clear()
    return fake
