"""Native CPU kernels (camex_runtime.kernels) against torch, and mixed precision serving
(16-bit weights, fp32 activations) against fp32 and pure 16-bit serving."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camex_runtime import Engine, kernels
from camex_runtime.engine.precision import Precision
from engine_models import build_folded

HAS_FLAGS = set(kernels.REQUIRED_FLAGS) <= kernels.cpu_flags()


def test_kernels_are_native_exactly_where_the_cpu_has_the_instructions():
    status = kernels.status()
    if HAS_FLAGS:  # this kind of machine (and CI): AVX2/FMA/F16C, a compiler, ninja
        assert status.startswith("native"), status
    else:
        assert status.startswith("torch (this CPU lacks"), status


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32])
def test_linear_equals_torch(wdtype, rows):
    torch.manual_seed(rows)
    big = torch.randn(50, 40).to(wdtype)
    w = big[:, :37]  # a row stride wider than the row, and an input width that is no multiple of 8
    x, b = torch.randn(rows, 37), torch.randn(50)
    want = F.linear(x, w.float(), b)
    for bias in (b, None):
        got = kernels.linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, 50)
        assert rel(got, F.linear(x, w.float(), bias)) <= 1e-6
    assert rel(kernels.linear(x.view(rows, 1, 37), w, b).view(rows, 50), want) <= 1e-6


def test_large_row_counts_and_16bit_activations_go_to_torch():
    torch.manual_seed(0)
    w = torch.randn(24, 16).bfloat16()
    x = torch.randn(kernels.MAX_ROWS + 1, 16)
    assert rel(kernels.linear(x, w), F.linear(x, w.float())) <= 1e-6
    xb = x[:4].bfloat16()
    assert torch.equal(kernels.linear(xb, w), F.linear(xb, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_equals_addmm(dtype):
    torch.manual_seed(1)
    n, E = 1037, 5
    base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
    coeffs = torch.rand(E)
    want = (base.float() + coeffs @ deltas.float()).to(dtype)
    out = torch.empty(n, dtype=dtype)
    kernels.merge(base, deltas, coeffs, out)
    # fp32 sums in another order: at most one unit in the last place of the 16-bit result
    tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert rel(out.float(), want.float()) <= tol


def test_mixed_precision_serves_16bit_weights_with_fp32_activations(tmp_path, monkeypatch):
    """On a CPU without native bf16 (and with the kernels), a bf16 engine streams bf16 weights
    and computes in fp32: closer to the fp32 engine than computing in bf16 is."""
    path = build_folded(tmp_path / "lm", T=4)
    prompt = list(range(3, 17))
    logits = {}
    for name in ("fp32", "mixed", "pure"):
        if name == "pure":
            monkeypatch.setenv("CAMEX_PRECISION", "pure")
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        engine = Engine.from_pretrained(path, dtype=dtype, max_batch_size=1, strategy="merged")
        runner = engine.runner
        rows = [runner.prefill(0, prompt, "segment", max_new_tokens=6)]
        tokens = list(prompt)
        for t in (5, 9, 2, 7, 11):
            tokens.append(t)
            rows.append(runner.decode([0], [t], [tokens])[0])
        logits[name] = torch.stack(rows).float()
        if name == "mixed":
            mixed = kernels.native() is not None and not ({"avx512_bf16", "amx_bf16"}
                                                          & kernels.cpu_flags())
            want = Precision(torch.bfloat16, torch.float32 if mixed else torch.bfloat16)
            assert runner.precision == want
            assert runner.kv.k.dtype == want.compute
            assert runner.cache.pool["fc1_weight"].dtype == torch.bfloat16
            assert runner.moe[0].w1.dtype == torch.bfloat16
            assert engine.info()["precision"] == want.describe()
    ref = logits["fp32"]
    err = {k: rel(v, ref) for k, v in logits.items() if k != "fp32"}
    assert err["mixed"] <= 0.03 and err["pure"] <= 0.03
    assert err["mixed"] <= err["pure"] + 1e-6, err
