"""benchmarks/startup.py end to end on the tiny LM: this checkout's server and, with
`--compare HEAD`, the same commit from a temporary git worktree, each started as a real process
on 127.0.0.1 until /ready, asked for a token and stopped. Checks the phases the script reads
from the server's log come in their order and the worktree is gone afterwards. Asserts nothing
about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "startup.py"
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_startup_against_a_worktree_baseline(tiny_lm_dir, tmp_path):
    out = tmp_path / "startup.json"
    worktrees = git("worktree", "list")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_lm_dir),
                           "--rounds", "1", "--engine-process", "on", "--threads", "1",
                           "--compare", "HEAD", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert git("worktree", "list") == worktrees  # the baseline's worktree was removed
    doc = json.loads(out.read_text())
    head = git("rev-parse", "--short", "HEAD")
    assert doc["commit"] == head and doc["rounds"] == 1
    baseline, ours = doc["rows"]
    assert baseline["variant"].startswith(f"{head} (baseline)")
    assert ours["variant"] == f"{head} engine-process=on"
    assert baseline["ready_vs_first"] == 1.0
    assert ours["ready_vs_first"] == pytest.approx(ours["ready_s"] / baseline["ready_s"],
                                                   abs=1e-3)
    for row in doc["rows"]:
        assert row["runs"] == 1
        # the API process imported the app, the engine warmed up, then /ready
        assert 0 < row["app_imported_s"] < row["ready_s"] <= row["first_token_s"]
        assert 0 < row["warmed_s"] <= row["ready_logged_s"] <= row["ready_s"] + 0.05
    # in its own process (the baseline's --engine-process auto may keep one process)
    assert 0 < ours["engine_loaded_s"] < ours["warmed_s"]
