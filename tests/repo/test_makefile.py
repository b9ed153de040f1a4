"""`make install` on machines unlike this one, without touching the network or apt: `python3`,
`apt-get`, `sudo` and `id` are stand-ins on PATH that log their arguments, and the venv's
`python` (and the `uv` its pip installs) are too. What is checked is the Makefile's own logic:
the CPU torch build, the CPU index as the fallback, uv for the rest with pip behind it, and
python3-venv installed only when `venv` cannot work."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# The venv's python: logs every call; `pip download ... torch==...+cpu` fails unless the CPU
# index is given when $LOCAL_TORCH is unset (a machine whose pip knows no CPU wheel), and
# otherwise leaves a wheel in the -d directory; `pip install uv` puts the uv stand-in next to it
# when $HAS_UV is set (else uv is not to be had here).
VENV_PYTHON = """#!/bin/sh
echo "venv-python $*" >> "$STUB_LOG"
case "$*" in
  *"download -q --no-deps -d "*" torch=="*)
    case "$*" in *--extra-index-url*) ;; *) [ -n "$LOCAL_TORCH" ] || exit 1 ;; esac
    mkdir -p "$7" && touch "$7/torch-${8#torch==}-cp311-cp311-manylinux_2_28_x86_64.whl" ;;
  *"install -q uv>="*) [ -n "$HAS_UV" ] || exit 1; cp "$STUB_DIR/uv" "$(dirname "$0")/uv" ;;
esac
exit 0
"""

# uv: logs every call; fails every install when $UV_FAILS is set (say, a private index it
# does not know about).
UV = """#!/bin/sh
echo "uv $*" >> "$STUB_LOG"
[ -z "$UV_FAILS" ]
"""

# python3: `-c 'import ensurepip, venv'` works only once apt installed python3-venv (or when
# $HAS_VENV is set); `-m venv DIR` creates DIR/bin/python (the stand-in above).
PYTHON3 = """#!/bin/sh
echo "python3 $*" >> "$STUB_LOG"
if [ "$1" = "-c" ]; then
  [ -n "$HAS_VENV" ] || [ -e "$STUB_DIR/python3-venv-installed" ] || exit 1
  exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$STUB_DIR/venv-python" "$3/bin/python" && chmod +x "$3/bin/python"
  exit 0
fi
exit 1
"""

APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$STUB_LOG"
case "$*" in *"install"*python3-venv*) touch "$STUB_DIR/python3-venv-installed";; esac
exit 0
"""


def stub(path: Path, body: str) -> None:
    path.write_text(textwrap.dedent(body))
    path.chmod(0o755)


def make_install(tmp_path: Path, *args: str, target: str = "install", **env: str) -> list[str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    stub(stubs / "python3", PYTHON3)
    stub(stubs / "venv-python", VENV_PYTHON)
    stub(stubs / "uv", UV)
    stub(stubs / "apt-get", APT_GET)
    stub(stubs / "sudo", '#!/bin/sh\necho "sudo $*" >> "$STUB_LOG"\nexec "$@"\n')
    stub(stubs / "id", "#!/bin/sh\necho 1000\n")  # not root: apt-get goes through sudo
    log = tmp_path / "calls.log"
    log.touch()
    run_env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_DIR": str(stubs),
               "HOME": str(tmp_path), **env}
    res = subprocess.run(["make", "-s", target, f"VENV={tmp_path / 'venv'}",
                          f"TOOLS_VENV={tmp_path / 'tools'}", *args], cwd=REPO,
                         env=run_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "venv" / ".installed").exists()
    return log.read_text().splitlines()


def pinned_torch() -> str:
    return re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def wheel(venv: Path) -> str:
    return (f"{venv}/.torch-wheels/torch-{pinned_torch()}+cpu-cp311-cp311-"
            f"manylinux_2_28_x86_64.whl")


def test_torch_is_the_cpu_build_from_the_cpu_index_when_pip_knows_no_other(tmp_path):
    calls = make_install(tmp_path, HAS_VENV="1")
    venv = tmp_path / "venv"
    fetch = [c for c in calls if "torch==" in c]
    spec = f"torch=={pinned_torch()}+cpu"      # the Makefile's version is pyproject.toml's pin
    get = f"venv-python -m pip download -q --no-deps -d {venv}/.torch-wheels {spec}"
    assert fetch == [get, f"{get} --extra-index-url https://download.pytorch.org/whl/cpu"]
    installed = calls.index(f"venv-python -m pip install -q {wheel(venv)}")  # no uv: pip
    assert calls.index(fetch[-1]) < installed < calls.index("venv-python -m pip install -q -e "
                                                             ".[dev]")  # pin then satisfied
    assert not any(c.startswith("apt-get") for c in calls)


def test_a_cpu_wheel_pip_already_knows_is_used_without_the_index(tmp_path):
    calls = make_install(tmp_path, HAS_VENV="1", LOCAL_TORCH="1")
    fetch = [c for c in calls if "torch==" in c]
    assert len(fetch) == 1 and "--extra-index-url" not in fetch[0]


