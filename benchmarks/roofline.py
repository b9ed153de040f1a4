"""Roofline bounds for the engine benchmarks: FLOPs and bytes per step, peaks measured now.

`measure_peaks` times a large GEMM (peak FLOP/s) and a weight-streaming GEMV (GB/s) on the
benchmark's device/dtype in the same run (on a CPU with the native kernels, the faster of
torch's GEMV and the engine's own streaming kernel: torch's alone let the engine "beat" its
bound); `decode_step_cost` / `prefill_cost` /
`classify_cost` count the FLOPs and bytes a perfect implementation must spend, per phase:
the model's own GEMMs/attention, and (CAMEx) the merges `Ê = E_m + α Σ s_i Δ_i`. Each phase
gets its own roofline and the phases add up (they run one after the other on the device):
`bound_s = Σ_phase max(flops / peak, bytes / bandwidth)`, achieved = bound_s / measured_s.
A merge streams E+2 FFNs of weights for ~2E FLOPs per parameter, so it is bandwidth-bound even
where the prefill GEMMs around it are compute-bound; `fused_bound` (one max over the totals,
as if merges could hide under the GEMMs) is reported beside it for comparison.

    python benchmarks/roofline.py [--quick] [--device cuda]   # prints the peaks and writes JSON
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camex_runtime import kernels
from common import base_parser, best_time, print_table, setup, shape, write_results


def measure_peaks(device, dtype, reps: int = 3) -> dict:
    n = 2048 if torch.device(device).type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    gemms = {"torch": 2 * n ** 3 / best_time(lambda: a @ a, device, reps) / 1e9}
    elem = torch.empty((), dtype=dtype).element_size()
    w = torch.randn((256 << 20) // (1024 * elem), 1024, device=device, dtype=dtype)
    x = torch.randn(1, 1024, device=device, dtype=dtype)
    nbytes = w.numel() * elem
    streams = {"torch": nbytes / best_time(lambda: F.linear(x, w), device, reps) / 1e9}
    if torch.device(device).type == "cpu" and kernels.native() is not None:
        # the engine streams CPU weights with its own kernel (fp32 activations, weights of any
        # dtype), faster than torch's GEMV on some CPUs: the bound is the faster of the two
        xf = x.float()
        streams["native"] = nbytes / best_time(lambda: kernels.linear(xf, w), device, reps) / 1e9
        # and multiplies prompt chunks with its own tiles where kernels.tiles_take says so
        # (fp32 on AMD CPUs; 512-bit vectors on Zen 5: twice torch's GEMM there)
        rows = kernels.tiles_max_rows(dtype)
        if kernels.tiles_take(dtype, rows):
            xs = torch.randn(rows, n, dtype=torch.float32)
            t = best_time(lambda: kernels.linear(xs, a), device, reps)
            gemms["native"] = 2 * rows * n * n / t / 1e9
    return {"peak_gflops": max(gemms.values()), "gemm_gflops": gemms,
            "peak_gbps": max(streams.values()), "stream_gbps": streams}


def _dense_parts(cfg: dict) -> tuple[int, int, int]:
    """(attention params per layer, FFN params per FFN, cached K+V values per token and layer)
    of either family: GPT-2 (fused qkv, 2-matrix FFN with biases) or Llama (GQA, SwiGLU)."""
    d, h, H = cfg["d_model"], cfg["d_ff"], cfg["n_head"]
    KV, hd = cfg.get("num_key_value_heads") or H, cfg.get("head_dim") or d // H
    if cfg.get("family", "gpt2") == "llama":
        return d * (H + 2 * KV) * hd + H * hd * d, 3 * d * h, 2 * KV * hd
    return 4 * d * d + 4 * d, 2 * d * h + d + h, 2 * d


def _layers(cfg: dict) -> tuple[int, int]:
    """(dense FFN layers, merged-expert FFN layers)."""
    L, E = cfg["n_layer"], cfg.get("num_experts", 0)
    moe = 0 if not E else (L if cfg.get("moe_layers") is None else len(cfg["moe_layers"]))
    return L - moe, moe


Cost = list[tuple[float, float]]  # (flops, bytes) per phase


def decode_step_cost(cfg: dict, B: int, ctx: int, strategy: str, elem: int) -> Cost:
    """[(flops, bytes) per phase] of one decode step of B sequences at context length ctx.
    strategy: "dense" | "merged" (cached per-sequence merges) | "mixture"; merges amortised
    at one per segment per sequence and layer."""
    d, L, V = cfg["d_model"], cfg["n_layer"], cfg["vocab_size"]
    E, T = cfg.get("num_experts", 0), cfg["segment_len"]
    attn, P, kv = _dense_parts(cfg)
    qk = cfg["n_head"] * (cfg.get("head_dim") or d // cfg["n_head"])  # query width
    Ld, Lm = _layers(cfg)
    if strategy == "dense":
        Ld, Lm = L, 0
    flops = L * (2 * B * attn + 4 * B * ctx * qk) + 2 * B * V * d + Ld * 2 * B * P
    nbytes = elem * (L * (attn + B * ctx * kv) + V * d + Ld * P)
    if Lm == 0:
        return [(flops, nbytes)]
    if strategy == "merged":
        flops += Lm * 2 * B * P
        nbytes += elem * Lm * B * P
        return [(flops, nbytes), (Lm * B * 2 * E * P / T, elem * Lm * B * (E + 2) * P / T)]
    flops += Lm * 2 * B * (E + 1) * P
    nbytes += elem * Lm * (E + 1) * P
    return [(flops, nbytes)]


def prefill_cost(cfg: dict, n: int, moe: bool, elem: int) -> Cost:
    """[(flops, bytes) per phase] of one n-token prompt: per segment one FFN GEMM and one
    merge, a layer's merges built in one pass over its expert stack (a read of the stack and a
    write per segment: the runner's shared pass)."""
    d, L, V = cfg["d_model"], cfg["n_layer"], cfg["vocab_size"]
    E, T = cfg.get("num_experts", 0), cfg["segment_len"]
    attn, P, _ = _dense_parts(cfg)
    qk = cfg["n_head"] * (cfg.get("head_dim") or d // cfg["n_head"])
    K = -(-n // T)
    flops = L * (2 * n * attn + 2 * n * n * qk + 2 * n * P) + 2 * V * d
    nbytes = elem * (L * (attn + P) + V * d)
    Lm = _layers(cfg)[1]
    if moe and Lm:
        return [(flops, nbytes), (Lm * K * 2 * E * P, elem * Lm * (E + 1 + K) * P)]
    return [(flops, nbytes)]


def classify_cost(cfg: dict, B: int, n: int, moe: bool, elem: int) -> Cost:
    d, L = cfg["d_model"], cfg["n_layer"]
    E = cfg.get("num_experts", 0)
    attn, P, _ = _dense_parts(cfg)
    flops = L * B * (2 * n * attn + 4 * n * n * d + 2 * n * P)
    nbytes = elem * L * (attn + P)
    Lm = _layers(cfg)[1]
    if moe and Lm:  # one merge per sequence and layer (or the mixture's (E+1)x weights)
        return [(flops, nbytes),
                (Lm * B * 2 * E * P, elem * Lm * min(B * (E + 2), E + 1) * P)]
    return [(flops, nbytes)]


def _roof(flops: float, nbytes: float, peaks: dict) -> float:
    return max(flops / (peaks["peak_gflops"] * 1e9), nbytes / (peaks["peak_gbps"] * 1e9))


def bound(cost: Cost, peaks: dict) -> float:
    """Seconds at best: each phase at its own roofline, phases in sequence."""
    return sum(_roof(f, b, peaks) for f, b in cost)


def fused_bound(cost: Cost, peaks: dict) -> float:
    """Seconds at best if all phases could overlap perfectly: one roofline over the totals."""
    return _roof(sum(f for f, _ in cost), sum(b for _, b in cost), peaks)


def main() -> None:
    args = base_parser(__doc__).parse_args()
    device, dtype = setup(args)
    peaks = measure_peaks(device, dtype, args.reps)
    cfg = shape(args)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for B in (1, 8, 32):
        for strategy in ("dense", "merged", "mixture"):
            cost = decode_step_cost(cfg, B, 256, strategy, elem)
            rows.append(dict(point=f"decode B={B}", strategy=strategy,
                             gflop=sum(f for f, _ in cost) / 1e9,
                             mbytes=sum(b for _, b in cost) / 1e6,
                             bound_tok_s=B / bound(cost, peaks)))
    print(f"peak {peaks['peak_gflops']:.1f} GFLOP/s, {peaks['peak_gbps']:.1f} GB/s")
    print_table(rows, ["point", "strategy", "gflop", "mbytes", "bound_tok_s"])
    write_results("roofline", args, rows, {"peaks": peaks, "shape": cfg})


if __name__ == "__main__":
    main()
