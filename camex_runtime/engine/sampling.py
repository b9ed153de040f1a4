"""Per-request next-token choice from a batch of logits: greedy or sampled, with HF semantics.

Order for a sampled row (as in `transformers` `generate`): repetition penalty -> temperature
-> top-k -> top-p -> multinomial draw with the request's own `torch.Generator`, so a seeded
request gives the same tokens whatever else shares its batch. Greedy rows (do_sample=False)
take the argmax after the repetition penalty only.

The reported logprob is log p(token) under the model's raw distribution (before any of the
processing above), like vLLM's default: it measures the model, not the sampler settings.
Knows nothing about tokenizers, stop strings or the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from camex_runtime.engine.request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampling request (seeded when `seed` is given), None for greedy."""
    if not params.do_sample:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int],
                             penalty: float) -> torch.Tensor:
    """HF rule on one row (V,): seen tokens' logits are divided by `penalty` if > 0, else
    multiplied by it."""
    if not history or penalty == 1.0:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device, dtype=torch.long)
    seen = logits.index_select(0, ids)
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None,
                       top_p: float | None) -> torch.Tensor:
    """Mask (V,) logits outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        # ...and explicitly so: a top_p below fp32's smallest value compares as 0 >= 0.
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
               generator: torch.Generator | None) -> int:
    """Choose the next token for one row of fp32 logits (V,)."""
    if params.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if not params.do_sample:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 histories: Sequence[Sequence[int]],
                 generators: Sequence[torch.Generator | None]
                 ) -> tuple[list[int], list[float], list[tuple[tuple[int, float], ...]]]:
    """logits (B, V) any dtype -> (token ids, raw-model logprobs, top alternatives), one per row.

    Plain greedy rows (no penalty) share one argmax; the others go row by row. A row's
    alternatives are its `params.logprobs` most likely tokens as (id, logprob), best first."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy default for every row
    for b, p in enumerate(params):
        if p.do_sample or p.repetition_penalty is not None:
            tokens[b] = sample_row(logits[b], p, histories[b], generators[b])
    idx = torch.tensor(tokens, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, idx).squeeze(1).tolist()  # (B,)
    return tokens, chosen, top_alternatives(logprobs, [p.logprobs for p in params])


def top_alternatives(logprobs: torch.Tensor, counts: Sequence[int]
                     ) -> list[tuple[tuple[int, float], ...]]:
    """Row b's `counts[b]` best (id, logprob) of (B, V) logprobs; one topk for the batch."""
    k = min(max(counts, default=0), logprobs.shape[-1])
    if k == 0:
        return [()] * len(counts)
    values, ids = torch.topk(logprobs, k, dim=-1)  # (B, k) each, best first
    values, ids = values.tolist(), ids.tolist()
    return [tuple(zip(ids[b][:n], values[b][:n])) for b, n in enumerate(counts)]
