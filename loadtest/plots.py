"""PNG plots of a report's request records (matplotlib, Agg backend: no display needed).

- ``latency_cdf.png``: empirical CDFs of TTFT, TPOT, ITL and e2e latency (ms);
- ``timeline.png``: completed requests/s and output tokens/s per time bin; requests in
  flight; per-request e2e latency and TTFT against completion time (failures marked).
Knows nothing of HTTP; works from a Report loaded from JSON as well as a live one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from loadtest.report import Report  # noqa: E402


def _latency_samples(r: Report) -> dict[str, list[float]]:
    done = [x for x in r.records if x.ok]
    streamed = [x for x in done if x.kind == "stream"]
    return {
        "TTFT": [x.ttft for x in streamed if x.ttft is not None],
        "TPOT": [x.tpot for x in streamed if x.tpot is not None],
        "ITL": [v for x in streamed for v in x.itl],
        "e2e": [x.e2e for x in done],
    }


def plot_latency_cdf(r: Report, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, _latency_samples(r).items()):
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = np.sort(np.asarray(values)) * 1e3  # (n,) ms
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
        ax.set_ylim(0, 1.02)
        slo = (r.slo or {}).get(name.lower())
        if slo:
            ax.axvline(slo * 1e3, color="red", linestyle="--", label="SLO")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _in_flight(r: Report) -> tuple[list[float], list[int]]:
    """Requests in flight as a step function of time (changes at every start and end)."""
    events = sorted([(x.start, 1) for x in r.records]
                    + [(x.end, -1) for x in r.records if x.end is not None])
    times, counts, cur = [0.0], [0], 0
    for t, delta in events:
        cur += delta
        times.append(t)
        counts.append(cur)
    return times, counts


def plot_timeline(r: Report, path: Path, bins: int | None = None) -> None:
    # about one bin per second, between 10 and 60 bins
    bins = bins or int(min(60, max(10, np.ceil(r.duration_s))))
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 1.5, 3]})
    done = [x for x in r.records if x.ok]
    span = max(r.duration_s, 1e-3)
    edges = np.linspace(0.0, span, bins + 1)  # (bins+1,) seconds
    width = edges[1] - edges[0]
    ends = np.array([x.end for x in done])
    reqs, _ = np.histogram(ends, bins=edges)
    toks, _ = np.histogram(ends, bins=edges, weights=[x.output_tokens for x in done])
    top.bar(edges[:-1], reqs / width, width=width, align="edge", alpha=0.5, label="completed req/s")
    top.set_ylabel("req/s")
    twin = top.twinx()
    twin.plot(edges[:-1] + width / 2, toks / width, color="C1", marker=".", label="output tok/s")
    twin.set_ylabel("tok/s")
    top.set_title("throughput over time (by completion time)")
    top.legend(loc="upper left")
    twin.legend(loc="upper right")
    times, in_flight = _in_flight(r)
    middle.step(times, in_flight, where="post", color="C2")
    middle.set_ylabel("in flight")
    middle.grid(alpha=0.3)
    bottom.scatter([x.end for x in done], [x.e2e * 1e3 for x in done], s=8, label="e2e")
    ttft = [(x.end, x.ttft * 1e3) for x in done if x.ttft is not None]
    if ttft:
        bottom.scatter(*zip(*ttft), s=8, label="TTFT")
    failed = [x for x in r.records if not x.ok and x.end is not None]
    if failed:
        bottom.scatter([x.end for x in failed], [x.e2e * 1e3 for x in failed], s=12, marker="x",
                       color="red", label="failed")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("latency (ms)")
    bottom.set_title("latency over time")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(r: Report, out_dir: str | Path) -> list[Path]:
    """Write both figures into ``out_dir`` (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_cdf.png", out / "timeline.png"]
    plot_latency_cdf(r, paths[0])
    plot_timeline(r, paths[1])
    return paths
