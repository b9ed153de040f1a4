"""Which dtypes a served model computes in, chosen per device and CPU at start-up, and the
serving layout that follows (linear layers on the native kernels).

A CPU without native 16-bit arithmetic (AVX2 machines: no AVX512-BF16 / AMX / AVX512-FP16)
multiplies bf16 and fp16 matrices slowly — torch widens them op by op, and small-row products
fall back to generic code (a bf16 decode step there costs as much as fp32, a batch of 8 three
times as much). A bf16 or fp16 language-model engine on such a CPU therefore keeps its *weights*
in the requested dtype — linear layers, expert stacks, merged weights, the output head: half
the bytes to stream, which is what decode costs — and computes *activations* in fp32: norms,
attention, the KV cache, router inputs, sampling. The native kernels (camex_runtime.kernels)
widen the weights in registers, exactly (bf16 and fp16 are subsets of fp32), so the result is
at least as accurate as computing in the 16-bit dtype. On CUDA, on CPUs with native 16-bit
arithmetic, and where the native kernels cannot be built, everything runs in the requested
dtype. `CAMEX_PRECISION=pure` forces that choice (comparisons, debugging).

Classifier engines keep one dtype (their merges serve one sequence once; the gain is decode's).
Knows nothing about requests or caches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from camex_runtime import kernels
from camex_runtime.layers import RMSNorm

NATIVE_16BIT = {torch.bfloat16: ("avx512_bf16", "amx_bf16"),
                torch.float16: ("avx512_fp16", "amx_fp16")}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # linear layers, expert stacks, merged weights, output head
    compute: torch.dtype  # activations, norms, attention, KV cache

    @property
    def mixed(self) -> bool:
        return self.weights != self.compute

    def describe(self) -> str:
        name = lambda t: str(t).replace("torch.", "")  # noqa: E731
        if not self.mixed:
            return name(self.compute)
        return f"{name(self.weights)} weights, {name(self.compute)} compute"


def choose(device: torch.device, dtype: torch.dtype, causal_lm: bool) -> Precision:
    """The precision to serve a `dtype` checkpoint with on `device` (module docstring)."""
    if (device.type != "cpu" or dtype not in NATIVE_16BIT or not causal_lm
            or os.environ.get("CAMEX_PRECISION") == "pure"):
        return Precision(dtype, dtype)
    if set(NATIVE_16BIT[dtype]) & kernels.cpu_flags() or kernels.native() is None:
        return Precision(dtype, dtype)
    return Precision(dtype, torch.float32)


class ServingLinear(nn.Linear):
    """An nn.Linear whose forward goes through `kernels.linear` (native for decode-sized row
    counts; fp32 activations with 16-bit weights). Same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


@torch.no_grad()
def prepare(model: nn.Module, precision: Precision) -> None:
    """Serving layout of `model` in place: linear layers on the kernels; with mixed precision,
    every parameter that is not a linear weight (biases, norms, position table) in the compute
    dtype, and the embedding's output cast to it."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ServingLinear
        if not precision.mixed:
            continue
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data = module.bias.data.to(precision.compute)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(precision.compute)
    if precision.mixed:
        tr = model.transformer
        if tr.wpe is not None:
            tr.wpe.weight.data = tr.wpe.weight.data.to(precision.compute)
        tr.activation_dtype = precision.compute
