"""camex-server with its engine in a process of its own (`--engine-process on`, what `auto`
picks on a CPU when the torch threads leave a core free), end to end over HTTP: the same
answers as the one-process server, metrics from the engine process, /health when that process
dies, and a SIGTERM that ends both processes. Real processes on 127.0.0.1, ended by PID."""

import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import build_tiny
from tests.server.live_server import live_server, value

pytestmark = pytest.mark.e2e
PROMPTS = ["Hello there", "The quick brown fox", "A"]


@pytest.fixture(scope="module")
def servers(tiny_lm_dir, tmp_path_factory):
    base = ("--model", str(tiny_lm_dir), "--threads", "1")
    with live_server(tmp_path_factory.mktemp("one"), *base, "--engine-process", "off") as one, \
            live_server(tmp_path_factory.mktemp("two"), *base, "--engine-process", "on") as two:
        yield one, two


def generate(url: str, prompt: str, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True, **params}}
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, prompt: str) -> list[dict]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "top_n_tokens": 2}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def test_answers_are_those_of_the_one_process_server(servers):
    one, two = servers
    engine_pid = httpx.get(two.base_url + "/info").json()["models"]["causal-lm"]["engine_pid"]
    assert engine_pid != two.proc.pid  # the engine really is elsewhere ...
    assert httpx.get(one.base_url + "/info").json()["models"]["causal-lm"][
        "engine_pid"] == one.proc.pid  # ... and here it is not
    loaded = [json.loads(line) for line in two.log().splitlines()
              if '"engine process loaded"' in line]
    # started by the CLI before it imported the app, then adopted (server.engine_launch)
    assert [(e["engine_pid"], e["started_early"]) for e in loaded] == [(engine_pid, True)]
    for prompt in PROMPTS:
        assert generate(two.base_url, prompt) == generate(one.base_url, prompt)
        sampled = dict(do_sample=True, seed=3, top_k=5, decoder_input_details=True)
        assert generate(two.base_url, prompt, **sampled) == \
            generate(one.base_url, prompt, **sampled)
        assert stream(two.base_url, prompt) == stream(one.base_url, prompt)


def test_client_mistakes_get_the_same_answers(servers):
    one, two = servers
    for body in ({"inputs": "x" * 5000, "parameters": {"max_new_tokens": 4}},
                 {"inputs": "hi", "parameters": {"top_k": 0}},
                 {"inputs": "", "parameters": {"max_new_tokens": 4}}):
        a = httpx.post(one.base_url + "/generate", json=body, timeout=30)
        b = httpx.post(two.base_url + "/generate", json=body, timeout=30)
        assert (b.status_code, b.json()) == (a.status_code, a.json())
        assert 400 <= b.status_code < 500


def test_engine_metrics_cross_the_process_boundary(servers):
    _, two = servers
    before = two.metrics()
    generate(two.base_url, "count my steps", max_new_tokens=6)
    after = two.metrics()
    steps = value(after, "camex_batch_size_count") - value(before, "camex_batch_size_count")
    assert steps >= 6  # one observation per engine step, made in the engine process
    assert value(after, "camex_router_score_count", layer="0", expert="0") > \
        value(before, "camex_router_score_count", layer="0", expert="0")
    assert value(after, "camex_generated_tokens_total") - \
        value(before, "camex_generated_tokens_total") == 6


def test_a_dead_engine_process_turns_health_red_and_ends_open_streams(tmp_path):
    long_lm = build_tiny(tmp_path / "long-lm", "lm", max_position_embeddings=2048)
    with live_server(tmp_path, "--model", str(long_lm), "--threads", "1",
                     "--engine-process", "on") as srv:
        pid = httpx.get(srv.base_url + "/info").json()["models"]["causal-lm"]["engine_pid"]
        body = {"inputs": "go on", "parameters": {"max_new_tokens": 2000, "ignore_eos": True}}
        with httpx.stream("POST", srv.base_url + "/generate_stream", json=body,
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(pid, signal.SIGKILL)  # the engine process this server started
            rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert rest and "error" in rest[-1]  # the stream ends with an error event
        health = httpx.get(srv.base_url + "/health", timeout=10)
        assert health.status_code == 503 and "stopped" in health.text
        late = httpx.post(srv.base_url + "/generate", json={"inputs": "hi"}, timeout=10)
        assert late.status_code == 503
        assert "engine process died" in srv.log()


def test_a_frozen_engine_process_is_stuck_and_recovers(tiny_lm_dir, tmp_path):
    with live_server(tmp_path, "--model", str(tiny_lm_dir), "--threads", "1",
                     "--engine-process", "on", "--health-stale-s", "1") as srv:
        pid = httpx.get(srv.base_url + "/info").json()["models"]["causal-lm"]["engine_pid"]
        os.kill(pid, signal.SIGSTOP)  # the engine process this server started
        try:
            t0 = time.monotonic()
            health = httpx.get(srv.base_url + "/health", timeout=10)
            assert health.status_code == 503 and "stuck" in health.text
            assert time.monotonic() - t0 < 5  # the probe gave up; it did not hang
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while httpx.get(srv.base_url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "health did not recover"
            time.sleep(0.1)
        assert generate(srv.base_url, "still here")["generated_text"] is not None


def test_sigterm_ends_both_processes(tiny_lm_dir, tmp_path):
    with live_server(tmp_path, "--model", str(tiny_lm_dir), "--threads", "1",
                     "--engine-process", "on") as srv:
        pid = httpx.get(srv.base_url + "/info").json()["models"]["causal-lm"]["engine_pid"]
        assert generate(srv.base_url, "one more")["generated_text"] is not None
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
