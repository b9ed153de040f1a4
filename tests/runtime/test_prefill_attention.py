"""A whole prompt's causal attention in query blocks (engine/attention.causal_attention): the
same attention as one causal call, for the lengths it blocks and for the ones it leaves alone,
and through the engine the same tokens as the model's own full forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camex_runtime import Engine, SamplingParams
from camex_runtime.engine import attention
from camex_runtime.engine.attention import CAUSAL_BLOCK, CAUSAL_BLOCKED_TOKENS, causal_attention
from engine_models import build_folded, full_forward_logprobs, reference

LO, HI = CAUSAL_BLOCKED_TOKENS[0], CAUSAL_BLOCKED_TOKENS[-1]


def qkv(n: int, heads: int, kv_heads: int, seed: int = 0):
    """q, k, v laid out as the model's split of one fused projection: (1, heads, n, hd) views
    of a (1, n, ...) tensor."""
    g = torch.Generator().manual_seed(seed)
    hd = 16
    x = torch.randn(1, n, (heads + 2 * kv_heads) * hd, generator=g)
    q, k, v = x.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    return (q.view(1, n, heads, hd).transpose(1, 2), k.view(1, n, kv_heads, hd).transpose(1, 2),
            v.view(1, n, kv_heads, hd).transpose(1, 2))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("n", [1, LO - 1, LO, LO + 5, 5 * CAUSAL_BLOCK + 7, HI, HI + 1])
def test_equals_one_causal_call(n, heads, kv_heads):
    q, k, v = qkv(n, heads, kv_heads)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=kv_heads != heads)
    got = causal_attention(q, k, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # what the next projection reads: (1, n, heads * hd) without a copy, as sdpa's own output
    assert got.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("n,calls", [(LO - 1, 1), (LO, LO // CAUSAL_BLOCK),
                                     (LO + 5, LO // CAUSAL_BLOCK + 1), (HI + 1, 1)])
def test_blocks_only_the_lengths_it_is_faster_at(monkeypatch, n, calls):
    seen = []
    real = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, *a, **kw: seen.append(q.shape[2]) or
                        real(q, *a, **kw))
    causal_attention(*qkv(n, 4, 4))
    assert len(seen) == calls
    assert sum(seen) == n  # every query row attended exactly once


@pytest.mark.parametrize("window", [None, 100, 300])
def test_capped_scores_in_query_blocks_equal_one_capped_call(window):
    """Soft-capped attention (Gemma 2) of a long prompt goes in query blocks, each against the
    keys it can see (its window's): the same attention as one materialised call."""
    from camex_runtime.layers import sees, scored_attention

    n = attention.CAPPED_BLOCK * 2 + 37
    q, k, v = qkv(n, 6, 2, seed=4)
    pos = torch.arange(n)
    want = scored_attention(q, k, v, 2.0, attn_mask=sees(pos, pos, window))
    got = causal_attention(q, k, v, window, softcap=2.0)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert got.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("window", [None, 300])
def test_sinks_in_query_blocks_equal_one_call_with_the_sink_column(window):
    """Attention sinks (GPT-OSS) of a long prompt go in query blocks like capped scores: the
    same attention as one materialised call, which is softmax over [scores, sink] with the
    sink's weight dropped (written out here)."""
    from camex_runtime.layers import sees, scored_attention

    n = attention.CAPPED_BLOCK * 2 + 37
    q, k, v = qkv(n, 6, 2, seed=5)
    sinks = torch.linspace(-3, 3, 6)
    pos = torch.arange(n)
    mask = sees(pos, pos, window)
    got = causal_attention(q, k, v, window, sinks=sinks)
    torch.testing.assert_close(got, scored_attention(q, k, v, None, sinks, attn_mask=mask),
                               atol=2e-6, rtol=1e-5)
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    column = sinks.view(1, 6, 1, 1).expand(1, 6, n, 1)
    probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    torch.testing.assert_close(got, probs @ v.repeat_interleave(3, 1), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got, causal_attention(q, k, v, window), atol=1e-3)


def test_sinks_through_the_fused_kernel_equal_the_materialised_scores(monkeypatch):
    """On a CPU sinks ride on torch's fused kernel (its log-sum-exp: × σ(lse − sink)): the
    materialised softmax's result, for causal, masked and padded rows (a row that sees
    nothing attends to its sink alone: zeros); without the kernel, the scores path."""
    from camex_runtime import layers
    from camex_runtime.layers import sink_attention, scored_attention

    q, k, v = qkv(40, 8, 2, seed=6)
    sinks = torch.linspace(-2, 4, 8)
    assert layers.fused_sinks(q)
    torch.testing.assert_close(sink_attention(q, k, v, sinks, is_causal=True),
                               scored_attention(q, k, v, None, sinks, is_causal=True),
                               atol=2e-6, rtol=1e-5)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    mask[1, :, :, :5] = False  # row 1's first keys are padding: its first queries see nothing
    q2, k2, v2 = (torch.cat([t, t]) for t in (q, k, v))
    got = sink_attention(q2, k2, v2, sinks, attn_mask=mask)
    torch.testing.assert_close(got, scored_attention(q2, k2, v2, None, sinks, attn_mask=mask),
                               atol=2e-6, rtol=1e-5)
    assert torch.equal(got[1, :, :5], torch.zeros_like(got[1, :, :5]))
    fused = causal_attention(q, k, v, 7, sinks=sinks)
    monkeypatch.setattr(layers, "_CPU_FLASH", None)
    assert not layers.fused_sinks(q)
    torch.testing.assert_close(causal_attention(q, k, v, 7, sinks=sinks), fused,
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [100, 300])
def test_a_windowed_prompt_in_query_blocks_equals_one_masked_call(window, monkeypatch):
    """Sliding-window attention of a prompt longer than a block: query blocks, each against
    the keys inside its window only — the attention of one call with the whole mask."""
    from camex_runtime.layers import sees

    n = attention.CAPPED_BLOCK * 2 + 37
    q, k, v = qkv(n, 6, 2, seed=5)
    pos = torch.arange(n)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sees(pos, pos, window),
                                          enable_gqa=True)
    keys = []
    real = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, k, *a, **kw: keys.append(k.shape[2]) or
                        real(q, k, *a, **kw))
    got = causal_attention(q, k, v, window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert len(keys) == 3 and max(keys) <= window + attention.CAPPED_BLOCK - 1


def test_prompt_in_blocks_decodes_like_full_forward(tmp_path):
    """A prompt long enough to be blocked (and one past a partial last block) through the engine:
    its tokens and log-probabilities are those of one full forward of the model code."""
    path = build_folded(tmp_path / "lm", T=64, max_position_embeddings=HI + 16)
    ref = reference(path)
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    gen = torch.Generator().manual_seed(3)
    for prompt_len in (LO + 5, HI - 3):
        prompt = torch.randint(0, 60, (prompt_len,), generator=gen).tolist()
        h = engine.submit(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        while not h.done:
            engine.step()
        res = h.result()
        ids = prompt + res.token_ids
        lp = full_forward_logprobs(ref, ids, prompt_len, "segment")
        assert res.token_ids == lp[prompt_len - 1:-1].argmax(-1).tolist()
        want = lp[torch.arange(prompt_len - 1, len(ids) - 1), torch.tensor(res.token_ids)]
        torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=1e-5)
