"""The serving contracts on Llama-family CAMEx (Llama, Mistral with a sliding window, Qwen2,
Qwen3, Phi-3, SmolLM3 with NoPE blocks, ... every one of dense_models.FAMILIES, GPT-OSS's
sinks, biased router and clamped SwiGLU included; GQA everywhere):
incremental decoding == the model's full forward across segment boundaries (contract 2),
staggered batches == each request alone (contract 3), merged == mixture == auto (contract 4),
int8 expert deltas == the dequantized model, bf16 against fp32, multi-EOS stopping,
classification through the engine == the model."""
from __future__ import annotations

import json

import pytest
import torch

import camex_runtime as cr
from camex_runtime import Engine, SamplingParams
from engine_models import int8_reference, reference
from tests.dense_models import (EOS, FAMILIES, build_dense, build_dense_classifier, random_ids,
                                spread)

T = 4


def build_folded_family(out_dir, family: str, **overrides):
    dense = build_dense(out_dir.parent / f"{out_dir.name}-dense", family)
    model = spread(cr.upcycle_from_dense(dense, num_experts=3, segment_len=T,
                                         **overrides)).eval()
    cr.export(model, out_dir)
    return out_dir


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm(request, tmp_path_factory):
    path = build_folded_family(tmp_path_factory.mktemp("fam") / request.param, request.param)
    return path, reference(path)


def full_forward_logprobs(ref, ids: list[int], prompt_len: int, mode: str) -> torch.Tensor:
    with torch.no_grad():
        logits = ref(torch.tensor([ids]), routing=mode, route1_len=min(prompt_len, T),
                     prompt_len=prompt_len).logits[0]
    return torch.log_softmax(logits.float(), -1)  # (L, V)


def decode_alone(engine, prompt, new):
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))
    while not handle.done:
        engine.step()
    return handle.result()


def test_int8_deltas_decode_like_the_dequantized_model(lm):
    """With `expert_deltas="int8"` (the fused [gate; up] rows quantized row by row as the
    separate projections are): incremental decoding == the full forward of the model whose
    experts are E_m + the dequantized deltas, merging, and with a pool too small for any merge
    (every row through the dequantizing mixture)."""
    path, _ = lm
    ref = int8_reference(path)
    for budget in (None, 1):
        engine = Engine.from_pretrained(path, max_batch_size=2, strategy="merged",
                                        merge_cache_bytes=budget, expert_deltas="int8")
        for prompt_len in (T - 1, 2 * T + 1):
            prompt = random_ids(prompt_len, seed=prompt_len)[0].tolist()
            res = decode_alone(engine, prompt, 2 * T + 2)
            ids = prompt + res.token_ids
            lp = full_forward_logprobs(ref, ids, prompt_len, "segment")
            assert res.token_ids == lp[prompt_len - 1:-1].argmax(-1).tolist(), (
                prompt_len, budget)
            want = lp[torch.arange(prompt_len - 1, len(ids) - 1), torch.tensor(res.token_ids)]
            torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=1e-5)
        assert (engine.runner.cache.fallbacks > 0) is (budget == 1)


@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_incremental_decode_equals_full_forward(lm, mode):
    path, ref = lm
    for strategy in ("merged", "mixture", "auto"):
        engine = Engine.from_pretrained(path, max_batch_size=2, strategy=strategy, routing=mode)
        for prompt_len in (1, T - 1, T + 3, 2 * T + 1):  # shorter and longer than a segment
            prompt = random_ids(prompt_len, seed=prompt_len)[0].tolist()
            res = decode_alone(engine, prompt, 3 * T + 2)  # crosses >= 3 segment boundaries
            ids = prompt + res.token_ids
            lp = full_forward_logprobs(ref, ids, prompt_len, mode)
            assert res.token_ids == lp[prompt_len - 1:-1].argmax(-1).tolist(), (
                prompt_len, strategy)
            want = lp[torch.arange(prompt_len - 1, len(ids) - 1), torch.tensor(res.token_ids)]
            torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=1e-5)
        assert engine.runner.cache.referenced == 0


