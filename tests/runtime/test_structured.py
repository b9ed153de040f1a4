"""Structured output in the engine: a constrained request's tokens are what its grammar allows,
chosen as sampling would choose among those alone, and it ends when the grammar is complete.

`engine` is tests/runtime/conftest.py's (the tiny LM, 4 slots). The references are independent
of the engine: the model's own full forward (logits per position) and a fresh llguidance
matcher fed the same tokens; Python's `json` and `re` for the finished answers.
"""
from __future__ import annotations

import json
import re

import llguidance
import llguidance.hf
import pytest
import torch
from transformers import AutoTokenizer

from camex_runtime import Constraint, Engine, SamplingParams
from camex_runtime.engine.structured import JSON_STYLE, Grammars, check
from camex_runtime.errors import InputValidationError, RequestFailedError
from engine_models import full_forward_logprobs, reference

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["ok", "color", "tags"], "additionalProperties": False}
JSON = Constraint("json", json.dumps(SCHEMA))
PROMPTS = ["the quick brown", "hello world, this", "numbers 0 1 2"]


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(str(tiny_lm_dir))


def fresh_matcher(tok, vocab_size: int, constraint: Constraint):
    """llguidance's matcher for `constraint`, built here (not through the engine's Grammars)."""
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
    if constraint.kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.value,
                                                                defaults=JSON_STYLE)
    else:
        grammar = llguidance.LLMatcher.grammar_from_regex(constraint.value)
    return llguidance.LLMatcher(lltok, grammar)


def allowed_ids(matcher, vocab_size: int) -> torch.Tensor:
    bits = torch.tensor(list(matcher.compute_bitmask()), dtype=torch.uint8)
    mask = ((bits[:, None] >> torch.arange(8)) & 1).flatten()[:vocab_size].bool()
    return mask


@pytest.mark.parametrize("constraint", [JSON, Constraint("regex", r"(ab|c)+ [0-9]{2}!")])
def test_greedy_picks_the_likeliest_token_the_grammar_allows(engine, tok, tiny_lm_dir,
                                                              constraint):
    """Each greedy token is the argmax, over the tokens a fresh matcher allows at that point,
    of the model's own full forward; the answer is complete (JSON that fits the schema, text
    that matches the regex) and ends as at EOS."""
    ref, V = reference(tiny_lm_dir), engine.config.vocab_size
    for prompt in PROMPTS[:2]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        res = engine.submit(prompt, SamplingParams(max_new_tokens=60,
                                                   constraint=constraint)).result()
        assert res.finish_reason == "eos_token", res
        logprobs = full_forward_logprobs(ref, ids + res.token_ids, len(ids), "segment")
        matcher = fresh_matcher(tok, V, constraint)
        for i, token in enumerate(res.token_ids):
            ok = allowed_ids(matcher, V)
            row = logprobs[len(ids) - 1 + i].masked_fill(~ok, float("-inf"))
            assert int(row.argmax()) == token, (prompt, i)
            assert matcher.consume_token(token)
        assert matcher.is_stopped()  # ended at the last token the grammar wanted, no EOS step
        assert engine.eos_token_ids.isdisjoint(res.token_ids)
        if constraint.kind == "json":
            answer = json.loads(res.text)
            assert answer["color"] in ("red", "green", "blue") and isinstance(answer["ok"], bool)
            assert set(answer) == {"ok", "color", "tags"} and len(answer["tags"]) <= 2
            assert res.text == json.dumps(answer)  # compact, Python's separators
        else:
            assert re.fullmatch(constraint.value, res.text), res.text
        # the model alone would have written something else: the mask did the work
        free = engine.submit(prompt, SamplingParams(max_new_tokens=len(res.token_ids),
                                                    ignore_eos=True)).result()
        assert free.token_ids != res.token_ids


