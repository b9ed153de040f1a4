"""OpenAI's, vLLM's and TGI's sampling controls beyond HF's: logit bias, presence and
frequency penalties (OpenAI's and TGI's), min-p, typical-p, min_tokens and stop_token_ids. Each
changes exactly the logits or the finish it names, row by row, so a row's tokens do not depend
on what shares its batch."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import SamplingParams
from camex_runtime.engine.sampling import (adjust_row, apply_penalties,
                                           apply_sequence_frequency, filter_min_p,
                                           filter_top_k_top_p, filter_typical, sample_batch)
from camex_runtime.errors import InputValidationError


def test_penalties_subtract_presence_once_and_frequency_per_occurrence():
    logits = torch.randn(9, generator=torch.Generator().manual_seed(0))
    out = apply_penalties(logits, [4, 1, 4, 4, 7], presence=0.5, frequency=0.25)
    want = logits.clone()
    for token, count in ((4, 3), (1, 1), (7, 1)):
        want[token] -= 0.5 + 0.25 * count
    torch.testing.assert_close(out, want)
    assert apply_penalties(logits, [], 0.5, 0.25) is logits  # nothing generated yet


def test_tgi_frequency_penalty_counts_the_whole_sequence_per_its_length():
    logits = torch.randn(9, generator=torch.Generator().manual_seed(0))
    history = [4, 1, 4, 4, 7, 2, 2, 0]  # prompt and generated alike
    out = apply_sequence_frequency(logits, history, 0.8)
    want = logits.clone()
    for token, count in ((4, 3), (1, 1), (7, 1), (2, 2), (0, 1)):
        want[token] -= 0.8 * count / len(history)
    torch.testing.assert_close(out, want)
    assert apply_sequence_frequency(logits, history, 0.0) is logits
    p = SamplingParams(sequence_frequency_penalty=0.8)
    torch.testing.assert_close(adjust_row(logits, p, history, generated=[], suppress=[]), want)


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.999])
def test_typical_p_keeps_what_transformers_typical_warper_keeps(mass):
    """The reference is transformers' own TypicalLogitsWarper (TGI's is the same rule)."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    warper = TypicalLogitsWarper(mass)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(50, generator=g) * (1 + seed)
        if seed % 2:  # after top-k: masked tokens stay masked, the rest as the reference
            logits = filter_top_k_top_p(logits, 20, None)
        want = warper(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
        got = filter_typical(logits, mass)
        assert torch.isfinite(got).tolist() == torch.isfinite(want).tolist()
        kept = int(torch.isfinite(got).sum())
        assert kept >= 1 and (kept < 50 or mass > 0.9)  # some go, the first always stays
    assert filter_typical(logits, None) is logits and filter_typical(logits, 1.0) is logits


def test_adjustments_apply_in_order_and_only_to_the_ids_named():
    logits = torch.tensor([1.0, -2.0, 3.0, 0.5, 2.5])
    p = SamplingParams(logit_bias={0: 2.0, 3: -1.0}, repetition_penalty=2.0,
                       presence_penalty=1.0)
    out = adjust_row(logits, p, history=[1, 0], generated=[0], suppress=[4])
    # bias, then 4 masked, then HF repetition over the history (0: 3.0 / 2, 1: -2.0 * 2), then
    # the presence penalty over the generated token 0
    assert out.tolist() == [0.5, -4.0, 3.0, -0.5, float("-inf")]
    assert logits.tolist() == [1.0, -2.0, 3.0, 0.5, 2.5]  # the batch's logits untouched


def test_min_p_keeps_tokens_at_least_min_p_of_the_likeliest():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_min_p(logits, 0.3)).tolist() == [True, True, True, False]
    assert torch.isfinite(filter_min_p(logits, 0.61)).tolist() == [True, False, False, False]
    assert filter_min_p(logits, None) is logits and filter_min_p(logits, 0.0) is logits


def test_biased_and_penalised_rows_choose_alone_what_they_choose_in_a_batch():
    """Greedy rows with a bias or penalties take the adjusted argmax; a plain greedy row next
    to them keeps its own; the reported logprobs stay the raw model's."""
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    best = logits.argmax(-1).tolist()
    ps = [SamplingParams(logit_bias={5: 100.0}), SamplingParams(),
          SamplingParams(frequency_penalty=2.0, logit_bias={best[2]: -100.0})]
    args = ([[1], [2], [3]], [None] * 3, [[], [], [best[2]]], [(), (), ()])
    toks, lps, _ = sample_batch(logits, ps, *args)
    assert toks[0] == 5 and toks[1] == best[1] and toks[2] != best[2]
    want = logits.clone()
    want[2, best[2]] -= 100.0 + 2.0
    assert toks[2] == int(want[2].argmax())
    raw = torch.log_softmax(logits, -1)
    assert lps == pytest.approx([float(raw[b, t]) for b, t in enumerate(toks)])
    for b in range(3):  # alone: the same choice
        alone = sample_batch(logits[b:b + 1], [ps[b]], *[[a[b]] for a in args])[0]
        assert alone == [toks[b]]


