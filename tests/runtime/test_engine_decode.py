"""Contract 2 and 4: incremental decoding through the Engine (KV cache + cached merges) equals
one full forward of the model code over the same tokens, at every position, across several
segment boundaries, in both routing modes, for every strategy."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import Engine, SamplingParams
from engine_models import build_folded, full_forward_logprobs, reference


@pytest.fixture(scope="module", params=[4, 8], ids=["T4", "T8"])
def lm(request, tmp_path_factory):
    path = build_folded(tmp_path_factory.mktemp("dec") / f"lm-T{request.param}", T=request.param)
    return path, reference(path)


@pytest.mark.parametrize("strategy", ["merged", "mixture", "auto"])
@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_incremental_decode_equals_full_forward(lm, strategy, mode):
    path, ref = lm
    T = ref.config.segment_len
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy=strategy, routing=mode)
    gen = torch.Generator().manual_seed(T)
    for prompt_len in (1, T - 1, T, T + 3, 2 * T + 1):  # shorter and longer than T
        prompt = torch.randint(0, 60, (prompt_len,), generator=gen).tolist()
        new = 3 * T + 2  # crosses at least three segment boundaries while decoding
        handle = engine.submit(prompt, SamplingParams(
            max_new_tokens=new, ignore_eos=True))
        while not handle.done:
            engine.step()
        res = handle.result()
        ids = prompt + res.token_ids
        lp = full_forward_logprobs(ref, ids, prompt_len, mode)  # (L, V)
        want_tokens = lp[prompt_len - 1:-1].argmax(-1).tolist()
        assert res.token_ids == want_tokens, (prompt_len, mode, strategy)
        want_lp = lp[torch.arange(prompt_len - 1, len(ids) - 1), torch.tensor(res.token_ids)]
        torch.testing.assert_close(torch.tensor(res.logprobs), want_lp, atol=1e-5, rtol=1e-5)
    assert engine.runner.cache.referenced == 0  # every finished request released its merges


def test_strategies_agree_token_for_token(lm):
    """merged == mixture == auto on a batch of concurrent requests (contract 4)."""
    path, _ = lm
    prompts = [[1, 2, 3], list(range(5, 20)), [7] * 9, [11, 12]]
    outs = {}
    for strategy in ("merged", "mixture", "auto"):
        engine = Engine.from_pretrained(path, max_batch_size=4, strategy=strategy)
        engine.start()
        try:
            hs = [engine.submit(p, SamplingParams(
                max_new_tokens=10, ignore_eos=True)) for p in prompts]
            outs[strategy] = [(h.result().token_ids, h.result().logprobs) for h in hs]
        finally:
            engine.stop()
    for strategy in ("mixture", "auto"):
        for (toks_a, lp_a), (toks_b, lp_b) in zip(outs["merged"], outs[strategy]):
            assert toks_a == toks_b
            torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-5, rtol=0)


def test_causality_after_first_segment(lm):
    """Contract 5: changing token t (t beyond segment 1) never changes earlier logits."""
    path, ref = lm
    T = ref.config.segment_len
    ids = torch.randint(0, 60, (1, 3 * T + 2), generator=torch.Generator().manual_seed(1))
    t = T + 2
    alt = ids.clone()
    alt[0, t] = (alt[0, t] + 1) % 60
    with torch.no_grad():
        a, b = ref(ids).logits, ref(alt).logits
    torch.testing.assert_close(a[0, :t], b[0, :t])
    assert not torch.allclose(a[0, t:], b[0, t:])


@pytest.mark.parametrize("overrides", [dict(moe_layers=[1]), dict(dynamic=True, n_layer=3),
                                       dict(num_experts=0)],
                         ids=["moe-subset", "dynamic", "dense"])
def test_other_architectures_decode_like_full_forward(tmp_path, overrides):
    """MoE on some blocks only, Dynamic-Merg (bases materialised by export), and dense."""
    path = build_folded(tmp_path / "lm", **overrides)
    ref = reference(path)
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    prompt = [3, 1, 4, 1, 5, 9]
    h = engine.submit(prompt, SamplingParams(max_new_tokens=11, ignore_eos=True))
    while not h.done:
        engine.step()
    res = h.result()
    lp = full_forward_logprobs(ref, prompt + res.token_ids, len(prompt), "segment")
    assert res.token_ids == lp[len(prompt) - 1:-1].argmax(-1).tolist()


@pytest.mark.parametrize("rows", [1, 12])  # the fused step and the block loop (beyond its rows)
def test_decode_keeps_no_autograd_history(lm, rows):
    """The model's parameters require grad (a folded model is a plain nn.Module): a decode
    outside inference mode would record autograd graphs, and in-place KV-cache writes would
    chain them from step to step. Every step's logits are inference tensors and the caches
    never require grad."""
    path, _ = lm
    engine = Engine.from_pretrained(path, max_batch_size=rows, strategy="merged")
    assert any(p.requires_grad for p in engine.runner.model.parameters())
    logits = []
    engine.runner.decode = (lambda real: lambda *a: logits.append(real(*a)) or logits[-1])(
        engine.runner.decode)
    handles = [engine.submit([1 + i, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
               for i in range(rows)]
    while not all(h.done for h in handles):
        engine.step()
    assert logits and all(t.is_inference() and t.grad_fn is None for t in logits)
    kv = engine.runner.kv
    assert not kv.k.requires_grad and not kv.v.requires_grad
    assert not engine.runner.seg_sum.requires_grad
