"""The naive serving baseline: FastAPI + ``transformers`` ``generate``, one request at a time.

What a quick first server looks like: every request calls ``model.generate`` on its own
(batch 1, the library's KV cache), behind a lock, so concurrent requests simply queue. It speaks
the TGI subset the load tester uses — ``POST /generate`` and ``POST /generate_stream`` (SSE,
TGI event shape, so TTFT is measurable) — plus ``GET /health`` and ``GET /info``.

The model is a ``transformers.GPT2LMHeadModel``: loaded from a GPT-2 directory, or, given a
CAMEx checkpoint directory, built with the same shape (vocab, d_model, layers, heads, d_ff,
positions) and random weights — the dense equivalent of that checkpoint — with the CAMEx
tokenizer. It knows nothing of CAMEx beyond reading those config fields. Binds 127.0.0.1 only.

    python benchmarks/naive_server.py --model artifacts/serving/dense --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from collections.abc import Callable

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class Parameters(BaseModel):
    max_new_tokens: int = Field(20, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    details: bool = False
    ignore_eos: bool = False  # vLLM-benchmark style: always generate max_new_tokens


class GenerateRequest(BaseModel):
    inputs: str = Field(..., min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)


def gpt2_config_from(model_dir: Path) -> tuple[GPT2Config, bool]:
    """(config, pretrained?) — a GPT-2 directory as is, a CAMEx one as its dense equivalent."""
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") == "gpt2":
        return GPT2Config.from_dict(raw), True
    if raw.get("model_type") != "camex":
        raise SystemExit(f"{model_dir}: model_type {raw.get('model_type')!r} "
                         f"is neither gpt2 nor camex")
    return GPT2Config(vocab_size=raw["vocab_size"], n_positions=raw["max_position_embeddings"],
                      n_embd=raw["d_model"], n_layer=raw["n_layer"], n_head=raw["n_head"],
                      n_inner=raw["d_ff"], activation_function="gelu",
                      eos_token_id=raw.get("eos_token_id"),
                      bos_token_id=raw.get("bos_token_id")), False


class TokenStreamer(BaseStreamer):
    """Calls ``on_token(id)`` for each generated token (``generate`` first puts the prompt)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():  # batch 1: one id per step
            self.on_token(int(token_id))

    def end(self) -> None:
        pass


class StopWhen(StoppingCriteria):
    """Stops ``generate`` once ``event`` is set (the streaming client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class NaiveGenerator:
    """One ``generate`` call at a time (a lock): the whole batching policy of this baseline."""

    def __init__(self, model: GPT2LMHeadModel, tokenizer, max_total_tokens: int):
        self.model, self.tokenizer, self.max_total = model, tokenizer, max_total_tokens
        self.lock = threading.Lock()

    def check(self, prompt: str, p: Parameters) -> torch.Tensor:
        """The prompt's ids (1, L); ValueError when prompt + new tokens exceed the positions."""
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids  # (1, L)
        if ids.shape[1] + p.max_new_tokens > self.max_total:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + "
                             f"max_new_tokens ({p.max_new_tokens}) exceeds {self.max_total}")
        return ids

    def __call__(self, prompt: str, p: Parameters, on_token: Callable[[int], None] = lambda t: None,
                 cancel: threading.Event | None = None) -> tuple[list[int], str, int]:
        """Blocking: (new token ids, finish reason, prompt tokens). ValueError when too long."""
        ids = self.check(prompt, p)  # (1, L)
        kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample,
                      pad_token_id=self.tokenizer.eos_token_id,
                      min_new_tokens=p.max_new_tokens if p.ignore_eos else None,
                      streamer=TokenStreamer(on_token),
                      stopping_criteria=[StopWhen(cancel or threading.Event())])
        if p.do_sample:
            kwargs.update(temperature=p.temperature or 1.0, top_k=p.top_k, top_p=p.top_p)
        with self.lock, torch.inference_mode():
            if p.seed is not None:
                torch.manual_seed(p.seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      **kwargs)  # (1, L+n)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        reason = "eos_token" if new and new[-1] == eos and len(new) < p.max_new_tokens else "length"
        return new, reason, ids.shape[1]


def token_json(tokenizer, token_id: int) -> dict:
    return {"id": token_id, "text": tokenizer.decode([token_id]), "logprob": None,
            "special": token_id in tokenizer.all_special_ids}


def create_app(gen: NaiveGenerator, model_id: str) -> FastAPI:
    app = FastAPI(title="naive transformers baseline")
    tok = gen.tokenizer

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        return {"model_id": model_id, "server": "naive-transformers", "max_batch_size": 1,
                "torch_threads": torch.get_num_threads()}

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> dict:
        try:
            new, reason, _ = await asyncio.to_thread(gen, body.inputs, body.parameters)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        out = {"generated_text": tok.decode(new)}
        if body.parameters.details:
            out["details"] = {"finish_reason": reason, "generated_tokens": len(new),
                              "seed": body.parameters.seed, "prefill": [],
                              "tokens": [token_json(tok, t) for t in new]}
        return out

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        try:  # refuse before the stream starts, so the client gets a status code
            gen.check(body.inputs, body.parameters)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return StreamingResponse(sse_events(gen, body), media_type="text/event-stream")

    return app


async def sse_events(gen: NaiveGenerator, body: GenerateRequest):
    """TGI SSE: one event per token; the last carries generated_text and details."""
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    on_token = lambda t: loop.call_soon_threadsafe(queue.put_nowait, t)  # noqa: E731
    job = asyncio.ensure_future(asyncio.to_thread(gen, body.inputs, body.parameters, on_token,
                                                  cancel))
    tok, sent, pending = gen.tokenizer, [], None
    try:
        while not (job.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            if pending is not None:  # hold one token back: the last one carries the details
                yield event(tok, len(sent) - 1, pending)
            pending = getter.result()
            sent.append(pending)
        try:
            _, reason, prompt_len = job.result()
        except ValueError as e:
            yield f"data: {json.dumps({'error': str(e), 'error_type': 'validation'})}\n\n"
            return
        final = {"generated_text": tok.decode(sent), "details": {
            "finish_reason": reason, "generated_tokens": len(sent), "seed": body.parameters.seed,
            "input_length": prompt_len}}
        if pending is not None:
            yield event(tok, len(sent) - 1, pending, **final)
    finally:
        cancel.set()  # client gone (or done): stop generate at its next step


def event(tok, index: int, token_id: int, generated_text=None, details=None) -> str:
    payload = {"index": index, "token": token_json(tok, token_id), "top_tokens": None,
               "generated_text": generated_text, "details": details}
    return f"data: {json.dumps(payload)}\n\n"


def load(model_dir: Path, seed: int) -> NaiveGenerator:
    cfg, pretrained = gpt2_config_from(model_dir)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(model_dir) if pretrained else GPT2LMHeadModel(cfg)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return NaiveGenerator(model.float().eval(), tokenizer, cfg.n_positions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="GPT-2 dir, or CAMEx checkpoint dir (dense twin)")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="random init of a dense twin")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    gen = load(Path(args.model), args.seed)
    with torch.inference_mode():  # warm up before serving
        gen("warm up", Parameters(max_new_tokens=2))
    print(f"naive server: {args.model} loaded in {time.perf_counter() - t0:.1f} s, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    uvicorn.run(create_app(gen, str(args.model)), host="127.0.0.1", port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
