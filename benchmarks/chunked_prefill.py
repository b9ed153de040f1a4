"""Chunked prefill: what a long prompt arriving next to running streams does to them.

Eight streams decode (greedy, long generations); once their inter-token latency (ITL) is steady,
a 2,000-token prompt arrives, and right behind it a few short prompts. Reported per setting of
`max_batched_tokens` (None = no chunking: the whole prompt in one step) and
`prefill_time_ratio` (None = the token budget alone; a ratio = chunked steps paced by measured
time), from the engine's own token events (in process, the engine's step loop running as in
the server):
- the streams' ITL p50/p99 before the long prompt (steady: gaps that start after every stream
  has half its steady tokens, so the streams' own prefills are not in it) and while it is
  prefilled;
- the ratio p99(during) / p99(steady) — target <= 2;
- the same streams over the same tokens in a run where nothing else arrives ("alone"), and
  p50/p99(during) / p50/p99(alone): like with like, token for token.
Segment turns: with 7+1 experts and 256-token segments, every stream opens a segment every
256 positions (12 merges for it in that step, ~80 ms on one core). They are part of how the
model decodes, prompt or not, and they are the slowest steps of a stream's steady state
(with 8 streams and a turn each per 256 steps, about 3 % of the steps: what a p99 sees). The
steady window is therefore a whole segment period by default (`--steady-tokens` = two
segments: gaps from token T to 2T), so it holds each stream's turn as the prefill's window
(~150-250 steps) does. With `--steady-tokens 64` (the default until 441d8a2) the steady
window held no turn and the prefill's window held all of them: p99(during) / p99(steady)
then also counted the model's own turns.
- the long prompt's time to first token, and the short prompts' (target: bounded, not
  waiting for the whole long prefill).

    python benchmarks/chunked_prefill.py --quick
    python benchmarks/chunked_prefill.py --budgets none,32,64 --ratios none,1.0 --threads 1
"""
from __future__ import annotations

import gc
import threading
import time

import torch

from common import base_parser, folded_model, print_table, setup, shape, write_results
from camex_runtime import Engine, SamplingParams
from camex_runtime.engine.compute_threads import in_passing_thread
from camex_runtime.engine.engine import DEFAULT_PREFILL_TIME_RATIO

COLS = ["max_batched_tokens", "prefill_time_ratio", "itl_p50_steady_ms", "itl_p99_steady_ms",
        "itl_p50_during_ms", "itl_p99_during_ms", "p99_ratio", "long_ttft_s", "short_ttft_max_s",
        "prefill_steps", "itl_p50_alone_ms", "itl_p99_alone_ms", "p50_vs_alone", "p99_vs_alone"]
