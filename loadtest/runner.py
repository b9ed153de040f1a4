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

Two readers (``client``): ``"wire"`` (``loadtest.wire``, a lean HTTP/1.1 protocol: about a
quarter of httpx's CPU per streamed token, so a load test on the serving machine takes less
from the server it measures) and ``"httpx"`` (HTTPS, or to compare); ``"auto"`` picks wire for
``http://`` targets. A stream's events are time-stamped as their bytes arrive and parsed once
the response has ended (or been cut off), so the JSON work does not compete with the server's
decode steps while it streams; the records are the same either way. Runs on uvloop when it is
installed (about half the stdlib loop's CPU per wake-up).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from loadtest import wire
from loadtest.arrivals import ARRIVAL_PROCESSES, arrival_offsets
from loadtest.records import RequestRecord
from loadtest.report import Report, Slo, build_report
from loadtest.workload import LengthDist, RequestSpec, build_workload, load_prompts

MAX_REQUESTS = 100_000  # hard bounds: a typo must not turn into an unbounded flood
MAX_DURATION_S = 4 * 3600.0
MAX_CONCURRENCY = 4096
CLIENTS = ("auto", "wire", "httpx")


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
    client: str = "auto"  # "wire" | "httpx" | "auto" (wire for http://, httpx for https://)

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
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}, got {self.client!r}")
        if self.client == "wire" and httpx.URL(self.url).scheme != "http":
            raise ValueError("the wire client speaks plain HTTP only; use client 'httpx' "
                             "(--client httpx) or 'auto' for an https:// target")

    @property
    def reader(self) -> str:
        """The client that reads responses: ``client`` with "auto" resolved by the URL's scheme."""
        if self.client != "auto":
            return self.client
        return "wire" if httpx.URL(self.url).scheme == "http" else "httpx"

    def summary(self) -> dict:
        """The settings recorded in the report (JSON-safe)."""
        d = asdict(self)
        d.pop("api_key")
        d["mode"] = "closed" if self.rate is None else "open"
        d["rate"] = (None if self.rate is None
                     else (str(self.rate) if math.isinf(self.rate) else self.rate))
        d["slo"] = asdict(self.slo) if self.slo else None
        d["client"] = self.reader
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


def _server_error(body: bytes) -> str:
    try:
        out = json.loads(body)
        return f"{out.get('error_type', 'error')}: {out.get('error', '')}"
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


OnEvent = Callable[[bytes], None]


class _HttpxTransport:
    """httpx's pooled async client (TLS, proxies off); `stream` hands out each ``data:`` line."""

    def __init__(self, cfg: LoadConfig, width: int, headers: dict[str, str]):
        # trust_env=False: an HTTP(S)_PROXY in the environment must not reroute loopback traffic
        self.client = httpx.AsyncClient(
            base_url=cfg.url, headers=headers, trust_env=False,
            timeout=httpx.Timeout(cfg.request_timeout_s),
            limits=httpx.Limits(max_connections=width, max_keepalive_connections=width))

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        resp = await self.client.post(path, json=body)
        return resp.status_code, resp.content

    async def stream(self, path: str, body: dict, on_event: OnEvent) -> tuple[int, bytes]:
        async with self.client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                return resp.status_code, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    on_event(line[5:].encode())
            return resp.status_code, b""

    async def aclose(self) -> None:
        await self.client.aclose()