def test_uv_installs_both_venvs_once_pip_has_put_it_in(tmp_path):
    """`make tools` builds .venv first (its uv installs the tools); pip, which knows where this
    machine keeps its wheels, fetches torch once for both venvs."""
    calls = make_install(tmp_path, target="tools", HAS_VENV="1", LOCAL_TORCH="1", HAS_UV="1")
    venv, tools = tmp_path / "venv", tmp_path / "tools"
    uv = [c for c in calls if c.startswith("uv ")]
    # bytecode compiled at install, as pip does (nothing compiles it later where
    # PYTHONDONTWRITEBYTECODE is set)
    into = "uv pip install -q --compile-bytecode --python"
    assert uv == [f"{into} {venv}/bin/python {wheel(venv)}",
                  f"{into} {venv}/bin/python -e .[dev]",
                  f"{into} {venv}/bin/python --no-deps text-generation>=0.7",
                  f"{into} {tools}/bin/python {wheel(venv)}",
                  f"{into} {tools}/bin/python lm-eval[api]==0.4.13 guidellm==0.8.1"]
    assert calls.index("venv-python -m pip install -q uv>=0.4") < calls.index(uv[0])
    assert len([c for c in calls if "torch==" in c]) == 1    # fetched once
    by_pip = [c for c in calls if c.startswith("venv-python") and " install " in c]
    assert by_pip == ["venv-python -m pip install -q --upgrade pip",
                      "venv-python -m pip install -q uv>=0.4",
                      "venv-python -m pip install -q --upgrade pip"]   # the tools venv's
    assert (tools / ".installed-lm-eval-0.4.13-guidellm-0.8.1").exists()


def test_pip_installs_what_uv_could_not(tmp_path):
    calls = make_install(tmp_path, HAS_VENV="1", LOCAL_TORCH="1", HAS_UV="1", UV_FAILS="1")
    for req in ("-e .[dev]", "--no-deps text-generation>=0.7"):
        tried = calls.index(f"uv pip install -q --compile-bytecode --python "
                            f"{tmp_path / 'venv'}/bin/python {req}")
        assert calls[tried + 1] == f"venv-python -m pip install -q {req}"


def test_installer_pip_never_asks_for_uv(tmp_path):
    calls = make_install(tmp_path, "INSTALLER=pip", HAS_VENV="1", LOCAL_TORCH="1", HAS_UV="1")
    assert not [c for c in calls if c.startswith("uv ") or "install -q uv" in c]
    assert "venv-python -m pip install -q -e .[dev]" in calls


def test_python3_venv_is_installed_with_apt_when_venv_cannot_work(tmp_path):
    calls = make_install(tmp_path, LOCAL_TORCH="1")
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt == ["apt-get update -qq", "apt-get install -y -qq python3-venv"]
    assert "sudo apt-get install -y -qq python3-venv" in calls          # not root here
    assert calls.index(apt[-1]) < calls.index(f"python3 -m venv {tmp_path / 'venv'}")


def test_torch_version_in_the_makefile_matches_pyproject():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^TORCH_VERSION \?= (\S+)$", make, re.M).group(1) == pinned_torch()


@pytest.mark.skipif(__import__("platform").machine() != "x86_64",
                    reason="the kernels' build tools are x86-64 only")
def test_system_deps_bring_the_native_kernels_build_tools_when_missing(tmp_path):
    """No C++ compiler and no Python.h: `make system-deps` installs g++ and python3-dev with the
    rest (the native CPU kernels would silently fall back to torch's without them)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("sh", "uname", "cat"):  # only these real tools: no c++ on PATH
        (stubs / tool).symlink_to(shutil.which(tool))
    headers = tmp_path / "include"  # Python's include directory, without Python.h
    headers.mkdir()
    stub(stubs / "python3", f"#!/bin/sh\necho {headers}\n")
    stub(stubs / "promtool", "#!/bin/sh\nexit 0\n")
    stub(stubs / "apt-get", APT_GET)
    stub(stubs / "id", "#!/bin/sh\necho 0\n")
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": str(stubs), "STUB_LOG": str(log), "STUB_DIR": str(stubs),
           "HOME": str(tmp_path)}
    res = subprocess.run([shutil.which("make"), "-s", "system-deps"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    installs = [c for c in log.read_text().splitlines() if "install" in c]
    assert len(installs) == 1 and {"g++", "python3-dev"} <= set(installs[0].split())
    # with both present, nothing of theirs is asked for
    (headers / "Python.h").write_text("")
    stub(stubs / "c++", "#!/bin/sh\nexit 0\n")
    log.write_text("")
    res = subprocess.run([shutil.which("make"), "-s", "system-deps"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not {"g++", "python3-dev"} & set(" ".join(log.read_text().splitlines()).split())