def test_torch_attention_paths_equal_the_full_forward_too(lm, monkeypatch):
    """Without the native kernels (CUDA, or CAMEX_KERNELS=torch) decode attention is sdpa over
    the cache with a ragged-row mask, the window's included: a batch of two rows at different
    positions, each equal to the model's full forward."""
    from camex_runtime import kernels

    path, ref = lm
    monkeypatch.setattr(kernels, "native", lambda: None)
    engine = Engine.from_pretrained(path, max_batch_size=2, strategy="merged")
    assert engine.runner.fused is None
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (T + 3, 1)]
    handles = [engine.submit(p, SamplingParams(max_new_tokens=3 * T, ignore_eos=True))
               for p in prompts]
    while not all(h.done for h in handles):
        engine.step()
    for prompt, h in zip(prompts, handles):
        ids = prompt + h.result().token_ids
        lp = full_forward_logprobs(ref, ids, len(prompt), "segment")
        assert h.result().token_ids == lp[len(prompt) - 1:-1].argmax(-1).tolist()


REQUESTS = [  # (arrival step, prompt length, seed, params)
    (0, 7, 1, SamplingParams(max_new_tokens=14, ignore_eos=True)),
    (0, 1, 2, SamplingParams(max_new_tokens=6, ignore_eos=True, routing="prompt")),
    (2, 3, 3, SamplingParams(max_new_tokens=11, ignore_eos=True, repetition_penalty=1.3)),
    (3, 13, 4, SamplingParams(max_new_tokens=5, do_sample=True, seed=7, top_k=8,
                              temperature=0.9, ignore_eos=True)),
    (5, 7, 1, SamplingParams(max_new_tokens=9, ignore_eos=True)),  # shares request 0's prefix
]


def test_staggered_batch_equals_alone(lm):
    path, _ = lm
    prompts = [random_ids(n, seed=s)[0].tolist() for _, n, s, _ in REQUESTS]
    alone_engine = Engine.from_pretrained(path, max_batch_size=1)
    alone = [decode_alone_params(alone_engine, p, sp) for p, (*_, sp) in zip(prompts, REQUESTS)]
    engine = Engine.from_pretrained(path, max_batch_size=3)
    handles, step = {}, 0
    while len(handles) < len(REQUESTS) or not all(h.done for h in handles.values()):
        for i, (arrival, *_, sp) in enumerate(REQUESTS):
            if arrival == step:
                handles[i] = engine.submit(prompts[i], sp)
        engine.step()
        step += 1
    for i in range(len(REQUESTS)):
        assert handles[i].result().token_ids == alone[i], f"request {i}"
    assert engine.runner.cache.referenced == 0


def decode_alone_params(engine, prompt, sp):
    handle = engine.submit(prompt, sp)
    while not handle.done:
        engine.step()
    return handle.result().token_ids


def test_bf16_logits_match_fp32(tmp_path):
    """bf16 weights and merged FFNs (and, where the CPU computes bf16 natively, activations and
    KV cache: engine/precision.py) against fp32, on every position's logits (prefill and decode
    of the same tokens): within 3 % of the logit range. bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9 per operation); through 2 blocks, merges and a 97-way head
    this tiny model measures about 0.5 % (printed below), so 3 % leaves room for other CPUs'
    kernels while still catching a wrong cast, a missed rotary dtype or an fp32-only path."""
    path = build_folded_family(tmp_path / "llama", "llama")
    prompt = random_ids(2 * T + 1, seed=5)[0].tolist()
    logits, greedy = {}, []  # both dtypes decode the fp32 model's greedy continuation
    for dtype in (torch.float32, torch.bfloat16):
        engine = Engine.from_pretrained(path, dtype=dtype, max_batch_size=1, strategy="merged")
        runner = engine.runner
        rows = [runner.prefill(0, prompt, "segment", max_new_tokens=8).float()]
        tokens = list(prompt)
        for i in range(8):
            if dtype == torch.float32:
                greedy.append(int(rows[-1].argmax()))
            tokens.append(greedy[i])
            rows.append(runner.decode([0], [greedy[i]], [tokens])[0].float())
        logits[dtype] = torch.stack(rows)
        assert runner.precision.weights == dtype and runner.moe[0].w1.dtype == dtype
        assert runner.model.lm_head.weight.dtype == runner.cache.pool["fc1_weight"].dtype == dtype
        assert runner.kv.k.dtype == runner.precision.compute
    ref, got = logits[torch.float32], logits[torch.bfloat16]
    err = float((ref - got).abs().max() / (ref.max() - ref.min()))
    print(f"bf16 vs fp32: max |dlogit| / logit range = {err:.4f}")
    assert err <= 0.03