class _WireTransport:
    """``loadtest.wire`` connections, one per request in flight, kept alive between requests."""

    def __init__(self, cfg: LoadConfig, headers: dict[str, str]):
        url = httpx.URL(cfg.url)
        self.host, self.port = url.host, url.port or 80
        self.prefix = url.path.rstrip("/")
        self.headers = headers
        self.idle: list[wire.Connection] = []

    async def _call(self, path: str, body: dict, on_event: OnEvent) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else wire.Connection(self.host, self.port,
                                                                 self.headers)
        try:
            resp = await conn.post(self.prefix + path, body, on_event)
        except BaseException:
            conn.close()
            raise
        self.idle.append(conn)
        return resp.status, resp.body

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        return await self._call(path, body, lambda data: None)

    async def stream(self, path: str, body: dict, on_event: OnEvent) -> tuple[int, bytes]:
        return await self._call(path, body, on_event)

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class _Sender:
    """Sends one RequestSpec and fills its RequestRecord; one coroutine per request kind."""

    def __init__(self, transport: _HttpxTransport | _WireTransport, cfg: LoadConfig, t0: float):
        self.transport, self.cfg, self.t0 = transport, cfg, t0
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
        except (httpx.ConnectError, wire.ConnectFailed) as e:
            rec.fail("connect_error", self.now(), str(e))
        except (httpx.HTTPError, wire.WireError, OSError) as e:  # after connecting
            rec.fail("transport_error", self.now(), f"{type(e).__name__}: {e}")
        except (ValueError, KeyError, TypeError) as e:  # malformed JSON / unexpected shape
            rec.fail("bad_response", self.now(), f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            rec.fail("cancelled", self.now(), "cancelled at the run's time cap")
            raise

    async def _post_json(self, path: str, body: dict, rec: RequestRecord) -> dict | list | None:
        rec.status, content = await self.transport.post(path, body)
        if rec.status != 200:
            rec.fail(str(rec.status), self.now(), _server_error(content))
            return None
        return json.loads(content)

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
        arrivals: list[tuple[float, bytes]] = []

        def on_event(data: bytes) -> None:  # stamped now, read after the stream
            arrivals.append((time.perf_counter(), data))

        try:
            status, content = await self.transport.stream("/generate_stream", body, on_event)
            ended = self.now()
        finally:
            if arrivals:  # events only stream in a 200; they count even if the request was cut
                rec.status = 200
                self._read_events(arrivals, rec)
        rec.status = status
        if status != 200:
            rec.fail(str(status), ended, _server_error(content))
        elif rec.ok:
            rec.end = ended
        else:
            rec.fail("bad_response", ended, "stream ended without a final event")

    def _read_events(self, arrivals: list[tuple[float, bytes]], rec: RequestRecord) -> None:
        """Fold the stream's events, stamped on arrival, into ``rec``; stops at an error event
        or a malformed one (recorded as the request's failure)."""
        for arrived, data in arrivals:
            t = arrived - self.t0
            if not data.strip():
                continue
            try:
                event = json.loads(data)
                if event.get("error") is not None:
                    reason = f"{event.get('error_type', 'error')}: {event['error']}"
                    rec.fail("stream_error", t, reason)
                    return
                if event.get("token") is not None:
                    rec.token_times.append(t)
                    rec.output_tokens += 1
                if event.get("generated_text") is not None:
                    rec.finish_reason = (event.get("details") or {}).get("finish_reason")
                    rec.ok = True
            except (ValueError, AttributeError) as e:  # not JSON, or JSON but not an object
                rec.fail("bad_response", t, f"{type(e).__name__}: {e}")
                return


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
    transport = (_WireTransport(cfg, headers) if cfg.reader == "wire"
                 else _HttpxTransport(cfg, width, headers))
    cpu0 = time.process_time()
    try:
        run = _Run(_Sender(transport, cfg, time.perf_counter()), cfg, len(specs))
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
    finally:
        await transport.aclose()
    # this process's CPU during the run: on the serving machine it came out of the server's share
    settings = {**cfg.summary(), "client_cpu_s": round(time.process_time() - cpu0, 4)}
    return build_report(run.records, len(specs), settings, cfg.slo, cfg.min_goodput, timed_out)


def run_load(cfg: LoadConfig | None = None, specs: list[RequestSpec] | None = None,
             **overrides) -> Report:
    """Blocking wrapper: ``run_load(url=..., num_requests=..., concurrency=...)`` -> Report.

    Keyword overrides build/replace fields of ``LoadConfig``; call from a thread without a
    running event loop (e.g. a plain pytest test). Runs on uvloop when it is installed.
    """
    if cfg is None:
        cfg = LoadConfig(**overrides)
    elif overrides:
        cfg = LoadConfig(**{**cfg.__dict__, **overrides})
    return wire.run(run_load_async(cfg, specs))
