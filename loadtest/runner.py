"""The async HTTP client that sends a workload and records what happened to each request.

Speaks only HTTP to a TGI-compatible server (``/generate_stream``, ``/generate``,
``/classify``); never imports the runtime or the server. Two ways to apply load:

- open loop (``rate`` set): requests leave on an arrival schedule (``arrivals.py``) whether or
  not earlier ones have finished; ``max_concurrency`` optionally caps requests in flight;
- closed loop (``rate`` None): ``concurrency`` workers each send their next request as soon as
  the previous one finished.

A run is always bounded: at most ``num_requests`` requests and ``max_duration_s`` seconds;
requests still in flight at the time cap are cancelled and recorded as ``"cancelled"``.
``run_load(config)`` is the one entry point (CLI and tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from loadtest.arrivals import ARRIVAL_PROCESSES, arrival_offsets
from loadtest.records import RequestRecord
from loadtest.report import Report, Slo, build_report
from loadtest.workload import LengthDist, RequestSpec, build_workload, load_prompts

MAX_REQUESTS = 100_000  # hard bounds: a typo must not turn into an unbounded flood
MAX_DURATION_S = 4 * 3600.0
MAX_CONCURRENCY = 4096


class RemoteTargetError(ValueError):
    """The target is not a loopback address and ``allow_remote`` was not given."""


@dataclass
class LoadConfig:
    """One load-test run. Defaults: closed loop, 1 worker, 100 streamed requests."""

    url: str = "http://127.0.0.1:8080"
    num_requests: int = 100
    max_duration_s: float = 600.0  # time cap; in-flight requests are cancelled when it hits
    rate: float | None = None  # requests/s (open loop; inf = all at t=0); None = closed loop
    concurrency: int = 1  # closed-loop workers
    max_concurrency: int | None = None  # open loop: cap on requests in flight (None = none)
    arrival: str = "poisson"  # open loop: "poisson" | "gamma"
    burstiness: float = 1.0  # gamma shape; 1 = Poisson, < 1 burstier
    mix: dict[str, float] = field(default_factory=lambda: {"stream": 1.0})
    prompts_path: str | None = None  # JSONL / text prompts; None = synthetic
    prompt_len: LengthDist | str | int = LengthDist("fixed", 32)  # synthetic prompt words
    max_new_tokens: LengthDist | str | int = LengthDist("fixed", 16)
    seed: int | None = 0  # workload + arrivals; request i sends parameters.seed = seed + i
    do_sample: bool = False
    extra_params: dict = field(default_factory=dict)  # merged into "parameters" (e.g. ignore_eos)
    request_timeout_s: float = 120.0
    api_key: str | None = None  # sent as "Authorization: Bearer ..."
    allow_remote: bool = False
    slo: Slo | str | None = None  # Slo or "ttft=500ms,e2e=5s"
    min_goodput: float | None = None  # the SLO gate, a fraction in [0, 1]
    progress: bool = False  # tqdm bar on stderr

    def __post_init__(self):
        # convenience for callers: max_new_tokens=8 or prompt_len="uniform:4:16"
        for name in ("prompt_len", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, LengthDist):
                setattr(self, name, LengthDist.parse(str(value)))
        if isinstance(self.slo, str):
            self.slo = Slo.parse(self.slo)

    def validate(self) -> None:
        """Raise ValueError naming the bad setting (bounds keep every run finite)."""
        check_target(self.url, self.allow_remote)
        if not 0 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests must be in [0, {MAX_REQUESTS}], "
                             f"got {self.num_requests}")
        if not 0 < self.max_duration_s <= MAX_DURATION_S:
            raise ValueError(f"max_duration_s must be in (0, {MAX_DURATION_S}], "
                             f"got {self.max_duration_s}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (or inf), got {self.rate}")
        for name in ("concurrency", "max_concurrency"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_CONCURRENCY:
                raise ValueError(f"{name} must be in [1, {MAX_CONCURRENCY}], got {value}")
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival must be one of {ARRIVAL_PROCESSES}, got {self.arrival!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.min_goodput is not None and not 0 <= self.min_goodput <= 1:
            raise ValueError(f"min_goodput is a fraction in [0, 1], got {self.min_goodput}")

    def summary(self) -> dict:
        """The settings recorded in the report (JSON-safe)."""
        d = asdict(self)
        d.pop("api_key")
        d["mode"] = "closed" if self.rate is None else "open"
        d["rate"] = (None if self.rate is None
                     else (str(self.rate) if math.isinf(self.rate) else self.rate))
        d["slo"] = asdict(self.slo) if self.slo else None
        return d


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but http(s) to a loopback host unless ``allow_remote``."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ValueError(f"bad URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"bad URL {url!r}: need http(s)://HOST[:PORT]")
    if allow_remote or parsed.host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(parsed.host).is_loopback
    except ValueError:  # a host name: resolving it here could be spoofed, so refuse it
        loopback = False
    if not loopback:
        raise RemoteTargetError(
            f"refusing to load-test non-loopback target {parsed.host!r}; "
            "pass --allow-remote (allow_remote=True) if you own it"
        )


def _server_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{body.get('error_type', 'error')}: {body.get('error', '')}"
    except (ValueError, AttributeError):
        return resp.text[:200]


class _Sender:
    """Sends one RequestSpec and fills its RequestRecord; one coroutine per request kind."""

    def __init__(self, client: httpx.AsyncClient, cfg: LoadConfig, t0: float):
        self.client, self.cfg, self.t0 = client, cfg, t0
        self.kinds = {"stream": self._stream, "generate": self._generate,
                      "classify": self._classify}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _params(self, spec: RequestSpec, details: bool) -> dict:
        params = {"max_new_tokens": spec.max_new_tokens, "do_sample": self.cfg.do_sample,
                  "details": details}
        if spec.seed is not None:
            params["seed"] = spec.seed
        return {**params, **self.cfg.extra_params}

    async def send(self, spec: RequestSpec, rec: RequestRecord) -> None:
        """Fill ``rec`` (created at send time) with the outcome of ``spec``; never raises
        except CancelledError, after recording the cancellation."""
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                await self.kinds[spec.kind](spec, rec)
        except (TimeoutError, httpx.TimeoutException) as e:
            rec.fail("timeout", self.now(), f"no complete response within the timeout ({e!r})")
        except httpx.ConnectError as e:
            rec.fail("connect_error", self.now(), str(e))
        except httpx.HTTPError as e:  # read/write/protocol errors after connecting
            rec.fail("transport_error", self.now(), f"{type(e).__name__}: {e}")
        except (ValueError, KeyError, TypeError) as e:  # malformed JSON / unexpected shape
            rec.fail("bad_response", self.now(), f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            rec.fail("cancelled", self.now(), "cancelled at the run's time cap")
            raise

    async def _post_json(self, path: str, body: dict, rec: RequestRecord) -> dict | list | None:
        resp = await self.client.post(path, json=body)
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.fail(str(resp.status_code), self.now(), _server_error(resp))
            return None
        return resp.json()

    async def _generate(self, spec: RequestSpec, rec: RequestRecord) -> None:
        body = {"inputs": spec.prompt, "parameters": self._params(spec, details=True)}
        out = await self._post_json("/generate", body, rec)
        if out is None:
            return
        if isinstance(out, list):  # TGI answers a list for some inputs; take the one result
            out = out[0]
        details = out.get("details") or {}
        rec.output_tokens = int(details.get("generated_tokens", 0))
        rec.finish_reason = details.get("finish_reason")
        if not isinstance(out.get("generated_text"), str):
            raise ValueError("response has no generated_text")
        rec.ok, rec.end = True, self.now()

    async def _classify(self, spec: RequestSpec, rec: RequestRecord) -> None:
        out = await self._post_json("/classify", {"inputs": spec.prompt}, rec)
        if out is None:
            return
        if not isinstance(out, list):
            raise ValueError("classification response is not a list")
        rec.ok, rec.end = True, self.now()

    async def _stream(self, spec: RequestSpec, rec: RequestRecord) -> None:
        body = {"inputs": spec.prompt, "parameters": self._params(spec, details=True)}
        async with self.client.stream("POST", "/generate_stream", json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                rec.fail(str(resp.status_code), self.now(), _server_error(resp))
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or not line[5:].strip():
                    continue  # blank separators, comments, "event:"/"id:" fields
                event = json.loads(line[5:])
                if event.get("error") is not None:
                    reason = f"{event.get('error_type', 'error')}: {event['error']}"
                    rec.fail("stream_error", self.now(), reason)
                    return
                if event.get("token") is not None:
                    rec.token_times.append(self.now())
                    rec.output_tokens += 1
                if event.get("generated_text") is not None:
                    rec.finish_reason = (event.get("details") or {}).get("finish_reason")
                    rec.ok = True
        if not rec.ok:
            rec.fail("bad_response", self.now(), "stream ended without a final event")
        else:
            rec.end = self.now()


class _Run:
    """One run's shared state: the records, the progress bar and the dispatch loops."""

    def __init__(self, sender: _Sender, cfg: LoadConfig, total: int):
        self.sender, self.cfg = sender, cfg
        self.records: list[RequestRecord] = []
        self.bar = tqdm(total=total, disable=not cfg.progress, unit="req", file=sys.stderr,
                        desc="camex-loadtest")
        self.failed = 0

    async def one(self, spec: RequestSpec) -> None:
        """Send one request; its record is kept even when the time cap cancels it."""
        rec = RequestRecord(index=spec.index, kind=spec.kind, start=self.sender.now(),
                            prompt_chars=len(spec.prompt))
        self.records.append(rec)
        try:
            await self.sender.send(spec, rec)
        finally:
            self.failed += not rec.ok
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)

    async def open_loop(self, specs: list[RequestSpec], tasks: set[asyncio.Task]) -> None:
        cfg = self.cfg
        offsets = arrival_offsets(len(specs), cfg.rate, cfg.arrival, cfg.burstiness, cfg.seed)
        slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        for spec, offset in zip(specs, offsets):
            if offset >= cfg.max_duration_s:
                break
            delay = offset - self.sender.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            task = asyncio.create_task(self.one(spec))
            tasks.add(task)
            if slots is not None:
                task.add_done_callback(lambda _: slots.release())
        if tasks:
            await asyncio.wait(tasks)

    async def closed_loop(self, specs: list[RequestSpec], tasks: set[asyncio.Task]) -> None:
        queue = iter(specs)

        async def worker() -> None:
            for spec in queue:  # the shared iterator hands each spec to exactly one worker
                await self.one(spec)

        tasks.update(asyncio.create_task(worker())
                     for _ in range(min(self.cfg.concurrency, len(specs))))
        if tasks:
            await asyncio.wait(tasks)


