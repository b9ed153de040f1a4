"""benchmarks/loadtest_client.py end to end on the tiny LM: one camex-server on 127.0.0.1, every
reader, two levels, two rounds.

Checks what its figures rest on: each reader really read the responses (the report names the
client it used), every request completed at full length, the order of readers rotates between
rounds, CPU per token is CPU over the tokens read, and the table's ratios are the readers' means
over the baseline's. Asserts nothing about speed.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "loadtest_client.py"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
N, NEW = 2, 4


def test_every_reader_reads_the_same_workload_in_full(tiny_lm_dir, tmp_path):
    out = tmp_path / "client.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_lm_dir), "--concurrency", "1,2",
         "--rounds", "2", "-n", str(N), "--max-new-tokens", str(NEW), "--prompt-len", "fixed:4",
         "--server-arg=--max-batch-size=4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert len(runs) == 2 * 2 * 3  # rounds x levels x readers
    for r in runs:
        assert r["completed"] == r["sent"] == N * r["concurrency"]
        assert r["tokens"] == r["sent"] * NEW
        assert r["run_client"] == {"httpx-asyncio": "httpx", "httpx": "httpx",
                                   "wire": "wire"}[r["reader"]]
        assert r["client_ms_per_token"] > 0 and r["server_loop_ms_per_token"] > 0
    first = [r["reader"] for r in runs if r["round"] == 0 and r["concurrency"] == 1]
    second = [r["reader"] for r in runs if r["round"] == 1 and r["concurrency"] == 1]
    assert first == ["httpx-asyncio", "httpx", "wire"] and second == first[1:] + first[:1]
    rows = {(r["concurrency"], r["reader"]): r for r in doc["rows"]}
    for (conc, reader), row in rows.items():
        mine = [r for r in runs if r["concurrency"] == conc and r["reader"] == reader]
        mean = statistics.fmean(r["tok_per_s"] for r in mine)
        assert row["tok_per_s"] == pytest.approx(mean) and row["failed"] == 0
        base = rows[(conc, "httpx-asyncio")]
        assert row["tok_per_s_vs_httpx-asyncio"] == pytest.approx(mean / base["tok_per_s"])
        assert row["client_ms_per_token_vs_httpx-asyncio"] == pytest.approx(
            row["client_ms_per_token"] / base["client_ms_per_token"])
    assert "x base" in proc.stdout and doc["host"]["commit"]
