"""llama.cpp for the peer benchmark: build `llama-server` and convert Hugging Face GPT-2 to GGUF.

Both come from the `llama-cpp-python` source package on the Python package index (its vendored
llama.cpp under ``vendor/llama.cpp``): the server is configured with cmake + ninja (Release, CPU
only, tuned for this CPU, only the ``llama-server`` target), and ``convert_hf_to_gguf.py`` runs
in a venv of its own (its pins, e.g. transformers 4.x, clash with this project's).

Everything lives outside the repository, under ``~/.cache/camex-serve/llama.cpp/<version>/``
(``$CAMEX_LLAMACPP_CACHE`` moves it): ``src/`` (the unpacked sdist), ``build-<cpu>/`` (one
build per CPU model and flag set, since ``GGML_NATIVE`` code may not run on another CPU) and
``convert-venv/``. A finished build or venv is reused; a half-finished one is redone.

Knows nothing about camex, its models or servers.

    python benchmarks/llamacpp_build.py            # build (or find) llama-server, print its path
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script
from machine import cpu_info  # noqa: E402

# The llama-cpp-python release whose vendored llama.cpp we build: pinned so a cached build and
# a result file name the same code (override with --llama-cpp-python-version).
DEFAULT_VERSION = "0.3.36"
CACHE_ROOT = Path(os.environ.get("CAMEX_LLAMACPP_CACHE",
                                 Path.home() / ".cache" / "camex-serve" / "llama.cpp"))
# Release, CPU only, -march=native; no web UI (its prebuilt assets would be downloaded from the
# Hugging Face hub at build time), no TLS, no tests/examples.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


class BuildError(RuntimeError):
    """A build or conversion step failed; the message says which and where its log is."""


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Source and build


@dataclass
class LlamaCpp:
    """A built llama.cpp: where its server binary and converter are."""
    version: str  # llama-cpp-python version that vendored it
    root: Path  # the vendored llama.cpp source tree
    server: Path  # the llama-server binary
    build_info: dict  # what build_server recorded (flags, seconds, `llama-server --version`)


def version_dir(version: str) -> Path:
    return CACHE_ROOT / version


def fetch_source(version: str) -> Path:
    """The unpacked sdist's vendored llama.cpp (downloaded with pip once)."""
    vdir = version_dir(version)
    src = vdir / "src"
    root = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / ".complete").exists() and root.is_dir():
        return root
    vdir.mkdir(parents=True, exist_ok=True)
    dl = vdir / "download"
    dl.mkdir(exist_ok=True)
    sdist = dl / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python=={version} source package (~75 MB) with pip")
        run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={version}", "-d", str(dl)], vdir / "download.log")
        if not sdist.exists():
            raise BuildError(f"pip did not produce {sdist}; see {vdir / 'download.log'}")
    log(f"unpacking {sdist.name}")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data")
    if not (root / "CMakeLists.txt").exists():
        raise BuildError(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
    (src / ".complete").touch()
    return root


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None,
               progress: re.Pattern | None = None, cwd: Path | None = None) -> None:
    """Run `cmd` with its output in `log_path`; echo lines matching `progress` (throttled)."""
    with log_path.open("w") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=cwd)
        last, t0 = 0.0, time.monotonic()
        for line in proc.stdout:
            logf.write(line)
            if progress is not None and progress.search(line) and time.monotonic() - last > 5:
                last = time.monotonic()
                log(f"{time.monotonic() - t0:6.0f} s  {line.strip()[:110]}")
        if proc.wait() != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise BuildError(f"{cmd[0]} failed ({proc.returncode}); log {log_path}:\n"
                             + "\n".join(tail))


