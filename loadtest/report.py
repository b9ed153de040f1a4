"""Statistics over request records: latency summaries, goodput, the SLO gate and comparisons.

Knows nothing about HTTP or plotting. Percentiles use linear interpolation between closest
ranks, identical to ``numpy.percentile(values, q, method="linear")`` (numpy's default): for
sorted values ``x[0..n-1]``, ``h = (n-1)*q/100`` and ``p = x[floor h] + (h - floor h) *
(x[floor h + 1] - x[floor h])``. The median is the 50th percentile by that rule.

Goodput: a request is *good* when it completed and meets every SLO that applies to it
(TTFT and TPOT apply to streamed requests only; e2e to all). ``goodput_fraction = good / sent``
(failed requests count as not good) and ``goodput_rps = good / duration``. The SLO gate passes
when ``goodput_fraction >= min_goodput``; without ``--slo`` every completed request is good, so
``--slo-min-goodput`` alone gates on the success rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.records import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation (numpy's default 'linear')."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    if lo + 1 >= len(xs):
        return xs[-1]
    return xs[lo] + (h - lo) * (xs[lo + 1] - xs[lo])


@dataclass
class LatencyStats:
    """Summary of one latency metric in seconds; None fields when there were no samples."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> LatencyStats:
        if not values:
            return cls()
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            median=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            min=min(values),
            max=max(values),
        )


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"0.25s"`` or ``"0.25"`` (seconds) -> seconds."""
    t = text.strip().lower()
    scale = 1.0
    if t.endswith("ms"):
        t, scale = t[:-2], 1e-3
    elif t.endswith("s"):
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"bad duration {text!r}: use e.g. 250ms, 0.25s or 0.25") from None
    if not value > 0:
        raise ValueError(f"duration must be > 0, got {text!r}")
    return value


@dataclass
class Slo:
    """Per-request latency objectives in seconds; None = not constrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``"ttft=500ms,tpot=50ms,e2e=5s"`` -> Slo (bare numbers are seconds)."""
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = item.partition("=")
            if name not in SLO_METRICS or not sep:
                raise ValueError(f"bad SLO item {item!r}: use {'/'.join(SLO_METRICS)}=DURATION")
            values[name] = parse_duration(value)
        if not values:
            raise ValueError(f"empty SLO {text!r}")
        return cls(**values)

    def met_by(self, rec: RequestRecord) -> bool:
        """True when the request completed and every applicable objective holds."""
        if not rec.ok:
            return False
        for name in SLO_METRICS:
            limit, value = getattr(self, name), getattr(rec, name)
            if limit is not None and value is not None and value > limit:
                return False
        return True


@dataclass
class Report:
    """Everything a run measured; serialises to JSON (``to_dict``/``from_dict``)."""

    run: dict  # the run's settings (url, mode, rate, concurrency, mix, seed, ...)
    duration_s: float  # run start -> last response
    planned: int  # requests in the workload
    sent: int
    completed: int
    failed: int
    failures_by_status: dict[str, int]
    total_output_tokens: int
    request_throughput: float  # completed / duration
    output_token_throughput: float  # output tokens of completed requests / duration
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    e2e_by_kind: dict[str, LatencyStats]
    sent_by_kind: dict[str, int]
    peak_concurrency: int  # most requests in flight at once, from the records' intervals
    slo: dict | None  # Slo as a dict, or None
    good: int
    goodput_fraction: float  # good / sent
    goodput_rps: float  # good / duration
    min_goodput: float | None  # the gate; None = no gate
    gate_passed: bool
    timed_out: bool  # the run hit its time cap (in-flight requests were cancelled)
    records: list[RequestRecord] = field(default_factory=list)

    def to_dict(self, with_records: bool = True) -> dict:
        d = asdict(self)
        if not with_records:
            d["records"] = []
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        d = dict(d)
        for name in ("ttft", "tpot", "itl", "e2e"):
            d[name] = LatencyStats(**d[name])
        d["e2e_by_kind"] = {k: LatencyStats(**v) for k, v in d["e2e_by_kind"].items()}
        d["records"] = [RequestRecord(**r) for r in d.get("records", [])]
        return cls(**d)

    def save(self, path: str | Path, with_records: bool = True) -> None:
        Path(path).write_text(json.dumps(self.to_dict(with_records), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Report:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a camex-loadtest report ({e})") from None


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most overlapping [start, end) intervals; an end at t frees its slot before a start at t."""
    events = [(r.start, 1) for r in records] + [(r.end, -1) for r in records if r.end is not None]
    peak = cur = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        cur += delta
        peak = max(peak, cur)
    return peak


def build_report(
    records: list[RequestRecord],
    planned: int,
    run: dict,
    slo: Slo | None = None,
    min_goodput: float | None = None,
    timed_out: bool = False,
) -> Report:
    """Aggregate records into a Report (see the module docstring for the definitions)."""
    records = sorted(records, key=lambda r: r.index)
    done = [r for r in records if r.ok]
    failures: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failures[r.failure or "unknown"] = failures.get(r.failure or "unknown", 0) + 1
    ends = [r.end for r in records if r.end is not None]
    duration = max(ends) if ends else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    streamed = [r for r in done if r.kind == "stream"]
    tokens = sum(r.output_tokens for r in done)
    good = sum(1 for r in records if (slo.met_by(r) if slo else r.ok))
    fraction = good / len(records) if records else 0.0
    kinds = sorted({r.kind for r in records})
    return Report(
        run=run,
        duration_s=duration,
        planned=planned,
        sent=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        failures_by_status=dict(sorted(failures.items())),
        total_output_tokens=tokens,
        request_throughput=per_s(len(done)),
        output_token_throughput=per_s(tokens),
        ttft=LatencyStats.of([r.ttft for r in streamed if r.ttft is not None]),
        tpot=LatencyStats.of([r.tpot for r in streamed if r.tpot is not None]),
        itl=LatencyStats.of([x for r in streamed for x in r.itl]),
        e2e=LatencyStats.of([r.e2e for r in done]),
        e2e_by_kind={k: LatencyStats.of([r.e2e for r in done if r.kind == k]) for k in kinds},
        sent_by_kind={k: sum(1 for r in records if r.kind == k) for k in kinds},
        peak_concurrency=peak_concurrency(records),
        slo=asdict(slo) if slo else None,
        good=good,
        goodput_fraction=fraction,
        goodput_rps=per_s(good),
        min_goodput=min_goodput,
        gate_passed=min_goodput is None or fraction >= min_goodput,
        timed_out=timed_out,
        records=records,
    )
