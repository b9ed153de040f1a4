"""Dockerfile, .dockerignore and docker-compose: hadolint clean, and the properties the image
promises (non-root, health check on /health without curl, CPU torch by default with a CUDA
build arg, demo checkpoints baked at build time, only existing paths copied)."""

from __future__ import annotations

import re
import subprocess

import yaml
from .interface_metrics import DEPLOY, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_hadolint_clean(hadolint):
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_multi_stage_on_slim_python_with_cpu_torch_default():
    ins = instructions()
    assert ("ARG", "BASE=python:3.11-slim-bookworm") in ins
    assert sum(word == "FROM" for word, _ in ins) >= 2
    assert ("ARG", "TORCH_VARIANT=cpu") in ins
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in rest for _, rest in ins)


def test_runtime_stage_is_non_root_with_python_healthcheck():
    stage = dict(final_stage())
    user = stage["USER"].split(":")[0]
    assert user not in {"root", "0"}
    health = stage["HEALTHCHECK"]
    assert "/health" in health and "urllib" in health and "curl" not in health
    assert stage["ENTRYPOINT"] == '["camex-server"]'
    assert "CAMEX_HOST=0.0.0.0" in stage["ENV"] and "CAMEX_PORT=8080" in stage["ENV"]
    assert stage["EXPOSE"] == "8080"


def test_demo_checkpoints_are_baked_and_copied_into_runtime():
    text = DOCKERFILE.read_text()
    assert "python -m camex_runtime.training.demo --root" in text
    assert "fortunes" in text  # the demo's training text
    assert any(word == "COPY" and "/opt/camex/demo" in rest for word, rest in final_stage())


def test_copied_sources_exist_and_are_not_ignored():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # allow-list context
    for word, rest in instructions():
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing in the repository"
                assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is ignored"


def test_entrypoint_is_a_project_script():
    assert 'camex-server = "server.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"camex-server", "prometheus", "grafana"} <= services.keys()
    assert services["camex-server"]["build"]["context"] == ".."
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "camex-server"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["camex-server:8080"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} is published on every interface"


def test_build_image_script_is_valid_bash():
    script = DEPLOY / "build_image.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert script.stat().st_mode & 0o111, "build_image.sh must be executable"


def test_every_camex_variable_is_a_server_setting():
    """CAMEX_* names in the image, compose and k8s files are real server options (or the
    kernels' own variables)."""
    import dataclasses

    from camex_runtime import kernels
    from server.settings import ServerSettings, env_name

    known = {env_name(f.name) for f in dataclasses.fields(ServerSettings)} | set(kernels.ENV_VARS)
    files = [DOCKERFILE, DEPLOY / "docker-compose.yml", *sorted(DEPLOY.glob("k8s/**/*.yaml"))]
    for path in files:
        used = set(re.findall(r"\bCAMEX_[A-Z_]+\b", path.read_text()))
        unknown = used - known
        assert not unknown, f"{path.relative_to(ROOT)} sets unknown options {unknown}"


def test_native_kernels_are_prebuilt_and_shipped_in_the_runtime_image():
    """Without them a container serves with torch's kernels: the slim runtime has no compiler."""
    builder = instructions()[:len(instructions()) - len(final_stage())]
    build = [rest for word, rest in builder if word == "RUN" and "camex_runtime.kernels" in rest]
    assert build and "g++" in build[0] and "python -P -m" in build[0]  # the installed copy
    assert ("ENV", "CAMEX_KERNELS_DIR=/opt/camex/kernels") in builder
    stage = final_stage()
    assert ("COPY", "--from=builder /opt/camex/kernels /opt/camex/kernels") in stage
    assert "CAMEX_KERNELS_DIR=/opt/camex/kernels" in dict(stage)["ENV"]


def test_the_wheel_carries_the_native_kernels_source(tmp_path):
    """`pip install .` (the image does) must install every source and header the kernels'
    build compiles next to its loader."""
    import sys
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("camex_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    from camex_runtime.kernels import build
    wanted = {f"camex_runtime/kernels/{p.name}" for p in (*build.SOURCES, *build.HEADERS)}
    assert len(wanted) == 3 and wanted <= set(names), sorted(wanted - set(names))
    assert "camex_runtime/kernels/build.py" in names
