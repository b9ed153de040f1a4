"""camex-server starts its engine process before it imports the app (`server.engine_launch`):
the launcher loads only the standard library, the loader adopts that process when it was
started with the loader's own arguments and replaces it otherwise, and a launched process that
nobody adopted ends with the server. Real processes, ended by PID."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.engine_launch import launch
from server.metrics import ServerMetrics, StatsReader
from server.settings import ServerSettings
from server.state import ServingState, build_engine

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "camex_runtime", "fastapi", "numpy", "safetensors")


def settings_for(path, *argv: str) -> ServerSettings:
    return ServerSettings.from_sources(["--model", str(path), "--engine-process", "on",
                                        "--threads", "1", *argv], env={})


def ended(process, timeout: float = 10.0) -> bool:
    process.join(timeout)
    return process.exitcode is not None


def test_the_loader_adopts_the_launched_process(tiny_lm_dir):
    settings = settings_for(tiny_lm_dir)
    launched = launch(settings)
    engine = build_engine(settings, str(tiny_lm_dir), None, "causal-lm", launched=launched)
    try:
        assert engine.pid == launched.pid and engine.started_early
        result = engine.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
        assert len(result.token_ids) == 4
        with pytest.raises(RuntimeError, match="already adopted"):
            launched.adopt()
        launched.discard()  # a no-op once adopted: the engine keeps running
        assert engine.stats().alive
    finally:
        engine.stop(grace_s=0)
    assert ended(launched.process)


def test_a_launched_process_with_other_settings_is_replaced(tiny_lm_dir):
    launched = launch(settings_for(tiny_lm_dir, "--max-batch-size", "3"))
    settings = settings_for(tiny_lm_dir)
    engine = build_engine(settings, str(tiny_lm_dir), None, "causal-lm", launched=launched)
    try:
        assert engine.pid != launched.pid and not engine.started_early
        assert ended(launched.process)  # killed, not left loading beside the right one
        assert engine.info()["max_batch_size"] == settings.max_batch_size != 3
    finally:
        engine.stop(grace_s=0)


def test_only_a_given_model_with_an_engine_process_is_launched(tiny_lm_dir, tmp_path):
    def of(*argv: str):
        return launch(ServerSettings.from_sources(list(argv), env={}))

    assert of("--model", str(tiny_lm_dir), "--engine-process", "off") is None
    # the demo checkpoints are built first (an empty demo dir: not the user's cache, which a
    # demo server run on this machine has filled)
    assert of("--engine-process", "on", "--demo-dir", str(tmp_path / "demo")) is None


def test_a_server_stopped_before_its_loader_ran_ends_the_launched_process(tiny_lm_dir):
    settings = settings_for(tiny_lm_dir)
    launched = launch(settings)
    state = ServingState(settings=settings, metrics=ServerMetrics(), version="test",
                         stats_reader=StatsReader(timeout_s=1.0), launched=launched)
    state.stop(grace_s=0)
    assert ended(launched.process)


LAUNCHER = """
import sys, time
import server.cli
from server.engine_launch import launch
from server.settings import ServerSettings
if __name__ == "__main__":
    launched = launch(ServerSettings.from_sources(
        ["--model", sys.argv[1], "--engine-process", "on", "--threads", "1"], env={}))
    heavy = [m for m in sys.argv[3].split(",") if m in sys.modules]
    print(launched.pid, ",".join(heavy) or "-", flush=True)
    time.sleep(float(sys.argv[2]))  # then exits without adopting it
"""


def test_a_process_nobody_adopted_ends_with_its_launcher(tiny_lm_dir, tmp_path):
    """It ignores SIGTERM from its start (the API process owns its end), so multiprocessing's
    own exit handler alone would wait for it forever."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_lm_dir), "0",
                             ",".join(HEAVY)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid_text, heavy = proc.stdout.readline().split()
        pid = int(pid_text)
        assert heavy == "-", f"the launcher imported {heavy}"
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while running(pid):
            assert time.monotonic() < deadline, "the engine process outlived its launcher"
            time.sleep(0.05)
    finally:
        for p in (proc.pid, pid):
            if p is not None and running(p):
                os.kill(p, signal.SIGKILL)
        proc.wait(10)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def demo_root(tiny_lm_dir, tiny_classifier_dir, tmp_path):
    """A built demo, as the container image ships it: both checkpoints, stamped current."""
    import shutil

    from camex_runtime.training.demo import CLF_NAME, LM_NAME, write_stamp

    shutil.copytree(tiny_lm_dir, tmp_path / LM_NAME)
    shutil.copytree(tiny_classifier_dir, tmp_path / CLF_NAME)
    write_stamp(tmp_path, LM_NAME), write_stamp(tmp_path, CLF_NAME)
    return tmp_path


def demo_settings(root) -> ServerSettings:
    return ServerSettings.from_sources(["--demo-dir", str(root), "--engine-process", "on",
                                        "--threads", "1"], env={})


def test_the_launcher_finds_the_demo_where_the_demo_builder_puts_it(monkeypatch, tmp_path):
    from camex_runtime.training import demo

    from server.engine_launch import DEMO_LM, demo_lm_dir, demo_stamp

    monkeypatch.delenv("CAMEX_DEMO_DIR", raising=False)
    plain = ServerSettings.from_sources([], env={})
    assert DEMO_LM == demo.LM_NAME and demo_lm_dir(plain) == demo.default_root() / demo.LM_NAME
    monkeypatch.setenv("CAMEX_DEMO_DIR", str(tmp_path))
    assert demo_lm_dir(plain) == demo.default_root() / demo.LM_NAME == tmp_path / DEMO_LM
    assert demo_stamp(tmp_path / DEMO_LM) is None
    demo.stamp_path(tmp_path, demo.LM_NAME).write_text("{}")
    assert demo_stamp(tmp_path / DEMO_LM) == b"{}"


@pytest.mark.parametrize("rebuilt", [False, True], ids=["as-built", "rebuilt-meanwhile"])
def test_the_built_demo_is_launched_and_adopted_unless_rebuilt(demo_root, rebuilt):
    from fastapi.testclient import TestClient

    from camex_runtime.training.demo import CLF_NAME, LM_NAME, write_stamp
    from server.app import create_app

    settings = demo_settings(demo_root)
    launched = launch(settings)
    assert launched is not None and launched.args[0] == str(demo_root / LM_NAME)
    if rebuilt:  # as ensure_demo_models leaves it after a rebuild: new stamps
        write_stamp(demo_root, LM_NAME), write_stamp(demo_root, CLF_NAME)
    try:
        with TestClient(create_app(settings, launched=launched)) as client:
            deadline = time.monotonic() + 120
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, client.get("/health").text
                time.sleep(0.1)
            pid = client.get("/info").json()["models"]["causal-lm"]["engine_pid"]
            assert (pid == launched.pid) is not rebuilt
            r = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200, r.text
    finally:
        launched.discard()
    assert ended(launched.process)


def test_a_demo_not_built_yet_is_not_launched(tmp_path, tiny_lm_dir):
    import shutil

    assert launch(demo_settings(tmp_path)) is None  # nothing there: it is trained first
    shutil.copytree(tiny_lm_dir, tmp_path / "demo-lm")
    assert launch(demo_settings(tmp_path)) is None  # no build stamp: ensure_demo_models decides
