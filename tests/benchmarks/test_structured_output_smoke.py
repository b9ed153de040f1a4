"""benchmarks/structured_output.py end to end on the tiny LM: its table and JSON report the
vocabulary compile, a schema's compile and free vs constrained decode rates that agree with
each other. Asserts nothing about how fast (timings are the benchmark's to report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "structured_output.py"


def test_structured_output_script_reports_both_rates(tiny_lm_dir, tmp_path):
    out = tmp_path / "so.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_lm_dir),
                           "--batch-sizes", "1,2", "--new-tokens", "6", "--reps", "1",
                           "--threads", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["benchmark"] == "structured_output" and doc["new_tokens"] == 6
    assert doc["vocab_size"] > 0 and doc["vocab_compile_s"] > 0 and doc["schema_compile_ms"] > 0
    assert [r["B"] for r in doc["rows"]] == [1, 2]
    for r in doc["rows"]:
        assert r["free_tok_s"] > 0 and r["constrained_tok_s"] > 0
        assert abs(r["ratio"] - r["constrained_tok_s"] / r["free_tok_s"]) < 1e-9
    assert "constrained_tok_s" in proc.stdout and "compiled in" in proc.stdout

    missing = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a folded checkpoint" in missing.stderr
