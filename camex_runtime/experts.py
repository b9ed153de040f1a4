"""Merged-expert FFNs in both forms, and how a full-sequence forward routes them.

The *training form* (``config.folded=False``) holds curvature operators and computes
``Δ_i = mask_i ⊙ M_i(τ_i)`` on every forward; the *folded form* (``config.folded=True``, what
export writes) holds ``E'_i`` and uses ``Δ_i = E'_i − E_m``. Either way a layer is described to
the merge code as an `ExpertBank`: one `LinearBank` per projection of the family's FFN (GPT-2:
``fc1``, ``fc2``; Llama: ``gate_proj``, ``up_proj``, ``down_proj``), all merged with the same
router scores.

Routing of full-sequence forwards (docs/DESIGN.md §2): causal LMs use causal segment routing
(``mode="segment"``: segment k ≥ 2 is served by the expert merged from the mean FFN input of
segment k−1, segment 1 by the mean of its first ``route1_len`` tokens) or one decision from the
prompt mean (``mode="prompt"``); encoders route once per sequence over their non-padding tokens
(``mode="sequence"``). `ReferenceRouting` applies that plan block by block; the serving engine
has its own routing contexts with the same interface (``apply(layer, h)``).

Knows nothing of attention, KV caches, batching or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CamexConfig
from .layers import DenseFFN, FFNKind, ffn_kind
from .merging import KroneckerCurvature, merge_experts, merge_mask, next_dynamic_base


# ---------------------------------------------------------------------------------------------
# Expert banks: what a merge needs, independent of how the deltas were produced.


@dataclass
class LinearBank:
    """One linear map of an MoE FFN as the merge sees it."""

    base_weight: Tensor          # (out, in)   E_m
    base_bias: Tensor | None     # (out,)      None when the family's FFN has no biases
    delta_weight: Tensor         # (E, out, in) Δ_i = mask_i ⊙ M_i(τ_i)  (folded: E'_i − E_m)
    delta_bias: Tensor | None    # (E, out)     biases merge without curvature
    # Training form only: M_i(τ_i) and τ_i before the mask, which the Dynamic-Merg base chain
    # sums (docs/DESIGN.md §1); None where no mask applies (then they equal the deltas).
    unmasked_weight: Tensor | None = None
    unmasked_bias: Tensor | None = None

    def chain_parts(self) -> list[tuple[Tensor, Tensor]]:
        """[(E_m weight, Σ-able weight deltas), (bias, bias deltas)] for next_dynamic_base."""
        w = self.delta_weight if self.unmasked_weight is None else self.unmasked_weight
        parts = [(self.base_weight, w)]
        if self.base_bias is not None:
            b = self.delta_bias if self.unmasked_bias is None else self.unmasked_bias
            parts.append((self.base_bias, b))
        return parts


@dataclass
class ExpertBank:
    """Everything one MoE layer needs to route and merge: router, one LinearBank per projection
    of `kind` (``bank.fc1``, ``bank.gate_proj``, ... read them by name), α."""

    router_weight: Tensor                     # (E, d)  W_g
    linears: dict[str, LinearBank]
    alpha: float
    kind: FFNKind = field(repr=False)
    router_bias: Tensor | None = None         # (E,)  b_g, where the config has router_bias

    def __getattr__(self, name: str) -> LinearBank:
        linears = self.__dict__.get("linears", {})
        if name in linears:
            return linears[name]
        raise AttributeError(name)


def route_scores(router_weight: Tensor, mean_h: Tensor, router_bias: Tensor | None = None
                 ) -> Tensor:
    """s = softmax(W_g · h̄ + b_g): (..., d) -> (..., E), computed in fp32 for bf16/fp16
    stability."""
    logits = mean_h.float() @ router_weight.float().T
    if router_bias is not None:
        logits = logits + router_bias.float()
    return torch.softmax(logits, dim=-1)


def merged_linear(x: Tensor, lb: LinearBank, scores: Tensor, alpha: float) -> Tensor:
    """x (S, t, in) through the merged linear of each group s: (S, t, out)."""
    w = merge_experts(lb.base_weight, lb.delta_weight, scores, alpha)      # (S, out, in)
    if lb.base_bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    b = merge_experts(lb.base_bias, lb.delta_bias, scores, alpha)          # (S, out)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def merged_ffn(x: Tensor, bank: ExpertBank, scores: Tensor) -> Tensor:
    """Apply one merged expert per group: x (S, t, d), scores (S, E) -> (S, t, d)."""
    k, a = bank.kind, bank.alpha
    hid = k.hidden([merged_linear(x, bank.linears[p], scores, a) for p in k.in_projs])
    return merged_linear(hid, bank.linears[k.out_proj], scores, a)


# ---------------------------------------------------------------------------------------------
# Routing plans: which tokens share a merged expert, and which mean routes them.


def segment_means(h: Tensor, T: int, route1_len: int) -> Tensor:
    """Routing inputs of causal segment routing: (B, L, d) -> (B, K, d), K = ceil(L / T).

    Row 0 is the mean of the first ``route1_len`` tokens (segment 1 routes on itself); row k ≥ 1
    is the mean of segment k (0-based k−1), which is full whenever segment k+1 exists.
    """
    B, L, d = h.shape
    K = -(-L // T)
    r1 = max(1, min(route1_len, T, L))
    first = h[:, :r1].mean(1, keepdim=True)                       # (B, 1, d)
    if K == 1:
        return first
    prev = h[:, : (K - 1) * T].reshape(B, K - 1, T, d).mean(2)    # (B, K-1, d)
    return torch.cat([first, prev], dim=1)


def apply_moe(h: Tensor, bank: ExpertBank, *, mode: str, T: int, route1_len: int | None,
              prompt_len: int | None, pad_mask: Tensor | None, training: bool
              ) -> tuple[Tensor, Tensor]:
    """Route and apply one MoE FFN to its inputs h (B, L, d). Returns (output, scores (B, K, E))."""
    B, L, d = h.shape
    if mode == "sequence":  # encoder: one merge per sequence over its non-padding tokens
        m = torch.ones(B, L, 1, dtype=h.dtype, device=h.device) if pad_mask is None \
            else pad_mask.to(h.dtype).unsqueeze(-1)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)           # (B, d)
        scores = route_scores(bank.router_weight, mean, bank.router_bias)  # (B, E)
        return merged_ffn(h, bank, scores), scores.unsqueeze(1)
    if mode == "prompt":
        P = L if prompt_len is None else max(1, min(prompt_len, L))
        scores = route_scores(bank.router_weight, h[:, :P].mean(1), bank.router_bias)
        return merged_ffn(h, bank, scores), scores.unsqueeze(1)
    if mode != "segment":
        raise ValueError(f"unknown routing mode {mode!r}")
    means = segment_means(h, T, T if route1_len is None else route1_len)  # (B, K, d)
    K = means.shape[1]
    scores = route_scores(bank.router_weight, means, bank.router_bias)  # (B, K, E)
    if training:
        # Segment 1 routes on its own mean, which includes tokens it then predicts: its scores
        # are stop-gradient (the paper's s_0 = DETACH(G(h̄_1))), so neither the router nor
        # the activations learn from that look-ahead.
        scores = torch.cat([scores[:, :1].detach(), scores[:, 1:]], dim=1)
    pad = K * T - L
    hp = F.pad(h, (0, 0, 0, pad)) if pad else h
    # Each (sequence, segment) is one group with its own merged expert.
    out = merged_ffn(hp.reshape(B * K, T, d), bank, scores.reshape(B * K, -1))
    return out.reshape(B, K * T, d)[:, :L], scores


@dataclass
class RoutingRequest:
    """How a full forward routes its MoE layers (see module docstring)."""

    mode: str = "segment"            # "segment" | "prompt" | "sequence" (encoder)
    route1_len: int | None = None    # segment mode: tokens whose mean routes segment 1 (≤ T)
    prompt_len: int | None = None    # prompt mode: tokens whose mean routes everything


class ReferenceRouting:
    """The MoE context of a full-sequence forward: applies each layer's bank under one plan
    and keeps the router scores per layer ((B, K, E), for routing transparency and tests)."""

    def __init__(self, banks: dict[int, ExpertBank], plan: RoutingRequest, T: int,
                 pad_mask: Tensor | None, training: bool) -> None:
        self.banks, self.plan, self.T = banks, plan, T
        self.pad_mask, self.training = pad_mask, training
        self.scores: dict[int, Tensor] = {}

    def apply(self, layer: int, h: Tensor) -> Tensor:
        p = self.plan
        y, self.scores[layer] = apply_moe(h, self.banks[layer], mode=p.mode, T=self.T,
                                          route1_len=p.route1_len, prompt_len=p.prompt_len,
                                          pad_mask=self.pad_mask, training=self.training)
        return y


# ---------------------------------------------------------------------------------------------
# Modules


class StackedLinear(nn.Module):
    """E linear maps stored as one tensor: weight (E, out, in), bias (E, out) or none."""

    def __init__(self, num: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num, out_features)) if bias else None


class ExpertSet(nn.Module):
    """The E routed experts of one MoE FFN: a StackedLinear per projection of the family's FFN
    (``experts.fc1``, ``experts.gate_proj``, ...)."""

    def __init__(self, kind: FFNKind, num: int, d: int, h: int, bias: bool) -> None:
        super().__init__()
        for name in kind.in_projs:
            setattr(self, name, StackedLinear(num, d, h, bias))
        setattr(self, kind.out_proj, StackedLinear(num, h, d, bias))


class CamexMoEFFN(nn.Module):
    """Merged-expert FFN: router, base expert E_m (absent in later Dynamic-Merg layers of the
    training form), routed experts E_1..E_E, and — training form only — curvature operators
    (one per projection: each projection has its own Kronecker factors)."""

    def __init__(self, config: CamexConfig, owns_base: bool) -> None:
        super().__init__()
        E, d, h = config.num_experts, config.d_model, config.d_ff
        self.config = config
        self.kind = ffn_kind(config)
        self.router = nn.Linear(d, E, bias=config.router_bias)
        self.base = DenseFFN(config) if owns_base else None
        self.experts = ExpertSet(self.kind, E, d, h, config.mlp_bias)
        self.curvature = None
        if not config.folded and config.curvature_rank > 0:
            R = config.curvature_rank
            shapes = dict.fromkeys(self.kind.in_projs, (h, d)) | {self.kind.out_proj: (d, h)}
            self.curvature = nn.ModuleDict({p: KroneckerCurvature(E, out, inp, R)
                                            for p, (out, inp) in shapes.items()})

    def own_base(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {p: self.base.projection(p) for p in self.kind.projections}

    def _deltas(self, name: str, base_w: Tensor, base_b: Tensor | None) -> LinearBank:
        lin: StackedLinear = getattr(self.experts, name)
        tau_w = lin.weight - base_w                                 # (E, out, in)
        tau_b = None if lin.bias is None else lin.bias - base_b     # (E, out)
        if self.config.folded:  # E'_i − E_m: mask and curvature were applied at export
            return LinearBank(base_w, base_b, tau_w, tau_b)
        c = self.config
        kw = dict(training=self.training, ties_density=c.ties_density, dare_p=c.dare_p)
        mask_w = merge_mask(c.merge_method, tau_w, **kw)
        mask_b = None if tau_b is None else merge_mask(c.merge_method, tau_b, **kw)
        mw = self.curvature[name](tau_w) if self.curvature is not None else tau_w  # M_i(τ_i)
        dw = mw * mask_w if mask_w is not None else mw
        db = tau_b * mask_b if mask_b is not None else tau_b
        return LinearBank(base_w, base_b, dw, db,
                          unmasked_weight=mw if mask_w is not None else None,
                          unmasked_bias=tau_b if mask_b is not None else None)

    def expert_bank(self, base: dict[str, tuple[Tensor, Tensor | None]] | None = None
                    ) -> ExpertBank:
        """The bank of this layer; ``base`` is the derived E_m of a Dynamic-Merg chain."""
        base = self.own_base() if self.base is not None else base
        linears = {p: self._deltas(p, *base[p]) for p in self.kind.projections}
        return ExpertBank(self.router.weight, linears, float(self.config.alpha), self.kind,
                          self.router.bias)


def next_bank_base(bank: ExpertBank) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Dynamic-Merg: E_m^{l+1} = E_m^l + α/E Σ_i M_i^l(τ_i^l), from the unmasked deltas."""
    out = {}
    for name, lb in bank.linears.items():
        parts = [next_dynamic_base(base, deltas, bank.alpha) for base, deltas in lb.chain_parts()]
        out[name] = (parts[0], parts[1] if len(parts) > 1 else None)
    return out
