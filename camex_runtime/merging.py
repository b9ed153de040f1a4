"""The merging math of CAMEx: curvature operators, merge masks, the merge formula, Dynamic-Merg.

- ``KroneckerCurvature``: ``M(τ) = Σ_r (A_r ⊗ B_r) τ (C_r ⊗ D_r)ᵀ`` for every expert at once,
  computed by contracting the modes of τ reshaped to ``[o1, o2, i1, i2]`` (the Kronecker product
  is never materialised). Identity at initialisation.
- ``merge_mask``: domain_specific (ones), ties (trim + sign election), dare (train-time drop).
- ``merge_experts``: the one merge formula ``base + α · scores @ deltas``, used by training,
  the folded model and the serving engine alike.
- ``next_dynamic_base``: the Dynamic-Merg chain ``E_m^{l+1} = E_m^l + α/E Σ_i Δ_i^l``.

This module knows nothing of blocks, routing or checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def factor_pair(n: int) -> tuple[int, int]:
    """The divisor pair (a, b), a <= b, a * b = n, closest to sqrt(n): 768 -> (24, 32)."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


class KroneckerCurvature(nn.Module):
    """Curvature operators M_1..M_E of rank R for one weight shape (out, in).

    Parameters, per expert e and rank term r: A (o1, o1), B (o2, o2), C (i1, i1), D (i2, i2).
    Term r = 0 starts as exact identities; terms r >= 1 start with A, C at small noise so that
    their contribution is O(noise²) yet their gradients are non-zero (symmetry breaking).
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int,
                 noise: float = 1e-3) -> None:
        super().__init__()
        self.rank, self.noise = rank, noise
        (o1, o2), (i1, i2) = factor_pair(out_features), factor_pair(in_features)
        self.shape4 = (o1, o2, i1, i2)
        E = num_experts
        self.A = nn.Parameter(torch.empty(E, rank, o1, o1))
        self.B = nn.Parameter(torch.empty(E, rank, o2, o2))
        self.C = nn.Parameter(torch.empty(E, rank, i1, i1))
        self.D = nn.Parameter(torch.empty(E, rank, i2, i2))
        self.reset_parameters()

    @torch.no_grad()
    def identity_init(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Initial values: identities for r = 0; noise on A, C and identities on B, D for r >= 1."""
        vals = {}
        for name, p in (("A", self.A), ("B", self.B), ("C", self.C), ("D", self.D)):
            n = p.shape[-1]
            v = torch.eye(n, dtype=p.dtype, device=p.device).expand_as(p).clone()
            if name in ("A", "C") and self.rank > 1:
                noise = torch.randn(p[:, 1:].shape, generator=generator, dtype=p.dtype) * self.noise
                v[:, 1:] = noise.to(p.device)
            vals[name] = v
        return vals

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, v in self.identity_init().items():
            getattr(self, name).copy_(v)

    def forward(self, tau: Tensor) -> Tensor:
        """(E, out, in) -> (E, out, in): M_e(τ_e) for every expert e."""
        E = tau.shape[0]
        o1, o2, i1, i2 = self.shape4
        t = tau.reshape(E, o1, o2, i1, i2)
        # Contract one mode at a time; r stays a batch dim until the final sum.
        t = torch.einsum("erxa,eabcd->erxbcd", self.A, t)   # (E,R,o1,o2,i1,i2)
        t = torch.einsum("eryb,erxbcd->erxycd", self.B, t)
        t = torch.einsum("erzc,erxycd->erxyzd", self.C, t)
        t = torch.einsum("erwd,erxyzd->erxyzw", self.D, t)
        return t.sum(1).reshape(E, o1 * o2, i1 * i2)


def explicit_apply(curv: KroneckerCurvature, tau: Tensor) -> Tensor:
    """M(τ) with materialised Kronecker products (tests only): Σ_r kron(A,B) τ kron(C,D)ᵀ."""
    out = []
    for e in range(tau.shape[0]):
        acc = torch.zeros_like(tau[e])
        for r in range(curv.rank):
            left = torch.kron(curv.A[e, r], curv.B[e, r])
            right = torch.kron(curv.C[e, r], curv.D[e, r])
            acc = acc + left @ tau[e] @ right.T
        out.append(acc)
    return torch.stack(out)


@torch.no_grad()
def ties_mask(tau: Tensor, density: float = 1.0) -> Tensor:
    """TIES mask for stacked domain vectors τ (E, ...): trim to the top-`density` fraction of
    |τ_e| per expert, then keep entries whose sign agrees with the elected sign(Σ_e trimmed τ_e)."""
    E = tau.shape[0]
    flat = tau.reshape(E, -1)
    if density < 1.0:
        k = max(1, int(round(density * flat.shape[1])))
        thresh = flat.abs().topk(k, dim=1).values[:, -1:]          # (E, 1)
        keep = flat.abs() >= thresh
    else:
        keep = torch.ones_like(flat, dtype=torch.bool)
    trimmed = flat * keep
    elected = torch.sign(trimmed.sum(0, keepdim=True))               # (1, n)
    agree = torch.sign(flat) == elected
    return (keep & agree).to(tau.dtype).reshape_as(tau)


def dare_mask(shape: torch.Size, p: float, device, dtype, generator=None) -> Tensor:
    """DARE: drop with probability p and rescale by 1/(1-p), so E[mask] = 1 (training only)."""
    keep = torch.rand(shape, device=device, generator=generator) >= p
    return keep.to(dtype) / (1.0 - p)


def merge_mask(method: str, tau: Tensor, *, training: bool, ties_density: float = 1.0,
               dare_p: float = 0.0) -> Tensor | None:
    """mask_i (docs/DESIGN.md §1.3) for stacked τ (E, ...); None means all ones (no multiply)."""
    if method == "domain_specific":
        return None
    if method == "ties":
        return ties_mask(tau, ties_density)
    if method == "dare":
        if not training or dare_p == 0.0:
            return None
        return dare_mask(tau.shape, dare_p, tau.device, tau.dtype)
    raise ValueError(f"unknown merge method {method!r}")


def merge_experts(base: Tensor, deltas: Tensor, scores: Tensor, alpha: float,
                  out: Tensor | None = None) -> Tensor:
    """The merge formula: Ê_s = base + α Σ_i scores[s, i] · deltas[i], for every row s.

    base (*shape), deltas (E, *shape), scores (S, E) -> (S, *shape). With ``out`` (a
    preallocated (S, *shape) buffer) the result is written in place: one addmm, no allocation.
    """
    E, shape = deltas.shape[0], deltas.shape[1:]
    S = scores.shape[0]
    n = base.numel()
    # (S, E) @ (E, n) -> (S, n), plus the base broadcast over rows.
    flat_out = None if out is None else out.view(S, n)
    res = torch.addmm(base.reshape(1, n), scores.to(deltas.dtype), deltas.reshape(E, n),
                      alpha=alpha, out=flat_out)
    return res.view(S, *shape)


def next_dynamic_base(base: Tensor, deltas: Tensor, alpha: float) -> Tensor:
    """Dynamic-Merg base chain: E_m^{l+1} = E_m^l + α/E · Σ_i Δ_i^l (no scores: no leak)."""
    return base + (alpha / deltas.shape[0]) * deltas.sum(0)
