"""Per-request next-token choice from a batch of logits: greedy or sampled.

Order for a row (vLLM's): a structured-output row's grammar mask (only the tokens its grammar
allows next keep their logits) -> logit bias -> the ids that would end generation masked while fewer
than `min_tokens` are generated -> repetition penalty (HF's rule, over prompt and generated
tokens) -> presence and frequency penalties (OpenAI's, over the generated tokens) -> TGI's
frequency penalty (over prompt and generated tokens, counts divided by their length); then a
greedy row (do_sample=False) takes the argmax, and a sampled one goes on: temperature -> min-p
-> top-k -> top-p -> typical-p (TGI's warper order) -> multinomial draw with the request's own
`torch.Generator`, so a seeded request gives the same tokens whatever else shares its batch.

The reported logprob is log p(token) under the model's raw distribution (before any of the
processing above), like vLLM's default: it measures the model, not the sampler settings.
Knows nothing about tokenizers, stop strings or the model.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from camex_runtime.engine.request import SamplingParams


def argmax_rows(logits: torch.Tensor) -> list[int] | int:
    """`torch.argmax(logits, dim=-1).tolist()`: per row the index of the first maximum, a NaN
    counting as the maximum (as torch's). CPU fp32 logits go through numpy's argmax, which is
    vectorised and agrees with torch's on ties, NaN and infinities: GPT-2's 50,257 logits took
    60 us per row in torch's and 4.7 in numpy's on one Zen 5 core (8 rows: 461 -> 30 us).
    With the chosen logprobs read through numpy too (sample_batch), a GPT-2-small decode step's
    sampling and output work at 8 rows went from 1.29-1.45 to 0.89-0.97 ms on one core."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(axis=-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


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


def apply_penalties(logits: torch.Tensor, generated: Sequence[int], presence: float,
                    frequency: float) -> torch.Tensor:
    """OpenAI's rule on one row (V,): each token generated c > 0 times loses
    `presence + frequency * c` from its logit."""
    if not generated or (presence == 0.0 and frequency == 0.0):
        return logits
    counts = Counter(generated)  # on the host: `unique` on a GPU tensor would wait for it
    ids = torch.tensor(list(counts), device=logits.device)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, -(presence + frequency * c))


def apply_sequence_frequency(logits: torch.Tensor, history: Sequence[int],
                             penalty: float) -> torch.Tensor:
    """TGI's rule on one row (V,): each token of the sequence so far (prompt and generated)
    loses `penalty * count / len(history)` from its logit."""
    if not history or penalty == 0.0:
        return logits
    counts = Counter(history)
    ids = torch.tensor(list(counts), device=logits.device)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, c * (-penalty / len(history)))


def adjust_row(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
               generated: Sequence[int], suppress: Sequence[int],
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One row's (V,) logits as the choice sees them: the tokens outside `allowed` (V,) bool
    at -inf, logit bias, `suppress`ed ids at -inf, repetition penalty, presence and frequency
    penalties, TGI's frequency penalty (a new tensor where any applies)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(params.logit_bias.values()),
                                                       dtype=logits.dtype, device=logits.device))
    if suppress:
        logits = logits.index_fill(0, torch.tensor(list(suppress), device=logits.device),
                                   float("-inf"))
    if params.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    logits = apply_penalties(logits, generated, params.presence_penalty,
                             params.frequency_penalty)
    return apply_sequence_frequency(logits, history, params.sequence_frequency_penalty)


def adjusts(params: SamplingParams, suppress: Sequence[int],
            allowed: torch.Tensor | None = None) -> bool:
    """Whether `adjust_row` changes anything for a row."""
    return bool(allowed is not None or params.logit_bias or suppress
                or params.repetition_penalty is not None or params.presence_penalty
                or params.frequency_penalty or params.sequence_frequency_penalty)


def filter_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Mask (V,) logits whose probability is below `min_p` times the likeliest token's."""
    if not min_p:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


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


def filter_typical(logits: torch.Tensor, typical_p: float | None) -> torch.Tensor:
    """Typical decoding on (V,) logits (HF's TypicalLogitsWarper, as TGI applies it): order the
    tokens by how far their -log p lies from the distribution's entropy, keep them in that
    order while the mass before them is below `typical_p` (the first always stays), mask the
    rest."""
    if typical_p is None or typical_p >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum()
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted)
    cum = logits[order].softmax(-1).cumsum(-1)
    last = (cum < typical_p).sum().clamp(max=logits.shape[-1] - 1)  # on the device: no sync
    return logits.masked_fill(shifted > sorted_shift[last], float("-inf"))


def sample_row(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
               generator: torch.Generator | None, generated: Sequence[int] = (),
               suppress: Sequence[int] = (), allowed: torch.Tensor | None = None) -> int:
    """Choose the next token for one row of fp32 logits (V,): `history` is every token id so
    far, `generated` the request's own, `suppress` ids it must not choose now, `allowed` (V,)
    bool the only ids it may choose (structured output; None: any)."""
    logits = adjust_row(logits, params, history, generated, suppress, allowed)
    if not params.do_sample:
        return int(argmax_rows(logits))
    logits = filter_min_p(logits / params.temperature, params.min_p)
    logits = filter_top_k_top_p(logits, params.top_k, params.top_p)
    logits = filter_typical(logits, params.typical_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 histories: Sequence[Sequence[int]],
                 generators: Sequence[torch.Generator | None],
                 generated: Sequence[Sequence[int]] | None = None,
                 suppress: Sequence[Sequence[int]] | None = None,
                 allowed: Sequence[torch.Tensor | None] | None = None
                 ) -> tuple[list[int], list[float], list[tuple[tuple[int, float], ...]]]:
    """logits (B, V) any dtype -> (token ids, raw-model logprobs, top alternatives), one per row.
    Per row: `histories` every token id so far, `generated` the request's own (default none),
    `suppress` ids it must not choose now (default none), `allowed` (V,) bool the only ids it
    may choose (default: any).

    Plain greedy rows (nothing to adjust) share one argmax; the others go row by row. A row's
    alternatives are its `params.logprobs` most likely tokens as (id, logprob), best first."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    tokens = argmax_rows(logits)  # greedy default for every row
    for b, p in enumerate(params):
        gen = generated[b] if generated is not None else ()
        sup = suppress[b] if suppress is not None else ()
        ok = allowed[b] if allowed is not None else None
        if p.do_sample or adjusts(p, sup, ok):
            tokens[b] = sample_row(logits[b], p, histories[b], generators[b], gen, sup, ok)
    if logprobs.device.type == "cpu":  # read in place: no torch call (see argmax_rows)
        lp = logprobs.detach().numpy()
        chosen = [float(lp[b, t]) for b, t in enumerate(tokens)]
    else:
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
