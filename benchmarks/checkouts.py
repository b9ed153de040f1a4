"""Which code a benchmark ran, and another commit's code beside this checkout.

``git_state(root)`` is what every results document records about its code: the commit, and
whether a tracked file differs from it. ``worktree(ref, path)`` checks `ref` out at `path` (a
detached git worktree; the benchmark starts its servers there with this checkout's Python
environment, ``-m server.cli`` from that root importing that commit's code) and removes it on
the way out, however the block ends, for benchmarks that compare two commits in one run.
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


def git_state(root: Path = ROOT) -> dict:
    """{"commit": full hash, "short": abbreviated, "dirty": a tracked file differs} of the
    checkout at `root`; None for each outside a git checkout (an unpacked source tree). Untracked
    files do not count: a round's results file, written by the run before and not yet
    committed, made the next run's document say dirty with no code changed."""
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "short": None, "dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "short": run("rev-parse", "--short", "HEAD"),
            "dirty": None if status is None else bool(status)}


@contextlib.contextmanager
def worktree(ref: str, path: Path) -> Iterator[Path]:
    git("worktree", "add", "--detach", str(path), ref)
    try:
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))
