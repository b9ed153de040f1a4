"""/health is a real liveness check: in-process app (factory + lifespan via TestClient) with a
real tiny engine; stopping the engine loop turns /health and /ready to 503 and engine_up to 0.
"""

import time

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/ready').json()}")


def test_health_turns_503_when_engine_loop_stops(tiny_lm_dir):
    app = create_app(ServerSettings(model=str(tiny_lm_dir)))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # loading or ok: the process lives
        wait_ready(client)
        assert client.get("/health").json() == {"status": "ok"}
        assert "camex_engine_up 1.0" in client.get("/metrics").text
        r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200
        app.state.serving.lm.stop(grace_s=0)
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["error_type"] == "unhealthy" and "stopped" in health.json()["error"]
        assert client.get("/ready").status_code == 503
        assert "camex_engine_up 0.0" in client.get("/metrics").text
        r = client.post("/generate", json={"inputs": "hello"})
        assert r.status_code == 503 and r.json()["error_type"] == "unavailable"


def test_stuck_engine_is_503_without_blocking_the_server(tiny_lm_dir):
    # in this process, to hold its lock (tests/e2e/test_engine_process_server.py freezes an
    # engine process instead)
    app = create_app(ServerSettings(model=str(tiny_lm_dir), health_stale_s=1.0,
                                    engine_process="off"))
    with TestClient(app) as client:
        wait_ready(client)
        engine = app.state.serving.lm
        with engine._lock:  # hack: hold the loop's lock so it cannot heartbeat (a stuck step)
            time.sleep(1.5)
            health = client.get("/health")
        assert health.status_code == 503 and "stuck" in health.json()["error"]
        # released: the loop heartbeats again on its next turn (which may come after this
        # thread's next request: the loop and the stats reader race for the lock)
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.05)


def test_missing_checkpoint_fails_health_and_ready(tmp_path):
    fatal = []
    app = create_app(ServerSettings(model=str(tmp_path / "nope")), on_fatal=fatal.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fatal and "nope" in fatal[0]
        assert client.get("/health").status_code == 503
        ready = client.get("/ready")
        assert ready.status_code == 503 and "nope: not a directory" in ready.json()["error"]
        assert str(tmp_path) not in ready.json()["error"]  # no absolute paths to clients


def test_heartbeat_age_decides_liveness():
    from types import SimpleNamespace

    from server.metrics import engine_alive

    stats = SimpleNamespace(alive=True, heartbeat=100.0)
    assert engine_alive(stats, stale_s=10, now=109.0)
    assert not engine_alive(stats, stale_s=10, now=111.0)
    assert not engine_alive(SimpleNamespace(alive=False, heartbeat=100.0), 10, now=100.0)


def test_no_model_serves_the_demo_checkpoints(tiny_lm_dir, tiny_classifier_dir, tmp_path):
    import shutil

    from camex_runtime.training.demo import CLF_NAME, LM_NAME, write_stamp

    # pre-built demo dir: ensure_demo_models finds both current and trains nothing
    shutil.copytree(tiny_lm_dir, tmp_path / LM_NAME)
    shutil.copytree(tiny_classifier_dir, tmp_path / CLF_NAME)
    write_stamp(tmp_path, LM_NAME), write_stamp(tmp_path, CLF_NAME)  # as if this code built them
    app = create_app(ServerSettings(demo_dir=str(tmp_path)))
    with TestClient(app) as client:
        wait_ready(client)
        info = client.get("/info").json()
        assert set(info["models"]) == {"causal-lm", "classifier"}
        assert info["model_id"] == LM_NAME and info["model_pipeline_tag"] == "text-generation"
        assert client.post("/classify", json={"inputs": "a dog"}).status_code == 200
        # the demo LM gets a chat template, so chat works out of the box
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        from camex_runtime.training.chat_template import DEMO_CHAT_TEMPLATE
        assert client.get("/tokenizer_info").json()["chat_template"] == DEMO_CHAT_TEMPLATE


def test_stopping_during_the_warm_up_is_no_load_failure(tiny_lm_dir, monkeypatch):
    """SIGTERM (or the app's shutdown) while the engines warm up stops them under the warm-up's
    requests. That ends the load, quietly: not "model failed to load", no fatal exit code."""
    from camex_runtime import Engine

    real, warming = Engine.warmup, []

    def warmup(self):  # the warm-up is still running when the server stops the engine
        warming.append(self)
        deadline = time.monotonic() + 30
        while self._accepting and time.monotonic() < deadline:
            time.sleep(0.01)
        real(self)  # its first request: the engine is stopping and accepts none

    monkeypatch.setattr(Engine, "warmup", warmup)
    fatal = []
    app = create_app(ServerSettings(model=str(tiny_lm_dir), engine_process="off"),  # patched
                     on_fatal=fatal.append)
    state = app.state.serving
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while not warming and time.monotonic() < deadline:
            time.sleep(0.01)
        assert warming and client.get("/ready").status_code == 503
    deadline = time.monotonic() + 30
    while state.loading and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not state.loading and not state.ready
    assert fatal == [] and state.load_error is None
