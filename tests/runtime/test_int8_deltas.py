"""Int8 expert deltas (`expert_deltas="int8"`, engine/moe.py): the quantizer's error bound, the
native merge against fp64 arithmetic and against itself (the same bits for every output count,
instruction set and prefetch distance), and engines that serve exactly the dequantized model:
incremental == full forward, batched == alone, every strategy."""
from __future__ import annotations

import pytest
import torch

from camex_runtime import Engine, SamplingParams, kernels
from camex_runtime.engine.moe import Int8Deltas, MoEWeights
from engine_models import build_folded, full_forward_logprobs, int8_reference, reference

NATIVE = kernels.native() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_gives_the_same_bits_natively_and_with_torch(dtype, monkeypatch):
    """A server with native kernels and one without (or a GPU) serve the same int8 model."""
    torch.manual_seed(2)
    base = torch.randn(33, 70).to(dtype)
    experts = (base + torch.randn(4, 33, 70) * 0.02).to(dtype)
    experts[2, 5] = base[5]  # a zero delta row
    experts[1, 7, 3] = base[7, 3] + 1.0  # an outlier that sets its row's scale
    native = Int8Deltas.from_experts([experts], [base])
    monkeypatch.setattr(kernels, "native", lambda: None)
    torch_path = Int8Deltas.from_experts([experts], [base])
    assert torch.equal(native.q, torch_path.q) and torch.equal(native.scales, torch_path.scales)
    assert native.scales[2, 5] == 0 and not native.q[2, 5].any()


def test_quantizer_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    E, R, C = 3, 6, 40
    base = torch.randn(R, C)
    spread = torch.logspace(-4, 0, R)[:, None]  # rows four decades apart
    experts = base + torch.randn(E, R, C) * spread
    experts[1, 2] = base[2]  # a delta row of zeros
    q = Int8Deltas.from_experts([experts], [base])
    assert q.q.dtype == torch.int8 and q.q.shape == (E, R, C) and q.scales.shape == (E, R)
    delta = experts - base
    assert torch.equal(q.q[1, 2], torch.zeros(C, dtype=torch.int8)) and q.scales[1, 2] == 0
    nonzero = q.scales > 0
    assert (q.q.abs().amax(-1)[nonzero] == 127).all()  # every row uses its whole range
    err = (q.dequantize(torch.float32) - delta).abs()
    assert (err <= q.scales[:, :, None] * 0.5 * (1 + 1e-5) + 1e-12).all()
    # rows are independent: two projections stacked along the rows quantize as each alone
    other = torch.randn(E, 4, C)
    both = Int8Deltas.from_experts([experts, other], [base, torch.zeros(4, C)])
    alone = Int8Deltas.from_experts([other], [torch.zeros(4, C)])
    assert torch.equal(both.q[:, :R], q.q) and torch.equal(both.q[:, R:], alone.q)
    assert torch.equal(both.scales[:, R:], alone.scales)
    assert q.nbytes == E * R * C + E * R * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_merge_matches_fp64_and_its_own_bits(dtype, monkeypatch):
    """outs[s] = base + Σ_e c[s,e]·scale[e,r]·q[e,r]: within the output dtype's rounding of the
    fp64 sum (natively and with torch), and natively the same bits whatever S, instruction set
    and prefetch distance (rows of 45 and 300 elements: vector bodies and scalar tails)."""
    torch.manual_seed(1)
    E = 7
    for R, C in ((37, 45), (9, 300)):
        base = torch.randn(R, C).to(dtype)
        q = torch.randint(-127, 128, (E, R, C), dtype=torch.int8)
        scales = torch.rand(E, R) * 0.01
        coeffs = torch.rand(3, E)
        want = base.double() + torch.einsum("se,er,erc->src", coeffs.double(), scales.double(),
                                            q.double())
        tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
        outs = [torch.empty(R, C, dtype=dtype) for _ in range(3)]
        kernels.merge_q8_many(base, q, scales, coeffs, outs)
        for s in range(3):
            assert rel(outs[s].double(), want[s]) <= tol, (dtype, R, C, s)
        with monkeypatch.context() as m:  # the torch path (no native kernels, a GPU)
            m.setattr(kernels, "native", lambda: None)
            kept = base.clone()
            torch_outs = [torch.empty(R, C, dtype=dtype) for _ in range(3)]
            kernels.merge_q8_many(base, q, scales, coeffs, torch_outs)
            assert torch.equal(base, kept)  # read, never written
        for s in range(3):
            assert rel(torch_outs[s].double(), want[s]) <= tol, (dtype, R, C, s)
        if not NATIVE:
            continue
        mod = kernels.native()
        try:
            isas = ["avx2"] + (["avx512"] if "avx512f" in kernels.cpu_flags() else [])
            for isa in isas:
                mod.set_isa(isa, 0)
                for ahead in (0, 64, 1024):
                    mod.set_merge_prefetch(ahead)
                    for s in range(3):  # one output at a time: the bits of three at once
                        one = torch.empty(R, C, dtype=dtype)
                        mod.merge_q8_many(base, q, scales, coeffs[s:s + 1], [one])
                        assert torch.equal(one, outs[s]), (dtype, isa, ahead, s)
        finally:
            mod.set_isa("auto", 0)
            kernels.apply_merge_prefetch(mod)


