"""Sampling, stop sequences, EOS and incremental detokenization."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import SamplingParams
from camex_runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from camex_runtime.engine.sampling import (apply_repetition_penalty, argmax_rows,
                                           filter_top_k_top_p, sample_batch)
from camex_runtime.errors import InputValidationError


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (torch.isfinite(filter_top_k_top_p(logits, 2, None)).tolist()
            == [True, True, False, False])
    # mass before token 3 is 0.95 >= 0.9: drop it; token 2 (mass before 0.8) stays
    assert (torch.isfinite(filter_top_k_top_p(logits, None, 0.9)).tolist()
            == [True, True, True, False])
    assert (torch.isfinite(filter_top_k_top_p(logits, None, 0.1)).tolist()
            == [True, False, False, False])


def test_repetition_penalty_hf_rule():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_greedy_and_top_k1_agree_and_logprobs_are_raw():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    ps = [SamplingParams(), SamplingParams(do_sample=True, top_k=1, seed=1),
          SamplingParams(do_sample=True, top_k=1, temperature=0.1, seed=2)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    toks, lps, tops = sample_batch(logits, ps, [[], [], []], gens)
    assert toks == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lps), want)
    assert tops == [(), (), ()]  # none asked for


def test_the_greedy_argmax_is_torchs_on_ties_nan_and_infinities():
    """argmax_rows takes CPU fp32 rows through numpy: it must pick what torch.argmax picks —
    the first of tied maxima, the first NaN, the first +inf — for rows, one row and views."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 50257, generator=g)
    x[1, [17, 40_000]] = 50.0  # a tie: the first wins
    x[2, [5, 9]] = float("nan")  # NaN counts as the maximum: the first NaN
    x[2, 3] = float("inf")
    x[3] = float("-inf")  # nothing finite: index 0
    x[4, [70, 8]] = float("inf")
    x[5] = 0.0  # all equal
    x[6, -1] = 1e30  # the last element
    for t in (x, x[:1], x[2], x[:, ::2], x.T.contiguous().T, x.to(torch.bfloat16)):
        assert argmax_rows(t) == torch.argmax(t, dim=-1).tolist()
    assert argmax_rows(x)[:7] == [int(torch.argmax(x[0])), 17, 5, 0, 8, 0, 50256]


def test_top_alternatives_per_row_are_the_raw_best_first():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    ps = [SamplingParams(logprobs=3), SamplingParams(),
          SamplingParams(do_sample=True, temperature=0.2, top_k=2, logprobs=5, seed=3)]
    gens = [None, None, torch.Generator().manual_seed(3)]
    _, _, tops = sample_batch(logits, ps, [[], [], []], gens)
    raw = torch.log_softmax(logits, -1)
    assert [len(t) for t in tops] == [3, 0, 5]
    for b in (0, 2):  # raw distribution, whatever temperature / top-k the sampler used
        order = raw[b].argsort(descending=True).tolist()
        assert [i for i, _ in tops[b]] == order[:len(tops[b])]
        assert [v for _, v in tops[b]] == pytest.approx(raw[b, order[:len(tops[b])]].tolist())


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = engine.generate("the quick brown fox", seed=123, **kw)
    b = engine.generate("the quick brown fox", seed=123, **kw)
    c = engine.generate("the quick brown fox", seed=124, **kw)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids
    # the same seed in a batch with other traffic draws the same tokens
    hs = [engine.submit("the quick brown fox", SamplingParams(seed=123, **kw))] + [
        engine.submit("hello world", SamplingParams(seed=s, **kw)) for s in range(3)]
    assert hs[0].result().token_ids == a.token_ids


def test_stop_sequence_and_length(engine):
    base = engine.generate("hello world", max_new_tokens=24, ignore_eos=True)
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    text = base.text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2)
                if text[i:i + 2].isprintable() and text[i:i + 2] not in text[:i + 1])
    cut = text.index(stop) + len(stop)
    res = engine.generate("hello world", max_new_tokens=24, ignore_eos=True, stop=[stop, "\x00"])
    assert res.finish_reason == "stop_sequence"
    assert res.text == text[:cut] and res.text.endswith(stop)
    assert res.token_ids == base.token_ids[:len(res.token_ids)]


