"""Generates the CAMEx Serve Grafana dashboard (deploy/grafana/dashboards/camex-serve.json).

The JSON is what Grafana provisions; this script is its source so that panels stay uniform and
reviewable. It only knows the metric names of docs/INTERFACES.md §3 and Grafana's dashboard
schema; it knows nothing about the server. tests/deploy checks that the committed JSON equals
this script's output, that every panel has a query and that the queries run on a real Prometheus.

Run: python deploy/grafana/dashboard.py  (rewrites the JSON next to it)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "camex-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # uid fixed by provisioning
SEL = '{job=~"$job", instance=~"$instance"}'  # every query is scoped by the two variables
WIN = "[$__rate_interval]"


def rate(metric: str, by: str = "", extra: str = "") -> str:
    """sum [by (...)] (rate(metric{job, instance[, extra]}[window]))."""
    sel = SEL if not extra else SEL[:-1] + ", " + extra + "}"
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{sel}{WIN}))"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """histogram_quantile over a histogram's buckets, keeping `by` labels."""
    keep = "le" + (", " + by if by else "")
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', keep)})"


def percentiles(histogram: str, by: str = "", legend: str = "") -> list[tuple[str, str]]:
    return [(quantile(q, histogram, by), f"p{int(q * 100)}{legend}") for q in (0.5, 0.9, 0.99)]


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL expr, legend format)
    unit: str = "short"
    kind: str = "timeseries"  # Grafana panel type
    width: int = 8
    description: str = ""
    extra: dict = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Request rate by route and status",
              [(rate("camex_requests_total", "route, status"), "{{route}} {{status}}")], "reqps"),
        Panel("Request latency p99 by route",
              [(quantile(0.99, "camex_request_duration_seconds", "route"), "{{route}}")], "s"),
        Panel("Errors by reason",
              [(rate("camex_failures_total", "reason"), "{{reason}}")], "reqps",
              description="validation, overloaded (429), dropped, timeout, unauthorized, "
                          "internal, shutdown (cut by the SIGTERM grace period: usually logged "
                          "rather than scraped, the process exits right after)"),
        Panel("Connections",
              [(f"sum(camex_open_connections{SEL})", "open"),
               (rate("camex_connections_closed_total", "reason"), "closed: {{reason}} /s")],
              description="closed by the server: header_timeout (slow headers), evicted "
                          "(idle, at the connection cap), over_capacity (refused with 503)"),
    ]),
    ("Latency", [
        Panel("Time to first token", percentiles("camex_time_to_first_token_seconds"), "s"),
        Panel("Inter-token latency", percentiles("camex_inter_token_latency_seconds"), "s"),
        Panel("Queue time", percentiles("camex_queue_time_seconds"), "s"),
        Panel("End-to-end latency", percentiles("camex_e2e_latency_seconds"), "s"),
        Panel("Request size (tokens)",
              [(quantile(0.5, "camex_request_prompt_tokens"), "prompt p50"),
               (quantile(0.99, "camex_request_prompt_tokens"), "prompt p99"),
               (quantile(0.5, "camex_request_generated_tokens"), "generated p50"),
               (quantile(0.99, "camex_request_generated_tokens"), "generated p99")]),
    ]),
    ("Load", [
        Panel("Running and waiting requests",
              [(f"sum(camex_running_requests{SEL})", "running"),
               (f"sum(camex_waiting_requests{SEL})", "waiting")]),
        Panel("Batch size",
              [(f"{rate('camex_batch_size_sum')} / {rate('camex_batch_size_count')}", "mean"),
               (quantile(0.99, "camex_batch_size"), "p99")]),
        Panel("Tokens per second",
              [(rate("camex_generated_tokens_total"), "generated"),
               (rate("camex_prompt_tokens_total"), "prompt"),
               (rate("camex_prompt_tokens_cached_total"), "prompt, from the prefix cache")],
              "short"),
        Panel("Classified sequences per second",
              [(rate("camex_classified_sequences_total"), "sequences")], "short"),
    ]),
    ("Merge cache", [
        Panel("Merge cache hit ratio",
              [(f"{rate('camex_merge_cache_hits_total')} / ({rate('camex_merge_cache_hits_total')}"
                f" + {rate('camex_merge_cache_misses_total')})", "hit ratio")], "percentunit"),
        Panel("Merge cache events",
              [(rate(f"camex_merge_cache_{e}_total"), e)
               for e in ("hits", "misses", "evictions", "fallbacks")], "ops",
              description="fallbacks: budget exhausted, the step used the mixture strategy"),
        Panel("Merge cache memory",
              [(f"sum(camex_merge_cache_bytes{SEL})", "used"),
               (f"sum(camex_merge_cache_budget_bytes{SEL})", "budget")], "bytes"),
        Panel("Merge duration", percentiles("camex_merge_duration_seconds"), "s"),
    ]),
    ("Routing", [
        Panel("Mean router score per layer and expert",
              [(f"{rate('camex_router_score_sum', 'layer, expert')}"
                f" / {rate('camex_router_score_count', 'layer, expert')}",
                "layer {{layer}} expert {{expert}}")], "percentunit", width=12,
              description="Uniform routing is 1/E per expert; one line near 1 is a collapse."),
        Panel("Top expert share per layer (collapse when near 1)",
              [(f"max by (layer) ({rate('camex_router_score_sum', 'layer, expert')}"
                f" / {rate('camex_router_score_count', 'layer, expert')})",
                "layer {{layer}}")], "percentunit", width=12),
        Panel("Router score distribution",
              [(rate("camex_router_score_bucket", "le"), "{{le}}")], kind="heatmap", width=24,
              extra={"options": {"calculate": False, "yAxis": {"unit": "percentunit"}}}),
    ]),
    ("Engine", [
        Panel("Engine up", [(f"min(camex_engine_up{SEL})", "engine up")], kind="stat"),
        Panel("Build", [(f"camex_build_info{SEL}", "{{model}} {{kind}} {{version}}")],
              kind="table", extra={"targets_format": "table"}),
        Panel("Scrape target up", [('up{job=~"$job", instance=~"$instance"}', "{{instance}}")],
              kind="stat"),
    ]),
]


def panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    table = p.extra.get("targets_format") == "table"
    out = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
             "legendFormat": legend, "range": not table, "instant": table,
             **({"format": "table"} if table else {})}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }
    out.update({k: v for k, v in p.extra.items() if k != "targets_format"})
    return out


def variable(name: str, query: str) -> dict:
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    }


def build() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for p in row_panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(p, pid, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    return {
        "uid": "camex-serve", "title": "CAMEx Serve", "tags": ["camex", "llm-serving"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "utc",
        "templating": {"list": [
            variable("job", "label_values(camex_build_info, job)"),
            variable("instance", 'label_values(camex_build_info{job=~"$job"}, instance)'),
        ]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
