"""ServerSettings: flags override CAMEX_* env vars, which override defaults; bad values fail."""

import dataclasses
import os

import pytest

from server.settings import (ServerSettings, build_parser, cpu_threads,
                             engine_in_process_of_its_own, env_name)


def test_defaults_bind_localhost():
    s = ServerSettings.from_sources([], env={})
    assert (s.host, s.port, s.model, s.api_key) == ("127.0.0.1", 8080, None, None)


def test_env_then_flags_precedence():
    env = {"CAMEX_PORT": "9001", "CAMEX_MAX_BATCH_SIZE": "3", "CAMEX_API_KEY": "k",
           "CAMEX_QUEUE_TIMEOUT_S": "2.5", "CAMEX_MODEL": "/m"}
    s = ServerSettings.from_sources(["--port", "9002"], env=env)
    assert s.port == 9002  # flag wins
    assert (s.max_batch_size, s.api_key, s.queue_timeout_s, s.model) == (3, "k", 2.5, "/m")


def test_every_field_has_flag_and_env_var():
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for name in ServerSettings.__dataclass_fields__:
        assert name in flags
        assert env_name(name) == "CAMEX_" + name.upper()


@pytest.mark.parametrize("env,message", [
    ({"CAMEX_PORT": "eighty"}, "CAMEX_PORT='eighty' is not a valid int"),
    ({"CAMEX_PORT": "99999"}, "port must be at most 65535, got 99999"),
    ({"CAMEX_STRATEGY": "fastest"}, "must be one of auto, merged, mixture"),
    ({"CAMEX_DTYPE": "float8"}, "unknown dtype 'float8'; use one of bfloat16, float16, float32 "
                                "(or bf16, fp16, fp32, half)"),
    ({"CAMEX_MAX_WAITING": "0"}, "max_waiting must be > 0"),
    ({"CAMEX_THREADS": "0"}, "threads must be > 0"),
    ({"CAMEX_MERGE_CACHE_BYTES": "-1"}, "merge_cache_bytes must be > 0"),
    ({"CAMEX_MAX_BATCHED_TOKENS": "1"}, "max_batched_tokens must be 0 (no chunking) or >= 2"),
    ({"CAMEX_PREFILL_TIME_RATIO": "-0.5"}, "prefill_time_ratio must be >= 0"),
    ({"CAMEX_WAITING_SERVED_RATIO": "-1"}, "waiting_served_ratio must be >= 0"),
    ({"CAMEX_PREFIX_CACHE_SLOTS": "-2"}, "prefix_cache_slots must be >= 0"),
    ({"CAMEX_EXPERT_DELTAS": "int4"}, "must be one of full, int8"),
    ({"CAMEX_EXPERT_DELTAS": "int8", "CAMEX_STRATEGY": "mixture"},
     "--expert-deltas int8 needs --strategy merged or auto"),
])
def test_bad_values_say_what_is_wrong(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerSettings.from_sources([], env=env)


def test_chunking_settings_reach_the_engine_with_its_defaults(tiny_lm_dir):
    """The server's defaults are the engine's; 0 turns each mechanism off."""
    import inspect
    from camex_runtime import Engine
    from server.state import build_engine
    engine_defaults = inspect.signature(Engine.__init__).parameters
    s = ServerSettings.from_sources([], env={})
    for name in ("max_batched_tokens", "prefill_time_ratio", "waiting_served_ratio"):
        assert getattr(s, name) == engine_defaults[name].default
    path = str(tiny_lm_dir)
    inside = dataclasses.replace(s, engine_process="off")  # its scheduler and pacer, read here
    engine = build_engine(inside, path, None, "causal-lm")
    assert engine.scheduler.config.max_batched_tokens == 256 and engine.pacer.ratio == 0.8
    assert engine.pacer.burst == 64 and engine.scheduler.config.waiting_served_ratio == 1.2
    assert engine.info()["waiting_served_ratio"] == 1.2
    off = ServerSettings.from_sources(["--max-batched-tokens", "0", "--prefill-time-ratio", "0",
                                       "--waiting-served-ratio", "0", "--engine-process", "off"],
                                      env={})
    engine = build_engine(off, path, None, "causal-lm")
    assert engine.scheduler.config.max_batched_tokens is None and engine.pacer is None
    assert engine.scheduler.config.waiting_served_ratio is None
    keys = ("max_batched_tokens", "prefill_time_ratio", "waiting_served_ratio")
    for settings in (s, off):  # the same values reach an engine in its own process
        inside = build_engine(dataclasses.replace(settings, engine_process="off"), path, None,
                              "causal-lm")
        remote = build_engine(dataclasses.replace(settings, engine_process="on"), path, None,
                              "causal-lm")
        try:
            assert remote.pid != os.getpid()
            assert {k: remote.info()[k] for k in keys} == {k: inside.info()[k] for k in keys}
        finally:
            remote.stop(grace_s=0)


def test_engine_process_auto_leaves_the_compute_threads_a_core_of_their_own(monkeypatch):
    def own(*argv):
        return engine_in_process_of_its_own(ServerSettings.from_sources(list(argv), env={}))

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert own()  # 3 torch threads, the HTTP process on the fourth core
    assert own("--threads", "2")
    assert not own("--threads", "4")  # every core computes: one process
    assert not own("--device", "cuda")
    assert own("--threads", "4", "--engine-process", "on")
    assert not own("--engine-process", "off")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert not own()  # one core: nothing to gain


def test_threads_default_leaves_a_core_for_the_http_loop(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_threads(ServerSettings.from_sources([], env={})) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert cpu_threads(ServerSettings.from_sources([], env={})) == 1
    assert cpu_threads(ServerSettings.from_sources(["--threads", "5"], env={})) == 5


def test_switches_come_from_flags_or_env_words():
    assert ServerSettings.from_sources([], env={}).allow_unauthenticated is False
    assert ServerSettings.from_sources(["--allow-unauthenticated"], env={}).allow_unauthenticated
    for word, want in (("1", True), ("true", True), ("yes", True), ("0", False), ("off", False)):
        env = {"CAMEX_ALLOW_UNAUTHENTICATED": word}
        assert ServerSettings.from_sources([], env=env).allow_unauthenticated is want
    with pytest.raises(ValueError, match="CAMEX_ALLOW_UNAUTHENTICATED='maybe' must be one of"):
        ServerSettings.from_sources([], env={"CAMEX_ALLOW_UNAUTHENTICATED": "maybe"})


@pytest.mark.parametrize("field", ["max_connections", "header_timeout_s", "body_timeout_s",
                                   "keep_alive_s", "classify_workers"])
def test_connection_and_worker_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        ServerSettings.from_sources([], env={env_name(field): "0"})


def test_a_key_given_twice_is_ambiguous(tmp_path):
    with pytest.raises(ValueError, match="give the API key once"):
        ServerSettings.from_sources(["--api-key-file", str(tmp_path / "k")],
                                    env={"CAMEX_API_KEY": "abc"})


def test_harmony_tool_calls_need_the_harmony_reasoning_parser():
    with pytest.raises(ValueError, match="--tool-call-parser openai reads GPT-OSS's harmony"):
        ServerSettings(tool_call_parser="openai")
    assert ServerSettings(tool_call_parser="openai",
                          reasoning_parser="openai_gptoss").tool_call_parser == "openai"
