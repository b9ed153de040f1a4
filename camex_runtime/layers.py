"""The pieces a CAMEx block is made of, per family: norms, rotary positions, attention, FFNs.

A family (``config.family``, see config.py) is a registry entry that says which norm, which
position scheme and which FFN shape its blocks use; attention is one module for every family
(fused qkv, optional grouped-query heads, optional rotary). Attention does not know whether a KV
cache exists: it hands its new queries, keys and values to an *attention context*, which is
either `FullAttention` (training, reference forwards, classification: attend within the given
tokens) or one of the serving engine's cache contexts (engine/attention.py).

Numerics follow transformers' implementations of the same layers (RMSNorm in fp32, rotary
tables in fp32, GELU tanh approximation), so upcycled models reproduce their dense sources.
Knows nothing about experts, routing or caches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CamexConfig


# ---------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary positions


def rope_frequencies(config: CamexConfig, params: dict | None = None) -> tuple[Tensor, float]:
    """(inv_freq (rot/2,), attention scaling) for the config's rotary type (or `params`, a
    second description such as `rope_local_parameters`), fp32 on the CPU.

    The same arithmetic, in the same order, as transformers' initialisers of these types
    (ROPE_TYPES in config.py), so imported models rotate exactly as their sources."""
    params = (config.rope_parameters if params is None else params) or {}
    rope_type = params.get("rope_type", "default")
    rot = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).to(torch.float) / rot))
    if rope_type == "linear":  # positions stretched by `factor`
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":  # long wavelengths slowed by `factor`, short kept, smooth between
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn(config, params, base, rot)
    if rope_type == "longrope":  # below original_max_position_embeddings: the short factors
        factor = params.get("factor") or \
            config.max_position_embeddings / params["original_max_position_embeddings"]
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(
                1 + math.log(factor) / math.log(params["original_max_position_embeddings"]))
        short = torch.tensor(params["short_factor"], dtype=torch.float32)
        shape = torch.arange(0, rot, 2, dtype=torch.int64).float() / rot
        return 1.0 / (short * base ** shape), float(attention)
    return inv_freq, 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config: CamexConfig, params: dict, base: float, rot: int) -> tuple[Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context, OLMo 3, DeepSeek): frequencies interpolated by
    `factor` below a band of dimensions, kept above it, ramped linearly between (the band from
    beta_fast / beta_slow rotations over the original context); cos/sin scaled by the
    attention factor. Nothing depends on the sequence length."""
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or config.max_position_embeddings / old_len
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else _yarn_mscale(factor))

    def dims(rotations: float) -> float:  # the dimension that turns `rotations` times
        return rot * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dims(params.get("beta_fast") or 32), dims(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rot // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolated (kept), 0: interpolated (divided by factor)
    pos_freqs = base ** (torch.arange(0, rot, 2).to(dtype=torch.float) / rot)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position, for positions < max_position_embeddings.

    The tables are built lazily on the device of the positions (a model built on the meta
    device and filled from safetensors never sees a stale buffer), once per device and dtype.
    Entries equal transformers' per-call computation bit for bit: each angle is one fp32
    product ``position * inv_freq``, cos/sin in fp32, then the cast."""

    def __init__(self, config: CamexConfig, params: dict | None = None) -> None:
        super().__init__()
        self.config, self.params = config, params  # params: None = config.rope_parameters
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        # Llama 4's query scale (Ministral 3): from the rotary's original length L on, every
        # query × 1 + beta · log(1 + ⌊position / L⌋), after the rotation. Only queries change,
        # so cached keys stay as they are; 1 exactly below L.
        p = params if params is not None else config.rope_parameters
        self.beta = float((p or {}).get("llama_4_scaling_beta") or 0.0)
        self.query_scale_from = int(p["original_max_position_embeddings"]) if self.beta \
            else None

    def query_scale(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """positions (B, L) -> (B, L) query scales, as transformers computes them (fp32)."""
        scale = 1 + self.beta * torch.log(1 + torch.floor(positions / self.query_scale_from))
        return scale.to(dtype)

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        got = self._tables.get((device, dtype))
        if got is None:
            inv_freq, scaling = rope_frequencies(self.config, self.params)
            pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]                       # (P, rot/2)
            emb = torch.cat((freqs, freqs), dim=-1)                        # (P, rot)
            got = ((emb.cos() * scaling).to(device=device, dtype=dtype),
                   (emb.sin() * scaling).to(device=device, dtype=dtype))
            self._tables[(device, dtype)] = got
        return got

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """positions (B, L) or (L,) -> cos, sin (B or 1, 1, L, rot): broadcast over heads;
        with a query scale, that too, (B or 1, 1, L, 1)."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        cos, sin = self.tables(positions.device, dtype)
        rope = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        if self.query_scale_from is None:
            return rope
        return *rope, self.query_scale(positions, dtype)[:, None, :, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, rope: tuple[Tensor, ...]) -> Tensor:
    """x (B, heads, L, hd) rotated at its positions (`rope`'s cos, sin); a partial rotary
    leaves the tail as is."""
    cos, sin = rope[0], rope[1]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention


class AttentionContext(Protocol):
    """Where keys and values come from: `attend(layer, q, k, v, window, softcap, sinks) -> (B,
    H, L, hd)` with the forward's new queries (B, H, L, hd) and keys/values (B, KV, L, hd);
    `window` (None: all) is how many positions up to its own a causal query sees (sliding-window
    attention), `softcap` (None: none) caps scores at ±softcap (Gemma 2: cap * tanh(s / cap)),
    `sinks` (None: none) are one logit per query head that joins each softmax as a column
    without a value (GPT-OSS's attention sinks)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor: ...


def sees(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """(n, m) bool: query at position q_pos[i] sees the key at k_pos[j] — causal, and within
    its window (k > q - window, transformers' sliding-window rule) when one is given."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
    return seen


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
         is_causal: bool = False, softcap: float | None = None,
         sinks: Tensor | None = None) -> Tensor:
    """scaled_dot_product_attention; key/value heads are shared by groups of query heads (GQA).
    With `softcap`, scores are capped before the mask and softmax, with `sinks` (H,) each
    head's sink joins the softmax (neither of which torch's fused kernels can do): the scores
    are materialised, (B, H, L, S) floats — except sinks alone on a CPU (`sink_attention`)."""
    if sinks is not None and softcap is None and fused_sinks(q):
        return sink_attention(q, k, v, sinks, attn_mask, is_causal)
    if softcap is not None or sinks is not None:
        return scored_attention(q, k, v, softcap, sinks, attn_mask, is_causal)
    kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          **kw)