def test_stop_reason_names_the_stop_string_or_id_that_ended_it(engine):
    """vLLM's stop_reason: the stop string, or the stop_token_ids id; None for EOS, a length."""
    base = engine.generate("hello world", max_new_tokens=12, ignore_eos=True)
    assert base.stop_reason is None
    text = base.text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2)
                if text[i:i + 2].isprintable() and text[i:i + 2] not in text[:i + 1])
    res = engine.generate("hello world", max_new_tokens=12, ignore_eos=True,
                          stop=["\x00", stop])
    assert (res.finish_reason, res.stop_reason) == ("stop_sequence", stop)
    tid = base.token_ids[4]
    h = engine.submit("hello world", SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                    stop_token_ids=[tid]))
    events = list(h)
    assert (h.result().finish_reason, h.result().stop_reason) == ("eos_token", tid)
    assert events[-1].stop_reason == tid and all(e.stop_reason is None for e in events[:-1])
    eos = engine.eos_token_id
    forced = engine.generate("hello world", max_new_tokens=4, allowed_token_ids=[eos],
                             stop_token_ids=[eos])
    assert (forced.finish_reason, forced.stop_reason) == ("eos_token", None)  # EOS comes first


def test_allowed_token_ids_keep_generation_inside_them(engine):
    """Only the listed ids are generated (EOS only if listed), each the likeliest of them;
    a row without the list in the same batch gets what it gets alone."""
    free = engine.generate("the lazy dog", max_new_tokens=6, ignore_eos=True, logprobs=20)
    first, alts = free.token_ids[0], [t for t, _ in free.top_logprobs[0]]
    allowed = [t for t in alts[3:9] if t != engine.eos_token_id]
    kw = dict(max_new_tokens=6, ignore_eos=True)
    h = engine.submit("the lazy dog", SamplingParams(allowed_token_ids=allowed, **kw))
    other = engine.submit("the lazy dog", SamplingParams(**kw))
    res = h.result()
    assert set(res.token_ids) <= set(allowed) and res.token_ids[0] != first
    assert res.token_ids[0] == next(t for t in alts if t in allowed)  # the best allowed
    assert other.result().token_ids == free.token_ids
    sampled = engine.generate("the lazy dog", do_sample=True, temperature=1.5, seed=3,
                              allowed_token_ids=allowed[:2], **kw)
    assert set(sampled.token_ids) <= set(allowed[:2])
    with pytest.raises(InputValidationError, match="allowed_token_ids names token ids outside"):
        engine.submit("x", SamplingParams(allowed_token_ids=[engine.config.vocab_size]))
    with pytest.raises(InputValidationError, match="nothing could be chosen"):
        engine.submit("x", SamplingParams(allowed_token_ids=[engine.eos_token_id], min_tokens=1))


def test_bad_words_are_not_generated(engine):
    """A token of the free answer that spells a word by itself, as a bad word: it is never
    chosen, the answer turns there; no spelling of the word (alone or after a space, as its
    tokens) appears."""
    free = engine.generate("the lazy dog", max_new_tokens=16, ignore_eos=True)
    at, word = next((i, w) for i, t in enumerate(free.token_ids) if i > 0
                    for w in [engine.tokenizer.decode([t]).strip()]
                    if w and (t,) in engine._bad_word_ids([w]))
    spellings = engine._bad_word_ids([word])
    res = engine.generate("the lazy dog", max_new_tokens=16, ignore_eos=True, bad_words=[word])
    assert res.token_ids[:at] == free.token_ids[:at] and res.token_ids[at] != free.token_ids[at]
    for ids in spellings:
        assert not any(tuple(res.token_ids[i:i + len(ids)]) == ids
                       for i in range(len(res.token_ids)))


def test_a_bad_word_of_several_tokens_bans_its_last_after_the_others(engine):
    from camex_runtime.engine.request import GenerationRequest, RequestTimings

    req = GenerationRequest("r", [1], SamplingParams(), "segment", None,
                            RequestTimings(queued_at=0.0), bad_word_ids=((5,), (7, 8)))
    assert engine._suppressed(req) == (5,)
    req.output_token_ids.extend([3, 7])
    assert engine._suppressed(req) == (5, 8)
    req.output_token_ids.append(8)  # (chosen anyway, e.g. forced): the rule looks back only
    assert engine._suppressed(req) == (5,)


