"""``camex-loadtest``: command line of the load tester (argument parsing and exit codes only).

    camex-loadtest --url http://127.0.0.1:8080 -n 200 --rate 4 --mix stream=0.8,classify=0.2 \\
        --slo ttft=500ms,tpot=100ms --slo-min-goodput 0.9 --json run.json --plots plots/
    camex-loadtest --compare baseline.json candidate.json

Exit codes: 0 ok; 1 the SLO gate failed (goodput fraction < --slo-min-goodput); 2 bad
arguments or refused target; 3 requests were sent but none completed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from loadtest.arrivals import ARRIVAL_PROCESSES
from loadtest.report import Report, Slo, parse_duration
from loadtest.runner import CLIENTS, LoadConfig, run_load
from loadtest.tables import compare_reports, format_compare, format_report
from loadtest.workload import LengthDist, parse_mix

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_NOTHING_COMPLETED = 0, 1, 2, 3


def _arg(parse):
    """Wrap a parser so argparse prints its ValueError message, not just 'invalid value'."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camex-loadtest",
                                description="HTTP load generator for TGI-compatible CAMEx servers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    p.add_argument("-n", "--num-requests", type=int, default=100, help="requests to send")
    p.add_argument("--max-duration", type=_arg(parse_duration), default=600.0,
                   help="time cap (e.g. 30s); requests in flight then are cancelled")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: requests/s ('inf' = all at once)")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: concurrent workers")
    p.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    p.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape: 1 = Poisson, <1 burstier, >1 more regular")
    p.add_argument("--mix", type=_arg(parse_mix), default="stream=1",
                   help="weights of request kinds: stream (POST /generate_stream), "
                        "generate (POST /generate), classify (POST /classify)")
    p.add_argument("--prompts", help="JSONL (prompt/inputs/text per line) or text file, "
                                     "one prompt per line")
    p.add_argument("--prompt-len", type=_arg(LengthDist.parse), default="fixed:32",
                   help="synthetic prompt words: N | uniform:LO:HI | normal:MEAN:STD")
    p.add_argument("--max-new-tokens", type=_arg(LengthDist.parse), default="fixed:16",
                   help="per-request max_new_tokens: N | uniform:LO:HI | normal:MEAN:STD")
    p.add_argument("--seed", type=int, default=0,
                   help="workload/arrival seed; request i sends parameters.seed = seed + i")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--params", type=_arg(json.loads), default={},
                   help='extra generation parameters as JSON, e.g. \'{"temperature": 0.7}\'')
    p.add_argument("--request-timeout", type=_arg(parse_duration), default=120.0)
    p.add_argument("--api-key", default=os.environ.get("CAMEX_API_KEY"),
                   help="Bearer token (default: $CAMEX_API_KEY)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--client", choices=CLIENTS, default="auto",
                   help="how responses are read: wire (a lean HTTP/1.1 reader, about a quarter of "
                        "httpx's CPU per streamed token, plain HTTP only), httpx, or auto (wire "
                        "for http://, httpx for https://)")
    p.add_argument("--slo", type=_arg(Slo.parse),
                   help="objectives, e.g. ttft=500ms,tpot=50ms,e2e=10s")
    p.add_argument("--slo-min-goodput", type=float,
                   help="gate: exit 1 unless this fraction of sent requests met every SLO")
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--no-records", action="store_true",
                   help="leave per-request records out of the JSON")
    p.add_argument("--plots", help="write latency_cdf.png and timeline.png into this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print B/A ratios of two saved reports and exit (sends nothing)")
    return p


def _config(args: argparse.Namespace) -> LoadConfig:
    if not isinstance(args.params, dict):
        raise ValueError("--params must be a JSON object")
    return LoadConfig(
        url=args.url, num_requests=args.num_requests, max_duration_s=args.max_duration,
        rate=args.rate, concurrency=args.concurrency, max_concurrency=args.max_concurrency,
        arrival=args.arrival, burstiness=args.burstiness, mix=args.mix, prompts_path=args.prompts,
        prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, seed=args.seed,
        do_sample=args.do_sample, extra_params=args.params, request_timeout_s=args.request_timeout,
        api_key=args.api_key, allow_remote=args.allow_remote, slo=args.slo,
        min_goodput=args.slo_min_goodput, progress=not args.no_progress, client=args.client,
    )


def _compare(path_a: str, path_b: str) -> int:
    rows = compare_reports(Report.load(path_a), Report.load(path_b))
    print(format_compare(rows, path_a, path_b))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.compare:
            return _compare(*args.compare)
        cfg = _config(args)
        cfg.validate()
        if args.plots:  # fail before the run, not after it, when matplotlib is unusable
            from loadtest.plots import write_plots
        report = run_load(cfg)
    except (ValueError, OSError) as e:
        print(f"camex-loadtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_report(report))
    if args.json_path:
        report.save(args.json_path, with_records=not args.no_records)
        print(f"report written to {args.json_path}")
    if args.plots:
        for path in write_plots(report, args.plots):
            print(f"plot written to {path}")
    if report.sent and not report.completed:
        return EXIT_NOTHING_COMPLETED
    return EXIT_OK if report.gate_passed else EXIT_GATE


if __name__ == "__main__":
    sys.exit(main())
