"""benchmarks/serving.py end to end on the tiny LM: camex-server and the naive baseline
(benchmarks/naive_server.py) as real processes on 127.0.0.1, then `--compare` of the two.

Checks what the committed results rest on: both servers answer the same seeded workload in full,
token counts agree with what was asked (ignore_eos: the naive server honours it; the tiny LM's
random weights never pick EOS), the server-side view is present for camex-server only, and the
ratios are B/A of the recorded throughputs. Asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serving.py"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
N, NEW = 6, 5


def run(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=200,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_camex_vs_naive_and_compare(tiny_lm_dir, tmp_path):
    load = ["--rates", "50", "-n", str(N), "--warmup", "1", "--max-new-tokens", str(NEW),
            "--prompt-len", "fixed:4", "--mix", "stream=2,generate=1"]
    a, b, c = tmp_path / "naive.json", tmp_path / "camex.json", tmp_path / "cmp.json"
    run("--naive", "--model", str(tiny_lm_dir), *load, "--out", str(a))
    run("--model", str(tiny_lm_dir), *load, "--server-arg=--max-batch-size=4", "--out", str(b))
    run("--compare", str(a), str(b), "--out", str(c))
    naive, camex, cmp = (json.loads(p.read_text()) for p in (a, b, c))
    for doc in (naive, camex):
        level = doc["levels"][0]
        report = level["report"]
        assert report["completed"] == report["sent"] == N, report["failures_by_status"]
        assert report["total_output_tokens"] == N * NEW
        assert level["finish_reasons"] == {"length": N}
        assert len(level["loadavg_before"]) == 3
    assert naive["server_info"]["server"] == "naive-transformers"
    assert naive["levels"][0]["server"] is None  # no /metrics on the baseline
    assert camex["levels"][0]["server"]["generated_tokens"] == N * NEW
    row = cmp["rows"][0]
    ra, rb = (d["levels"][0]["report"]["request_throughput"] for d in (naive, camex))
    assert row["ratios_b_over_a"]["req_per_s"] == pytest.approx(rb / ra)
