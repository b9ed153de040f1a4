"""The load tester against a REAL camex-server process: what it reports must match /metrics.

One server on 127.0.0.1 (a free port) serves the tiny LM and the tiny classifier; it is killed
by PID when the module ends (`tests.server.live_server`). A seeded mixed workload (streamed
/generate_stream, plain /generate, /classify) runs through `loadtest.run_load`, and the
client's counts are checked against the server's Prometheus counters diffed around the run:
requests per route and status, generated tokens, classified texts. A mismatch means one side
miscounts (e.g. the tester counting a final SSE event twice, or the server counting a token it
never sent).
"""

from __future__ import annotations

import pytest

from loadtest import run_load
from tests.server.live_server import live_server, value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
MIX = {"stream": 3, "generate": 2, "classify": 1}
ROUTES = {"stream": "/generate_stream", "generate": "/generate", "classify": "/classify"}


@pytest.fixture(scope="module")
def server(tiny_lm_dir, tiny_classifier_dir, tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("live-load"), "--model", str(tiny_lm_dir),
                     "--classifier", str(tiny_classifier_dir), "--max-batch-size", "4") as srv:
        yield srv


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def run_and_diff(srv, **load):
    before = srv.metrics()
    report = run_load(url=srv.base_url, mix=MIX, prompt_len="uniform:2:10",
                      max_new_tokens="uniform:1:12", **load)
    return report, before, srv.metrics()


def assert_counts_match(report, before: dict, after: dict) -> None:
    assert report.sent == report.planned
    assert report.completed + report.failed == report.sent
    assert report.failed == 0, report.failures_by_status
    assert sum(report.sent_by_kind.values()) == report.sent
    assert set(report.sent_by_kind) == set(MIX), report.sent_by_kind  # every kind was exercised
    for kind, route in ROUTES.items():
        sent = report.sent_by_kind.get(kind, 0)
        assert delta(before, after, "camex_requests_total", route=route,
                     status="200") == sent, route
    generations = report.sent_by_kind["stream"] + report.sent_by_kind["generate"]
    assert delta(before, after, "camex_generated_tokens_total") == report.total_output_tokens
    assert delta(before, after, "camex_request_generated_tokens_count") == generations
    assert (delta(before, after, "camex_classified_sequences_total")
            == report.sent_by_kind["classify"])
    assert report.total_output_tokens >= generations  # every generation yields >= 1 token
    assert report.ttft.count == report.sent_by_kind["stream"]


def test_closed_loop_mix_matches_server_counters(server):
    report, before, after = run_and_diff(server, num_requests=30, concurrency=4, seed=5)
    assert_counts_match(report, before, after)
    assert report.peak_concurrency <= 4


def test_open_loop_burst_matches_server_counters(server):
    """All requests at t=0 (rate=inf): the engine batches them; counts must still add up."""
    report, before, after = run_and_diff(server, num_requests=18, rate=float("inf"), seed=11)
    assert_counts_match(report, before, after)
    assert report.peak_concurrency > 4  # more in flight than batch slots: some really queued
    assert (delta(before, after, "camex_batch_size_sum")
            > delta(before, after, "camex_batch_size_count"))
