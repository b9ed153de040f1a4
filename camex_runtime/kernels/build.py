"""Compiling and loading the native kernels' extension, safely across processes.

The extension lives in a build directory: `$CAMEX_KERNELS_DIR` where set (an image bakes a
prebuilt one there), else `<torch's extension root>/camex_cpu_decode-<fingerprint>`, where the
fingerprint hashes the sources (kernels, bindings, header), the compiler flags, torch's version
and Python's, so two checkouts of the same code share one build and an upgrade never loads a
stale library.

- A directory whose `stamp.json` carries the current fingerprint is imported directly: no
  compiler, no ninja, nothing written (a read-only image layer serves).
- Otherwise the build runs under an exclusive `flock` on `camex-build.lock` in that directory.
  The kernel drops the lock when its holder dies, so a build killed half-way (Ctrl-C on a first
  start, a pod killed while starting) never blocks the next start. Under that lock a leftover
  `lock` file of torch's own builder can only be stale — torch waits on it forever — so it is
  removed. A process that finds the lock held waits (saying so) at most `LOCK_TIMEOUT_S`, then
  gives up and the caller serves with torch's kernels.

`python -m camex_runtime.kernels` builds now and says which kernels serve (image builds run it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("camex.kernels")

NAME = "camex_cpu_decode"
# two units, compiled side by side (ninja): the kernels, and their pybind11 bindings, whose
# headers alone take about as long to compile as all the kernels
SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_decode.cpp", "bindings.cpp"))
HEADERS = (Path(__file__).with_name("cpu_decode.h"),)
# -fopenmp: at::parallel_for is OpenMP code in torch's headers, serial without it; the library
# then binds to the libgomp torch has loaded (one thread pool, sized by torch.set_num_threads)
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
LDFLAGS = ("-fopenmp",)
STAMP = "stamp.json"
BUILD_LOCK = "camex-build.lock"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton
LOCK_TIMEOUT_S = 600.0  # a cold build takes ~30 s on two cores
WAIT_NOTICE_S = 2.0


def fingerprint() -> str:
    """What the built library depends on: sources, flags, torch, Python, machine."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(json.dumps([list(CFLAGS), list(LDFLAGS), torch.__version__,
                         list(sys.version_info[:2]), platform.machine()]).encode())
    return h.hexdigest()


def build_dir() -> Path:
    """Where the extension is built and looked for."""
    explicit = os.environ.get("CAMEX_KERNELS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"{NAME}-{fingerprint()[:16]}"


def _import_prebuilt(directory: Path, fp: str) -> ModuleType | None:
    """The library in `directory` when its stamp says it was built from exactly this `fp`."""
    lib = directory / f"{NAME}.so"
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("fingerprint") != fp or not lib.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, lib)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:  # a damaged library: build it again
        log.warning("cannot import %s (%s); rebuilding", lib, e)
        return None
    return module


@contextlib.contextmanager
def exclusive(path: Path, timeout_s: float = LOCK_TIMEOUT_S, poll_s: float = 0.1):
    """Hold an exclusive `flock` on `path` (created if missing); TimeoutError after `timeout_s`.
    The lock belongs to this open file: the kernel releases it when the process ends, however."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        noticed = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    raise TimeoutError(
                        f"another process held {path} for {timeout_s:.0f} s") from None
                if not noticed and waited >= WAIT_NOTICE_S:
                    log.info("waiting for another process building the native kernels (%s)",
                             path)
                    noticed = True
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_module(timeout_s: float = LOCK_TIMEOUT_S) -> ModuleType:
    """The extension, imported from its build directory or built there first. Raises when it
    cannot be had (no compiler, no ninja, an unwritable directory, a build lock held too long)."""
    directory, fp = build_dir(), fingerprint()
    module = _import_prebuilt(directory, fp)
    if module is not None:
        return module
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory / BUILD_LOCK, timeout_s):
        module = _import_prebuilt(directory, fp)  # built by the process we waited for
        if module is not None:
            return module
        stale = directory / TORCH_LOCK
        if stale.exists():
            log.warning("removing %s, left by a build that was interrupted", stale)
            stale.unlink(missing_ok=True)
        (directory / STAMP).unlink(missing_ok=True)
        from torch.utils.cpp_extension import load

        # the builder runs `ninja` from PATH: the venv's (pip's ninja) when not activated
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        log.info("building the native kernels in %s (once; about half a minute)", directory)
        module = load(NAME, [str(p) for p in SOURCES], build_directory=str(directory),
                      verbose=False, extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))
        tmp = directory / f"{STAMP}.{os.getpid()}"
        tmp.write_text(json.dumps({"fingerprint": fp, "torch": torch.__version__,
                                   "python": platform.python_version()}) + "\n")
        os.replace(tmp, directory / STAMP)
        return module
