"""benchmarks/reliability/run.py end to end in its --quick form on the tiny checkpoints: the
script starts its servers, runs two scenarios, writes the results JSON with the run's
provenance (commit, machine, load average) and exits 0 when every scenario passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.timeout(600)]


def test_quick_run_writes_results(tiny_lm_dir, tiny_classifier_dir, tmp_path):
    out = tmp_path / "reliability.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/reliability/run.py"), "--quick",
         "--model", str(tiny_lm_dir), "--classifier", str(tiny_classifier_dir),
         "--only", "disconnect_storm,corrupt_checkpoints", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=560,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert len(doc["git_commit"]) == 40 and doc["machine"]["cpus"] >= 1
    assert len(doc["load_avg_start"]) == 3 and doc["quick"] is True
    storm = doc["scenarios"]["disconnect_storm"]
    assert storm["next_request_status"] == 200 and storm["dropped_counted"] <= storm["clients_left"]
    cases = doc["scenarios"]["corrupt_checkpoints"]["cases"]
    assert {"truncated_weights", "nan_tensor", "classifier_as_model"} <= cases.keys()
    assert all(c["exit_code"] in (1, 2) and c["error_lines"] == 1 for c in cases.values())
    assert "| disconnect_storm |" in proc.stdout  # the table
