"""Fixtures for the load-tester tests: a real HTTP fake server on 127.0.0.1."""

from __future__ import annotations

import pytest
from loadtest_fake_server import FakeServer

from loadtest import RequestSpec, run_load


@pytest.fixture(scope="module")
def fake():
    with FakeServer() as server:
        # one untimed request of each kind first: the first request through a fresh server and
        # client pays one-off costs (lazy imports, first connections; 0.5 s once in CI) that
        # the tests' latency bounds are not about
        specs = [RequestSpec(i, kind, "n=2", 2, i)
                 for i, kind in enumerate(("stream", "generate", "classify"))]
        warm = run_load(url=server.url, num_requests=len(specs), concurrency=len(specs),
                        specs=specs)
        assert warm.completed == len(specs), warm.failures_by_status
        server.clear()
        yield server


@pytest.fixture
def fresh_fake(fake):
    """The module's fake server with its request log emptied."""
    fake.clear()
    return fake
