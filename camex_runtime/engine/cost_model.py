"""Chooses the merged or mixture strategy for one MoE layer of one batch, from timings of
the real layer measured at start-up.

`StrategyProfile.measure` times, on the engine's device and dtype and with the model's own
expert weights: one merge, one merged FFN applied to n tokens, and the mixture applied to n
tokens, for a few n. The cost model interpolates those curves (linearly, extrapolating past
the last point), so it captures both regimes the design notes measured without a hand-tuned
roofline: at B=1 a cached merge costs one FFN read while the mixture reads E+1; at large B the
mixture reads the expert stack once while merged weights cost one FFN read per distinct merge.

Knows nothing about requests or caches beyond the counts it is given.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass

import torch

from camex_runtime.engine.merge_cache import merged_ffn_shapes
from camex_runtime.engine.moe import MoEWeights, apply_merged, apply_mixture

STRATEGIES = ("auto", "merged", "mixture")
PROBE_TOKENS = (1, 16, 128)
MEASURE_PASSES = 5  # timed runs of each probe (see best_times)
ROTATE_BYTES = 96 << 20  # merged-apply probe cycles through this much weight memory


def _sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, reps: int) -> float:
    """Best wall time of `reps` runs after one warm-up run (device synchronised)."""
    return best_times({"fn": fn}, device, reps)["fn"]


def best_times(probes: dict, device, passes: int,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    """Each probe's best wall time over `passes` passes that run every probe once, in turn,
    after a warm-up pass (device synchronised).

    Interleaved on purpose: a slow stretch of the machine (another tenant, a daemon waking)
    then lands on a few neighbouring probes of one pass, and every probe keeps clean runs in
    the other passes. Timed back to back, one probe's runs took ~12 ms together, so one short
    stretch could cover all of them: a server measured a merged FFN at twice its cost at
    start-up, chose the mixture for 8 decoding rows, and ran at 57 tok/s instead of 95 for its
    whole life (GPT-2-small 7+1 experts, bf16, two threads)."""
    for fn in probes.values():
        fn()
    _sync(device)
    best = dict.fromkeys(probes, float("inf"))
    for _ in range(passes):
        for key, fn in probes.items():
            t0 = clock()
            fn()
            _sync(device)
            best[key] = min(best[key], clock() - t0)
    return best


@dataclass(frozen=True)
class StrategyProfile:
    points: tuple[int, ...]  # token counts probed
    merged: tuple[float, ...]  # seconds: one merged FFN applied to n tokens
    mixture: tuple[float, ...]  # seconds: the mixture applied to n tokens
    merge: float  # seconds: one merge (E deltas + base -> one FFN)
    num_experts: int

    @classmethod
    @torch.inference_mode()
    def measure(cls, moe: MoEWeights, points: tuple[int, ...] = PROBE_TOKENS,
                passes: int = MEASURE_PASSES, dtype: torch.dtype | None = None,
                clock: Callable[[], float] = time.perf_counter,
                mixture: bool = True) -> StrategyProfile:
        """`dtype`: the activations' (default: the weights'), see engine/precision.py. Every
        probe is timed `passes` times, interleaved with the others (see `best_times`).
        `mixture=False` (int8 expert deltas, which the mixture would dequantize on every
        call): the mixture is not probed and counts as never faster, so `auto` merges."""
        dev, wt = moe.w1.device, moe.w1.dtype
        dt = dtype or wt
        E, h, d = moe.num_experts, moe.w2.shape[2], moe.w2.shape[1]
        layout = {"gated": moe.w1.shape[1] == 2 * h, "bias": moe.b1 is not None}
        # Several merged FFNs, used in turn: in serving, a sequence's merged weights are not
        # in the CPU/GPU cache when its turn comes, so one hot buffer would flatter `merged`.
        entry = moe.ffn_params * moe.w1.element_size()
        k = max(1, min(8, -(-ROTATE_BYTES // entry)))
        outs = [{part: torch.empty(shape, device=dev, dtype=dt if part.endswith("_bias") else wt)
                 for part, shape in merged_ffn_shapes(d, h, **layout).items()} for _ in range(k)]
        s = torch.full((E,), 1.0 / E, device=dev)
        for out in outs:
            moe.merge_into(s, out)
        probes = {"merge": lambda: moe.merge_into(s, outs[0])}
        for n in points:
            x = torch.randn(n, d, device=dev, dtype=dt)
            sn = s.expand(n, E)

            def apply_each(x=x):
                for out in outs:
                    apply_merged(x, out, moe.kind)
            probes["merged", n] = apply_each
            if mixture:
                probes["mixture", n] = lambda x=x, sn=sn: apply_mixture(x, moe, sn)
        best = best_times(probes, dev, passes, clock)
        return cls(tuple(points), tuple(best["merged", n] / k for n in points),
                   tuple(best.get(("mixture", n), math.inf) for n in points), best["merge"], E)

    def describe(self) -> dict:
        """The timings in milliseconds (logged at warm-up, reported in the engine's info)."""
        def ms(seconds: float) -> float | None:
            return None if math.isinf(seconds) else round(seconds * 1e3, 3)  # inf: not probed
        return {"points": list(self.points), "merge_ms": ms(self.merge),
                "merged_ms": [ms(v) for v in self.merged],
                "mixture_ms": [ms(v) for v in self.mixture]}


CHOICES_KEPT = 4096  # CostModel.choose's memo: cleared when full


def _interp(xs: tuple[int, ...], ys: tuple[float, ...], n: int) -> float:
    """Piecewise-linear in n, extrapolated from the last two points."""
    i = min(max(bisect_left(xs, n), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


class CostModel:
    def __init__(self, profile: StrategyProfile):
        self.p = profile
        # choose()'s answers: a decode step asks once per MoE layer, mostly the same question
        # as the step before (12 questions per GPT-2-small step, ~10 us each uncached)
        self._choices: dict[tuple, str] = {}

    def merged_time(self, tokens_per_merge: list[int], new_merges: float,
                    batched_merges: bool = False) -> float:
        """One merged FFN per group, plus the merges still missing (a fraction when a merge
        is amortised over the steps that will reuse it). Batched merges (one GEMM for S rows)
        read the E deltas once: S merges cost ~ (E + 1 + S) / (E + 2) merges."""
        p = self.p
        merges = new_merges * p.merge
        if batched_merges and new_merges:
            E = p.num_experts
            merges = p.merge * (E + 1 + new_merges) / (E + 2)
        return merges + sum(_interp(p.points, p.merged, n) for n in tokens_per_merge)

    def mixture_time(self, num_tokens: int) -> float:
        if math.isinf(self.p.mixture[0]):  # not probed (int8 deltas): never the cheaper one
            return math.inf
        return _interp(self.p.points, self.p.mixture, num_tokens)

    def choose(self, tokens_per_merge: list[int], new_merges: float,
               batched_merges: bool = False, mixture_rows: int = 0) -> str:
        """'merged' or 'mixture' for one layer of one batch. `mixture_rows` more rows run the
        mixture either way (the merge pool had no room for them): choosing `merged` then
        costs both kernels, while `mixture` serves every row with one."""
        key = (tuple(tokens_per_merge), new_merges, batched_merges, mixture_rows)
        got = self._choices.get(key)
        if got is None:
            if len(self._choices) >= CHOICES_KEPT:
                self._choices.clear()
            got = self._choices[key] = self._choose(tokens_per_merge, new_merges,
                                                    batched_merges, mixture_rows)
        return got

    def _choose(self, tokens_per_merge, new_merges: float, batched_merges: bool,
                mixture_rows: int) -> str:
        merged = self.merged_time(tokens_per_merge, new_merges, batched_merges)
        if mixture_rows:
            merged += self.mixture_time(mixture_rows)
        mixture = self.mixture_time(sum(tokens_per_merge) + mixture_rows)
        return "merged" if merged <= mixture else "mixture"

    @property
    def merge_seconds(self) -> float:
        """One merge, as measured."""
        return self.p.merge

    def merge_in_tokens(self) -> float:
        """One merge in prompt tokens of one FFN: its time over the marginal time per token of
        a merged FFN applied to a prompt chunk (the last two probe points)."""
        p = self.p
        per_token = (p.merged[-1] - p.merged[-2]) / (p.points[-1] - p.points[-2])
        return p.merge / per_token if per_token > 0 else float(p.points[-1])

    def choose_segment(self, n: int, future: int, new_merge: bool) -> str:
        """A prompt segment of n tokens whose merge will also serve `future` decode steps
        (one token each): merge once and reuse it, or run the mixture every time."""
        p = self.p
        merged = (p.merge if new_merge else 0.0) + _interp(p.points, p.merged, n) \
            + future * p.merged[0]
        mixture = self.mixture_time(n)
        if math.isinf(mixture):  # (and inf * 0 future steps would be nan)
            return "merged"
        mixture += future * p.mixture[0]
        return "merged" if merged <= mixture else "mixture"
