"""One closed-loop streaming client for two server APIs, measuring both the same way.

The camex server speaks TGI (``POST /generate_stream``, one SSE event per token, then a final
event with ``generated_text``); llama.cpp's ``llama-server`` speaks its own ``POST /completion``
(``"stream": true``: one SSE event per decodable piece carrying ``tokens_predicted``, the last
with ``"stop": true``). A `Dialect` turns a prompt into each API's greedy, EOS-ignoring,
fixed-length request and reads each event as "k new tokens" / "done". Everything else — the
closed loop, the timestamps, and the statistics (``loadtest.records.RequestRecord`` and
``loadtest.report.build_report``: TTFT, ITL, TPOT, tokens/s) — is shared, so a difference
between the two servers cannot come from the client.

Talks only HTTP, to 127.0.0.1 only; never imports the server or the runtime.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
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


DIALECTS = {"tgi": TgiDialect, "llama.cpp": LlamaCppDialect}


async def stream_one(client: httpx.AsyncClient, dialect, prompt: str, max_new_tokens: int,
                     rec: RequestRecord, t0: float, ids: list[int]) -> int | None:
    """Send one request, fill `rec` and `ids` (generated token ids); returns the server's
    prompt token count if it said."""
    now = lambda: time.perf_counter() - t0  # noqa: E731
    produced, prompt_tokens = 0, None
    async with client.stream("POST", dialect.path,
                             json=dialect.body(prompt, max_new_tokens)) as resp:
        rec.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            rec.fail(str(resp.status_code), now(), resp.text[:300])
            return None
        async for line in resp.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            ev = dialect.read(json.loads(data), produced)
            if ev.error:
                rec.fail("stream_error", now(), ev.error)
                return prompt_tokens
            t = now()
            rec.token_times.extend([t] * ev.new_tokens)  # several tokens in one piece: same time
            produced += ev.new_tokens
            ids.extend(ev.token_ids)
            prompt_tokens = ev.prompt_tokens if ev.prompt_tokens is not None else prompt_tokens
            if ev.done:
                rec.ok, rec.end, rec.finish_reason = True, t, ev.finish_reason
                break
    rec.output_tokens = produced
    if not rec.ok:
        rec.fail("bad_response", now(), "stream ended without a final event")
    return prompt_tokens


async def closed_loop(url: str, dialect, prompts: list[str], concurrency: int,
                      max_new_tokens: int, timeout_s: float) -> LevelResult:
    """`concurrency` workers send `prompts` (each once, in order) back to back."""
    check_target(url, allow_remote=False)
    records: list[RequestRecord] = []
    prompt_counts: list[int] = []
    token_ids: dict[int, list[int]] = {}
    queue = iter(enumerate(prompts))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, trust_env=False, limits=limits,
                                 timeout=httpx.Timeout(timeout_s)) as client:
        t0, cpu0 = time.perf_counter(), time.process_time()

        async def worker() -> None:
            for i, prompt in queue:
                rec = RequestRecord(index=i, kind="stream", start=time.perf_counter() - t0,
                                    prompt_chars=len(prompt))
                records.append(rec)
                token_ids[i] = []
                try:
                    n = await stream_one(client, dialect, prompt, max_new_tokens, rec, t0,
                                         token_ids[i])
                except httpx.HTTPError as e:
                    rec.fail("transport_error", time.perf_counter() - t0,
                             f"{type(e).__name__}: {e}")
                    n = None
                except (ValueError, KeyError, TypeError) as e:  # an event that is not the API's
                    rec.fail("bad_response", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
                    n = None
                if n is not None:
                    prompt_counts.append(n)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        cpu_s = time.process_time() - cpu0  # the client's own work while its requests ran
    run = {"url": url, "api": dialect.name, "mode": "closed", "concurrency": concurrency,
           "max_new_tokens": max_new_tokens, "client_cpu_s": round(cpu_s, 4)}
    return LevelResult(build_report(records, len(prompts), run), prompt_counts, token_ids)


def measure(url: str, api: str, prompts: list[str], concurrency: int, max_new_tokens: int,
            timeout_s: float = 600.0) -> LevelResult:
    """Blocking: one closed-loop level (prompt token counts: llama.cpp only, TGI's stream does
    not say them)."""
    return asyncio.run(closed_loop(url, DIALECTS[api](), prompts, concurrency, max_new_tokens,
                                   timeout_s))
