"""The metric catalogue of docs/INTERFACES.md §3, parsed from the document itself, and a tiny
PromQL reader that says which metrics and grouping labels an expression uses.

The document is the single source of truth for metric names, so the deploy tests read it
rather than keeping a second list. This module knows nothing about the server's code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INTERFACES = ROOT / "docs" / "INTERFACES.md"
DEPLOY = ROOT / "deploy"

# Series Prometheus makes up itself (scrape health), allowed in queries besides camex_*.
PROMETHEUS_SERIES = {"up"}
# Labels that exist on every scraped series or on histogram buckets.
COMMON_LABELS = {"job", "instance", "le"}


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as in the table, e.g. camex_requests_total or camex_batch_size
    type: str  # counter | gauge | histogram
    labels: frozenset[str]

    def series(self) -> set[str]:
        """Names this metric is exposed under."""
        if self.type == "histogram":
            return {f"{self.name}_{s}" for s in ("bucket", "sum", "count")}
        return {self.name}


def _expand(names: list[str]) -> list[str]:
    """`camex_merge_cache_hits_total`, `_misses_total` -> full names (suffix shorthand)."""
    first, out = names[0], [names[0]]
    for short in names[1:]:
        if short.startswith("_"):
            parts = short.strip("_").split("_")
            stem = "_".join(first.split("_")[: -len(parts)])
            out.append(stem + short)
        else:
            out.append(short)
    return out


def interface_metrics(path: Path = INTERFACES) -> dict[str, MetricSpec]:
    text = path.read_text()
    section = text.split("## 3.", 1)[1].split("\n## ", 1)[0]
    specs: dict[str, MetricSpec] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        name_cell, type_cell, label_cell = [c.strip() for c in line.strip("|").split("|")[:3]]
        kind = type_cell.split()[0]
        labels = frozenset(re.findall(r"`([a-z_]+)`", label_cell))
        for name in _expand(re.findall(r"`([a-z0-9_]+)`", name_cell)):
            specs[name] = MetricSpec(name, kind, labels)
    if not specs:
        raise ValueError(f"no metric table found in §3 of {path}")
    return specs


def series_index(specs: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
    """Exposed series name -> its spec (histogram parts map to the histogram)."""
    return {s: spec for spec in specs.values() for s in spec.series()}


_FUNCS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "deriv",
          "histogram_quantile", "clamp_min", "clamp_max", "abs", "by", "without", "on",
          "ignoring", "and", "or", "unless", "label_values", "delta", "avg_over_time",
          "max_over_time", "min_over_time", "topk", "bottomk", "group_left", "group_right"}


def metrics_in(expr: str) -> set[str]:
    """Metric names used as selectors in a PromQL expression."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_labels)
    names = re.findall(r"(?<![\w$])([a-zA-Z_:][\w:]*)\s*(?=[{)\s]|$|\[|/|\+|-|\*|>|<|=)",
                       no_ranges)
    grouping = set()
    for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", no_ranges):
        grouping |= {label.strip() for label in labels.split(",")}
    return {n for n in names if n not in _FUNCS and n not in grouping and not _number(n)}


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def _number(token: str) -> bool:
    return bool(re.fullmatch(r"\d+(\.\d+)?|Inf|NaN", token))
