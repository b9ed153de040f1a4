"""Turns sampled tokens into what callers see: text pieces, stop checks, finish reasons.

One `OutputProcessor` per running request (created at prefill). For each new token it
updates the request's ids, logprobs and text, decides whether the request is finished
(EOS or one of its `stop_token_ids` -> "eos_token", as is a structured-output answer its grammar
allows nothing after; a stop string in the decoded text ->
"stop_sequence", max_new_tokens -> "length"; checked in that order, the first two only from
`min_tokens` new tokens on) and builds the `TokenEvent`. Knows nothing about tensors.
"""
from __future__ import annotations

from collections.abc import Iterable

from camex_runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from camex_runtime.engine.outputs import TokenEvent
from camex_runtime.engine.request import GenerationRequest


class _IdsOnly:
    """Stand-in tokenizer for engines without one: generated text stays empty."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


class OutputProcessor:
    def __init__(self, req: GenerationRequest, tokenizer, eos_token_ids: Iterable[int] = ()):
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer or _IdsOnly(),
                                            req.params.skip_special_tokens)
        self.eos = frozenset(eos_token_ids)  # every id that ends generation (Llama 3 has several)

    def process(self, token_id: int, logprob: float,
                top: tuple[tuple[int, float], ...] = (), at: float = 0.0,
                complete: bool = False) -> TokenEvent:
        """Append one token; returns its event (finish_reason set when the request ends),
        stamped `at` (the step's time.monotonic()). `complete`: the request's grammar allows
        nothing after this token (it ends, even before `min_tokens`)."""
        req, p = self.req, self.req.params
        req.append_token(token_id, logprob, top)
        piece = self.detok.push(token_id)
        finish = reason = None
        stops = len(req.output_token_ids) >= p.min_tokens
        eos = token_id in self.eos and not p.ignore_eos
        if complete or stops and (eos or token_id in p.stop_token_ids):
            finish = "eos_token"
            if not (complete or eos):  # a stop id (EOS first, as vLLM reports it)
                reason = token_id
        elif len(req.output_token_ids) >= p.max_new_tokens:
            finish = "length"
        if finish is not None:
            piece += self.detok.flush()
        text = req.text + piece
        stop = find_stop(text, len(piece), p.stop) if stops else None
        if stop is not None:
            end, reason = stop
            piece = piece[:len(piece) - (len(text) - end)]  # the text ends with the stop string
            text, finish = text[:end], "stop_sequence"
        req.text = text
        req.finish_reason, req.stop_reason = finish, reason
        return TokenEvent(token_id=token_id, text=piece, logprob=logprob,
                          index=len(req.output_token_ids) - 1, finish_reason=finish,
                          top_logprobs=top, stop_reason=reason, at=at)


def terminal_event(req: GenerationRequest, reason: str, error: str | None = None) -> TokenEvent:
    """The last event of a request that ends without a new token (cancelled, error, or
    "length" for a prompt scored with max_new_tokens=0): token_id -1, empty text."""
    req.finish_reason, req.error = reason, error
    return TokenEvent(token_id=-1, text="", logprob=0.0, index=len(req.output_token_ids),
                      finish_reason=reason, error=error)
