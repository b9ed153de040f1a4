"""The decode step with fused blocks: each block's attention half and FFN half in one native call.

A decode step multiplies a few rows by every weight matrix once; on a CPU core those products
take ~10 ms for GPT-2-small in bf16, and the model's block code spends another ~2.5 ms around
them: per block a dozen small torch operations (norms, views, residual adds, the activation),
each an interpreter round trip and a dispatch. `FusedDecode` runs the same blocks through
`kernels`' native `attn_block` (norm, qkv projection, rotary positions, KV-cache write,
attention, output projection, residual) and `ffn_block` (norm, input projection(s), GELU or
SwiGLU, output projection, residual), with the same weights the model holds: no copies.

Merged-expert layers keep their routing in Python: the block's second norm is native, the FFN
is the routing context's (`_DecodeRouting.apply`: segment sums, merges, the merged or mixture
strategy), the residual a torch add.

It applies where the native kernels do (a CPU with AVX2/FMA/F16C and the extension built),
with fp32 activations (fp32 models, or 16-bit weights served in mixed precision), an fp32 KV
cache, and at most `kernels.MAX_ROWS` rows; `FusedDecode.build` returns None otherwise and the
runner uses the model's block loop. Every row is computed on its own, so a row's result does not
depend on the rest of its batch; against the block loop it differs only by float rounding (its
norms, activation and rotary arithmetic are its own). Knows nothing about requests or merges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camex_runtime import kernels
from camex_runtime.engine.kv_cache import KVCache
from camex_runtime.layers import RMSNorm, gelu_hidden, swiglu_hidden


@dataclass(frozen=True)
class _Norm:
    weight: Tensor
    bias: Tensor | None
    eps: float
    rms: bool

    @classmethod
    def of(cls, module: nn.Module) -> _Norm | None:
        if isinstance(module, nn.LayerNorm) and module.weight is not None and \
                module.normalized_shape == (module.weight.shape[0],):
            return cls(module.weight, module.bias, float(module.eps), False)
        if isinstance(module, RMSNorm):
            return cls(module.weight, None, float(module.eps), True)
        return None

    def args(self) -> tuple:
        return self.weight, self.bias, self.eps, self.rms


@dataclass(frozen=True)
class _Block:
    layer: int
    attn: tuple  # attn_block's arguments after x, up to the cache
    norm2: _Norm
    ffn: tuple | None  # ffn_block's arguments after x; None: a merged-expert layer


class FusedDecode:
    def __init__(self, model, kv: KVCache, blocks: list[_Block], final: _Norm,
                 rope: tuple[Tensor, Tensor] | None, heads: tuple[int, int]):
        self.tr = model.transformer
        self.kv, self.blocks, self.final, self.rope, self.heads = kv, blocks, final, rope, heads

    @classmethod
    def build(cls, model, kv: KVCache, compute: torch.dtype) -> FusedDecode | None:
        """The fused step for `model` (served with activations in `compute`), or None where it
        does not apply (see the module docstring)."""
        tr = model.transformer
        if (kernels.native() is None or compute != torch.float32 or model.training
                or kv.k.dtype != torch.float32 or kv.k.device.type != "cpu"
                or not (kv.k.is_contiguous() and kv.v.is_contiguous())):
            return None
        final = _Norm.of(tr.ln_f)
        if final is None or final.weight.dtype != torch.float32:
            return None
        blocks = []
        for i, block in enumerate(tr.h):
            n1, n2 = _Norm.of(block.ln_1), _Norm.of(block.ln_2)
            if n1 is None or n2 is None or n1.weight.dtype != compute or \
                    n2.weight.dtype != compute:
                return None
            a = block.attn
            attn = (*n1.args(), a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias)
            ffn = None
            if not block.is_moe:
                f, kind = block.ffn, block.ffn.kind
                if kind.hidden is gelu_hidden and len(kind.in_projs) == 1:
                    gate, up = None, getattr(f, kind.in_projs[0])
                elif kind.hidden is swiglu_hidden and len(kind.in_projs) == 2:
                    gate, up = (getattr(f, p) for p in kind.in_projs)
                else:
                    return None
                down = getattr(f, kind.out_proj)
                ffn = (*n2.args(), None if gate is None else gate.weight,
                       None if gate is None else gate.bias, up.weight, up.bias, down.weight,
                       down.bias)
            blocks.append(_Block(i, attn, n2, ffn))
        rope = tr.rotary.tables(kv.k.device, compute) if tr.rotary is not None else None
        first = tr.h[0].attn
        return cls(model, kv, blocks, final, rope, (first.n_head, first.n_kv))

    def run(self, ids: Tensor, positions: Tensor, slots: Tensor, moe) -> Tensor:
        """ids, positions, slots (B,) -> the final (normed) hidden states (B, d), keys and
        values of every layer written into the cache; `moe` applies merged-expert FFNs
        (`apply(layer, h (B, 1, d)) -> (B, 1, d)`)."""
        mod, tr, kc, vc = kernels.native(), self.tr, self.kv.k, self.kv.v
        x = tr.wte(ids).float()
        if tr.wpe is not None:
            x = x + tr.wpe(positions)
        x = x.contiguous()
        cos, sin = self.rope if self.rope is not None else (None, None)
        H, KV = self.heads
        for b in self.blocks:
            x = mod.attn_block(x, *b.attn, kc, vc, b.layer, slots, positions, cos, sin, H, KV)
            if b.ffn is not None:
                x = mod.ffn_block(x, *b.ffn)
            else:
                h = mod.norm(x, *b.norm2.args())
                x = x + moe.apply(b.layer, h[:, None])[:, 0]
        return mod.norm(x, *self.final.args())
