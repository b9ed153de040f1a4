"""One closed-loop streaming client for two server APIs, measuring both the same way.

The camex server speaks TGI (``POST /generate_stream``, one SSE event per token, then a final
event with ``generated_text``); llama.cpp's ``llama-server`` speaks its own ``POST /completion``
(``"stream": true``: one SSE event per decodable piece carrying ``tokens_predicted``, the last
with ``"stop": true``). A `Dialect` turns a prompt into each API's greedy, EOS-ignoring,
fixed-length request and reads each event as "k new tokens" / "done". Everything else — the
closed loop, the timestamps, and the statistics (``loadtest.records.RequestRecord`` and
``loadtest.report.build_report``: TTFT, ITL, TPOT, tokens/s) — is shared, so a difference
between the two servers cannot come from the client. The bytes are read by ``loadtest.wire`` (a
lean HTTP/1.1 reader, the default) or by httpx (``client="httpx"``, what rounds before it used;
kept to measure what the client itself costs, see ``loadtest.wire``'s docstring).

Talks only HTTP, to 127.0.0.1 only; never imports the server or the runtime.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from loadtest import wire  # noqa: E402
from loadtest.records import RequestRecord  # noqa: E402
from loadtest.report import Report, build_report  # noqa: E402
from loadtest.runner import check_target  # noqa: E402


@dataclass
class Event:
    """What one SSE event said, in API-neutral terms."""
    new_tokens: int = 0
    done: bool = False
    finish_reason: str | None = None  # "length" when max tokens were generated
    prompt_tokens: int | None = None  # as the server counted them, when it says
    token_ids: list[int] = field(default_factory=list)  # the new tokens' ids, when it says
    error: str | None = None


@dataclass
class LevelResult:
    """One measured level: the loadtest Report, and what shows both servers ran the same thing."""
    report: Report
    prompt_tokens: list[int]  # prompt lengths as the server counted them ([] where it does not say)
    token_ids: dict[int, list[int]]  # request index -> generated ids (greedy: comparable)

    def to_dict(self) -> dict:
        return {"report": self.report.to_dict(with_records=False),
                "finish_reasons": sorted({r.finish_reason for r in self.report.records if r.ok},
                                         key=str),
                "prompt_tokens": sorted(set(self.prompt_tokens)),
                "token_ids": [self.token_ids.get(i, []) for i in range(self.report.planned)]}

    @classmethod
    def from_dict(cls, d: dict) -> LevelResult:
        """The inverse of ``to_dict`` for a report serialised with its records."""
        return cls(Report.from_dict(d["report"]), list(d["prompt_tokens"]),
                   {i: list(ids) for i, ids in enumerate(d["token_ids"])})


def concatenate(parts: list[LevelResult]) -> LevelResult:
    """Levels measured one after another (slices of one level, interleaved with other servers)
    as one level run back to back: each part's times shifted by the parts' durations before it,
    its request indices by their request counts. Tokens/s is then total tokens / the summed
    durations, and TTFT/ITL/TPOT are over every request, as if nothing had run in between."""
    records: list[RequestRecord] = []
    token_ids: dict[int, list[int]] = {}
    prompt_tokens: list[int] = []
    offset_s, offset_i = 0.0, 0
    for part in parts:
        rep = part.report
        for r in rep.records:
            records.append(dataclasses.replace(
                r, index=r.index + offset_i, start=r.start + offset_s,
                end=None if r.end is None else r.end + offset_s,
                token_times=[t + offset_s for t in r.token_times]))
        token_ids.update({i + offset_i: ids for i, ids in part.token_ids.items()})
        prompt_tokens += part.prompt_tokens
        offset_s += rep.duration_s
        offset_i += rep.planned
    run = {**parts[0].report.run, "slices": len(parts)} if parts else {}
    if parts and all("client_cpu_s" in p.report.run for p in parts):
        run["client_cpu_s"] = round(sum(p.report.run["client_cpu_s"] for p in parts), 4)
    return LevelResult(build_report(records, offset_i, run), prompt_tokens, token_ids)


class TgiDialect:
    """camex-server: TGI ``/generate_stream`` with ``ignore_eos``."""
    name, path = "tgi", "/generate_stream"

    def body(self, prompt: str, max_new_tokens: int) -> dict:
        return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens,
                                                 "do_sample": False, "ignore_eos": True,
                                                 "details": True}}

    def read(self, event: dict, produced: int) -> Event:
        if event.get("error") is not None:
            return Event(error=f"{event.get('error_type', 'error')}: {event['error']}")
        token = event.get("token")
        out = Event(new_tokens=0 if token is None else 1,
                    token_ids=[] if token is None else [int(token["id"])])
        if event.get("generated_text") is not None:
            out.done = True
            out.finish_reason = (event.get("details") or {}).get("finish_reason")
        return out


class LlamaCppDialect:
    """llama-server: ``/completion`` streamed, temperature 0 (greedy), no prompt cache reuse
    between requests (each request prefills its whole prompt, as camex does), EOS ignored."""
    name, path = "llama.cpp", "/completion"

    def body(self, prompt: str, max_new_tokens: int) -> dict:
        return {"prompt": prompt, "n_predict": max_new_tokens, "temperature": 0.0,
                "cache_prompt": False, "ignore_eos": True, "stream": True}

    def read(self, event: dict, produced: int) -> Event:
        """`produced`: tokens this request has had so far (events carry a running count)."""
        if event.get("error") is not None:
            err = event["error"]
            return Event(error=err.get("message", str(err)) if isinstance(err, dict) else str(err))
        predicted = int(event.get("tokens_predicted", produced))
        out = Event(new_tokens=max(0, predicted - produced),
                    prompt_tokens=event.get("tokens_evaluated"),
                    token_ids=[int(t) for t in event.get("tokens") or []])
        if event.get("stop"):
            out.done = True
            out.finish_reason = {"limit": "length", "eos": "eos_token",
                                 "word": "stop_sequence"}.get(event.get("stop_type"),
                                                              event.get("stop_type"))
        return out


class OpenAICompletionsDialect:
    """camex-server's OpenAI ``/v1/completions``, streamed, greedy, EOS ignored: one chunk per
    generated token (its text may be empty while held back), the last with its finish reason.
    The chunks carry no token ids."""
    name, path = "openai", "/v1/completions"

    def body(self, prompt: str, max_new_tokens: int) -> dict:
        return {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}

    def read(self, event: dict, produced: int) -> Event:
        if event.get("error") is not None:
            err = event["error"]
            return Event(error=err.get("message", str(err)) if isinstance(err, dict) else str(err))
        choices = event.get("choices") or []
        out = Event(new_tokens=len(choices))
        reasons = [c.get("finish_reason") for c in choices if c.get("finish_reason")]
        if reasons:
            out.done, out.finish_reason = True, reasons[0]
        return out


DIALECTS = {"tgi": TgiDialect, "llama.cpp": LlamaCppDialect, "openai": OpenAICompletionsDialect}


class Reading:
    """One request's events, each with the time it arrived, into its record and generated ids:
    the part both clients share, so that they count and time tokens alike."""

    def __init__(self, dialect, rec: RequestRecord, t0: float, ids: list[int]):
        self.dialect, self.rec, self.t0, self.ids = dialect, rec, t0, ids
        self.produced, self.prompt_tokens = 0, None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def event(self, data: str | bytes, arrived: float | None = None) -> bool:
        """One event's data, which arrived at `arrived` (``time.perf_counter()``; None: now);
        True once the request is over (done or failed)."""
        ev = self.dialect.read(json.loads(data), self.produced)
        t = self.now() if arrived is None else arrived - self.t0
        if ev.error:
            self.rec.fail("stream_error", t, ev.error)
            return True
        self.rec.token_times.extend([t] * ev.new_tokens)  # several tokens in one piece: same time
        self.produced += ev.new_tokens
        self.ids.extend(ev.token_ids)
        if ev.prompt_tokens is not None:
            self.prompt_tokens = ev.prompt_tokens
        if ev.done:
            self.rec.ok, self.rec.end, self.rec.finish_reason = True, t, ev.finish_reason
        return ev.done

    def end(self) -> int | None:
        """After the stream: the record's totals; the server's prompt token count if it said.
        Ids that do not cover every generated token are dropped (unknown, never compared):
        llama-server holds back a token that ends inside a UTF-8 character and its next event,
        which counts both, names only the last one."""
        self.rec.output_tokens = self.produced
        if len(self.ids) != self.produced:
            self.ids.clear()
        if not self.rec.ok:  # a failure recorded before stays (the first one wins)
            self.rec.fail("bad_response", self.now(), "stream ended without a final event")
        return self.prompt_tokens


async def stream_httpx(client: httpx.AsyncClient, dialect, prompt: str, max_new_tokens: int,
                       reading: Reading) -> int | None:
    async with client.stream("POST", dialect.path,
                             json=dialect.body(prompt, max_new_tokens)) as resp:
        reading.rec.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            reading.rec.fail(str(resp.status_code), reading.now(), resp.text[:300])
            return None
        async for line in resp.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if data and data != "[DONE]" and reading.event(data):
                break
    return reading.end()


async def stream_wire(conn: wire.Connection, dialect, prompt: str, max_new_tokens: int,
                      reading: Reading) -> int | None:
    """While the response streams, each event is only stamped and kept; its JSON is read once
    the body has ended. The times are the same, and on a machine whose cores all compute, the
    client's per-token work (~18 us of Python when warm, several times that after the server's
    compute has evicted it) does not compete with the decode steps still to come. At B=1 the
    parsing then runs while the server waits for the next request; with several streams, while
    the others decode, as before."""
    arrivals: list[tuple[float, bytes]] = []

    def on_event(data: bytes) -> None:
        arrivals.append((time.perf_counter(), data))

    # the body is read to its end (after the final event too), so the connection is reusable
    resp = await conn.post(dialect.path, dialect.body(prompt, max_new_tokens), on_event)
    reading.rec.status = resp.status
    if resp.status != 200:
        text = resp.body.decode("utf-8", "replace")
        reading.rec.fail(str(resp.status), reading.now(), text[:300])
        return None
    for arrived, data in arrivals:
        if data.strip() != b"[DONE]" and reading.event(data, arrived):
            break
    return reading.end()


CLIENTS = ("wire", "httpx")


async def closed_loop(url: str, dialect, prompts: list[str], concurrency: int,
                      max_new_tokens: int, timeout_s: float, client: str = "wire") -> LevelResult:
    """`concurrency` workers send `prompts` (each once, in order) back to back, each on a
    connection of its own: `client` "wire" (``loadtest.wire``, the default: little CPU per token) or
    "httpx" (what rounds before the wire client measured with)."""
    check_target(url, allow_remote=False)
    if client not in CLIENTS:
        raise ValueError(f"client {client!r}: one of {', '.join(CLIENTS)}")
    records: list[RequestRecord] = []
    prompt_counts: list[int] = []
    token_ids: dict[int, list[int]] = {}
    queue = iter(enumerate(prompts))
    workers = min(concurrency, len(prompts))
    parsed = httpx.URL(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with contextlib.AsyncExitStack() as stack:
        pool = None if client == "wire" else await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, trust_env=False, limits=limits, timeout=httpx.Timeout(timeout_s)))
        conns = [wire.Connection(parsed.host, parsed.port or 80) for _ in range(workers)]
        t0, cpu0 = time.perf_counter(), time.process_time()

        async def one(conn: wire.Connection, reading: Reading, prompt: str) -> int | None:
            if client == "httpx":
                return await stream_httpx(pool, dialect, prompt, max_new_tokens, reading)
            async with asyncio.timeout(timeout_s):
                return await stream_wire(conn, dialect, prompt, max_new_tokens, reading)

        async def worker(conn: wire.Connection) -> None:
            for i, prompt in queue:
                rec = RequestRecord(index=i, kind="stream", start=time.perf_counter() - t0,
                                    prompt_chars=len(prompt))
                records.append(rec)
                token_ids[i] = []
                try:
                    n = await one(conn, Reading(dialect, rec, t0, token_ids[i]), prompt)
                except (httpx.HTTPError, wire.WireError, OSError, TimeoutError) as e:
                    rec.fail("transport_error", time.perf_counter() - t0,
                             f"{type(e).__name__}: {e}")
                    conn.close()
                    n = None
                except (ValueError, KeyError, TypeError) as e:  # an event that is not the API's
                    rec.fail("bad_response", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
                    conn.close()
                    n = None
                if n is not None:
                    prompt_counts.append(n)

        try:
            await asyncio.gather(*(worker(conn) for conn in conns))
            cpu_s = time.process_time() - cpu0  # the client's own work while its requests ran
        finally:
            for conn in conns:
                conn.close()
    run = {"url": url, "api": dialect.name, "mode": "closed", "concurrency": concurrency,
           "max_new_tokens": max_new_tokens, "client": client, "client_cpu_s": round(cpu_s, 4)}
    return LevelResult(build_report(records, len(prompts), run), prompt_counts, token_ids)


def measure(url: str, api: str, prompts: list[str], concurrency: int, max_new_tokens: int,
            timeout_s: float = 600.0, client: str = "wire") -> LevelResult:
    """Blocking: one closed-loop level (prompt token counts: llama.cpp only, TGI's stream does
    not say them)."""
    # httpx on the stdlib loop, as the rounds that used it measured
    run = wire.run if client == "wire" else asyncio.run
    return run(closed_loop(url, DIALECTS[api](), prompts, concurrency, max_new_tokens,
                           timeout_s, client))
