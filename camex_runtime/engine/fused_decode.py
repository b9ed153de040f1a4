"""The decode step with fused blocks: spans of pre-norm blocks in one native call each.

A decode step multiplies a few rows by every weight matrix once; on a CPU core those products
take ~10 ms for GPT-2-small in bf16, and the model's block code spends another ~2.5 ms around
them: per block a dozen small torch operations (norms, views, residual adds, the activation),
each an interpreter round trip and a dispatch. `FusedDecode` runs the same blocks through
`kernels`' native `layers`: per block the attention half (norm, qkv projection, per-head q/k
norms where the model has them, rotary positions — the block's own tables where it has a second
rotary base, Gemma 3 —, KV-cache write, attention (its scores capped where the model caps them,
Gemma 2; each head's sink in its softmax, GPT-OSS), output projection, the output's norm in
Gemma's blocks, residual) and the FFN half (norm, input projection(s), GELU, SwiGLU, GeGLU or
GPT-OSS's clamped SwiGLU, output projection, the output's norm in Gemma's blocks, residual),
with the same weights the
model holds: no copies. One call covers as many consecutive blocks as it can (a dense model: all
of them and the final norm), because every return from native code waits for the GIL, and in a
server the event loop thread holds it while it sends the previous token: per block, a dense
GPT-2-small step gained ~0.6 ms at B=1 against a thread busy 0.3 ms per step (Zen 4, bf16).

Merged-expert layers are planned first, for every layer in order (`moe.plan(layer)`: new
segments routed, merges acquired; nothing there depends on this step's hidden states). A layer
whose rows all have their merged expert runs natively too: one FFN group per merged expert, the
segment sums accumulated in the call. A layer that needs the mixture (the `auto` strategy's
choice, or rows the merge pool refused) breaks the span: its attention half and norm are native
calls, its FFN the routing context's (`moe.apply`), the residual a torch add.

It applies where the native kernels do (a CPU with AVX2/FMA/F16C and the extension built),
with fp32 activations (fp32 models, or 16-bit weights served in mixed precision), an fp32 KV
cache, and at most `max_rows` rows (`kernels.max_rows` of the weights it multiplies: 16 for
fp32, 8 for 16-bit weights); `FusedDecode.build` returns
None otherwise, and the runner uses the model's block loop for those and for larger batches
(`serves`), and for a step with a row at or past the position where Llama 4's query scale
starts (Ministral 3, 16,384): the native blocks do not scale queries, which below it is 1.
Every row is computed on its own, so a row's result does not
depend on the rest of its batch; against the block loop it differs only by float rounding (its
norms, activation and rotary arithmetic are its own); a span gives the bits of its blocks run
one call at a time. Knows nothing about requests or merges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camex_runtime import kernels
from camex_runtime.engine.kv_cache import KVCache
from camex_runtime.layers import RMSNorm, ffn_kind, gelu_hidden


@dataclass(frozen=True)
class _Norm:
    weight: Tensor | None  # None: no norm (the identity)
    bias: Tensor | None
    eps: float
    rms: bool

    @classmethod
    def of(cls, module: nn.Module, eps: float = 1e-5) -> _Norm | None:
        """The native kernels' description of a norm module; an identity (a block without
        pre-norms, OLMo 2) has no weight and `eps` (what the block's other norms use)."""
        if isinstance(module, nn.Identity):
            return cls(None, None, eps, True)
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
    attn: tuple  # attn_block's arguments after x, up to the cache (q/k norm weights last)
    norm2: _Norm
    ffn: FFNSpec | None  # a dense block's FFN; None: a merged-expert layer (moe.plan)
    window: int = 0  # sliding-window attention: positions a query sees; 0: all
    rotates: bool = True  # False: no rotary positions in this block (NoPE)
    gate: int = 0  # a gated FFN's gate (kernels.NATIVE_GATES: silu, gelu_tanh, clamped SwiGLU)
    local: bool = False  # rotates with the model's second (local) tables (Gemma 3)
    # norms of the attention's and the FFN's outputs before the residual adds (Gemma), or None
    attn_out: Tensor | None = None
    ffn_out: Tensor | None = None
    sinks: Tensor | None = None  # the heads' attention sinks (GPT-OSS), or None
    qk_after_rope: bool = False  # per-head q/k norms on the rotated heads (Hunyuan)

    def tensors(self) -> list:
        """`layers`' 13 tensors of the block: norm 1, qkv, o projections, q/k head norms (or
        None), norm 2, the two output norms (or None), the attention sinks (or None)."""
        w1, b1, _, _, qkv, qkv_b, o, o_b, qn, kn = self.attn
        return [w1, b1, qkv, qkv_b, o, o_b, qn, kn, self.norm2.weight, self.norm2.bias,
                self.attn_out, self.ffn_out, self.sinks]


@dataclass(frozen=True)
class FFNSpec:
    """One block's FFN for the native `layers`: groups of (rows or None for all, gate, gate
    bias, up, up bias, down, down bias); `stacked`: SwiGLU with [gate; up] in `up`; rows whose
    `acc_slots` entry is >= 0 add their FFN input to `seg_sum[slot, moe_index]`."""
    groups: list
    stacked: bool = False
    moe_index: int = -1
    acc_slots: Tensor | None = None


class FusedDecode:
    def __init__(self, model, kv: KVCache, blocks: list[_Block], final: _Norm,
                 rope: tuple[Tensor, Tensor] | None, heads: tuple[int, int],
                 rope_local: tuple[Tensor, Tensor] | None = None):
        self.tr = model.transformer
        # every block's attention scores capped at ±softcap (Gemma 2); 0: not capped
        self.softcap = model.config.attn_logit_softcapping or 0.0
        self.kv, self.blocks, self.final, self.rope, self.heads = kv, blocks, final, rope, heads
        self.rope_local = rope_local
        # Llama 4's query scale (Ministral 3) is 1 below this position, and the native blocks
        # do not apply it: a step with a row at or past it takes the block loop (serves())
        starts = [r.query_scale_from for r in (self.tr.rotary, self.tr.rotary_local)
                  if r is not None and r.query_scale_from is not None]
        self.query_scale_from = min(starts) if starts else None
        # `layers`' per-block arguments that do not change between steps
        self._tensors = [b.tensors() for b in blocks]
        self._eps = [(b.attn[2], b.norm2.eps) for b in blocks]
        self._flags = [(b.layer, int(b.attn[3]), int(b.norm2.rms)) for b in blocks]
        # the span's last ints per block: the attention window (0: all), rotary positions (1/0),
        # the gate's code, the local rotary tables (1/0), q/k norms after the rotation (1/0)
        self._attn_ints = [(b.window, int(b.rotates), b.gate, int(b.local), int(b.qk_after_rope))
                           for b in blocks]
        # the clamped SwiGLU's (limit, alpha) (GPT-OSS); 0 for the other gates
        kind = ffn_kind(model.config)
        self.swiglu = kernels.gate_args(kind.activation, kind.params)[2:]
        # rows per step: the native kernels' limit for the weights the step multiplies (its
        # linear layers, expert stacks and output head; an embedding table is only indexed)
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = getattr(model, "lm_head", None)
        products = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
        if head is not None:
            products.append(head.weight)
        self.max_rows = min(kernels.max_rows(p.dtype) for p in products)

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
        kind = ffn_kind(model.config)  # dense and merged FFNs alike
        if kind.activation not in kernels.NATIVE_ACTIVATIONS:
            return None
        gate_code = kernels.NATIVE_GATES.get(kind.activation, 0)
        eps = model.config.layer_norm_epsilon
        for i, block in enumerate(tr.h):
            n1, n2 = _Norm.of(block.ln_1, eps), _Norm.of(block.ln_2, eps)
            if n1 is None or n2 is None or any(n.weight is not None and n.weight.dtype != compute
                                               for n in (n1, n2)):
                return None
            a = block.attn
            if a.sinks is not None and a.sinks.dtype != compute:
                return None
            qk = (None, None)
            if a.q_norm is not None:  # the kernel norms heads with the block norm's eps
                if not (n1.rms and a.q_norm.eps == a.k_norm.eps == n1.eps
                        and a.q_norm.weight.dtype == a.k_norm.weight.dtype == compute):
                    return None
                qk = (a.q_norm.weight, a.k_norm.weight)
            attn = (*n1.args(), a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
                    *qk)
            outs = []  # Gemma's norms of the branch outputs: RMS, each with its branch's eps
            for norm, like in ((block.ln_attn_out, n1), (block.ln_ffn_out, n2)):
                o = _Norm.of(norm) if norm is not None else None
                if norm is not None and (o is None or not (o.rms and like.rms) or o.eps != like.eps
                                         or o.weight.dtype != compute):
                    return None
                outs.append(None if o is None else o.weight)
            ffn = None
            if not block.is_moe:
                f, kind = block.ffn, block.ffn.kind
                if kind.hidden is gelu_hidden and len(kind.in_projs) == 1:
                    gate, up = None, getattr(f, kind.in_projs[0])
                elif kind.activation in kernels.NATIVE_GATES and len(kind.in_projs) == 2:
                    gate, up = (getattr(f, p) for p in kind.in_projs)
                else:
                    return None
                down = getattr(f, kind.out_proj)
                ffn = FFNSpec([[None, None if gate is None else gate.weight,
                                None if gate is None else gate.bias, up.weight, up.bias,
                                down.weight, down.bias]])
            blocks.append(_Block(i, attn, n2, ffn, a.window or 0, a.rotates, gate_code,
                                 a.local_rope, *outs,
                                 None if a.sinks is None else a.sinks.detach(),
                                 a.qk_norm_after_rope))
        rope = tr.rotary.tables(kv.k.device, compute) if tr.rotary is not None else None
        local = tr.rotary_local.tables(kv.k.device, compute) \
            if tr.rotary_local is not None else None
        first = tr.h[0].attn
        return cls(model, kv, blocks, final, rope, (first.n_head, first.n_kv), local)

    def serves(self, rows: int, last_position: int) -> bool:
        """Whether a decode step of `rows` rows, the furthest at `last_position`, runs here."""
        return rows <= self.max_rows and (self.query_scale_from is None
                                          or last_position < self.query_scale_from)

    def run(self, ids: Tensor, positions: Tensor, slots: Tensor, moe,
            seg_sum: Tensor | None = None) -> Tensor:
        """ids, positions, slots (B,) -> the final (normed) hidden states (B, d), keys and
        values of every layer written into the cache. `moe` is the step's routing context:
        `plan(layer) -> FFNSpec | None` (None: that layer's FFN is `apply(layer, h (B, 1, d))
        -> (B, 1, d)`); `seg_sum` the tensor the specs' segment sums go to."""
        mod, tr, kc, vc = kernels.native(), self.tr, self.kv.k, self.kv.v
        x = tr.wte(ids).float()
        if tr.config.embedding_scale is not None:
            x = x * tr.config.embedding_scale
        if tr.wpe is not None:
            x = x + tr.wpe(positions)
        x = x.contiguous()
        cos, sin = self.rope if self.rope is not None else (None, None)
        cos_l, sin_l = self.rope_local if self.rope_local is not None else (None, None)
        H, KV = self.heads
        specs = [b.ffn if b.ffn is not None else moe.plan(b.layer) for b in self.blocks]
        n, i = len(self.blocks), 0
        while i < n:
            b = self.blocks[i]
            if specs[i] is None:  # a merged-expert layer on the routing context's mixture
                rot = ((cos_l, sin_l) if b.local else (cos, sin)) if b.rotates else (None, None)
                x = mod.attn_block(x, *b.attn, kc, vc, b.layer, slots, positions, *rot, H, KV,
                                   b.window, b.attn_out, self.softcap, b.sinks,
                                   b.qk_after_rope)
                h = mod.norm(x, *b.norm2.args()) if b.norm2.weight is not None else x
                f = moe.apply(b.layer, h[:, None])[:, 0]
                if b.ffn_out is not None:
                    f = mod.norm(f.contiguous(), b.ffn_out, None, b.norm2.eps, True)
                x = x + f
                i += 1
                continue
            j = i
            while j < n and specs[j] is not None:
                j += 1
            ffns = specs[i:j]
            final = self.final if j == n else None
            x = mod.layers(
                x, self._tensors[i:j], [e for pair in self._eps[i:j] for e in pair],
                [v for flags, f, attn in zip(self._flags[i:j], ffns, self._attn_ints[i:j])
                 for v in (*flags, int(f.stacked), f.moe_index, *attn)],
                [f.groups for f in ffns], [f.acc_slots for f in ffns], seg_sum, kc, vc, slots,
                positions, cos, sin, cos_l, sin_l, H, KV,
                None if final is None else final.weight,
                None if final is None else final.bias, 1e-5 if final is None else final.eps,
                False if final is None else final.rms, self.softcap, *self.swiglu)
            if final is not None:
                return x
            i = j
        return mod.norm(x, *self.final.args())
