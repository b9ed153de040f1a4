"""benchmarks/prefix_cache.py end to end, quick and without llama.cpp: two real camex-servers
(with and without --prefix-caching) hold four conversations; every later turn of the caching
one computes fewer prompt tokens than the whole prompt, the other computes all of them, both
answer alike, and the JSON and table say so. Asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_peer_llamacpp import bench_env  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(480)
def test_quick_conversations_resume_with_the_cache_only(tmp_path):
    out = tmp_path / "pc.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prefix_cache.py"), "--quick", "--no-llama",
         "--conversations", "3", "--turns", "3", "--work", str(tmp_path / "work"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=450, env=bench_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "prefix_cache" and doc["commit"] and doc["llama_cpp"] is None
    assert doc["camex_same_answers"] is True
    warm, cold = doc["rows"]["camex (prefix caching)"], doc["rows"]["camex (no cache)"]
    assert [(r["conversation"], r["turn"]) for r in warm] == \
        [(c, t) for t in (1, 2, 3) for c in range(3)]
    for w, c in zip(warm, cold):
        assert w["prompt_tokens"] == c["prompt_tokens"] == c["computed_tokens"]
        if w["turn"] == 1:
            assert w["computed_tokens"] == w["prompt_tokens"]
        else:  # every conversation resumed from its own last turn
            assert 0 < w["computed_tokens"] <= w["prompt_tokens"] - 16  # >= a segment
    summary = doc["summary"]["camex (prefix caching)"]
    assert [t["turn"] for t in summary["turns"]] == [1, 2, 3]
    assert summary["later_turns_ttft_ms"] > 0
    assert "answers the same with and without the cache: True" in proc.stdout
