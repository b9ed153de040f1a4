"""Chooses the merged or mixture strategy for one batch from a roofline cost estimate.

At start-up `DeviceProfile.measure` times a GEMM (peak FLOP/s) and a weight-streaming GEMV
(achievable bytes/s) on the engine's device and dtype, plus the fixed cost of a small kernel
launch. A strategy's time is then estimated per MoE layer as sum over its kernels of
`max(flops / peak, bytes / bandwidth) + launch`, which captures both regimes the design notes
measured: at B=1 merged weights cost one FFN read (mixture reads E+1), at large B mixture
reads the expert stack once while merged reads one FFN per distinct merge.

Knows nothing about requests or caches beyond the counts it is given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGIES = ("auto", "merged", "mixture")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class DeviceProfile:
    flops_per_s: float  # GEMM peak measured on this device/dtype
    bytes_per_s: float  # weight streaming (GEMV) bandwidth
    launch_s: float  # fixed cost of one small op (Python + dispatch + kernel launch)

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype, d: int = 512,
                stream_mb: int = 32, reps: int = 3) -> "DeviceProfile":
        """A quick probe (well under a second on a CPU)."""
        with torch.inference_mode():
            a = torch.randn(256, d, device=device, dtype=dtype)
            b = torch.randn(4 * d, d, device=device, dtype=dtype)
            t_gemm = _best_time(lambda: F.linear(a, b), device, reps)
            elem = torch.empty((), dtype=dtype).element_size()
            rows = max(1, (stream_mb << 20) // (d * elem))
            w = torch.randn(rows, d, device=device, dtype=dtype)
            x = torch.randn(1, d, device=device, dtype=dtype)
            t_gemv = _best_time(lambda: F.linear(x, w), device, reps)
            tiny = torch.randn(1, 8, device=device, dtype=dtype)
            t_launch = _best_time(lambda: tiny + tiny, device, reps * 3)
        return cls(flops_per_s=2 * 256 * d * 4 * d / t_gemm,
                   bytes_per_s=w.numel() * elem / t_gemv, launch_s=t_launch)


@dataclass(frozen=True)
class FFNShape:
    num_experts: int  # E routed (the stack has E+1 rows)
    ffn_params: int  # parameters of one FFN (both linears, with biases)
    elem_bytes: int


class CostModel:
    def __init__(self, profile: DeviceProfile, shape: FFNShape):
        self.p = profile
        self.s = shape

    def _kernel(self, flops: float, nbytes: float) -> float:
        return max(flops / self.p.flops_per_s, nbytes / self.p.bytes_per_s) + self.p.launch_s

    def merge_time(self) -> float:
        """One merge: read E deltas + base, write one FFN."""
        P, b = self.s.ffn_params, self.s.elem_bytes
        E = self.s.num_experts
        return 4 * self._kernel(2 * E * P / 4, (E + 2) * P * b / 4)

    def merged_time(self, tokens_per_merge: list[int], new_merges: int) -> float:
        """Apply one merged FFN per group (two linears each) plus the merges still missing."""
        P, b = self.s.ffn_params, self.s.elem_bytes
        t = new_merges * self.merge_time()
        for n in tokens_per_merge:
            t += 2 * self._kernel(2 * n * P / 2, P * b / 2 + 0)
        return t

    def mixture_time(self, num_tokens: int) -> float:
        """fc1 GEMM over the stack + fc2 bmm over the stack + a few small ops."""
        P, b = self.s.ffn_params, self.s.elem_bytes
        E1 = self.s.num_experts + 1
        per_linear = self._kernel(2 * num_tokens * E1 * P / 2, E1 * P * b / 2)
        return 2 * per_linear + 4 * self.p.launch_s

    def choose(self, tokens_per_merge: list[int], new_merges: int) -> str:
        """'merged' or 'mixture' for one layer of one batch."""
        merged = self.merged_time(tokens_per_merge, new_merges)
        mixture = self.mixture_time(sum(tokens_per_merge))
        return "merged" if merged <= mixture else "mixture"
