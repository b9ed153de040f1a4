"""Tokenizer routes: vLLM's `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, and
TGI's `POST /tokenize`, which shares the path (told apart by the body: TGI sends `inputs`).

lm-eval's remote tokenizer backend uses the vLLM routes: `/tokenizer_info` must carry
`eos_token` (and `chat_template` when there is one), `/tokenize` `{"prompt", "add_special_tokens"}`
answers `{"tokens": [...]}`, `/detokenize` `{"tokens"}` answers `{"prompt"}`. vLLM's chat form of
`/tokenize` (`messages`) renders the chat template first. Errors: OpenAI's shape, TGI's for a
TGI-style body.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Request
from pydantic import Discriminator, Tag

from server import errors
from server.chat_template import render, require_template, template_for
from server.openai_protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                    TokenizeCompletionRequest, TokenizeResponse)
from server.openai_runs import check_model, token_strings
from server.protocol import GenerateRequest, SimpleToken
from server.routes.completions import OPENAI_ERRORS

router = APIRouter(tags=["Tokenizer"])


def _form(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("inputs", "messages", "prompt"):
            if key in body:
                return key
    return "prompt"  # errors then name vLLM's `prompt`, the most common form


TokenizeBody = Annotated[Annotated[TokenizeCompletionRequest, Tag("prompt")]
                         | Annotated[TokenizeChatRequest, Tag("messages")]
                         | Annotated[GenerateRequest, Tag("inputs")],
                         Discriminator(_form)]


@router.post("/tokenize", response_model=TokenizeResponse | list[SimpleToken],
             responses=OPENAI_ERRORS)
async def tokenize(request: Request, body: TokenizeBody):
    """vLLM: `{"prompt"}` or `{"messages"}` -> `{"count", "max_model_len", "tokens"}`.
    TGI: `{"inputs"}` -> `[{"id", "text", "start", "stop"}]`."""
    state = request.app.state.serving
    engine = state.require("causal-lm")
    if isinstance(body, GenerateRequest):
        return await anyio.to_thread.run_sync(tgi_tokens, engine.tokenizer, body.inputs)
    check_model(state, body.model)
    if isinstance(body, TokenizeChatRequest):
        template = require_template(engine, state.settings)
        text = await anyio.to_thread.run_sync(
            lambda: render(engine, template, body.messages, body.add_generation_prompt,
                           body.continue_final_message, body.chat_template_kwargs, body.tools))
    else:
        text = body.prompt
    ids = await anyio.to_thread.run_sync(
        lambda: list(engine.tokenizer(text, add_special_tokens=body.add_special_tokens)
                     ["input_ids"]))
    strs = token_strings(engine.tokenizer, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.info()["max_total_tokens"],
                            tokens=ids, token_strs=strs)


def tgi_tokens(tokenizer, text: str) -> list[SimpleToken]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [SimpleToken(id=i, text=text[a:b], start=a, stop=b)
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


@router.post("/detokenize", response_model=DetokenizeResponse, responses=OPENAI_ERRORS)
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    """Token ids -> text (vLLM)."""
    state = request.app.state.serving
    engine = state.require("causal-lm")
    check_model(state, body.model)
    vocab = engine.config.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise errors.validation(f"token id {bad} is outside the vocabulary [0, {vocab})",
                                param="tokens")
    text = await anyio.to_thread.run_sync(engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info", responses=OPENAI_ERRORS)
async def tokenizer_info(request: Request) -> dict:
    """The tokenizer's configuration (tokenizer_config.json as loaded), its class, special
    tokens and the chat template in force (vLLM's shape)."""
    state = request.app.state.serving
    engine = state.require("causal-lm")
    tok = engine.tokenizer
    info = {k: _jsonable(v) for k, v in (getattr(tok, "init_kwargs", None) or {}).items()
            if k not in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")}
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        info[name] = None if value is None else str(value)
    info["tokenizer_class"] = type(tok).__name__
    info["model_max_length"] = engine.info()["max_total_tokens"]
    template = template_for(engine, state.settings)
    if template:
        info["chat_template"] = template
    return info


def _jsonable(value: Any) -> Any:
    if hasattr(value, "content"):  # AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