def scored_attention(q: Tensor, k: Tensor, v: Tensor, cap: float | None,
                     sinks: Tensor | None = None, attn_mask: Tensor | None = None,
                     is_causal: bool = False) -> Tensor:
    """softmax(cap * tanh(q k^T / sqrt(hd) / cap) + mask) v, the softmax in fp32: Gemma 2's
    attention with a cap, plain attention without; with `sinks` (H,) each head's logit is one
    more softmax column whose weight is dropped (GPT-OSS), so a query may attend to nothing.
    `attn_mask` bool (True: attend) broadcast to (B, H, L, S), `is_causal` with L == S."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    if is_causal:
        L = q.shape[2]
        attn_mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        # a finite floor, not -inf: a row that sees nothing (padding) must not become NaN
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    scores = scores.float()
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    column = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


# torch's fused CPU attention, which returns each query's log-sum-exp of its scores beside its
# output (F.scaled_dot_product_attention runs it and drops that); None where a torch lacks it
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_sinks(q: Tensor) -> bool:
    """Whether attention sinks for queries `q` go through `sink_attention` (a fused kernel)."""
    return _CPU_FLASH is not None and q.device.type == "cpu"


def sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor,
                   attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """`scored_attention` with sinks and no cap through torch's fused CPU kernel: a sink only
    adds e^sink to each softmax's denominator, so with S = Σ_j e^(s_j) (the kernel's
    log-sum-exp, lse) the output is the plain attention's × S / (S + e^sink) = × σ(lse − sink).
    Nothing (H, L, S) is materialised: GPT-OSS-shaped attention (64 query heads, 8 key/value
    heads) of 128-2,048-token prompts, full or a 128-token window, one or two threads (Zen 4),
    took 1.9-5.1x the plain attention's time through the scores, 1.1-1.5x this way (the key /
    value heads repeated for the kernel and the sigmoid)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # (the kernel has no grouped heads)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = None
    if attn_mask is not None:  # additive, in q's dtype; a finite floor as scored_attention's
        mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attn_mask, torch.finfo(q.dtype).min)
    out, lse = _CPU_FLASH(q, k, v, 0.0, is_causal, attn_mask=mask)
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # (B, H, L)
    return out * keep.to(out.dtype).unsqueeze(-1)


@dataclass
class FullAttention:
    """No cache: every token attends within the tokens of this forward."""

    causal: bool = True
    key_padding_mask: Tensor | None = None  # (B, L), True/1 = a real token

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               window: int | None = None, softcap: float | None = None,
               sinks: Tensor | None = None) -> Tensor:
        """A window applies to causal attention only (the decoders that have one)."""
        window = window if self.causal else None
        if self.key_padding_mask is None and window is None:
            return sdpa(q, k, v, is_causal=self.causal, softcap=softcap, sinks=sinks)
        L = q.shape[2]
        mask = torch.ones(1, 1, L, L, dtype=torch.bool, device=q.device)
        if self.causal:
            pos = torch.arange(L, device=q.device)
            mask = sees(pos, pos, window)[None, None]
        if self.key_padding_mask is not None:
            mask = mask & self.key_padding_mask[:, None, None, :].bool()  # (B, 1, L, L)
        return sdpa(q, k, v, attn_mask=mask, softcap=softcap, sinks=sinks)