@pytest.mark.skipif(not NATIVE, reason="needs the native kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_merges_of_compiled_delta_counts_give_the_run_time_counts_bits(dtype):
    """The native int8 merge compiles its loop over deltas for 1-15 deltas and reads the count
    at run time for 16: E deltas must give the bits of the same merge padded to 16 deltas with
    zero coefficients, for every E, with each instruction set this CPU has."""
    mod = kernels.native()
    torch.manual_seed(5)
    R, C, total = 3, 77, kernels.MERGE_Q8_MAX_DELTAS
    isas = ["avx2"] + (["avx512"] if "avx512f" in kernels.cpu_flags() else [])
    try:
        for E in range(1, total):
            base = torch.randn(R, C).to(dtype)
            q = torch.randint(-127, 128, (total, R, C), dtype=torch.int8)
            scales = torch.rand(total, R) * 0.01
            coeffs = torch.rand(2, E)
            zero_padded = torch.cat([coeffs, torch.zeros(2, total - E)], 1)
            for isa in isas:
                mod.set_isa(isa, 0)
                compiled = [torch.full((R, C), float("nan"), dtype=dtype) for _ in range(2)]
                run_time = [torch.full((R, C), float("nan"), dtype=dtype) for _ in range(2)]
                kernels.merge_q8_many(base, q[:E].contiguous(), scales[:E].contiguous(), coeffs,
                                      compiled)
                kernels.merge_q8_many(base, q, scales, zero_padded, run_time)
                for a, b in zip(compiled, run_time):
                    assert not a.isnan().any() and torch.equal(a, b), (isa, E)
    finally:
        mod.set_isa("auto", 0)


def test_int8_merge_of_more_deltas_than_registers_goes_to_torch():
    """A model with more experts than the native loop keeps in registers still merges."""
    torch.manual_seed(4)
    E = kernels.MERGE_Q8_MAX_DELTAS + 1
    base, q = torch.randn(6, 40), torch.randint(-127, 128, (E, 6, 40), dtype=torch.int8)
    scales, coeffs = torch.rand(E, 6) * 0.01, torch.rand(2, E)
    outs = [torch.empty(6, 40) for _ in range(2)]
    kernels.merge_q8_many(base, q, scales, coeffs, outs)
    want = base.double() + torch.einsum("se,er,erc->src", coeffs.double(), scales.double(),
                                        q.double())
    for s in range(2):
        assert rel(outs[s].double(), want[s]) <= 1e-6


@pytest.mark.skipif(not NATIVE, reason=f"no native kernels: {kernels.status()}")
def test_int8_merge_refuses_what_it_cannot_read():
    mod = kernels.native()
    base, q, s = torch.zeros(4, 8), torch.zeros(2, 4, 8, dtype=torch.int8), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="int8"):
        mod.merge_q8_many(base, q.float(), s, torch.ones(1, 2), [torch.empty(4, 8)])
    with pytest.raises(RuntimeError, match="scales"):
        mod.merge_q8_many(base, q, s[:, :3], torch.ones(1, 2), [torch.empty(4, 8)])
    with pytest.raises(RuntimeError, match="one coefficient per delta"):
        mod.merge_q8_many(base, q, s, torch.ones(1, 3), [torch.empty(4, 8)])
    many = torch.zeros(17, 4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="at most 16 deltas"):
        mod.merge_q8_many(base, many, torch.zeros(17, 4), torch.ones(1, 17), [torch.empty(4, 8)])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = build_folded(tmp_path_factory.mktemp("q8") / "lm", T=4)
    return path, int8_reference(path)


@pytest.mark.parametrize("strategy", ["merged", "auto", "fallback"])
@pytest.mark.parametrize("mode", ["segment", "prompt"])
def test_int8_engine_decodes_like_the_dequantized_model(lm, strategy, mode):
    """Incremental decoding with int8 deltas equals a full forward of the model whose experts
    are E_m + the dequantized deltas, at every position, across segment boundaries; also when
    the merge pool has no room and every row runs the (dequantizing) mixture ("fallback")."""
    path, ref = lm
    T = ref.config.segment_len
    extra = dict(merge_cache_bytes=1) if strategy == "fallback" else {}
    engine = Engine.from_pretrained(path, max_batch_size=2, routing=mode, expert_deltas="int8",
                                    strategy="merged" if strategy == "fallback" else strategy,
                                    **extra)
    assert all(m.deltas == "int8" for m in engine.runner.moe)
    gen = torch.Generator().manual_seed(5)
    for prompt_len in (1, T, T + 3, 2 * T + 1):
        prompt = torch.randint(0, 60, (prompt_len,), generator=gen).tolist()
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=3 * T + 2, ignore_eos=True))
        while not handle.done:
            engine.step()
        res = handle.result()
        ids = prompt + res.token_ids
        lp = full_forward_logprobs(ref, ids, prompt_len, mode)
        assert res.token_ids == lp[prompt_len - 1:-1].argmax(-1).tolist(), (prompt_len, mode)
        want = lp[torch.arange(prompt_len - 1, len(ids) - 1), torch.tensor(res.token_ids)]
        torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=1e-5)
    assert engine.runner.cache.referenced == 0
    assert (engine.runner.cache.fallbacks > 0) is (strategy == "fallback")