def test_a_grammar_can_wait_for_the_end_of_reasoning(engine, tok, tiny_lm_dir):
    """`start_after`: the tokens up to and including that sequence are the model's own (the
    free answer's), the grammar applies from the next one — greedy among the allowed tokens
    of the full forward from there, as without waiting."""
    prompt = PROMPTS[0]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    free = engine.submit(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True)).result()
    pairs = [tuple(free.token_ids[i:i + 2]) for i in range(9)]
    # "the end of thinking": the first pair of free tokens, from the third on, not seen before
    k = next(i for i in range(2, 9) if pairs[i] not in pairs[:i])
    regex = Constraint("regex", r"(ab|c){1,4} [0-9]{2}!", start_after=pairs[k])
    res = engine.submit(prompt, SamplingParams(max_new_tokens=60, constraint=regex)).result()
    assert res.token_ids[:k + 2] == free.token_ids[:k + 2] and res.finish_reason == "eos_token"
    answer = res.token_ids[k + 2:]
    assert re.fullmatch(regex.value, tok.decode(answer)), tok.decode(answer)
    ref, V = reference(tiny_lm_dir), engine.config.vocab_size
    logprobs = full_forward_logprobs(ref, ids + res.token_ids, len(ids), "segment")
    matcher = fresh_matcher(tok, V, regex)
    for i, token in enumerate(answer):
        row = logprobs[len(ids) + k + 1 + i].masked_fill(~allowed_ids(matcher, V), float("-inf"))
        assert int(row.argmax()) == token and matcher.consume_token(token)
    with pytest.raises(InputValidationError, match="constraint.start_after names token ids"):
        engine.submit(prompt, SamplingParams(
            constraint=Constraint("regex", "a", start_after=(V + 1,))))


def test_sampled_answers_stay_inside_the_grammar_and_seeds_repeat(engine):
    choices = ("yes", "no", "maybe so")
    for seed in range(6):
        for c, fits in ((Constraint("choice", choices), lambda t: t in choices),
                        (Constraint("regex", r"[a-c]{1,4}-[0-9]"),
                         lambda t: re.fullmatch(r"[a-c]{1,4}-[0-9]", t)),
                        (JSON, lambda t: json.loads(t)["color"] in ("red", "green", "blue"))):
            p = SamplingParams(max_new_tokens=60, do_sample=True, temperature=1.5, seed=seed,
                               top_k=50, constraint=c)
            res = engine.submit("the quick", p).result()
            assert res.finish_reason == "eos_token" and fits(res.text), (c.kind, res.text)
            assert engine.submit("the quick", p).result().token_ids == res.token_ids


def test_constrained_and_free_rows_batched_equal_each_alone(tiny_lm_dir):
    """A row's mask is its own: a batch of constrained and unconstrained requests gives each
    the tokens it gets alone (and the free rows what they get without any constraint near)."""
    params = [SamplingParams(max_new_tokens=40, constraint=JSON),
              SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=40, do_sample=True, seed=3,
                             constraint=Constraint("choice", ("red", "green", "blue"))),
              SamplingParams(max_new_tokens=12, do_sample=True, seed=5, ignore_eos=True)]
    alone = Engine.from_pretrained(tiny_lm_dir, max_batch_size=1)
    batched = Engine.from_pretrained(tiny_lm_dir, max_batch_size=4)
    try:
        want = [alone.generate(p, **vars(sp)).token_ids for p, sp in zip(PROMPTS + PROMPTS,
                                                                          params)]
        handles = [batched.submit(p, sp) for p, sp in zip(PROMPTS + PROMPTS, params)]
        batched.start()
        assert [h.result().token_ids for h in handles] == want
    finally:
        alone.stop()
        batched.stop()


def test_min_tokens_and_max_tokens_meet_the_grammar(engine):
    """A complete grammar ends the request even before min_tokens (nothing else may follow);
    max_new_tokens cuts an incomplete answer as always ("length", a prefix of the answer)."""
    choice = Constraint("choice", ("yes", "no"))
    res = engine.submit("hi", SamplingParams(max_new_tokens=20, min_tokens=10,
                                             constraint=choice)).result()
    assert res.finish_reason == "eos_token" and res.text in ("yes", "no")
    assert len(res.token_ids) < 10 and engine.eos_token_ids.isdisjoint(res.token_ids)
    whole = engine.submit("hi", SamplingParams(max_new_tokens=60, constraint=JSON)).result()
    cut = engine.submit("hi", SamplingParams(max_new_tokens=5, constraint=JSON)).result()
    assert cut.finish_reason == "length" and whole.token_ids[:5] == cut.token_ids


