"""benchmarks/int8_deltas.py end to end on the tiny LM and a text file: the table and JSON it
writes hold both models' perplexities, their differences and the experts' bytes in either
layout, consistent with each other. Asserts nothing about a particular model's quality."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "int8_deltas.py"


def test_int8_deltas_script_reports_both_models(tiny_lm_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("the quick brown fox jumps over the lazy dog again and again\n\n"
                     "hi\n\n"
                     "science studies the natural world by experiment and by careful "
                     "observation of what happens\n")
    out = tmp_path / "q8.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_lm_dir),
                           "--texts", str(texts), "--min-tokens", "4", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert doc["benchmark"] == "int8_deltas" and row["model"] == str(tiny_lm_dir)
    assert row["texts"] == 2  # "hi" is under --min-tokens
    assert row["ppl_full"] > 1 and row["ppl_int8"] > 1
    assert 0 <= row["logprob_diff_mean"] <= row["logprob_diff_max"]
    assert 0 < row["top1_agreement"] <= 1
    assert row["expert_bytes_int8"] < 0.5 * row["expert_bytes_full"]  # fp32, 3 deltas
    assert "perplexity full → int8" in proc.stdout and "tiny-lm" in proc.stdout

    missing = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a folded checkpoint" in missing.stderr