def test_sampling_never_draws_what_min_p_typical_p_or_suppress_removed():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.2, 0.05]] * 3))
    ps = [SamplingParams(do_sample=True, min_p=0.3, seed=1), SamplingParams(do_sample=True),
          SamplingParams(do_sample=True, typical_p=0.5)]
    drawn = [set(), set(), set()]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    for _ in range(300):
        toks, _, _ = sample_batch(logits, ps, [[], [], []], gens, [[], [], []],
                                  [(), (0, 1), ()])
        for b, t in enumerate(toks):
            drawn[b].add(t)
    assert drawn[0] == {0, 1, 2}  # 0.05 < 0.3 x 0.4
    assert drawn[1] == {2, 3}  # suppressed: never, however likely
    # entropy 1.20 nats: -log p = 0.92, 1.05, 1.61, 3.00 -> typical order 1, 0, 2, 3; 0.35
    # alone is below 0.5, so 1 and 0 stay
    assert drawn[2] == {0, 1}


PROMPT = "the lazy dog"


def test_stop_token_ids_end_generation_as_eos_does(engine):
    base = engine.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    stop = base[4]
    first = base.index(stop)
    res = engine.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    assert res.finish_reason == "eos_token" and res.token_ids == base[:first + 1]


def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings(engine):
    """The model's EOS (here its first greedy token, made EOS), a stop id and a stop string
    that would end the request early are not chosen or not honoured before min_tokens."""
    base = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    saved = engine.eos_token_ids
    engine.eos_token_ids = {base.token_ids[0]}
    try:
        assert engine.generate(PROMPT, max_new_tokens=12).token_ids == base.token_ids[:1]
        res = engine.generate(PROMPT, max_new_tokens=12, min_tokens=6)
        assert len(res.token_ids) >= 6 and base.token_ids[0] not in res.token_ids[:6]
        for t in res.token_ids[6:-1]:
            assert t != base.token_ids[0]  # from 6 on EOS would have ended it
    finally:
        engine.eos_token_ids = saved
    stop_id = base.token_ids[1]
    res = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, min_tokens=4,
                          stop_token_ids=[stop_id])
    assert stop_id not in res.token_ids[:4]
    assert res.finish_reason == "length" or res.token_ids[-1] == stop_id
    text = base.text
    stop = text[:2]  # in the text from the first token on
    res = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, stop=[stop], min_tokens=3)
    assert len(res.token_ids) >= 3  # (after 3, a new piece holding the stop string ends it)
    early = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert early.finish_reason == "stop_sequence" and len(early.token_ids) < 3


@pytest.mark.parametrize("penalties", [dict(presence_penalty=1.5, frequency_penalty=0.5),
                                       dict(sequence_frequency_penalty=2.0)],
                         ids=["openai", "tgi"])
def test_penalised_requests_answer_alike_alone_and_batched(engine, penalties):
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True, **penalties)
    alone = engine.generate(PROMPT, **vars(sp)).token_ids
    plain = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids
    handles = [engine.submit(PROMPT, sp), engine.submit("hello world", SamplingParams(
        max_new_tokens=12, ignore_eos=True, logit_bias={7: 5.0}))]
    assert handles[0].result().token_ids == alone
    assert handles[1].result().token_ids  # (its own bias, beside)
    # the penalties matter here: the plain greedy answer repeats a token they would avoid
    assert alone != plain and len(set(plain)) < len(plain)


def test_seeded_typical_sampling_answers_alike_alone_and_batched(engine):
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True, do_sample=True, typical_p=0.3,
                        seed=11)
    alone = engine.generate(PROMPT, **vars(sp)).token_ids
    handles = [engine.submit("hello world", SamplingParams(max_new_tokens=10, do_sample=True)),
               engine.submit(PROMPT, sp)]
    assert handles[1].result().token_ids == alone
    wide = engine.generate(PROMPT, **{**vars(sp), "typical_p": None}).token_ids
    assert wide != alone  # the same seed draws otherwise from the whole distribution


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    V = engine.config.vocab_size
    for kw in (dict(logit_bias={V: 1.0}), dict(stop_token_ids=[1, V + 3])):
        with pytest.raises(InputValidationError, match="outside the vocabulary"):
            engine.submit(PROMPT, SamplingParams(**kw))


@pytest.mark.parametrize("kw,msg", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys"),
    (dict(logit_bias={1: 101}), "logit_bias values"),
    (dict(logit_bias={True: 1.0}), "logit_bias keys"),
    (dict(logit_bias=[1, 2]), "logit_bias must map"),
    (dict(min_p=1.5), "min_p"), (dict(min_tokens=-1), "min_tokens"),
    (dict(typical_p=0.0), "typical_p"), (dict(typical_p=1.5), "typical_p"),
    (dict(sequence_frequency_penalty=-2.5), "sequence_frequency_penalty"),
    (dict(min_tokens=5, max_new_tokens=4), "must not exceed"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids"),
    (dict(stop_token_ids="ab"), "stop_token_ids")])
def test_bad_controls_are_refused(kw, msg):
    with pytest.raises(InputValidationError, match=msg):
        SamplingParams(**kw).validate()