class CamexAttention(nn.Module):
    """Self-attention of every family: one fused qkv projection (rows: H query heads, then KV
    key heads, then KV value heads), optionally an RMSNorm over each query and each key head
    (`qk_norm`, Qwen3: one weight for all query heads, one for all key heads; with
    `qk_norm_width="all"`, OLMo 2: over all query heads together, all key heads), rotary positions
    where the family uses them, output projection. GPT-2 is the case KV = H, no rotary."""

    def __init__(self, config: CamexConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = (config.n_head, config.num_key_value_heads,
                                                 config.head_dim)
        qkv = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.c_attn = nn.Linear(config.d_model, qkv, bias=config.attention_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.d_model,
                                bias=config.attention_out_bias)
        self.window = config.window(layer)  # None: full causal attention
        self.rotates = config.rotates(layer)  # False: no rotary positions (GPT-2, NoPE blocks)
        self.local_rope = config.local_rope(layer)  # rotates with rope_local_parameters
        self.softcap = config.attn_logit_softcapping  # None: scores not capped
        # GPT-OSS: one logit per query head in every softmax (attention sinks); None: none
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attention_sinks else None
        # OLMo 2: one norm over all query heads' values together (H * hd), one over the keys'
        self.qk_norm_all = config.qk_norm and config.qk_norm_width == "all"
        self.qk_norm_after_rope = config.qk_norm_after_rope  # Hunyuan: rotate, then norm
        if config.qk_norm:
            q_width, k_width = (self.n_head * self.head_dim, self.n_kv * self.head_dim) \
                if self.qk_norm_all else (self.head_dim, self.head_dim)
            self.q_norm = RMSNorm(q_width, config.layer_norm_epsilon)
            self.k_norm = RMSNorm(k_width, config.layer_norm_epsilon)
        else:
            self.q_norm = self.k_norm = None

    def split_qkv(self, x: Tensor, rope: tuple[Tensor, ...] | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, d) -> q (B, H, L, hd), k and v (B, KV, L, hd); q and k normed per head if
        the model has `qk_norm`, then rotated if rope (rotated, then normed: Hunyuan)."""
        B, L, _ = x.shape
        H, KV, hd = self.n_head, self.n_kv, self.head_dim
        qkv = self.c_attn(x)
        if self.qk_norm_all:  # normed before the heads are split apart
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
            q = self.q_norm(q).view(B, L, H, hd).transpose(1, 2)
            k = self.k_norm(k).view(B, L, KV, hd).transpose(1, 2)
            v = v.view(B, L, KV, hd).transpose(1, 2)
        elif KV == H:  # one view, as GPT-2 always did
            q, k, v = qkv.view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
            q = q.view(B, L, H, hd).transpose(1, 2)
            k = k.view(B, L, KV, hd).transpose(1, 2)
            v = v.view(B, L, KV, hd).transpose(1, 2)
        per_head = self.q_norm is not None and not self.qk_norm_all
        if per_head and not self.qk_norm_after_rope:  # over head_dim, the last axis
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if per_head and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and len(rope) > 2:  # Llama 4's query scale (see RotaryEmbedding)
            q = q * rope[2]
        return q, k, v

    def merge_heads(self, o: Tensor) -> Tensor:
        """(B, H, L, hd) -> c_proj((B, L, H*hd))."""
        B, H, L, hd = o.shape
        return self.c_proj(o.transpose(1, 2).reshape(B, L, H * hd))

    def forward(self, x: Tensor, ctx: AttentionContext | None = None, *,
                rope: tuple[Tensor, ...] | None = None, causal: bool = True,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend through `ctx` (default: within x, causal or with a padding mask)."""
        q, k, v = self.split_qkv(x, rope if self.rotates else None)
        ctx = ctx or FullAttention(causal, key_padding_mask)
        return self.merge_heads(ctx.attend(self.layer, q, k, v, self.window, self.softcap,
                                           self.sinks))


# ---------------------------------------------------------------------------------------------
# FFNs


def gelu_hidden(ins: list[Tensor]) -> Tensor:
    # GPT-2's "gelu_new" (tanh approximation), so upcycled models match GPT-2 exactly.
    return F.gelu(ins[0], approximate="tanh")


def swiglu_hidden(ins: list[Tensor]) -> Tensor:
    gate, up = ins
    return F.silu(gate) * up


def geglu_hidden(ins: list[Tensor]) -> Tensor:
    # Gemma's gelu_pytorch_tanh on the gate
    gate, up = ins
    return F.gelu(gate, approximate="tanh") * up


def swigluoai_hidden(limit: float, alpha: float) -> Callable[[list[Tensor]], Tensor]:
    """GPT-OSS's clamped SwiGLU: (up + 1) * gate * sigmoid(alpha * gate), the gate clamped
    above at `limit`, up to ±limit (transformers' order of operations)."""
    def hidden(ins: list[Tensor]) -> Tensor:
        gate, up = ins
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return hidden


@dataclass(frozen=True)
class FFNKind:
    """The shape of one FFN: input projection(s) d -> h, a hidden function of their outputs,
    and one output projection h -> d. Every projection is a linear map, so every one merges
    with the same formula and the same scores."""

    in_projs: tuple[str, ...]
    out_proj: str
    hidden: Callable[[list[Tensor]], Tensor]
    # what `hidden` computes, for native kernels that fuse it: "gelu_tanh" (one input) or
    # "swiglu" (silu(gate) * up; fused layout: [gate; up] stacked in fc1) or "geglu"
    # (gelu_tanh(gate) * up, the same layout) or "swigluoai" (GPT-OSS's clamped SwiGLU, the same
    # layout; `params` (limit, alpha))
    activation: str = ""
    params: tuple[float, ...] = ()

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.in_projs, self.out_proj)

    def fused(self) -> FFNKind:
        """The serving layout: all input projections stacked along their output rows as one
        `fc1` (for SwiGLU: [gate; up], one GEMM), the output projection as `fc2`."""
        k, hidden = len(self.in_projs), self.hidden
        if k == 1:
            return FFNKind(("fc1",), "fc2", hidden, self.activation, self.params)
        return FFNKind(("fc1",), "fc2", lambda ins: hidden(list(ins[0].chunk(k, dim=-1))),
                       self.activation, self.params)


