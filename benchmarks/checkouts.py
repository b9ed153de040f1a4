"""Another commit's code beside this checkout, for benchmarks that compare two commits in one run.

``worktree(ref, path)`` checks `ref` out at `path` (a detached git worktree; the benchmark starts
its servers there with this checkout's Python environment, ``-m server.cli`` from that root
importing that commit's code) and removes it on the way out, however the block ends.
"""
from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def worktree(ref: str, path: Path) -> Iterator[Path]:
    git("worktree", "add", "--detach", str(path), ref)
    try:
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))
