"""benchmarks/demo_models.py end to end on tiny checkpoints (the real run trains the demo
models for minutes): it must serve them, send the README's requests, and find the server's
greedy tokens equal to a full forward with route1_len = prompt length (docs/DESIGN.md §2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from camex_runtime.training import demo

from tests.conftest import build_tiny

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_benchmark_runs_on_tiny_demo_checkpoints(tmp_path, tiny_classifier_dir):
    root = tmp_path / "demo"
    root.mkdir()
    # Long enough for the benchmark's long prompt (the tiny tokenizer is nearly byte-level).
    build_tiny(root / demo.LM_NAME, "lm", max_position_embeddings=512)
    shutil.copytree(tiny_classifier_dir, root / demo.CLF_NAME)
    demo.write_stamp(root, demo.LM_NAME), demo.write_stamp(root, demo.CLF_NAME)
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "benchmarks/demo_models.py", "--no-clone",
                           "--no-make", "--demo-dir", str(root), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["git"]["commit"]) == 40 and result["machine"]["cpus"] >= 1
    assert set(result["load_avg"]) == {"start", "after_ready", "end"}
    labels = {"animals", "science", "greeting"}
    assert [c["top"] in labels for c in result["readme_examples"]["classify"]] == [True, True]
    greedy = result["greedy_vs_transformers_generate"]
    assert len(greedy) == 2 and all(g["server_equals_full_forward_route1"] for g in greedy)
    assert greedy[1]["prompt_tokens"] >= greedy[1]["segment_len"]
    assert "first run in all" in proc.stdout
