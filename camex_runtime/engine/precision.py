"""Which dtypes a served model computes in, chosen per device and CPU at start-up, and the
serving layout that follows (linear layers on the native kernels).

On a CPU, a bf16 or fp16 language-model engine keeps its *weights* in the requested dtype —
linear layers, expert stacks, merged weights, the output head: half the bytes to stream, which
is what decode costs — and computes *activations* in fp32: norms, attention, the KV cache,
router inputs, sampling ("mixed"). The native kernels (camex_runtime.kernels) widen the weights
in registers, exactly (bf16 and fp16 are subsets of fp32), so the result is at least as accurate
as computing in the 16-bit dtype, and a decode step streams the weights at memory speed.
Computing in the 16-bit dtype ("pure") is slower at decode sizes on every CPU measured: on AVX2
machines torch widens the matrices op by op (a bf16 step cost what fp32 did, a batch of 8 three
times as much); on a Zen 4 core with AVX512-BF16, one sequence's step took 33 ms pure against
13 ms mixed (GPT-2-small shape), and pure was ahead only at 8 sequences (49 ms against 55 ms).
Prompt chunks (more rows than a decode batch) multiply in the 16-bit dtype where the CPU has
native 16-bit GEMMs (2-2.7x faster than widening each weight matrix per call); elsewhere the
native prompt tiles take them (kernels.tiles_take: each group of weight rows widened once into a
small scratch), and longer chunks widen the weights a slice at a time for torch's fp32 GEMM,
which the widening pays for from a few hundred rows.
So mixed is the default wherever the native kernels run; on CUDA, where they cannot be built,
and for classifiers, everything runs in the requested dtype. `CAMEX_PRECISION=pure|mixed`
overrides the choice (comparisons, debugging).

Classifier engines keep one dtype (their merges serve one sequence once; the gain is decode's).
Knows nothing about requests or caches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from camex_runtime import kernels
from camex_runtime.engine.moe import serving_hidden
from camex_runtime.layers import CamexAttention, DenseFFN, RMSNorm

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


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
    mode = os.environ.get("CAMEX_PRECISION", "auto")
    if mode not in ("auto", "pure", "mixed"):
        raise ValueError(f"CAMEX_PRECISION must be auto, pure or mixed, got {mode!r}")
    if (device.type != "cpu" or dtype not in SIXTEEN_BIT or not causal_lm or mode == "pure"
            or kernels.native() is None):
        return Precision(dtype, dtype)
    return Precision(dtype, torch.float32)


class ServingLinear(nn.Linear):
    """An nn.Linear whose forward goes through `kernels.linear` (native for decode-sized row
    counts; fp32 activations with 16-bit weights). Same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class ServingFFN(DenseFFN):
    """A DenseFFN whose hidden function goes through `kernels.serving_hidden` (native, the
    bits the decode step's fused FFN gives each element; torch's tanh GELU was ~5 % of a
    GPT-2-small prompt's prefill on one Zen 3 core). Same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hid = serving_hidden([getattr(self, p)(x) for p in self.kind.in_projs], self.kind)
        return getattr(self, self.kind.out_proj)(hid)


@torch.no_grad()
def prepare(model: nn.Module, precision: Precision) -> None:
    """Serving layout of `model` in place: linear layers and dense FFNs' hidden functions on
    the kernels; with mixed precision,
    every parameter that is not a linear weight (biases, norms, attention sinks, position
    table) in the compute dtype, and the embedding's output cast to it."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ServingLinear
        elif type(module) is DenseFFN:
            module.__class__ = ServingFFN
        if not precision.mixed:
            continue
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data = module.bias.data.to(precision.compute)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(precision.compute)
        elif isinstance(module, CamexAttention) and module.sinks is not None:
            module.sinks.data = module.sinks.data.to(precision.compute)
    if precision.mixed:
        tr = model.transformer
        if tr.wpe is not None:
            tr.wpe.weight.data = tr.wpe.weight.data.to(precision.compute)
        tr.activation_dtype = precision.compute
