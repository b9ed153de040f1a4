"""The two exact ways to apply a merged-expert FFN, on weights laid out for serving.

`MoEWeights` stacks each linear as `[E_m; Δ_1..Δ_E]` once at load (the folded checkpoint's
`E'_i − E_m`, docs/DESIGN.md §3), so that
- **merged**: `merge_into` writes `Ê = E_m + α Σ_i s_i Δ_i` into a preallocated pool entry with
  `merging.merge_experts(..., out=)` (one addmm per part, no allocation), and
  `apply_merged` applies it with two plain linears — the same cost as a dense FFN;
- **mixture**: `apply_mixture` runs the inputs through all E+1 experts at once (fc1: one GEMM
  against the stacked weight; fc2: one bmm over the score-scaled activations) and never
  materialises per-sequence weights. Exact too, since every linear is linear in its weight.

Knows nothing about caches, keys or requests: weights, scores and activations in, outputs out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from camex_runtime.merging import merge_experts
from camex_runtime.modeling import ExpertBank, LinearBank, ffn_activation, route_scores


@dataclass
class MoEWeights:
    """One MoE FFN in serving layout. Row 0 of each stack is the base expert E_m."""
    router: Tensor  # (E, d)
    w1: Tensor  # (E+1, h, d)
    b1: Tensor  # (E+1, h)
    w2: Tensor  # (E+1, d, h)
    b2: Tensor  # (E+1, d)
    alpha: float

    @classmethod
    def from_bank(cls, bank: ExpertBank) -> "MoEWeights":
        def stack(base: Tensor, delta: Tensor) -> Tensor:
            return torch.cat([base.unsqueeze(0), delta], dim=0).contiguous()
        with torch.no_grad():
            return cls(router=bank.router_weight.detach(),
                       w1=stack(bank.fc1.base_weight, bank.fc1.delta_weight),
                       b1=stack(bank.fc1.base_bias, bank.fc1.delta_bias),
                       w2=stack(bank.fc2.base_weight, bank.fc2.delta_weight),
                       b2=stack(bank.fc2.base_bias, bank.fc2.delta_bias),
                       alpha=float(bank.alpha))

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0] - 1

    @property
    def ffn_params(self) -> int:
        """Parameters of one (merged) FFN."""
        return self.w1[0].numel() + self.b1[0].numel() + self.w2[0].numel() + self.b2[0].numel()

    def bank(self) -> ExpertBank:
        """The same weights as the model code's ExpertBank (views, no copy)."""
        return ExpertBank(self.router, LinearBank(self.w1[0], self.b1[0], self.w1[1:], self.b1[1:]),
                          LinearBank(self.w2[0], self.b2[0], self.w2[1:], self.b2[1:]), self.alpha)

    def scores(self, mean_h: Tensor) -> Tensor:
        """(S, d) routing inputs -> (S, E) fp32 softmax scores (the model's route_scores)."""
        return route_scores(self.router, mean_h)

    def merge_into(self, scores: Tensor, out: dict[str, Tensor]) -> None:
        """Write the merged FFN for one routing decision, scores (E,), into pool views `out`
        (fc1_weight (h, d), fc1_bias (h,), fc2_weight (d, h), fc2_bias (d,))."""
        s = scores.reshape(1, -1)  # (1, E)
        a = self.alpha
        merge_experts(self.w1[0], self.w1[1:], s, a, out=out["fc1_weight"].unsqueeze(0))
        merge_experts(self.b1[0], self.b1[1:], s, a, out=out["fc1_bias"].unsqueeze(0))
        merge_experts(self.w2[0], self.w2[1:], s, a, out=out["fc2_weight"].unsqueeze(0))
        merge_experts(self.b2[0], self.b2[1:], s, a, out=out["fc2_bias"].unsqueeze(0))


def apply_merged(x: Tensor, w: dict[str, Tensor]) -> Tensor:
    """x (n, d) through one merged FFN (pool views) -> (n, d)."""
    hid = ffn_activation(F.linear(x, w["fc1_weight"], w["fc1_bias"]))  # (n, h)
    return F.linear(hid, w["fc2_weight"], w["fc2_bias"])  # (n, d)


def mixture_coefficients(scores: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """(n, E) scores -> (n, E+1) weights of [E_m; Δ_1..Δ_E]: [1, α s_1, ..., α s_E]."""
    ones = torch.ones_like(scores[:, :1])
    return torch.cat([ones, alpha * scores], dim=1).to(dtype)


def apply_mixture(x: Tensor, moe: MoEWeights, scores: Tensor) -> Tensor:
    """x (n, d), per-row scores (n, E) -> (n, d), without materialising merged weights."""
    n, d = x.shape
    E1, h = moe.w1.shape[0], moe.w1.shape[1]
    c = mixture_coefficients(scores, moe.alpha, x.dtype)  # (n, E+1)
    # fc1: (n, d) @ ((E+1)·h, d)^T -> (n, E+1, h); then the score-weighted sum over experts
    y = F.linear(x, moe.w1.view(E1 * h, d), moe.b1.view(E1 * h)).view(n, E1, h)
    hid = ffn_activation(torch.bmm(c.unsqueeze(1), y).squeeze(1))  # (n, 1, E+1) @ (n, E+1, h)
    # fc2: per expert e, (c_e · hid) @ w2[e]^T summed over e: (E+1, n, h) @ (E+1, h, d)
    scaled = c.t().unsqueeze(2) * hid.unsqueeze(0)  # (E+1, n, h)
    out = torch.bmm(scaled, moe.w2.transpose(1, 2)).sum(0)  # (n, d)
    return out + c @ moe.b2  # (n, E+1) @ (E+1, d)