def test_int8_engine_batched_equals_alone_and_keeps_fewer_bytes(lm):
    """Concurrent requests get the tokens each gets alone (int8 merges of several rows in one
    pass included); the experts take well under the full layout's bytes; /info says which."""
    path, _ = lm
    prompts = [[1, 2, 3], list(range(5, 20)), [7] * 9, [11, 12]]
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    results = {}
    for batch in (1, 4):
        engine = Engine.from_pretrained(path, max_batch_size=batch, expert_deltas="int8")
        engine.start()
        try:
            hs = [engine.submit(p, sp) for p in prompts]
            results[batch] = [(h.result().token_ids, h.result().logprobs) for h in hs]
            assert engine.info()["expert_deltas"] == "int8"
            q8_bytes = engine.info()["expert_bytes"]
        finally:
            engine.stop()
    for (toks_a, lp_a), (toks_b, lp_b) in zip(results[1], results[4]):
        assert toks_a == toks_b  # (the logprobs' last bits follow the batch's GEMM shapes)
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-5, rtol=0)
    full = Engine.from_pretrained(path, max_batch_size=1)
    assert full.info()["expert_deltas"] == "full"
    full_bytes = full.info()["expert_bytes"]
    stacks = sum(t.numel() * t.element_size() for m in full.runner.moe  # [E_m; Δ], biases
                 for t in (m.w1, m.b1, m.w2, m.b2) if t is not None)
    assert full_bytes == stacks
    # fp32, 3 deltas: base 4 + 3 x 1 byte (+ scales) per element against 4 + 3 x 4
    assert q8_bytes < 0.5 * full_bytes, (q8_bytes, full_bytes)


def test_int8_deltas_stay_close_to_the_full_model(lm):
    """What quantizing costs, on the same prompt: the full-sequence log-probabilities of the
    int8 model stay within a few thousandths of the full model's (the deltas are ~1e-2 of
    the weights' scale here, rounded to 1/254 of each row's largest)."""
    path, q8 = lm
    full = reference(path)
    ids = list(range(3, 40))
    a = full_forward_logprobs(full, ids, len(ids), "segment")
    b = full_forward_logprobs(q8, ids, len(ids), "segment")
    assert not torch.equal(a, b)  # the deltas were rounded
    assert float((a - b).abs().max()) < 0.05


def test_int8_engines_merge_and_never_choose_the_mixture(lm):
    """The mixture would dequantize every expert on each call: an int8 engine refuses it as a
    strategy, `auto`'s cost model does not probe it (null in /info) and never picks it, and
    warm-up skips it."""
    path, _ = lm
    with pytest.raises(ValueError, match="strategy 'mixture'.*int8"):
        Engine.from_pretrained(path, strategy="mixture", expert_deltas="int8")
    engine = Engine.from_pretrained(path, max_batch_size=2, expert_deltas="int8")
    engine.warmup()
    try:
        profile = engine.info()["cost_profile"]
        assert profile["mixture_ms"] == [None] * len(profile["points"])
        assert profile["merge_ms"] > 0 and all(v > 0 for v in profile["merged_ms"])
        cost = engine.runner.cost
        for tokens, new, rows in (([1], 1.0, 0), ([1] * 8, 8.0, 0), ([500], 1.0, 0),
                                  ([1], 0.0, 3)):
            assert cost.choose(tokens, new, mixture_rows=rows) == "merged"
        for n, future in ((1, 0), (300, 0), (4, 100)):
            assert cost.choose_segment(n, future, new_merge=True) == "merged"
    finally:
        engine.stop()
    full = Engine.from_pretrained(path, max_batch_size=2)
    full.warmup()
    try:  # full deltas still measure the mixture
        assert all(v > 0 for v in full.info()["cost_profile"]["mixture_ms"])
    finally:
        full.stop()


def test_engine_refuses_an_unknown_delta_layout_and_classifiers_keep_full(tmp_path):
    path = build_folded(tmp_path / "lm", T=4)
    with pytest.raises(ValueError, match="expert_deltas must be one of"):
        Engine.from_pretrained(path, expert_deltas="int4")
    with pytest.raises(ValueError, match="expert deltas must be one of"):
        MoEWeights.from_folded(reference(path).transformer.h[0].ffn, "fp8")
    clf = build_folded(tmp_path / "clf", kind="classifier", T=4)
    engine = Engine.from_pretrained(clf, expert_deltas="int8")
    assert engine.kind == "classifier"
    assert engine.info()["expert_deltas"] == "full"
