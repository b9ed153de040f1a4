"""Server settings: one typed dataclass, filled from CLI flags, then `CAMEX_*` env vars, then
defaults.

Every field is both a flag (`--max-batch-size`) and an environment variable
(`CAMEX_MAX_BATCH_SIZE`); the flag wins. This module knows nothing about HTTP or the engine:
it only parses and validates configuration so that `server.cli` and tests build the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping, Sequence

ENV_PREFIX = "CAMEX_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# --dtype spellings -> torch dtype attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
DTYPE_ALIASES = sorted(k for k, v in DTYPES.items() if k != v)


@dataclass
class ServerSettings:
    """Everything the server process needs to know; see `camex-server --help`."""

    model: str | None = _opt(None, "folded causal-LM checkpoint directory (none: demo models)")
    classifier: str | None = _opt(None, "folded classifier checkpoint directory")
    host: str = _opt("127.0.0.1", "bind address (keep 127.0.0.1 unless behind a proxy)")
    port: int = _opt(8080, "TCP port")
    api_key: str | None = _opt(None, "require `Authorization: Bearer KEY` on API routes (visible "
                               "to other users in `ps`: prefer CAMEX_API_KEY or --api-key-file)")
    api_key_file: str | None = _opt(None, "read the API key from this file (its first line)")
    allow_unauthenticated: bool = _opt(False, "serve a non-loopback address without an API key "
                                       "(only on a network you trust)")
    allowed_hosts: str | None = _opt(
        None, "comma-separated Host header names to accept (DNS-rebinding guard); none: "
        "loopback names when bound to loopback, any name otherwise; '*': any")
    cors_origins: str | None = _opt(None, "comma-separated browser origins allowed to call the "
                                    "API (CORS); none: CORS off; '*': any origin")
    model_id: str | None = _opt(None, "model name reported by /info and /v1/models")
    device: str = _opt("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    dtype: str | None = _opt(None, "float32, bfloat16 or float16 (none: checkpoint dtype)")
    max_batch_size: int = _opt(8, "running sequences per engine step")
    max_waiting: int = _opt(64, "bounded waiting queue; beyond it requests get 429")
    max_input_tokens: int | None = _opt(None, "longest prompt (none: engine default)")
    max_total_tokens: int | None = _opt(None, "prompt + new tokens (none: engine default)")
    max_client_batch_size: int = _opt(32, "most texts in one /classify or /v1/completions call")
    max_stop_sequences: int = _opt(4, "most stop sequences per request")
    max_body_bytes: int = _opt(1 << 20, "request body size limit (413 beyond it)")
    queue_timeout_s: float = _opt(30.0, "longest wait in the queue before a 504")
    max_connections: int = _opt(1000, "open client connections; at the limit the oldest idle "
                                "one is closed, and with none idle a new one gets 503")
    header_timeout_s: float = _opt(10.0, "a connection must send its request headers within "
                                   "this time, else it is closed (slowloris guard)")
    body_timeout_s: float = _opt(30.0, "a request must send its whole body within this time "
                                 "(408 beyond)")
    keep_alive_s: float = _opt(75.0, "idle keep-alive connections are closed after this time "
                               "(keep it above clients' and proxies' own idle timeouts)")
    classify_workers: int = _opt(2, "threads running /classify calls; further calls wait in a "
                                 "bounded queue (max_waiting) for at most queue_timeout_s")
    merge_cache_bytes: int | None = _opt(
        None, "merged-weight pool per engine, committed at start-up (none: the larger of "
        "256 MiB and one merged FFN per MoE layer for every batch slot, plus one)")
    max_batched_tokens: int = _opt(
        256, "while requests decode: tokens per engine step, each decoding row one and prompt "
        "chunks the rest (chunked prefill; on the CPU long prompts are also paced by time, "
        "prefill_time_ratio); 0: prompts are always prefilled whole")
    prefill_time_ratio: float = _opt(
        0.8, "while requests decode (CPU): a step's prompt work is held to about this many times "
        "the time of the step's decode, measured, so a long prompt raises inter-token latency "
        "about (1 + ratio)x; larger: faster prefills next to running streams; 0: tokens only")
    waiting_served_ratio: float = _opt(
        1.2, "while requests decode: once the requests that could join are at least this many "
        "times the running ones (rounded down), short prompts join together in one step (as "
        "TGI's setting of that name): a longer step for the running streams, but first tokens "
        "for the waiting now rather than one join per step; 0: never")
    threads: int | None = _opt(None, "torch CPU threads (none: all cores but one, so the HTTP "
                               "loop keeps a core; at least 1)")
    engine_process: str = _opt(
        "auto", "run the text-generation engine in its own process, so the HTTP event loop "
        "never holds the engine's GIL (the classifier stays in this process); auto: on a CPU "
        "when the torch threads leave a core free", choices=("auto", "on", "off"))
    stream_direct: bool = _opt(
        True, "streamed token events are written to the client's socket by the thread that "
        "produced them (one non-blocking write, no event-loop wake-up per token; the loop takes "
        "over at the last event, a slow reader or a closed connection), see docs/DESIGN.md; "
        "--no-stream-direct sends every event through the event loop")
    strategy: str = _opt("auto", "merged-expert apply strategy",
                         choices=("auto", "merged", "mixture"))
    expert_deltas: str = _opt(
        "full", "how text-generation engines keep the expert weight deltas: full (the "
        "checkpoint's dtype, exact) or int8 (one fp32 scale per expert and weight row: merges "
        "read 1 byte per delta element, so a new routing's first token comes sooner and the "
        "experts take about half the memory (bf16) or a third (fp32); the served model is the "
        "dequantized one, see docs/DESIGN.md; not with --strategy mixture)",
        choices=("full", "int8"))
    prefix_caching: bool = _opt(
        True, "keep each finished sequence's KV cache in its free slot and resume a later "
        "prompt that starts with the same tokens from there (a chat's next turn, a shared "
        "system prompt); the same outputs up to rounding, see docs/DESIGN.md; "
        "--no-prefix-caching computes every prompt whole")
    prefix_cache_slots: int = _opt(
        0, "KV-cache slots beyond --max-batch-size that only keep finished requests' tokens "
        "for prefix caching, so that more conversations than run at once resume (each slot "
        "costs one sequence's KV cache, see /info and docs/DESIGN.md)")
    routing: str | None = _opt(None, "default routing mode (none: checkpoint's)",
                               choices=("segment", "prompt"))
    demo_dir: str | None = _opt(None, "where demo checkpoints are built when no model is given")
    grace_s: float = _opt(30.0, "SIGTERM: time to finish in-flight requests")
    health_stale_s: float = _opt(10.0, "/health is 503 when the engine loop is silent this long")
    log_level: str = _opt("info", "log level (debug also logs the traceback of a failed model "
                          "load)", choices=("debug", "info", "warning", "error"))
    lenient_fields: bool = _opt(False, "ignore unknown request fields instead of a 422 naming "
                                "them (for clients that send extras)")
    chat_template: str | None = _opt(None, "Jinja chat template file for /v1/chat/completions "
                                     "(none: the checkpoint's tokenizer_config.json)")
    reasoning_parser: str | None = _opt(
        None, "split a thinking model's reasoning from its answer in chat completions "
        "(message `reasoning_content` and `reasoning`, as vLLM's parsers of these names): "
        "qwen3 and deepseek_r1 read <think>...</think>, openai_gptoss GPT-OSS's harmony "
        "channels (analysis: reasoning; final: answer)",
        choices=("qwen3", "deepseek_r1", "openai_gptoss"))
    tool_call_parser: str | None = _opt(
        None, "parse tool calls out of chat answers of requests with `tools`, in the model's "
        "format (vLLM's parsers of these names): hermes (<tool_call>{json}</tool_call>, "
        "Qwen2.5/Qwen3), llama3_json ({\"name\", \"parameters\"}, Llama 3.1+), mistral "
        "([TOOL_CALLS][...]), openai (GPT-OSS's harmony commentary messages to=functions.NAME; "
        "with --reasoning-parser openai_gptoss); none: requests with tools are refused",
        choices=("hermes", "llama3_json", "mistral", "openai"))

    def __post_init__(self) -> None:
        positive = ("port", "max_batch_size", "max_waiting", "max_client_batch_size",
                    "max_body_bytes", "queue_timeout_s", "health_stale_s", "max_connections",
                    "header_timeout_s", "body_timeout_s", "keep_alive_s", "classify_workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.port > 65535:  # (the resolver would wrap it: 99999 listens on 34463)
            raise ValueError(f"port must be at most 65535, got {self.port}")
        for name in ("max_input_tokens", "max_total_tokens", "merge_cache_bytes", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.max_batched_tokens < 0 or self.max_batched_tokens == 1:
            raise ValueError(f"max_batched_tokens must be 0 (no chunking) or >= 2, got "
                             f"{self.max_batched_tokens}")
        for name in ("prefill_time_ratio", "waiting_served_ratio", "prefix_cache_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.expert_deltas == "int8" and self.strategy == "mixture":
            raise ValueError("--expert-deltas int8 needs --strategy merged or auto: the mixture "
                             "strategy would dequantize every expert on each call")
        if self.max_stop_sequences < 0 or self.grace_s < 0:
            raise ValueError("max_stop_sequences and grace_s must be >= 0")
        if self.dtype is not None and self.dtype not in DTYPES:  # before a model loads
            names, aliases = sorted(set(DTYPES.values())), ", ".join(DTYPE_ALIASES)
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(names)} "
                             f"(or {aliases})")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"chat_template {self.chat_template!r} is not a file")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give the API key once: --api-key (CAMEX_API_KEY) or --api-key-file")
        if self.tool_call_parser == "openai" and self.reasoning_parser != "openai_gptoss":
            raise ValueError("--tool-call-parser openai reads GPT-OSS's harmony messages, which "
                             "--reasoning-parser openai_gptoss splits: give both")

    @property
    def classifier_only(self) -> bool:
        """Serving a classifier and no text-generation model: `POST /` classifies."""
        return self.classifier is not None and self.model is None

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None,
                     env: Mapping[str, str] | None = None) -> ServerSettings:
        """Flags override `CAMEX_*` environment variables, which override defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw not in (None, ""):
                values[f.name] = _convert(f, raw, source=env_name(f.name))
        parsed = build_parser().parse_args(argv)
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
        return cls(**values)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return typ
    return str


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(f: dataclasses.Field, raw: str, source: str) -> Any:
    typ = _base_type(f)
    if typ is bool:
        if raw.lower() not in TRUE + FALSE:
            raise ValueError(f"{source}={raw!r} must be one of {', '.join(TRUE + FALSE)}")
        return raw.lower() in TRUE
    try:
        value = typ(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not a valid {typ.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{source}={raw!r} must be one of {', '.join(choices)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camex-server",
        description="Serve CAMEx merged-expert models over HTTP (TGI/TEI/OpenAI-compatible).",
        epilog="Every option is also an environment variable: --max-batch-size <-> "
               "CAMEX_MAX_BATCH_SIZE. Flags win over the environment.")
    for f in dataclasses.fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default}]"
        if _base_type(f) is bool:  # a switch: --lenient-fields / --no-lenient-fields
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                dest=f.name, help=text)
            continue
        parser.add_argument(flag, type=_base_type(f), default=None, dest=f.name,
                            choices=f.metadata.get("choices"), help=text)
    return parser


def engine_in_process_of_its_own(settings: ServerSettings) -> bool:
    """`engine_process` resolved: "auto" is on for a CPU engine whose threads leave a core
    free. There the HTTP process runs beside the engine without taking compute from it; when
    the engine's threads take every core, the HTTP process would preempt one of them inside
    its parallel matrix products (bf16, two threads on two cores: 8 % slower than in one
    process), while in one process the event loop's work mostly falls in the step's
    single-threaded Python stretches."""
    if settings.engine_process != "auto":
        return settings.engine_process == "on"
    return settings.device == "cpu" and cpu_threads(settings) < available_cores()


def available_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def cpu_threads(settings: ServerSettings) -> int:
    """The torch intra-op thread count to use: the setting, else all cores but one."""
    if settings.threads is not None:
        return settings.threads
    return max(1, available_cores() - 1)
