"""End to end, the unhappy paths: overload (429), client disconnects (slot freed, `dropped`),
API keys, and SIGTERM draining. Real processes on 127.0.0.1, killed by PID in teardown.

A tiny model with 2048 positions and `ignore_eos` make a "long" request below really occupy
its slot for 2000 decode steps.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.live_server import ROOT, free_port, live_server, value

pytestmark = pytest.mark.e2e
KEY = "test-secret"
LONG_TOKENS = 2000  # >= ~1.4 s even on an idle machine: far longer than any step below
LONG = {"inputs": "long request", "parameters": {"max_new_tokens": LONG_TOKENS,
                                                "ignore_eos": True}}


@pytest.fixture(scope="module")
def small_server(long_lm_dir, tmp_path_factory):
    """One running slot, one waiting slot, an API key from the environment."""
    with live_server(tmp_path_factory.mktemp("srv"), "--model", str(long_lm_dir),
                     "--max-batch-size", "1", "--max-waiting", "1",
                     env={"CAMEX_API_KEY": KEY}) as srv:
        yield srv


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_until(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def idle(srv) -> bool:
    m = srv.metrics()
    return value(m, "camex_running_requests") == 0 and value(m, "camex_waiting_requests") == 0


def test_api_key_with_real_clients(small_server):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import TextGenerationError
    from openai import AuthenticationError, OpenAI

    ok = InferenceClient(base_url=small_server.base_url, api_key=KEY)
    assert isinstance(ok.text_generation("hello", max_new_tokens=2), str)
    with pytest.raises(TextGenerationError) as err:  # parsed from our {"error", "error_type"}
        InferenceClient(base_url=small_server.base_url, api_key="wrong").text_generation("hi")
    assert err.value.__cause__.response.status_code == 401
    client = OpenAI(base_url=small_server.base_url + "/v1", api_key=KEY)
    served = client.models.list().data[0].id  # another name is a 404, as vLLM
    assert client.completions.create(model=served, prompt="hi", max_tokens=2).choices
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=small_server.base_url + "/v1", api_key="nope").models.list()
    assert httpx.get(small_server.base_url + "/health").status_code == 200  # probes stay open


def test_overload_gives_429_with_retry_after(small_server):
    async def burst():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            order = []

            async def one(i):
                r = await client.post("/generate", json=LONG, headers=auth())
                order.append(r.status_code)
                return r
            return await asyncio.gather(*(one(i) for i in range(6))), order

    before = small_server.metrics()
    responses, order = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.headers["Retry-After"] == "1" and r.json()["error_type"] == "overloaded"
               for r in rejected)
    assert order.index(429) < len(order) - 1 and order[-1] == 200  # rejected before done
    after = small_server.metrics()
    assert value(after, "camex_failures_total", reason="overloaded") - \
        value(before, "camex_failures_total", reason="overloaded") == len(rejected)


def test_stream_disconnect_frees_the_slot(small_server):
    before = value(small_server.metrics(), "camex_failures_total", reason="dropped")
    with httpx.stream("POST", small_server.base_url + "/generate_stream", json=LONG,
                      headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_until(lambda: value(small_server.metrics(), "camex_running_requests") == 1,
                   "the stream to hold the slot")
        # the engine decodes on its own thread: HTTP answers while the slot is busy
        assert httpx.get(small_server.base_url + "/health").json() == {"status": "ok"}
    # the connection is closed mid-stream: the engine request must be cancelled
    wait_until(lambda: idle(small_server), "the slot to be freed")
    m = small_server.metrics()
    assert value(m, "camex_failures_total", reason="dropped") == before + 1
    info = httpx.get(small_server.base_url + "/info", headers=auth()).json()
    assert info["models"]["causal-lm"]["stats"]["running"] == 0
    # the freed slot serves the next request
    r = httpx.post(small_server.base_url + "/generate", headers=auth(),
                   json={"inputs": "next", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


@pytest.mark.parametrize("n", [1, 2])
def test_openai_stream_disconnect_cancels_the_running_choice(small_server, n):
    """One choice is followed directly, several through a queue (server.openai_runs.merged):
    either way a client leaving mid-stream cancels every choice, the running one and one still
    queued, each counted once. With one slot, the stream of n=2 starts with the first choice's
    tokens while the second waits for the slot (it once waited for both: the first choice had
    run to its end before the client saw a token)."""
    wait_until(lambda: idle(small_server), "an idle server")
    before = value(small_server.metrics(), "camex_failures_total", reason="dropped")
    with httpx.stream("POST", small_server.base_url + "/v1/completions", headers=auth(),
                      json={"prompt": "long request", "max_tokens": LONG_TOKENS, "n": n,
                            "ignore_eos": True, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert json.loads(next(x for x in lines if x.startswith("data:"))[5:])["choices"]
        wait_until(lambda: (value(small_server.metrics(), "camex_running_requests"),
                            value(small_server.metrics(), "camex_waiting_requests")) == (1, n - 1),
                   "streaming, with the second choice still queued")
    wait_until(lambda: idle(small_server), "the choices to be cancelled")
    assert value(small_server.metrics(), "camex_failures_total", reason="dropped") == before + n


def test_non_streaming_disconnect_is_cancelled(small_server):
    wait_until(lambda: idle(small_server), "an idle server")
    before = value(small_server.metrics(), "camex_failures_total", reason="dropped")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.base_url + "/generate", json=LONG, headers=auth(),
                   timeout=httpx.Timeout(60, read=0.3))
    wait_until(lambda: value(small_server.metrics(), "camex_failures_total", reason="dropped")
               == before + 1 and idle(small_server), "the cancelled request to be dropped")


def test_sigterm_drains_in_flight_then_exits_zero(long_lm_dir, tmp_path):
    with live_server(tmp_path, "--model", str(long_lm_dir), "--grace-s", "60") as srv:
        result = {}

        def in_flight():
            result["r"] = httpx.post(srv.base_url + "/generate", json=LONG, timeout=120)

        t = threading.Thread(target=in_flight)
        t.start()
        wait_until(lambda: value(srv.metrics(), "camex_running_requests") == 1,
                   "the request to run")
        os.kill(srv.proc.pid, signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200
        assert result["r"].json()["generated_text"] is not None
        assert int(result["r"].headers["x-generated-tokens"]) == LONG_TOKENS
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.base_url + "/health", timeout=2)
        assert '"msg": "stopped"' in srv.log()


def end_session(sid: int) -> None:
    """Kill what is left of the session the server led (ninja puts each compiler command in a
    process group of its own, so its process group is not enough)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_sigterm_while_the_model_loads_exits_zero(long_lm_dir, tmp_path):
    """A first start compiles the native kernels (tens of seconds) before the model is ready.
    SIGTERM then ends the process at once, exit 0, without finalizing Python under the loader
    thread: with a loader inside torch's C++ (copying a large model's weights) that used to
    abort (SIGABRT, exit 134, "terminate called without an active exception"). Where the
    loader is when the signal lands is timing; this pins the exit path that avoids it."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "CAMEX_KERNELS": "auto", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:  # its own session: the compiler it runs is ended below
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--host", "127.0.0.1",
                                 "--port", str(port), "--model", str(long_lm_dir)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def loading() -> bool:
            try:
                body = httpx.get(base + "/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            assert body.get("status") != "ok", "ready before it could be stopped while loading"
            return body.get("status") == "loading"

        wait_until(loading, "the server to answer while loading")
        time.sleep(1.0)  # well inside the load (the kernels are compiling)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        end_session(proc.pid)  # the kernel build the loader had started
    text = log_path.read_text()
    assert "terminate called" not in text and '"msg": "stopped"' in text
    assert "still loading" in text


def test_queue_timeout_is_504_plain_and_stream(long_lm_dir, tmp_path):
    with live_server(tmp_path, "--model", str(long_lm_dir), "--max-batch-size", "1",
                     "--queue-timeout-s", "0.3") as srv:
        holder = threading.Thread(
            target=lambda: httpx.post(srv.base_url + "/generate", json=LONG, timeout=120))
        holder.start()
        wait_until(lambda: value(srv.metrics(), "camex_running_requests") == 1,
                   "the slot to be taken")
        short = {"inputs": "waits", "parameters": {"max_new_tokens": 2}}

        async def both():  # wait side by side, so the holder need only outlast one timeout
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                return await asyncio.gather(client.post("/generate", json=short),
                                            client.post("/generate_stream", json=short))

        for r in asyncio.run(both()):
            assert r.status_code == 504 and r.json()["error_type"] == "queue_timeout"
        holder.join(120)
        assert value(srv.metrics(), "camex_failures_total", reason="timeout") == 2
        # an OpenAI stream starts with its first choice's tokens: its second choice, queued
        # behind the first in the one slot, times out there as an in-stream error
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60, json={
                "prompt": "long request", "max_tokens": LONG_TOKENS, "n": 2,
                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            chunks = [json.loads(x[5:]) for x in r.iter_lines()
                      if x.startswith("data:") and x != "data: [DONE]"]
        assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0}  # tokens of choice 0
        assert chunks[-1]["error"]["code"] == "queue_timeout"
        assert value(srv.metrics(), "camex_failures_total", reason="timeout") == 3


def run_cli(*args: str, env: dict | None = None, timeout: float = 120):
    import subprocess
    import sys

    from tests.server.live_server import ROOT, free_port

    cmd = [sys.executable, "-m", "server.cli", "--port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_wrong_paths_and_swapped_flags_fail_in_one_line(tmp_path, tiny_classifier_dir,
                                                        tiny_lm_dir):
    cases = [
        (["--model", str(tmp_path / "missing")], "--model", "no such directory"),
        (["--model", str(tmp_path)], "--model", "no config.json"),
        (["--model", str(tiny_classifier_dir)], "is a classifier checkpoint",
         "pass it with --classifier"),
        (["--classifier", str(tiny_lm_dir)], "is a causal-lm checkpoint",
         "pass it with --model"),
        (["--port", "http"], "--port", "invalid int"),
    ]
    for args, *expected in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 or args[0] == "--port", proc.stderr  # argparse adds its usage
        assert all(e in lines[-1] for e in expected), proc.stderr
        assert "Traceback" not in proc.stderr


def test_corrupt_checkpoint_exits_one_with_its_error_once(tiny_lm_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "corrupt-lm"
    shutil.copytree(tiny_lm_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    proc = run_cli("--model", str(bad))
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, errors
    assert "CheckpointError" in errors[0]["msg"] and "model.safetensors" in errors[0]["msg"]
    assert "exc" not in errors[0]  # no traceback ...
    debug = run_cli("--model", str(bad), "--log-level", "debug")
    traced = [json.loads(line) for line in debug.stderr.splitlines()]
    assert any("Traceback" in r.get("exc", "") for r in traced)  # ... unless asked for


def test_a_taken_port_fails_in_one_line_before_the_model_loads(tiny_lm_dir):
    """Another process listening on the port: exit 2 with one line naming the port, before
    anything loads (was: the whole model loaded, then uvicorn's exit 3, or exit 134 when the
    loader was still inside torch)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_cli("--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_lm_dir))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # nothing was logged: no load started
    assert f"--port {port}" in lines[0] and "address already in use" in lines[0], lines[0]


def test_when_uvicorn_cannot_start_the_server_exits_one_after_one_error(tiny_lm_dir):
    """A bind that fails after the check (the port taken in between) ends in uvicorn's
    sys.exit(3): the CLI logs one error of its own and exits 1 like any failed start, through
    the exit path that never finalizes Python under a loading model."""
    import json

    from tests.server.live_server import ROOT, free_port

    script = ("import sys, uvicorn\n"
              "def fail(self, sockets=None):\n"
              "    raise SystemExit(3)\n"
              "uvicorn.Server.run = fail\n"
              "from server import cli\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "--host", "127.0.0.1", "--port",
                           str(free_port()), "--model", str(tiny_lm_dir), "--engine-process",
                           "off"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1 and "did not start" in errors[0]["msg"], errors
    assert errors[0]["uvicorn_exit"] == 3
    assert not any(r["msg"] == "stopped" for r in records)