# the pacer's view of the long prompt's prefill (paced runs only; see PacerTrace)
PACER_COLS = ["max_batched_tokens", "prefill_time_ratio", "paced_steps", "work_p50", "work_mean",
              "one_token_steps", "held_steps", "decode_base_ms", "decode_p50_ms",
              "excess_ms_mean", "turn_ms_mean", "fixed_ms", "token_ms", "chunk_ms_p50",
              "timed_chunks", "timed_chunk_ms_p50", "step_ms_p50", "step_ms_p99"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def follow(handle, stamps: list[float]) -> threading.Thread:
    """Record the arrival time of every token event of `handle` (a reader thread)."""
    def run():
        for _ in handle:
            stamps.append(time.perf_counter())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class StepCounter:
    """Engine observer: counts steps, and notes the step that gave `watch` its first token
    (`on_step` runs on the engine thread right after the step's tokens are published, so the
    count is exact, unlike reading `engine.steps` from another thread later)."""

    def __init__(self) -> None:
        self.steps, self.watch, self.first_token_step = 0, None, None

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.steps += 1
        if self.first_token_step is None and self.watch is not None and self.watch._events:
            self.first_token_step = self.steps


class PacerTrace:
    """Records, while `active`, what the engine's prefill pacer saw and granted in each step:
    the bound (`budget`), its inputs (the baseline decode, the last decode's time beyond it,
    the known segment-turn time of this step's decode, the chunk time fit), the step's decode
    time, the paced work the step did, and the prefill timings the fit took in (`chunks`:
    [work, seconds] pairs; a prefill with a routing decision is priced, not timed, and has
    none) with the fit's state where the trace starts, so another fit can be replayed on the
    same run. It answers why a long prompt took the steps it took: a slow hour slows every
    step, but the pacer also shrinks the chunks when decodes run over their baseline.

    Given the engine's runner, each step also lists its prefill calls (`prefills`: the call's
    ms and, per chunk, [slot, budget, before, after], where before/after are the slot's prompt
    tokens through every layer and the next layer of a span advancing by layers, or None): what
    the slowest step actually ran (which layers of which span, beside which short prompts)."""

    def __init__(self, pacer, runner=None) -> None:
        self.active, self.steps = False, []
        self.fit_at_start: list[float] | None = None  # the fit's weighted sums, first step
        budget, record_decode, spend = pacer.budget, pacer.record_decode, pacer.spend
        record_prefill = pacer.record_prefill
        # the step whose bound was asked for last, traced or not: `active` is set by another
        # thread, so the step in flight when it was set asked for its bound untraced and may
        # still take the long prompt's first chunk; it joins the trace when it does prompt work
        # while active
        last: dict | None = None

        def current(join: bool = True) -> dict | None:
            if not self.active or last is None:
                return None
            if not self.steps or self.steps[-1] is not last:
                if not join:
                    return None
                if not self.steps:
                    self.fit_at_start = list(fit_at_bound)
                self.steps.append(last)
            return last

        fit_at_bound: list[float] = []

        def traced_budget(extra_s: float = 0.0):
            nonlocal last, fit_at_bound
            base = pacer.decode_s
            prev = pacer._decodes[-1] if pacer._decodes else None
            fit_at_bound = list(pacer._fit)
            got = budget(extra_s)
            # `at`: when the step asked for its bound (its start); the next step's `at` ends it
            last = dict(budget=got, turn_s=extra_s, base_s=base,
                        excess_s=None if base is None else max(0.0, prev - base),
                        fixed_s=pacer.fixed_s, token_s=pacer.token_s, decode_s=None, work=0,
                        chunks=[], prefills=[], at=time.perf_counter())
            current()
            return got

        def traced_decode(seconds: float) -> None:
            if (step := current(join=False)) is not None:
                step["decode_s"] = seconds
            record_decode(seconds)

        def traced_spend(work_tokens: int) -> None:
            if (step := current()) is not None:
                step["work"] = work_tokens
            spend(work_tokens)

        def traced_prefill(work_tokens: int, seconds: float) -> None:
            if (step := current()) is not None:
                step["chunks"].append([work_tokens, seconds])
            record_prefill(work_tokens, seconds)

        pacer.budget, pacer.record_decode, pacer.spend = traced_budget, traced_decode, traced_spend
        pacer.record_prefill = traced_prefill
        if runner is None:
            return
        prefill_steps = runner.prefill_steps

        def progress(slot: int) -> list:
            st = runner.slots[slot]
            return [st.length, None if st.partial is None else st.partial.layer]

        def traced_prefill_steps(chunks):
            before = [progress(slot) for slot, _ in chunks]
            t0 = time.perf_counter()
            got = prefill_steps(chunks)
            seconds = time.perf_counter() - t0
            if (step := current()) is not None:
                step["prefills"].append(dict(ms=1e3 * seconds, chunks=[
                    [slot, n, b, progress(slot)] for (slot, n), b in zip(chunks, before)]))
            return got

        runner.prefill_steps = traced_prefill_steps

    def step_times(self) -> list[float]:
        """Each traced step's wall time, start to the next traced step's start (the last
        traced step has none): decode, prompt work and the engine's own Python together, the
        time the streams waited for that step's tokens."""
        return [b["at"] - a["at"] for a, b in zip(self.steps, self.steps[1:])]

    def summary(self) -> dict:
        steps = [s for s in self.steps if s["budget"] is not None]
        times = self.step_times()
        slowest = max(range(len(times)), key=times.__getitem__, default=None)
        paced = [s for s in steps if s["work"] > 0]

        def ms(key: str, xs: list[dict], q: float | None = 0.5) -> float:
            vals = [s[key] for s in xs if s[key] is not None]
            if not vals:
                return float("nan")
            return 1e3 * (percentile(vals, q) if q is not None else sum(vals) / len(vals))

        fit = paced[-1] if paced else {"fixed_s": float("nan"), "token_s": float("nan")}
        return dict(
            paced_steps=len(paced),
            work_p50=percentile([s["work"] for s in paced], 0.5),
            work_mean=sum(s["work"] for s in paced) / max(1, len(paced)),
            one_token_steps=sum(s["budget"] == 1 for s in steps),
            held_steps=sum(s["budget"] == 0 for s in steps),
            decode_base_ms=ms("base_s", steps), decode_p50_ms=ms("decode_s", steps),
            excess_ms_mean=ms("excess_s", steps, None), turn_ms_mean=ms("turn_s", steps, None),
            fixed_ms=1e3 * fit["fixed_s"], token_ms=1e3 * (fit["token_s"] or float("nan")),
            # what the fit (as the step's bound was set) gives a step's work: predicted, not timed
            chunk_ms_p50=1e3 * percentile([s["fixed_s"] + s["token_s"] * s["work"]
                                           for s in paced if s["token_s"]], 0.5),
            timed_chunks=sum(len(s["chunks"]) for s in steps),
            # with the timings, what replays the fit exactly (PrefillPacer._fit)
            fit_sums_at_start=self.fit_at_start,
            timed_chunk_ms_p50=1e3 * percentile([t for s in steps for _, t in s["chunks"]], 0.5),
            step_ms_p50=1e3 * percentile(times, 0.5), step_ms_p99=1e3 * percentile(times, 0.99),
            # which step that is: a chunk carrying merges, a turn, a slow decode
            slowest_step=None if slowest is None else self._described(slowest, times[slowest]))

    def _described(self, i: int, seconds: float) -> dict:
        s = self.steps[i]
        return dict(index=i, ms=1e3 * seconds, work=s["work"], budget=s["budget"],
                    turn_ms=1e3 * s["turn_s"],
                    decode_ms=None if s["decode_s"] is None else 1e3 * s["decode_s"],
                    prefills=s["prefills"])


def start_streams(engine: Engine, streams: int, ids, max_total: int
                  ) -> tuple[list, list[list[float]], list[threading.Thread]]:
    """The decoding streams: 16-token prompts, greedy, long generations; their token stamps."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    handles = [engine.submit(ids(16), SamplingParams(max_new_tokens=max_total - 17,
                                                     ignore_eos=True))
               for _ in range(streams)]
    return handles, stamps, [follow(h, s) for h, s in zip(handles, stamps)]


def cancel(handles: list, readers: list[threading.Thread]) -> None:
    """End the streams and wait until their readers saw the last events."""
    for h in handles:
        h.cancel()
    for r in readers:
        r.join(timeout=60)


def token_ids(vocab: int):
    """Seeded prompt ids: every run draws the same streams' prompts first."""
    gen = torch.Generator().manual_seed(0)
    return lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()


def release() -> None:
    """Free the last run's engine: its merge pool is committed memory (GBs). Its warm-up froze
    the heap (`gc.freeze`, as the server does), which keeps the engine's reference cycles
    from ever being collected: four engines in one process ran this machine (24 GB) out of
    memory."""
    gc.unfreeze()
    gc.collect()


def make_engine(model_cfg: dict, device, dtype, budget, ratio, batch: int, long_len: int,
                observer=None) -> Engine:
    def build() -> Engine:
        torch.manual_seed(0)  # the same weights in every run: `alone` repeats `measure`'s streams
        return Engine(folded_model(model_cfg, device, dtype), None, max_batch_size=batch,
                      max_waiting=64, max_input_tokens=long_len,
                      max_total_tokens=model_cfg["max_position_embeddings"],
                      max_batched_tokens=budget, prefill_time_ratio=ratio, observer=observer)

    # built in a thread that ends, as from_pretrained loads: the loop thread keeps the only
    # pool of torch worker threads (camex_runtime/engine/compute_threads.py)
    engine = in_passing_thread(build)
    engine.warmup()  # as the server does before it reports ready: pool committed, cost model
    return engine


def alone(model_cfg: dict, device, dtype, budget, ratio, streams: int, shorts: int,
          tokens: int, long_len: int, vocab: int) -> list[list[float]]:
    """The same streams (same prompts, so the same greedy tokens and the same segment turns) in
    an engine set up as `measure`'s, decoding `tokens` tokens each with nothing else arriving:
    the counterfactual of its "during" window, token for token. (The settings matter before the
    long prompt too: merged-expert prompts are paced, so the streams start over a few steps and
    open their segments in different steps.)"""
    max_total = model_cfg["max_position_embeddings"]
    engine = make_engine(model_cfg, device, dtype, budget, ratio, streams + 1 + shorts, long_len)
    try:
        handles, stamps, readers = start_streams(engine, streams, token_ids(vocab), max_total)
        while min(len(s) for s in stamps) < tokens:
            if any(h.done for h in handles):
                raise RuntimeError("a stream ended before the window it is compared over")
            time.sleep(0.005)
        cancel(handles, readers)
    finally:
        engine.stop(grace_s=1.0)
    return stamps


def measure(model_cfg: dict, device, dtype, budget, ratio, streams: int, long_len: int,
            shorts: int, steady_tokens: int, vocab: int) -> dict:
    max_total = model_cfg["max_position_embeddings"]
    engine = make_engine(model_cfg, device, dtype, budget, ratio, streams + 1 + shorts, long_len,
                         observer=(counter := StepCounter()))
    trace = PacerTrace(engine.pacer, engine.runner) if engine.pacer is not None else None
    ids = token_ids(vocab)
    try:
        handles, stamps, readers = start_streams(engine, streams, ids, max_total)
        # steady ITL: measured once every stream is past its own prefill and the ramp-up (the
        # first half of the steady tokens: from the arrival of the last stream's half-way
        # token, read from the stamps afterwards: a tiny model makes tokens faster than this
        # loop polls), until the long prompt arrives
        while min(len(s) for s in stamps) < steady_tokens:
            time.sleep(0.005)
        t_long = time.perf_counter()
        long_stamps: list[float] = []
        steps0 = counter.steps  # the step in flight now may still be before the long prompt
        if trace is not None:  # before the submit: the step that takes its first chunk counts
            trace.active = True
        long_h = engine.submit(ids(long_len), SamplingParams(max_new_tokens=4, ignore_eos=True))
        counter.watch = long_h
        readers.append(follow(long_h, long_stamps))
        short_stamps = [[] for _ in range(shorts)]
        short_hs = [engine.submit(ids(8), SamplingParams(max_new_tokens=4, ignore_eos=True))
                    for _ in range(shorts)]
        t_short = time.perf_counter()
        readers += [follow(h, s) for h, s in zip(short_hs, short_stamps)]
        while not long_stamps or counter.first_token_step is None:
            time.sleep(0.005)
        t_first = long_stamps[0]
        if trace is not None:
            trace.active = False
        prefill_steps = counter.first_token_step - steps0  # counting the one in flight, if any
        if any(h.done for h in handles):
            raise RuntimeError("a stream ended before the long prompt was in: use a model with "
                               "more positions or fewer steady tokens")
        cancel(handles, readers)
    finally:
        engine.stop(grace_s=1.0)
    t_steady = max(s[steady_tokens // 2 - 1] for s in stamps)
    steady, during, windows = [], [], []
    for s in stamps:
        gaps = [(b, b - a) for a, b in zip(s, s[1:])]  # gap i ends at token i + 1
        steady += [g for t, g in gaps if t_steady <= t - g and t < t_long]
        # gaps overlapping the prefill: ending after the long prompt arrived, starting before
        # its first token (the step that completes it is one of them, whichever reader thread
        # saw its token first)
        idx = [i + 1 for i, (t, g) in enumerate(gaps) if t >= t_long and t - g < t_first]
        during += [gaps[i - 1][1] for i in idx]
        windows.append((idx[0], idx[-1]) if idx else None)  # tokens whose gaps are "during"
    p99s, p99d = percentile(steady, 0.99), percentile(during, 0.99)
    return dict(max_batched_tokens=str(budget),
                prefill_time_ratio=str(ratio if engine.pacer is not None else None),
                itl_p50_steady_ms=1e3 * percentile(steady, 0.5),
                itl_p99_steady_ms=1e3 * p99s, itl_p50_during_ms=1e3 * percentile(during, 0.5),
                itl_p99_during_ms=1e3 * p99d, p99_ratio=p99d / p99s,
                long_ttft_s=t_first - t_long,
                short_ttft_max_s=max(((s[0] - t_short) for s in short_stamps if s),
                                     default=float("nan")),
                prefill_steps=prefill_steps, windows=windows,
                pacer=trace.summary() if trace is not None else None,
                pacer_steps=trace.steps if trace is not None else None)


def compare_alone(row: dict, stamps: list[list[float]]) -> None:
    """Add the streams' ITL over the same tokens without the long prompt (`alone`), and the
    during / alone ratios, to a `measure` row."""
    gaps = [s[i] - s[i - 1] for s, w in zip(stamps, row.pop("windows")) if w
            for i in range(w[0], w[1] + 1)]
    p50, p99 = percentile(gaps, 0.5), percentile(gaps, 0.99)
    row.update(itl_p50_alone_ms=1e3 * p50, itl_p99_alone_ms=1e3 * p99,
               p50_vs_alone=row["itl_p50_during_ms"] / (1e3 * p50),
               p99_vs_alone=row["itl_p99_during_ms"] / (1e3 * p99))


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--budgets", default=None, help="comma list; 'none' = no chunking "
                   "(default none,64; quick: none,8)")
    p.add_argument("--ratios", default=f"none,{DEFAULT_PREFILL_TIME_RATIO}",
                   help="prefill_time_ratio values, comma list ('none' = the token budget alone), "
                        "each measured with every chunking budget (default: none and the "
                        f"engine's default, none,{DEFAULT_PREFILL_TIME_RATIO})")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--long", type=int, default=None, help="long prompt tokens (default 2000)")
    p.add_argument("--shorts", type=int, default=3)
    p.add_argument("--steady-tokens", type=int, default=None,
                   help="tokens per stream before the long prompt arrives; the steady window is "
                        "the second half (default: two segments, so it is one segment period)")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = shape(args)
    budgets = [None if b == "none" else int(b) for b in
               (args.budgets or ("none,8" if args.quick else "none,64")).split(",")]
    ratios = [None if r == "none" else float(r) for r in args.ratios.split(",")]
    # without chunking there is nothing to pace: one row
    settings = [(b, r) for b in budgets for r in (ratios if b is not None else [None])]
    long_len = args.long or (200 if args.quick else 2000)
    steady_tokens = args.steady_tokens or 2 * cfg["segment_len"]
    rows = []
    for budget, ratio in settings:
        rows.append(measure(cfg, device, dtype, budget, ratio, args.streams, long_len, args.shorts,
                            steady_tokens, cfg["vocab_size"]))
        release()
        # the counterfactual: the same streams over the same tokens, nothing else arriving
        last = max((w[1] for w in rows[-1]["windows"] if w), default=1)
        compare_alone(rows[-1], alone(cfg, device, dtype, budget, ratio, args.streams,
                                      args.shorts, last + 1, long_len, cfg["vocab_size"]))
        print_table(rows[-1:], COLS)
        release()
    print()
    print_table(rows, COLS)
    paced = [{"max_batched_tokens": r["max_batched_tokens"],
              "prefill_time_ratio": r["prefill_time_ratio"], **r["pacer"]}
             for r in rows if r["pacer"]]
    if paced:
        print("\nthe pacer during the long prompt's prefill (work: paced prompt tokens + merge "
              "costs per step; excess: the last decode beyond the baseline, taken off the "
              "next step's work; chunk: the fit's time for a step's work, not a timing)")
        print_table(paced, PACER_COLS)
        for r in rows:
            if r["pacer"] and r["pacer"]["slowest_step"]:
                print(f"slowest traced step at ratio {r['prefill_time_ratio']}: "
                      f"{r['pacer']['slowest_step']}")
    write_results("chunked_prefill", args, rows, {"shape": cfg, "long_prompt": long_len,
                                                  "streams": args.streams,
                                                  "steady_tokens": steady_tokens})


if __name__ == "__main__":
    main()