def build_server(version: str = DEFAULT_VERSION, jobs: int | None = None) -> LlamaCpp:
    """Build `llama-server` for this CPU (or reuse the finished build) and return it."""
    root = fetch_source(version)
    cpu = cpu_info()
    build = version_dir(version) / f"build-{cpu['flags_hash']}"
    info_path = build / "camex-build-info.json"
    server = build / "bin" / "llama-server"
    if info_path.exists() and server.exists():
        return LlamaCpp(version, root, server, json.loads(info_path.read_text()))
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building llama.cpp needs `{tool}` on PATH "
                             f"(Debian: apt-get install cmake ninja-build g++)")
    jobs = jobs or os.cpu_count() or 1
    log(f"building llama-server {version} in {build} with {jobs} jobs "
        f"(~10 min on 2 cores; progress every 5 s)")
    t0 = time.monotonic()
    build.mkdir(parents=True, exist_ok=True)
    run_logged(["cmake", "-S", str(root), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS],
               build / "configure.log")
    run_logged(["ninja", "-C", str(build), "-j", str(jobs), "llama-server"], build / "build.log",
               progress=re.compile(r"^\[\d+/\d+\]"))
    seconds = time.monotonic() - t0
    info = {"llama_cpp_python": version, "cmake_flags": CMAKE_FLAGS, "jobs": jobs,
            "build_seconds": round(seconds), "cpu": cpu, "server_version": server_version(server),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info_path.write_text(json.dumps(info, indent=1))
    log(f"built {server} in {seconds / 60:.1f} min")
    return LlamaCpp(version, root, server, info)


def server_version(server: Path) -> str:
    """`llama-server --version` (build number and commit; "unknown" in an sdist without git)."""
    proc = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join((proc.stdout + proc.stderr).split())


# ---------------------------------------------------------------------------------------------
# Conversion


def converter_requirements(root: Path) -> list[str]:
    """The converter's pip requirements, from its own requirements files, except that torch is
    this project's pinned CPU build (its pin would come from PyTorch's own index) and gguf is
    the vendored gguf-py of the same llama.cpp."""
    reqs, todo = [], [root / "requirements" / "requirements-convert_hf_to_gguf.txt"]
    while todo:
        for line in todo.pop().read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r"):
                todo.append(root / "requirements" / line[2:].strip())
            elif line and not line.startswith("-"):
                name = re.split(r"[<>=~!\[ ]", line)[0].lower()
                if name not in ("torch", "gguf"):
                    reqs.append(line)
    import torch  # the version this project runs (the local CPU wheel)
    return [f"torch=={torch.__version__.split('+')[0]}", *reqs, str(root / "gguf-py")]


def converter_python(llama: LlamaCpp) -> Path:
    """The converter venv's python, created and filled on first use."""
    venv = version_dir(llama.version) / "convert-venv"
    py = venv / "bin" / "python"
    if (venv / ".complete").exists() and py.exists():
        return py
    reqs = converter_requirements(llama.root)
    log(f"creating the converter venv {venv}: {', '.join(reqs[:-1])} + gguf-py (a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    run_logged([base, "-m", "venv", str(venv)], version_dir(llama.version) / "venv.log")
    run_logged([str(py), "-m", "pip", "install", "-q", *reqs],
               version_dir(llama.version) / "venv-install.log")
    (venv / ".complete").touch()
    return py


def convert_to_gguf(llama: LlamaCpp, hf_dir: Path, out: Path, outtype: str) -> Path:
    """`convert_hf_to_gguf.py hf_dir --outtype {f32,f16} --outfile out` (kept when present)."""
    if out.exists():
        return out
    py = converter_python(llama)
    launcher = Path(__file__).with_name("llamacpp_convert.py")
    tmp = out.with_name(out.name + ".tmp")
    log(f"converting {hf_dir.name} to {out.name} ({outtype})")
    run_logged([str(py), str(launcher), str(llama.root), str(hf_dir), "--outtype", outtype,
                "--outfile", str(tmp)], out.with_suffix(".convert.log"))
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp-python-version", default=DEFAULT_VERSION)
    p.add_argument("--jobs", type=int, default=None)
    args = p.parse_args(argv)
    llama = build_server(args.llama_cpp_python_version, args.jobs)
    print(json.dumps({"server": str(llama.server), **llama.build_info}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