def test_every_eos_id_of_the_generation_config_stops(tmp_path):
    path = build_folded_family(tmp_path / "llama", "llama")
    engine = Engine.from_pretrained(path, max_batch_size=1)
    prompt = random_ids(6, seed=11)[0].tolist()
    free = decode_alone(engine, prompt, 6).token_ids  # what greedy produces without stops
    gen = json.loads((path / "generation_config.json").read_text()) \
        if (path / "generation_config.json").exists() else {}
    gen["eos_token_id"] = [EOS, free[2]]  # a list, as Llama 3 ships it
    (path / "generation_config.json").write_text(json.dumps(gen))
    engine = Engine.from_pretrained(path, max_batch_size=1)
    assert engine.eos_token_ids == {EOS, free[2]}
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=6))
    while not handle.done:
        engine.step()
    res = handle.result()
    assert res.finish_reason == "eos_token"
    assert res.token_ids == free[:free.index(free[2]) + 1]


def test_swiglu_pool_entries_hold_three_matrices(lm):
    """[gate; up] and down, and their biases where the experts have them (GPT-OSS)."""
    path, ref = lm
    engine = Engine.from_pretrained(path, max_batch_size=1)
    d, h = ref.config.d_model, ref.config.d_ff
    shapes = {k: tuple(v.shape[1:]) for k, v in engine.runner.cache.pool.items()}
    want = {"fc1_weight": (2 * h, d), "fc2_weight": (d, h)}
    if ref.config.mlp_bias:
        want |= {"fc1_bias": (2 * h,), "fc2_bias": (d,)}
    assert shapes == want
    biases = 2 * h + d if ref.config.mlp_bias else 0
    assert engine.runner.cache.entry_bytes == (3 * d * h + biases) * 4


@pytest.mark.parametrize("strategy", ["merged", "mixture", "auto"])
@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])  # q/k norms; sinks and padding
def test_classifier_through_the_engine_equals_the_model(tmp_path, strategy, family):
    dense = build_dense_classifier(tmp_path / "dense", family)
    model = spread(cr.upcycle_from_dense(dense, num_experts=3, segment_len=T)).eval()
    cr.export(model, tmp_path / "clf")
    engine = Engine.from_pretrained(tmp_path / "clf", strategy=strategy)
    texts = [random_ids(n, seed=n)[0].tolist() for n in (3, 10, 1, 6)]
    got = engine.classify(texts, raw_scores=True)
    ref = reference(tmp_path / "clf")
    for ids, res in zip(texts, got):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        want = dict(zip([f"label{i}" for i in range(3)], logits.tolist()))
        for label, score in res.scores:
            assert score == pytest.approx(want[label], abs=1e-5)


def test_a_resumed_conversation_answers_as_a_cold_prompt(lm):
    """Prefix caching on every family (Mistral's window shorter than the conversation): the
    next turn resumes from the slot the first left and answers as an engine without it."""
    path, _ = lm
    first = random_ids(2 * T + 1, seed=21)[0].tolist()
    warm = Engine.from_pretrained(path, max_batch_size=1, prefix_caching=True)
    cold = Engine.from_pretrained(path, max_batch_size=1)
    answer = decode_alone_params(warm, first, SamplingParams(max_new_tokens=6, ignore_eos=True))
    turn = first + answer + random_ids(3, seed=22)[0].tolist()
    handle = warm.submit(turn, SamplingParams(max_new_tokens=8, ignore_eos=True))
    while not handle.done:
        warm.step()
    res = handle.result()
    assert res.cached_tokens >= len(first)  # resumed, not recomputed
    assert res.token_ids == decode_alone_params(
        cold, turn, SamplingParams(max_new_tokens=8, ignore_eos=True))


def test_chunked_prefill_equals_whole_prefill(lm):
    """Chunks start at arbitrary positions: rotary positions and the cached keys of earlier
    chunks (key/value heads only) must line up exactly."""
    path, _ = lm
    prompt = random_ids(3 * T + 3, seed=13)[0].tolist()
    engine = Engine.from_pretrained(path, max_batch_size=1, strategy="merged")
    want = engine.runner.prefill(0, prompt, "segment")
    for budget in (3, 5):
        engine.runner.start_prefill(0, prompt, "segment")
        got = None
        while got is None:
            got = engine.runner.prefill_step(0, budget)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
