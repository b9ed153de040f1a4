"""Report statistics on hand-made records: exact percentiles, derived latencies, goodput,
compare."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.records import RequestRecord
from loadtest.report import LatencyStats, Report, Slo, build_report, parse_duration, percentile
from loadtest.tables import compare_reports, format_compare, format_report


def stream(index, start, token_times, end=None, ok=True):
    rec = RequestRecord(index=index, kind="stream", start=start, token_times=list(token_times),
                        output_tokens=len(token_times), ok=ok)
    rec.end = end if end is not None else token_times[-1]
    return rec


def failed(index, start, end, failure, kind="generate"):
    rec = RequestRecord(index=index, kind=kind, start=start)
    rec.fail(failure, end)
    return rec


def test_percentile_is_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 101):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 10, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q, method="linear"),
                                                      rel=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_stats_of_known_values():
    s = LatencyStats.of([0.4, 0.1, 0.3, 0.2])
    assert (s.count, s.min, s.max) == (4, 0.1, 0.4)
    assert s.mean == pytest.approx(0.25) and s.median == pytest.approx(0.25)
    assert s.p90 == pytest.approx(0.37) and s.p99 == pytest.approx(0.397)
    assert LatencyStats.of([]) == LatencyStats()


def test_record_derived_latencies():
    rec = stream(0, start=1.0, token_times=[1.25, 1.5, 2.0], end=2.0)
    assert rec.ttft == 0.25 and rec.e2e == 1.0
    assert rec.itl == [0.25, 0.5]
    assert rec.tpot == (1.0 - 0.25) / 2
    one = stream(1, start=0.0, token_times=[0.5])
    assert one.tpot is None and one.itl == []


def test_build_report_counts_goodput_and_concurrency():
    records = [
        stream(0, 0.0, [0.25, 0.5, 0.75]),  # ttft 0.25, tpot 0.25, e2e 0.75
        stream(1, 0.5, [1.5, 1.75], end=2.0),  # ttft 1.0 (violates ttft<=0.5)
        RequestRecord(index=2, kind="generate", start=0.5, end=1.0, ok=True, output_tokens=8),
        failed(3, 1.0, 1.25, "429"),
        failed(4, 1.0, 1.5, "429"),
        failed(5, 1.0, 4.0, "timeout", kind="stream"),
    ]
    r = build_report(records, planned=8, run={}, slo=Slo(ttft=0.5, e2e=1.0), min_goodput=0.5)
    assert (r.planned, r.sent, r.completed, r.failed) == (8, 6, 3, 3)
    assert r.failures_by_status == {"429": 2, "timeout": 1}
    assert r.duration_s == 4.0 and r.request_throughput == 3 / 4.0
    assert r.total_output_tokens == 3 + 2 + 8 and r.output_token_throughput == 13 / 4.0
    assert r.ttft.count == 2 and r.ttft.mean == pytest.approx((0.25 + 1.0) / 2)
    assert r.itl.count == 3 and r.e2e.count == 3
    assert r.good == 2  # record 0 and the generate request (ttft does not apply to it)
    assert r.goodput_fraction == 2 / 6 and not r.gate_passed
    assert r.peak_concurrency == 4  # at t=1.0: 1 still runs, 3,4,5 start, 2 ends then
    assert r.sent_by_kind == {"generate": 3, "stream": 3}
    assert "429: 2" in format_report(r) and "FAIL" in format_report(r)


def test_without_slo_every_completed_request_is_good():
    records = [stream(0, 0.0, [0.5]), failed(1, 0.0, 0.5, "503")]
    r = build_report(records, planned=2, run={}, min_goodput=0.5)
    assert r.good == 1 and r.gate_passed
    assert build_report(records, planned=2, run={}, min_goodput=0.75).gate_passed is False


def test_peak_concurrency_end_frees_slot_before_start_at_same_time():
    records = [stream(0, 0.0, [1.0]), stream(1, 1.0, [2.0]), stream(2, 1.0, [2.0])]
    assert build_report(records, 3, {}).peak_concurrency == 2


def test_slo_and_duration_parsing():
    assert (parse_duration("250ms") == 0.25 and parse_duration("2s") == 2.0
            and parse_duration("1.5") == 1.5)
    assert Slo.parse("ttft=500ms,tpot=0.05,e2e=10s") == Slo(ttft=0.5, tpot=0.05, e2e=10.0)
    for bad in ("latency=1", "ttft", "ttft=-1", "ttft=abc", ""):
        with pytest.raises(ValueError):
            Slo.parse(bad)


def test_report_json_round_trip(tmp_path):
    r = build_report([stream(0, 0.0, [0.25, 0.5]), failed(1, 0.0, 0.5, "503")], 2, {"url": "x"},
                     slo=Slo(e2e=1.0))
    r.save(tmp_path / "r.json")
    back = Report.load(tmp_path / "r.json")
    assert back == r
    r.save(tmp_path / "summary.json", with_records=False)
    assert Report.load(tmp_path / "summary.json").records == []
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a camex-loadtest report"):
        Report.load(tmp_path / "bad.json")


def test_compare_ratios_are_b_over_a():
    a = build_report([stream(0, 0.0, [0.5, 1.0]), stream(1, 0.0, [0.5, 1.0])], 2, {})
    b = build_report([stream(0, 0.0, [0.25, 0.5]), stream(1, 0.0, [0.25, 0.5])], 2, {})
    rows = {row.metric: row for row in compare_reports(a, b)}
    assert rows["request_throughput"].ratio == 2.0  # 2 req in 0.5 s vs 2 req in 1 s
    assert rows["ttft.median"].ratio == 0.5 and rows["e2e.p99"].ratio == 0.5
    assert rows["failed"].ratio is None  # 0 failures in A: undefined, not infinite
    text = format_compare(list(rows.values()), "a.json", "b.json")
    assert "request_throughput" in text and "2.000" in text and "0.500" in text
