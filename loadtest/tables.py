"""Text output of reports: the summary table and the A-vs-B comparison (ratios B/A).

Pure formatting over ``Report`` objects; knows nothing of HTTP or of how a run was made.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.report import Report

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
LATENCY_FIELDS = ("mean", "median", "p90", "p99")
THROUGHPUT_FIELDS = ("request_throughput", "output_token_throughput", "goodput_rps",
                     "goodput_fraction", "completed", "failed", "peak_concurrency")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def format_report(r: Report) -> str:
    """A human-readable summary; latencies in milliseconds."""
    run = r.run
    load = (f"closed loop, concurrency {run.get('concurrency')}" if run.get("mode") == "closed"
            else f"open loop, {run.get('rate')} req/s {run.get('arrival')}")
    if run.get("client"):
        load += f"; read by {run['client']}"
    failures = ", ".join(f"{k}: {v}" for k, v in r.failures_by_status.items()) or "none"
    lines = [
        f"target            {run.get('url')}  ({load})",
        f"requests          planned {r.planned}  sent {r.sent}  completed {r.completed}"
        f"  failed {r.failed}"
        + ("  [time cap hit]" if r.timed_out else ""),
        f"failures          {failures}",
        "sent by kind      " + ", ".join(f"{k}: {v}" for k, v in r.sent_by_kind.items()),
        f"duration          {r.duration_s:.3f} s   peak concurrency {r.peak_concurrency}",
        f"throughput        {r.request_throughput:.3f} req/s   "
        f"{r.output_token_throughput:.2f} output tok/s"
        f"   ({r.total_output_tokens} tokens)",
    ]
    if run.get("client_cpu_s") is not None:
        per_token = (f"  ({1e3 * run['client_cpu_s'] / r.total_output_tokens:.3f} ms per output "
                     "token)" if r.total_output_tokens else "")
        lines.append(f"client CPU        {run['client_cpu_s']:.3f} s{per_token}")
    lines += [
        "",
        f"{'latency (ms)':<14}{'n':>7}{'mean':>11}{'median':>11}{'p90':>11}{'p99':>11}",
    ]
    rows = [(name, getattr(r, name)) for name in LATENCY_METRICS]
    rows += [(f"e2e[{k}]", s) for k, s in r.e2e_by_kind.items()] if len(r.e2e_by_kind) > 1 else []
    for name, s in rows:
        lines.append(f"{name:<14}{s.count:>7}"
                     + "".join(f"{_ms(getattr(s, f)):>11}" for f in LATENCY_FIELDS))
    slo = ", ".join(f"{k}<={v * 1e3:g}ms"
                    for k, v in (r.slo or {}).items() if v is not None) or "none"
    gate = ("no gate" if r.min_goodput is None
            else f"gate >= {r.min_goodput:.3f}: {'PASS' if r.gate_passed else 'FAIL'}")
    lines += ["", f"goodput           {r.good}/{r.sent} = {r.goodput_fraction:.3f}  "
                  f"({r.goodput_rps:.3f} good req/s)  SLO: {slo}  {gate}"]
    return "\n".join(lines)


@dataclass
class CompareRow:
    """One metric of a comparison; ratio = b / a, None when undefined (a missing or zero)."""

    metric: str
    a: float | None
    b: float | None
    ratio: float | None


def compare_reports(a: Report, b: Report) -> list[CompareRow]:
    """Throughput, goodput and latency metrics of A and B side by side with B/A ratios."""
    pairs = [(name, getattr(a, name), getattr(b, name)) for name in THROUGHPUT_FIELDS]
    for metric in LATENCY_METRICS:
        for f in LATENCY_FIELDS:
            pairs.append((f"{metric}.{f}", getattr(getattr(a, metric), f),
                          getattr(getattr(b, metric), f)))
    rows = []
    for name, va, vb in pairs:
        ratio = vb / va if va not in (None, 0) and vb is not None else None
        rows.append(CompareRow(name, va, vb, ratio))
    return rows


def format_compare(rows: list[CompareRow], name_a: str = "A", name_b: str = "B") -> str:
    """Table of the rows; latencies in ms; ratio B/A (< 1 is lower: better for latency)."""
    out = [f"{'metric':<26}{name_a[-18:]:>20}{name_b[-18:]:>20}{'B/A':>9}"]
    for row in rows:
        is_latency = "." in row.metric
        fmt = _ms if is_latency else (lambda v: "-" if v is None else f"{v:.4g}")
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        label = row.metric + (" (ms)" if is_latency else "")
        out.append(f"{label:<26}{fmt(row.a):>20}{fmt(row.b):>20}{ratio:>9}")
    return "\n".join(out)
