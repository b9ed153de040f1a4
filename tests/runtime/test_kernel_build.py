"""Building the native kernels: across processes, after an interrupted build, and prebuilt."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from camex_runtime import kernels
from camex_runtime.kernels import build

ROOT = Path(__file__).resolve().parents[2]
HAS_FLAGS = set(kernels.REQUIRED_FLAGS) <= kernels.cpu_flags()


def test_the_build_lock_waits_for_a_holder_and_gives_up_after_the_timeout(tmp_path):
    import fcntl

    path = tmp_path / build.BUILD_LOCK
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="another process held"):
        with build.exclusive(path, timeout_s=0.3, poll_s=0.02):
            pass
    assert time.monotonic() - t0 >= 0.3
    os.close(holder)  # released: the next caller gets it at once
    with build.exclusive(path, timeout_s=0.3):
        pass


def test_a_killed_builder_never_blocks_the_next_one(tmp_path):
    """The scenario torch's own lock file gets wrong: a build killed half-way."""
    path = tmp_path / build.BUILD_LOCK
    code = ("import sys, time; from camex_runtime.kernels import build\n"
            f"with build.exclusive(__import__('pathlib').Path({str(path)!r})):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            with build.exclusive(path, timeout_s=0.2):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        t0 = time.monotonic()
        with build.exclusive(path, timeout_s=5.0):
            assert time.monotonic() - t0 < 1.0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_build_directory_follows_the_source_and_an_explicit_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("CAMEX_KERNELS_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = build.build_dir()
    assert d.parent == tmp_path and d.name == f"{build.NAME}-{build.fingerprint()[:16]}"
    monkeypatch.setenv("CAMEX_KERNELS_DIR", str(tmp_path / "baked"))
    assert build.build_dir() == tmp_path / "baked"


def test_the_fingerprint_covers_every_unit_and_header(monkeypatch, tmp_path):
    """An edit to any file the build compiles or includes gives another build directory; each
    of those files exists (the wheel ships them: tests/deploy)."""
    assert {p.suffix for p in build.SOURCES} == {".cpp"} and build.HEADERS
    before = build.fingerprint()
    for name in ("SOURCES", "HEADERS"):
        files = getattr(build, name)
        copies = []
        for path in files:
            copy = tmp_path / name / path.name
            copy.parent.mkdir(exist_ok=True)
            copy.write_bytes(path.read_bytes())
            copies.append(copy)
        monkeypatch.setattr(build, name, tuple(copies))
        assert build.fingerprint() == before  # same bytes, same name: same build
        copies[-1].write_bytes(copies[-1].read_bytes() + b"\n// edited\n")
        assert build.fingerprint() != before
        monkeypatch.setattr(build, name, files)
    assert build.fingerprint() == before


def test_a_stamp_from_other_sources_is_not_imported(tmp_path):
    (tmp_path / f"{build.NAME}.so").write_bytes(b"not a library")
    (tmp_path / build.STAMP).write_text(json.dumps({"fingerprint": "0" * 64}))
    assert build._import_prebuilt(tmp_path, build.fingerprint()) is None
    # the right fingerprint on a damaged library: not imported either (it gets rebuilt)
    (tmp_path / build.STAMP).write_text(json.dumps({"fingerprint": build.fingerprint()}))
    assert build._import_prebuilt(tmp_path, build.fingerprint()) is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLAGS, reason="the native kernels need AVX2/FMA/F16C")
def test_a_stale_torch_lock_is_cleared_and_a_prebuilt_library_needs_no_compiler(tmp_path):
    """A first start killed while compiling leaves torch's `lock` file, on which torch's builder
    would wait forever. Then the built directory is used as an image ships it: no compiler and no
    ninja on PATH."""
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / build.TORCH_LOCK).write_text("")
    env = {**os.environ, "CAMEX_KERNELS_DIR": str(kdir), "CAMEX_KERNELS": "native"}
    cmd = [sys.executable, "-m", "camex_runtime.kernels"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "removing" in first.stderr and "interrupted" in first.stderr
    assert "native (" in first.stderr and str(kdir) in first.stdout
    assert not (kdir / build.TORCH_LOCK).exists()
    assert json.loads((kdir / build.STAMP).read_text())["fingerprint"] == build.fingerprint()

    bare = {**env, "PATH": str(tmp_path / "empty")}  # no c++, no ninja, no venv bin
    second = subprocess.run(cmd, cwd=ROOT, env=bare, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "building" not in second.stderr and "native (" in second.stderr