def test_allowed_token_ids_narrow_the_grammar_and_an_empty_meet_fails_only_its_request(
        engine, tok):
    """allowed_token_ids and a grammar together: the tokens both allow. Where they share none
    the request fails with the reason; a request beside it in the batch finishes."""
    yes, no = (tok(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no"))
    choice = Constraint("choice", ("yes", "no"))
    kw = dict(max_new_tokens=10, constraint=choice)
    assert yes[0] not in no
    for allowed, word in ((no, "no"), (yes, "yes")):  # whichever the model prefers
        res = engine.submit("hi", SamplingParams(allowed_token_ids=allowed, **kw)).result()
        assert res.text == word and res.token_ids == (no if word == "no" else yes)
    doomed = engine.submit("hi", SamplingParams(allowed_token_ids=[engine.eos_token_id], **kw))
    beside = engine.submit("hi", SamplingParams(max_new_tokens=3, ignore_eos=True))
    with pytest.raises(RequestFailedError, match="no token is both allowed by allowed_token_ids"):
        doomed.result()
    assert beside.result().finish_reason == "length"


@pytest.mark.parametrize("constraint,needle", [
    (Constraint("json", '{"type": "strin"}'), "Invalid type"),
    (Constraint("json", '{"type": "object", "propertyNames": {"pattern": "a"}}'),
     "propertyNames"),
    (Constraint("json", "[1, 2"), "not valid JSON"),
    (Constraint("regex", "(?=a)b"), "look-around"),
    (Constraint("lark", "start: missing"), "unknown name"),
    (Constraint("choice", ()), "non-empty list"),
    (Constraint("yaml", "a: 1"), "kind must be one of"),
])
def test_a_bad_constraint_is_refused_at_submit_and_the_engine_goes_on(engine, constraint,
                                                                       needle):
    with pytest.raises(InputValidationError, match=re.escape(needle)):
        engine.submit("hi", SamplingParams(max_new_tokens=4, constraint=constraint))
    assert engine.submit("hi", SamplingParams(max_new_tokens=3, ignore_eos=True)
                         ).result().finish_reason == "length"


def test_lenient_schemas_ignore_what_cannot_be_enforced():
    schema = '{"type": "object", "propertyNames": {"pattern": "^a"}}'
    with pytest.raises(InputValidationError, match="propertyNames"):
        check(Constraint("json", schema))
    assert check(Constraint("json", schema, lenient=True))


def test_grammars_need_the_checkpoint_tokenizer(tiny_lm_dir):
    with pytest.raises(InputValidationError, match="tokenizer"):
        Grammars(None, 64, [0]).guide(Constraint("regex", "a+"))


def test_guide_mask_is_the_matcher_bitmask(tok):
    """The (V,) mask Guide hands to sampling is llguidance's bitmask, bit for bit, including
    vocabulary ids beyond the tokenizer's (padded embeddings: never allowed)."""
    V = len(tok) + 7
    guide = Grammars(tok, V, [tok.eos_token_id]).guide(JSON)
    matcher = fresh_matcher(tok, V, JSON)
    for _ in range(6):
        got = guide.allowed()
        want = allowed_ids(matcher, V)
        assert got.dtype == torch.bool and got.shape == (V,) and torch.equal(got, want)
        assert not got[len(tok):].any()
        token = int(got.nonzero()[-1])
        assert not guide.advance(token) and matcher.consume_token(token)
    with pytest.raises(RuntimeError, match="outside the request's grammar"):
        guide.advance(int((~guide.allowed()).nonzero()[0]))


def test_compiled_grammars_are_kept_and_every_request_gets_its_own_copy(tok, monkeypatch):
    """A grammar is compiled once for the last CACHE_SIZE used; each guide is a copy that walks
    on its own: one request's tokens never move another's mask, and a guide from the kept
    matcher masks as a freshly compiled one does, step by step."""
    import camex_runtime.engine.structured as structured

    monkeypatch.setattr(structured, "CACHE_SIZE", 2)
    V = len(tok)
    grammars = Grammars(tok, V, [tok.eos_token_id])
    first, second = grammars.guide(JSON), grammars.guide(JSON)
    assert list(grammars._compiled) == [check(JSON)]
    matcher = fresh_matcher(tok, V, JSON)
    start = allowed_ids(matcher, V)
    for _ in range(5):  # the first walks; the second stays where it started
        token = int(first.allowed().nonzero()[-1])
        assert torch.equal(first.allowed(), allowed_ids(matcher, V))
        assert not first.advance(token) and matcher.consume_token(token)
        assert torch.equal(second.allowed(), start)
    assert torch.equal(grammars.guide(JSON).allowed(), start)  # the kept one never moved
    regex, choice = Constraint("regex", "a+b"), Constraint("choice", ("yes", "no"))
    grammars.guide(regex)
    grammars.guide(choice)  # the least recently used (JSON) goes
    assert list(grammars._compiled) == [check(regex), check(choice)]
    bad = Constraint("regex", "(")
    for _ in range(2):  # a refusal is not kept: refused each time, by name
        with pytest.raises(InputValidationError, match="regex constraint cannot be compiled"):
            grammars.guide(bad)
