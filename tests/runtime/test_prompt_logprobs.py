"""Prompt logprobs come from the prefill pass and equal the model's own full forward.

The reference is the model code's folded forward over the whole prompt with the serving
routing rule (segment 1 routed by the mean of min(L, T) prompt tokens), log-softmaxed in fp32.
Lengths straddle the segment length T=4, so one, several and partial segments are covered.
"""
from __future__ import annotations

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.runner import score_prompt
from tests.runtime.engine_models import build_folded, reference

T = 4


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_folded(tmp_path_factory.mktemp("plp") / "lm", T=T)


@pytest.fixture(scope="module")
def engine(lm_dir):
    e = Engine.from_pretrained(lm_dir, max_batch_size=4, strategy="merged")
    e.start()
    yield e
    e.stop()


def full_forward_logprobs(model, ids: list[int], routing: str = "segment") -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids]), routing=routing,
                       route1_len=min(len(ids), T), prompt_len=len(ids)).logits[0]
    return torch.log_softmax(logits.float(), -1)  # (L, V)


@pytest.mark.parametrize("length", [2, 3, 4, 5, 7, 8, 9, 13])
@pytest.mark.parametrize("routing", ["segment", "prompt"])
def test_prompt_logprobs_equal_the_full_forward(engine, lm_dir, length, routing):
    ids = torch.randint(0, 60, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    res = engine.generate(ids, max_new_tokens=1, prompt_logprobs=3, routing=routing)
    ref = full_forward_logprobs(reference(lm_dir), ids, routing)
    assert len(res.prompt_logprobs) == length and res.prompt_logprobs[0] is None
    for t in range(1, length):
        got = res.prompt_logprobs[t]
        assert got.logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        want = ref[t - 1].topk(3)
        assert [i for i, _ in got.top_logprobs] == want.indices.tolist()
        assert [v for _, v in got.top_logprobs] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_scoring_only_with_zero_new_tokens(engine, lm_dir):
    ids = [3, 14, 15, 9, 26, 5]
    handle = engine.submit(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    events = list(handle)
    res = handle.result()
    assert res.token_ids == [] and res.finish_reason == "length" and res.text == ""
    assert [(e.token_id, e.finish_reason) for e in events] == [(-1, "length")]
    ref = full_forward_logprobs(reference(lm_dir), ids)
    got = [p.logprob for p in res.prompt_logprobs[1:]]
    assert got == pytest.approx([ref[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    assert all(p.top_logprobs == () for p in res.prompt_logprobs[1:])
    assert engine.stats().running == 0


def test_one_token_prompt_has_only_the_empty_first_entry(engine):
    res = engine.generate([7], max_new_tokens=0, prompt_logprobs=2)
    assert res.prompt_logprobs == [None]


def test_generated_token_alternatives_match_the_full_forward(engine, lm_dir):
    prompt = [1, 2, 3, 4, 5, 6]  # greedy continuation, decode steps cross a segment boundary
    res = engine.generate(prompt, max_new_tokens=5, logprobs=4, ignore_eos=True)
    ref = full_forward_logprobs(reference(lm_dir), prompt + res.token_ids)
    for i, (tok, top) in enumerate(zip(res.token_ids, res.top_logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert [t for t, _ in top] == row.topk(4).indices.tolist()
        assert top[0][0] == tok  # greedy picks the best
        assert res.logprobs[i] == pytest.approx(row[tok].item(), abs=1e-4)


def test_chunked_scoring_equals_one_pass():
    torch.manual_seed(0)
    head, norm = torch.nn.Linear(8, 50, bias=False), torch.nn.LayerNorm(8)
    x, targets = torch.randn(11, 8), torch.randint(0, 50, (11,))
    with torch.no_grad():
        small = score_prompt(head, norm(x), targets, 3, chunk=3)
        whole = score_prompt(head, norm(x), targets, 3, chunk=1000)
    for a, b in zip(small, whole):
        torch.testing.assert_close(a, b)
    assert small[0].shape == (11,) and small[1].shape == (11, 3)


def test_max_new_tokens_zero_needs_prompt_logprobs(engine):
    from camex_runtime.errors import InputValidationError
    with pytest.raises(InputValidationError, match="prompt_logprobs"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=0))


def test_prompt_logprobs_of_a_chunked_prefill_equal_the_unchunked(lm_dir):
    """A long prompt scored while another request decodes is prefilled in chunks (and its first
    segment by layers): its prompt logprobs must not depend on the chunking."""
    prompt = list(range(3, 3 + 19))
    sp = SamplingParams(max_new_tokens=2, prompt_logprobs=2, ignore_eos=True)
    want = Engine.from_pretrained(lm_dir, max_batched_tokens=None).generate(
        prompt, **sp.__dict__).prompt_logprobs
    engine = Engine.from_pretrained(lm_dir, max_batch_size=2, max_batched_tokens=3)
    other = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    handle = engine.submit(prompt, sp)
    steps = 0
    while not handle.done:
        engine.step()
        steps += 1
    assert steps > 3  # really chunked
    got = handle.result().prompt_logprobs
    assert got[0] is None and len(got) == len(want) == len(prompt)
    for a, b in zip(got[1:], want[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    other.cancel()