def test_special_tokens_are_skipped_in_text_unless_asked(engine):
    eos = engine.eos_token_id
    kw = dict(max_new_tokens=3, allowed_token_ids=[eos])
    assert engine.generate("hello", **kw).text == ""
    shown = engine.generate("hello", skip_special_tokens=False, **kw)
    assert shown.token_ids == [eos] and shown.text == engine.tokenizer.decode([eos]) != ""


def test_eos_ends_generation(engine):
    base = engine.generate("the lazy dog", max_new_tokens=8, ignore_eos=True)
    eos = base.token_ids[3]
    first = base.token_ids.index(eos)
    saved = engine.eos_token_id
    engine.eos_token_id = eos  # pretend this token is EOS for the model
    try:
        res = engine.generate("the lazy dog", max_new_tokens=8)
        assert res.finish_reason == "eos_token" and res.token_ids == base.token_ids[:first + 1]
        assert engine.generate("the lazy dog", max_new_tokens=8, ignore_eos=True).token_ids \
            == base.token_ids
    finally:
        engine.eos_token_id = saved


def test_streamed_pieces_concatenate_to_text(engine):
    h = engine.submit("curvature aware", SamplingParams(max_new_tokens=20, ignore_eos=True))
    events = list(h)
    assert "".join(e.text for e in events) == h.result().text
    assert [e.index for e in events] == list(range(20))
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None
                                                        for e in events[:-1])


def test_incremental_detokenizer_handles_multibyte(tiny_lm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    text = "héllo wörld ✓ 日本 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some byte-level tokens alone are incomplete characters


def test_find_stop_only_in_new_text():
    assert find_stop("abcSTOPx", 1, ["STOP"]) is None  # completed by an earlier piece
    assert find_stop("abcSTO", 1, ["STOP"]) is None
    assert find_stop("abcSTOP", 1, ["STOP", "cS"]) == (7, "STOP")
    assert find_stop("abcSTOPzz", 6, ["zz", "STOP"]) == (7, "STOP")  # earliest end wins


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition"),
    (dict(seed=-1), "seed"), (dict(stop="x"), "stop"), (dict(routing="nope"), "routing"),
    (dict(queue_timeout_s=0), "queue_timeout_s"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(bad_words="word"), "bad_words"), (dict(bad_words=[" "]), "bad_words"),
    (dict(bad_words=["w"] * 257), "at most 256 bad_words")])
def test_bad_params_are_rejected(kw, msg):
    with pytest.raises(InputValidationError, match=msg):
        SamplingParams(**kw).validate()


def test_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5])
    out = filter_top_k_top_p(logits, None, 5e-324)  # 0 in fp32: must still keep one token
    assert torch.isfinite(out).tolist() == [False, True, False, False]


def test_a_failing_request_does_not_fail_its_batch(engine, monkeypatch):
    """Sampling of one request raises (fault injected for seed 666): that request ends with
    an error, the others in the same batch finish normally with the tokens they get alone."""
    import camex_runtime.engine.engine as engine_mod

    real = engine_mod.sample_batch

    def flaky(logits, params, *rest):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling fault")
        return real(logits, params, *rest)

    good = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = [engine.generate([5, 6, 7], **vars(good)).token_ids,
             engine.generate([9, 8], **vars(good)).token_ids]
    monkeypatch.setattr(engine_mod, "sample_batch", flaky)
    bad = SamplingParams(max_new_tokens=6, do_sample=True, seed=666, ignore_eos=True)
    handles = [engine.submit([5, 6, 7], good), engine.submit([1, 2], bad),
               engine.submit([9, 8], good)]
    results = [h.result(timeout=60) if i != 1 else None for i, h in enumerate(handles)]
    with pytest.raises(Exception, match="injected sampling fault"):
        handles[1].result(timeout=60)
    assert [results[0].token_ids, results[2].token_ids] == alone
    assert engine.stats().running == 0