async def run_load_async(cfg: LoadConfig, specs: list[RequestSpec] | None = None) -> Report:
    """Send the workload (built from ``cfg`` unless given) and return the Report."""
    cfg.validate()
    if specs is None:
        prompts = load_prompts(cfg.prompts_path) if cfg.prompts_path else None
        specs = build_workload(cfg.num_requests, cfg.mix, prompts, cfg.prompt_len,
                               cfg.max_new_tokens, cfg.seed)
    specs = specs[: cfg.num_requests]
    width = cfg.concurrency if cfg.rate is None else (cfg.max_concurrency or max(len(specs), 1))
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # trust_env=False: an HTTP(S)_PROXY in the environment must not reroute loopback traffic.
    async with httpx.AsyncClient(
        base_url=cfg.url, headers=headers, trust_env=False,
        timeout=httpx.Timeout(cfg.request_timeout_s),
        limits=httpx.Limits(max_connections=width, max_keepalive_connections=width),
    ) as client:
        run = _Run(_Sender(client, cfg, time.perf_counter()), cfg, len(specs))
        loop = run.closed_loop if cfg.rate is None else run.open_loop
        tasks: set[asyncio.Task] = set()
        timed_out = False
        try:
            async with asyncio.timeout(cfg.max_duration_s):
                await loop(specs, tasks)
        except TimeoutError:
            timed_out = True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            run.bar.close()
    return build_report(run.records, len(specs), cfg.summary(), cfg.slo, cfg.min_goodput, timed_out)


def run_load(cfg: LoadConfig | None = None, specs: list[RequestSpec] | None = None,
             **overrides) -> Report:
    """Blocking wrapper: ``run_load(url=..., num_requests=..., concurrency=...)`` -> Report.

    Keyword overrides build/replace fields of ``LoadConfig``; call from a thread without a
    running event loop (e.g. a plain pytest test).
    """
    if cfg is None:
        cfg = LoadConfig(**overrides)
    elif overrides:
        cfg = LoadConfig(**{**cfg.__dict__, **overrides})
    return asyncio.run(run_load_async(cfg, specs))
