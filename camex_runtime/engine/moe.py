"""The two exact ways to apply a merged-expert FFN, on weights laid out for serving.

`MoEWeights` stacks each linear as `[E_m; Δ_1..Δ_E]` once at load (the folded checkpoint's
`E'_i − E_m`, docs/DESIGN.md §3), so that
- **merged**: `merge_into` writes `Ê = E_m + α Σ_i s_i Δ_i` into a preallocated pool entry with
  `kernels.merge` (one pass over the stack per part, no allocation), and
  `apply_merged` applies it with two plain linears — the same cost as a dense FFN;
  `merge_apply` does both for a prompt segment a tile of weight rows at a time, the same bits;
- **mixture**: `apply_mixture` runs the inputs through all E+1 experts at once (fc1: one GEMM
  against the stacked weight; fc2: one bmm over the score-scaled activations) and never
  materialises per-sequence weights. Exact too, since every linear is linear in its weight.

With `deltas="int8"` (opt-in, `Int8Deltas`) the weight deltas are kept as int8 with one fp32
scale per expert and weight row, and a merge reads 1 byte per delta element instead of 2 (bf16)
or 4 (fp32): the merges a prompt's first token waits for are bound by those bytes. The served
model is then the one whose deltas are the dequantized `scale · q`; `merge_apply` declines
(merge, then apply), and `apply_mixture` dequantizes the stacks on every call (the engine runs
it for int8 deltas only when the merge pool is full).

Knows nothing about caches, keys or requests: weights, scores and activations in, outputs out.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from camex_runtime import kernels
from camex_runtime.experts import ExpertBank, LinearBank, route_scores
from camex_runtime.layers import FFNKind
from camex_runtime.memory import huge_page_empty


DELTA_FORMATS = ("full", "int8")  # expert deltas in the weights' dtype; int8 + per-row scales


@dataclass
class Int8Deltas:
    """The E weight deltas of one stacked projection as int8 with one fp32 scale per (expert,
    row): Δ_e[r] ≈ scales[e, r] · q[e, r] (symmetric, scale = max |Δ_e[r]| · (1/127), q rounded
    half to even; kernels.quantize_q8), what a merge reads in place of the full-precision deltas
    (kernels.merge_q8_many)."""

    q: Tensor  # (E, R, C) int8
    scales: Tensor  # (E, R) fp32

    @classmethod
    def from_experts(cls, experts: list[Tensor], bases: list[Tensor]) -> Int8Deltas:
        """Δ_e = E'_e − E_m of projections stacked along the rows, experts[p] (E, R_p, C) and
        bases[p] (R_p, C), one expert and projection at a time (kernels.quantize_q8, fp32
        arithmetic; no full-precision copy of the stack)."""
        E, C = experts[0].shape[0], experts[0].shape[2]
        R = sum(b.shape[0] for b in bases)
        dev = bases[0].device
        q = huge_page_empty((E, R, C), torch.int8, dev)
        scales = torch.empty(E, R, dtype=torch.float32, device=dev)
        for e in range(E):
            at = 0
            for w, b in zip(experts, bases):
                n = b.shape[0]
                kernels.quantize_q8(w[e].contiguous(), b.contiguous(), q[e, at:at + n],
                                    scales[e, at:at + n])
                at += n
        return cls(q, scales)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """(E, R, C) in `dtype`: scales · q computed in fp32, then rounded."""
        return (self.q.float() * self.scales[:, :, None]).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * 4


@dataclass
class MoEWeights:
    """One MoE FFN in serving layout. Row 0 of each stack is the base expert E_m.

    The family's input projections are stacked along their output rows as one `fc1` (GPT-2:
    fc1; SwiGLU: [gate; up], so one GEMM serves both) and the output projection is `fc2`;
    `kind` is the family's FFN in that fused layout (layers.FFNKind.fused).

    With int8 deltas (`q1`, `q2` set) `w1` and `w2` hold E_m alone, (1, k*h, d) and (1, d, h);
    the biases stay stacked in full precision (a few KB a layer). `stacks()` gives the
    [E_m; Δ] stacks in either layout."""
    router: Tensor  # (E, d)
    w1: Tensor  # (E+1, k*h, d), k = number of input projections; (1, k*h, d) with q1
    b1: Tensor | None  # (E+1, k*h), None without FFN biases
    w2: Tensor  # (E+1, d, h); (1, d, h) with q2
    b2: Tensor | None  # (E+1, d)
    alpha: float
    kind: FFNKind
    q1: Int8Deltas | None = None  # int8 deltas of fc1 (E, k*h, d)
    q2: Int8Deltas | None = None  # int8 deltas of fc2 (E, d, h)
    router_bias: Tensor | None = None  # (E,), where the config has router_bias

    @classmethod
    def from_folded(cls, ffn, deltas: str = "full") -> MoEWeights:
        """From a folded `CamexMoEFFN` (base E_m, experts E'_i): Δ_i = E'_i − E_m is written
        straight into one preallocated stack per part, so loading holds at most one layer's
        stack beside the checkpoint's own tensors. `deltas="int8"`: the weight deltas are then
        quantized (`Int8Deltas`, from E'_i − E_m in fp32) and the full stack dropped."""
        if deltas not in DELTA_FORMATS:
            raise ValueError(f"expert deltas must be one of {DELTA_FORMATS}, got {deltas!r}")
        kind = ffn.kind
        base = ffn.own_base()
        experts = {p: getattr(ffn.experts, p) for p in kind.projections}

        def stack(projs: tuple[str, ...], bias: bool) -> Tensor | None:
            pairs = [(base[p][1], experts[p].bias) if bias else (base[p][0], experts[p].weight)
                     for p in projs]
            if pairs[0][0] is None:
                return None
            b0, e0 = pairs[0]
            rows = sum(b.shape[0] for b, _ in pairs)
            out = huge_page_empty((e0.shape[0] + 1, rows, *b0.shape[1:]), b0.dtype, b0.device)
            at = 0
            for b, e in pairs:  # fused input projections side by side along the rows
                n = b.shape[0]
                out[0, at:at + n] = b
                torch.sub(e, b, out=out[1:, at:at + n])
                at += n
            return out

        def quantized(projs: tuple[str, ...]) -> tuple[Tensor, Int8Deltas]:
            """E_m (1, rows, in) and the int8 deltas (Int8Deltas.from_experts)."""
            bases = [base[p][0] for p in projs]
            q = Int8Deltas.from_experts([experts[p].weight for p in projs], bases)
            rows = sum(b.shape[0] for b in bases)
            out = huge_page_empty((1, rows, *bases[0].shape[1:]), bases[0].dtype,
                                  bases[0].device)
            torch.cat(bases, dim=0, out=out[0])
            return out, q

        with torch.no_grad():
            b1, b2 = stack(kind.in_projs, True), stack((kind.out_proj,), True)
            if deltas == "int8":
                (w1, q1), (w2, q2) = quantized(kind.in_projs), quantized((kind.out_proj,))
            else:
                w1, w2 = stack(kind.in_projs, False), stack((kind.out_proj,), False)
                q1 = q2 = None
            bias = ffn.router.bias
            return cls(router=ffn.router.weight.detach(), w1=w1, b1=b1, w2=w2, b2=b2,
                       alpha=float(ffn.config.alpha), kind=kind.fused(), q1=q1, q2=q2,
                       router_bias=None if bias is None else bias.detach())

    @property
    def num_experts(self) -> int:
        return self.q1.q.shape[0] if self.q1 is not None else self.w1.shape[0] - 1

    @property
    def deltas(self) -> str:
        """The layout of the weight deltas: "full" or "int8" (DELTA_FORMATS)."""
        return "full" if self.q1 is None else "int8"

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of the expert stacks (weights, deltas, scales, biases)."""
        parts = [self.w1, self.b1, self.w2, self.b2]
        total = sum(t.numel() * t.element_size() for t in parts if t is not None)
        return total + sum(q.nbytes for q in (self.q1, self.q2) if q is not None)

    def stacks(self) -> tuple[Tensor, Tensor]:
        """The weight stacks [E_m; Δ_1..Δ_E] of fc1 and fc2: (E+1, k*h, d), (E+1, d, h). With
        int8 deltas they are dequantized here, a new allocation per call (the mixture strategy
        and `bank()` use them; the merges read the int8 deltas directly)."""
        def full(w: Tensor, q: Int8Deltas | None) -> Tensor:
            return w if q is None else torch.cat([w, q.dequantize(w.dtype)])
        return full(self.w1, self.q1), full(self.w2, self.q2)

    @property
    def ffn_params(self) -> int:
        """Parameters of one (merged) FFN."""
        biases = 0 if self.b1 is None else self.b1[0].numel() + self.b2[0].numel()
        return self.w1[0].numel() + self.w2[0].numel() + biases

    def bank(self) -> ExpertBank:
        """The same weights as the model code's ExpertBank, in the fused layout (views)."""
        def lb(w: Tensor, b: Tensor | None) -> LinearBank:
            return LinearBank(w[0], None if b is None else b[0],
                              w[1:], None if b is None else b[1:])
        w1, w2 = self.stacks()
        return ExpertBank(self.router, {"fc1": lb(w1, self.b1), "fc2": lb(w2, self.b2)},
                          self.alpha, self.kind, self.router_bias)

    def scores(self, mean_h: Tensor) -> Tensor:
        """(S, d) routing inputs -> (S, E) fp32 softmax scores (the model's route_scores)."""
        return route_scores(self.router, mean_h, self.router_bias)

    def merge_into(self, scores: Tensor, out: Mapping[str, Tensor]) -> None:
        """Write the merged FFN for one routing decision, scores (E,), into pool views `out`
        (merge_cache.merged_ffn_shapes: fc1_weight (k*h, d), fc2_weight (d, h), biases):
        Ê = E_m + α Σ_i s_i Δ_i, one pass over the stack (kernels.merge)."""
        self.merge_many_into(scores.reshape(1, -1), [out])

    def merge_many_into(self, scores: Tensor, outs: list[Mapping[str, Tensor]]) -> None:
        """`merge_into` for S decisions at once, scores (S, E): one pass over the stack writes
        all S merged FFNs (kernels.merge_many), the same bits as S separate merges."""
        E = self.num_experts
        coeffs = (self.alpha * scores.reshape(len(outs), E)).float()
        for part, stack, q in (("fc1_weight", self.w1, self.q1), ("fc1_bias", self.b1, None),
                               ("fc2_weight", self.w2, self.q2), ("fc2_bias", self.b2, None)):
            if stack is None:
                continue
            if q is not None:
                kernels.merge_q8_many(stack[0], q.q, q.scales, coeffs.to(stack.device),
                                      [out[part] for out in outs])
            else:
                kernels.merge_many(stack[0].reshape(-1), stack[1:].reshape(E, -1),
                                   coeffs.to(stack.device), [out[part].view(-1) for out in outs])

    def merge_apply(self, x: Tensor, scores: Tensor, out: Mapping[str, Tensor]) -> Tensor | None:
        """`merge_into` for one decision, scores (E,), and `apply_merged` of a prompt
        segment's rows x (n, d) by it, each projection merged and applied a tile at a time
        (kernels.merge_linear: the pool gets the same bits, the merged weights are never
        re-read). Returns the FFN's output (n, d), the bits `apply_merged` gives x from the
        finished entry, or None with nothing written where the kernels do not take x (the
        caller merges, then applies), as with int8 deltas."""
        if self.q1 is not None:
            return None
        E = self.num_experts
        w1, w2 = self.w1.reshape(E + 1, -1), self.w2.reshape(E + 1, -1)
        if not (self.kind.activation in kernels.NATIVE_ACTIVATIONS
                and kernels.merge_linear_takes(x, w1, out["fc1_weight"])):
            return None
        coeffs = (self.alpha * scores.reshape(E)).float().to(x.device)
        for part, stack in (("fc1_bias", self.b1), ("fc2_bias", self.b2)):
            if stack is not None:  # the products add the merged biases
                kernels.merge(stack[0], stack[1:], coeffs, out[part])
        u = kernels.merge_linear(x, w1[0], w1[1:], coeffs, out["fc1_weight"], out.get("fc1_bias"))
        hid = kernels.hidden(u, self.kind.activation, self.kind.params)  # as kernels.ffn does
        return kernels.merge_linear(hid, w2[0], w2[1:], coeffs, out["fc2_weight"],
                                    out.get("fc2_bias"))

    def to_compute(self, dtype: torch.dtype) -> MoEWeights:
        """Mixed precision (engine/precision.py): biases and router in the compute dtype,
        the weight stacks kept in theirs."""
        conv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return MoEWeights(self.router.to(dtype), self.w1, conv(self.b1), self.w2, conv(self.b2),
                          self.alpha, self.kind, self.q1, self.q2, conv(self.router_bias))


def with_int8_deltas(model):
    """The model an engine with `expert_deltas="int8"` serves, in the model code's own form:
    each folded MoE FFN's experts replaced, in place, by E_m + the dequantized int8 delta
    (`Int8Deltas`, fp32 arithmetic, then the weights' dtype). Returns `model`. For measuring
    what int8 deltas cost offline (benchmarks/int8_deltas.py) and as the tests' reference."""
    with torch.no_grad():
        for block in model.transformer.h:
            if not block.is_moe:
                continue
            ffn = block.ffn
            base = ffn.own_base()
            for name in ffn.kind.projections:
                lin = getattr(ffn.experts, name)
                q = Int8Deltas.from_experts([lin.weight], [base[name][0]])
                lin.weight.copy_(base[name][0].float() + q.dequantize(torch.float32))
    return model


def serving_hidden(ins: list[Tensor], kind: FFNKind) -> Tensor:
    """The hidden function of an FFN of `kind` (fused or not; a served model's dense FFNs too,
    engine/precision.py): native where it applies (kernels.serving_hidden: the bits kernels.ffn
    gives), else the kind's own."""
    hid = kernels.serving_hidden(ins, kind.activation, kind.params)
    return kind.hidden(ins) if hid is None else hid


def apply_merged(x: Tensor, w: Mapping[str, Tensor], kind: FFNKind) -> Tensor:
    """x (n, d) through one merged FFN (pool views) -> (n, d): decode rows and short prompt
    segments (fp32 weights; bf16 with kernels.bf16_dot()) on the CPU in one native call
    (kernels.ffn; MoEWeights.merge_apply gives the same bits), else two linears around the
    hidden function."""
    got = kernels.ffn(x, w["fc1_weight"], w.get("fc1_bias"), w["fc2_weight"], w.get("fc2_bias"),
                      kind.activation, kind.params)
    if got is not None:
        return got
    hid = serving_hidden([kernels.linear(x, w["fc1_weight"], w.get("fc1_bias"))], kind)  # (n, h)
    return kernels.linear(hid, w["fc2_weight"], w.get("fc2_bias"))  # (n, d)


def mixture_coefficients(scores: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """(n, E) scores -> (n, E+1) weights of [E_m; Δ_1..Δ_E]: [1, α s_1, ..., α s_E]."""
    ones = torch.ones_like(scores[:, :1])
    return torch.cat([ones, alpha * scores], dim=1).to(dtype)


def apply_mixture(x: Tensor, moe: MoEWeights, scores: Tensor) -> Tensor:
    """x (n, d), per-row scores (n, E) -> (n, d), without materialising merged weights.
    Exact because every projection is linear in its weight: the input projections' E+1
    outputs are combined with [1, α s] before the (non-linear) hidden function."""
    n, d = x.shape
    w1, w2 = moe.stacks()  # int8 deltas: dequantized for this call
    E1, kh = w1.shape[0], w1.shape[1]
    c = mixture_coefficients(scores, moe.alpha, x.dtype)  # (n, E+1)
    b1 = None if moe.b1 is None else moe.b1.view(E1 * kh)
    # fc1: (n, d) @ ((E+1)·kh, d)^T -> (n, E+1, kh); then the score-weighted sum over experts
    y = kernels.linear(x, w1.view(E1 * kh, d), b1).view(n, E1, kh)
    mixed = torch.bmm(c.unsqueeze(1), y).squeeze(1)  # (n, 1, E+1) @ (n, E+1, kh)
    hid = serving_hidden([mixed], moe.kind)
    # fc2: per expert e, (c_e · hid) @ w2[e]^T summed over e: (E+1, n, h) @ (E+1, h, d)
    scaled = c.t().unsqueeze(2) * hid.unsqueeze(0)  # (E+1, n, h)
    if w2.dtype == x.dtype and n > kernels.max_rows(w2.dtype):
        out = torch.bmm(scaled, w2.transpose(1, 2)).sum(0)  # (n, d)
    else:  # decode rows, or 16-bit weights under fp32 activations: one streaming pass each
        out = sum(kernels.linear(scaled[e], w2[e]) for e in range(E1))
    return out if moe.b2 is None else out + c @ moe.b2  # (n, E+1) @ (E+1, d)
