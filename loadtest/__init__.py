"""camex-loadtest: an HTTP load generator for TGI-compatible servers (CAMEx Serve).

Speaks only HTTP; never imports ``camex_runtime`` or ``server``. Entry points:
``run_load(url=..., num_requests=..., ...) -> Report`` for tests and scripts, and the
``camex-loadtest`` console script (``loadtest.cli:main``). See ``loadtest/README.md``.
"""

from loadtest.records import RequestRecord
from loadtest.report import LatencyStats, Report, Slo, percentile
from loadtest.runner import LoadConfig, RemoteTargetError, run_load, run_load_async
from loadtest.workload import LengthDist, RequestSpec

__all__ = [
    "LatencyStats", "LengthDist", "LoadConfig", "RemoteTargetError", "Report", "RequestRecord",
    "RequestSpec", "Slo", "percentile", "run_load", "run_load_async",
]