GELU_FFN = FFNKind(("fc1",), "fc2", gelu_hidden, "gelu_tanh")
SWIGLU_FFN = FFNKind(("gate_proj", "up_proj"), "down_proj", swiglu_hidden, "swiglu")
GEGLU_FFN = FFNKind(("gate_proj", "up_proj"), "down_proj", geglu_hidden, "geglu")


@dataclass(frozen=True)
class Family:
    """What differs between families; everything else (routing, merging, serving) is shared."""

    norm: Callable[[int, float], nn.Module]
    learned_positions: bool  # an absolute position table added to the embeddings (GPT-2)
    ffn: FFNKind


FAMILY_REGISTRY: dict[str, Family] = {
    "gpt2": Family(norm=lambda d, eps: nn.LayerNorm(d, eps=eps), learned_positions=True,
                   ffn=GELU_FFN),
    "llama": Family(norm=RMSNorm, learned_positions=False, ffn=SWIGLU_FFN),
}


def family_of(config: CamexConfig) -> Family:
    return FAMILY_REGISTRY[config.family]


@functools.cache
def swigluoai_ffn(limit: float, alpha: float) -> FFNKind:
    """GPT-OSS's FFN (one object per limit and slope, so kinds compare by identity)."""
    return FFNKind(("gate_proj", "up_proj"), "down_proj", swigluoai_hidden(limit, alpha),
                   "swigluoai", (limit, alpha))


def ffn_kind(config: CamexConfig) -> FFNKind:
    """The FFN of the config's blocks: the family's, GeGLU for a gelu llama (Gemma), the
    clamped SwiGLU for a swigluoai one (GPT-OSS)."""
    if config.family == "llama" and config.hidden_act == "gelu_pytorch_tanh":
        return GEGLU_FFN
    if config.family == "llama" and config.hidden_act == "swigluoai":
        return swigluoai_ffn(config.swiglu_limit, config.swiglu_alpha)
    return family_of(config).ffn


class DenseFFN(nn.Module):
    """A dense FFN of the config's family: blocks outside ``moe_layers``, the dense baseline,
    and the base expert E_m of a merged-expert layer."""

    def __init__(self, config: CamexConfig) -> None:
        super().__init__()
        self.kind = ffn_kind(config)
        d, h, bias = config.d_model, config.d_ff, config.mlp_bias
        for name in self.kind.in_projs:
            setattr(self, name, nn.Linear(d, h, bias=bias))
        setattr(self, self.kind.out_proj, nn.Linear(h, d, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        hid = self.kind.hidden([getattr(self, p)(x) for p in self.kind.in_projs])
        return getattr(self, self.kind.out_proj)(hid)

    def projection(self, name: str) -> tuple[Tensor, Tensor | None]:
        lin: nn.Linear = getattr(self, name)
        return lin.weight, lin.bias
