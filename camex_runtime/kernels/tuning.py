"""Measuring the AVX-512 linear kernel's settings on the CPU at hand (`python -m
camex_runtime.kernels --tune`).

`AVX512_TUNING` holds settings measured per CPU vendor (and per family where one was measured
on its own: Zen 5); a CPU of another family (or the same vendor's next one) may want others.
This times one decode step's products of a GPT-2-shaped model (per layer the QKV, output, FC1
and FC2 weights, then the LM head; weights on huge pages as the server loads them) with the
native kernel under a grid of candidate settings, for each kind
of weights, each decode batch size and each thread count asked for. Candidates are interleaved
pass by pass so that drift in the machine's speed falls on all of them alike, the first pass is
a warm-up, and each cell is the median of the rest. Every candidate must give the same bits as
the first (the settings choose how the work is done, never what it computes).

The chosen setting per kind of weights is the candidate with the smallest geometric mean of
(its time / the fastest candidate's time) over the cells: one number that says how far from the
best it is across batch sizes, rather than the fastest at one batch size. It is printed as a
`CAMEX_KERNELS_TUNING` value, which the server applies at start-up.

The prompt tiles (prefill chunks' products) are timed with 256-bit and with 512-bit vectors
(`TILES_ISAS`: the same bits, which this checks too): every layer's FC1 and FC2 with fp32
weights at a few chunk sizes (`TILES_ROWS`), the faster printed as a `CAMEX_TILES_ISA` value.

Merges (`[E_m; Δ_1..Δ_7]` into one expert) are timed the same way under each software prefetch
distance (`MERGE_DISTANCES`): GPT-2-shaped FC1 and FC2 stacks of every layer, fp32 and bf16,
the best for each kind of stack (scored as above over the thread counts) printed as a
`CAMEX_MERGE_PREFETCH` value.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from camex_runtime.kernels import MAX_ROWS, MAX_ROWS_FP32, Avx512Tuning
from camex_runtime.memory import on_huge_pages

DTYPES = {"fp32": torch.float32, "16bit": torch.bfloat16}
MERGE_DISTANCES = (0, 256, 512, 1024, 2048, 4096)  # bytes ahead in each stream
MERGE_DELTAS = 7  # the benchmark model's 7+1 experts
ROWS = {"fp32": (1, 2, 3, 4, 6, 8, 12, MAX_ROWS_FP32), "16bit": (1, 2, 3, 4, 6, MAX_ROWS)}
TILES_ISAS = {"256-bit": "avx2", "512-bit": "avx512"}  # candidate name: CAMEX_TILES_ISA
TILES_ROWS = (32, 128, 512)  # a chat prompt, a chunk, a long prompt's chunk


def candidates(max_rows: int) -> dict[str, Avx512Tuning]:
    """The grid: AVX2 alone, and AVX-512 from 1, 2, 3 or 4 inputs with one or four weight rows per
    pass (four from where AVX-512 starts, or from 5), without and with the far prefetch."""
    grid = {"avx2": Avx512Tuning(max_rows + 1, 0, 0, 0, 0)}
    for start in (1, 2, 3, 4):
        for quad in sorted({0, start, 5}):
            for far in (0, 16384):
                t = Avx512Tuning(start, 0, quad, 2048, far)
                grid[f"from {start}, fours {'from ' + str(quad) if quad else 'never'}, "
                     f"far {far // 1024} KiB"] = t
    return grid


def shapes(d_model: int, n_layer: int, vocab: int) -> list[tuple[int, int]]:
    """(out, in) of one decode step's weight products, GPT-2 layout (FFN 4 x d_model)."""
    d, f = d_model, 4 * d_model
    return [(3 * d, d), (d, d), (f, d), (d, f)] * n_layer + [(vocab, d)]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch at `n` threads, then put back the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(grid: dict, apply: Callable, run: Callable[[], list[torch.Tensor]], reps: int,
                what: str) -> dict[str, float]:
    """{candidate: median ms of `run()`} with each of grid's settings `apply`d in turn, pass
    by pass (reps timed passes after a warm-up one that warms caches and pages); raises
    AssertionError where a setting changes the outputs' bits (a kernel bug)."""
    times: dict[str, list[float]] = {name: [] for name in grid}
    reference = None
    for rep in range(reps + 1):
        for name, setting in grid.items():
            apply(setting)
            start = time.perf_counter()
            outs = run()
            elapsed = time.perf_counter() - start
            if reference is None:
                reference = [o.clone() for o in outs]  # run() may write into the same buffers
            elif not all(torch.equal(a, b) for a, b in zip(reference, outs)):
                raise AssertionError(f"{what}: the setting {name!r} changed the result's bits: "
                                     "a kernel bug")
            if rep > 0:
                times[name].append(elapsed * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def measure(module, kind: str, threads: Iterable[int], d_model: int, n_layer: int, vocab: int,
            reps: int, progress: Callable[[str], None] = lambda _: None) -> dict:
    """{threads: {rows: {candidate: median ms}}} for weights of `kind`; restores nothing (the
    caller re-applies the tuning it serves with)."""
    torch.manual_seed(0)
    dtype = DTYPES[kind]
    dims = shapes(d_model, n_layer, vocab)
    weights = [on_huge_pages((torch.randn(s) * 0.02).to(dtype)) for s in dims]
    biases = [torch.zeros(s[0]) for s in dims]
    grid = candidates(max(ROWS[kind]))
    results: dict = {}
    for n_threads in threads:
        results[n_threads] = {}
        with torch_threads(n_threads):
            for rows in ROWS[kind]:
                xs = [torch.randn(rows, s[1]) for s in dims]
                results[n_threads][rows] = interleaved(
                    grid, lambda t: module.tune(kind, *t),
                    lambda xs=xs: [module.linear(x, w, b) for x, w, b in zip(xs, weights, biases)],
                    reps, kind)
                best = min(results[n_threads][rows].values())
                progress(f"{kind}, {n_threads} thread{'s' if n_threads > 1 else ''}, {rows} "
                         f"row{'s' if rows > 1 else ''}: fastest {best:.2f} ms")
    return results


def choose(results: dict) -> tuple[str, dict[str, float]]:
    """(the candidate with the smallest geometric mean of time / fastest over every cell,
    {candidate: that mean})."""
    cells = [cell for per_rows in results.values() for cell in per_rows.values()]
    score = {name: math.exp(statistics.fmean(math.log(cell[name] / min(cell.values()))
                                             for cell in cells))
             for name in cells[0]}
    return min(score, key=score.get), score


def table(kind: str, results: dict, score: dict[str, float], current: str | None) -> str:
    """A plain-text table: a line per candidate, its ms per step's products per thread count
    and batch size, and its score (1.00: fastest everywhere)."""
    return render(f"{kind} weights, ms per decode step's products (threads x rows)", results,
                  score, current, lambda n, r: f"{n}t x{r}")


def render(title: str, results: dict, score: dict[str, float], current: str | None,
           column: Callable[[int, object], str]) -> str:
    """`results` ({threads: {cell: {candidate: ms}}}) as lines of text, a line per candidate
    from the best score down, the cells' columns named by `column(threads, cell)`."""
    cols = [(n, c) for n, per_cell in results.items() for c in per_cell]
    width = max([8, *(len(column(n, c)) for n, c in cols)])
    head = " ".join(f"{column(n, c):>{width}}" for n, c in cols)
    lines = [f"{title}; score: geometric mean of time / fastest",
             f"{'candidate':<36} {head} {'score':>6}"]
    for name in sorted(score, key=score.get):
        mark = " (current)" if name == current else ""
        row = " ".join(f"{results[n][c][name]:{width}.2f}" for n, c in cols)
        lines.append(f"{name + mark:<36} {row} {score[name]:6.3f}")
    return "\n".join(lines)


def current_name(kind: str, tuning: Avx512Tuning) -> str | None:
    """The grid's name of `tuning`, if the grid has it."""
    grid = candidates(max(ROWS[kind]))
    return next((name for name, t in grid.items() if t == tuning), None)


def merge_name(ahead: int) -> str:
    """The candidate name of a merge prefetch distance."""
    return "no prefetch" if ahead == 0 else f"{ahead} bytes ahead"


def measure_merge(module, threads: Iterable[int], d_model: int, n_layer: int, reps: int,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """{threads: {kind: {candidate: median ms}}}: every layer's FC1 and FC2 merged from
    MERGE_DELTAS deltas, under each of MERGE_DISTANCES, for fp32 and bf16 stacks (the shape
    of `measure`'s results, with the kind of weights where it has rows); restores nothing (the
    caller re-applies the distance it serves with)."""
    torch.manual_seed(0)
    d, f = d_model, 4 * d_model
    grid = {merge_name(a): a for a in MERGE_DISTANCES}
    results: dict = {n: {} for n in threads}
    for kind, dtype in DTYPES.items():  # one kind's stacks at a time, built once
        stacks = [on_huge_pages((torch.randn(MERGE_DELTAS + 1, f * d) * 0.02).to(dtype))
                  for _ in range(2 * n_layer)]
        outs = [torch.empty(f * d, dtype=dtype) for _ in stacks]
        coeffs = torch.rand(MERGE_DELTAS)

        def merge_all(stacks=stacks, outs=outs, coeffs=coeffs) -> list[torch.Tensor]:
            for stack, out in zip(stacks, outs):
                module.merge(stack[0], stack[1:], coeffs, out)
            return outs
        for n_threads in results:
            with torch_threads(n_threads):
                results[n_threads][kind] = interleaved(grid, module.set_merge_prefetch,
                                                       merge_all, reps, f"merges, {kind}")
            best = min(results[n_threads][kind].values())
            progress(f"merges, {kind}, {n_threads} thread{'s' if n_threads > 1 else ''}: "
                     f"fastest {best:.2f} ms")
        del stacks, outs, merge_all  # before the next kind's are built
    return results


def merge_table(results: dict, score: dict[str, float], current: str | None) -> str:
    """`table` for `measure_merge`'s results: a line per prefetch distance."""
    kinds = sorted({k for per_kind in results.values() for k in per_kind})
    return render(f"merges of every layer's FC1 and FC2 ({MERGE_DELTAS} deltas), "
                  f"{', '.join(kinds)} stacks, ms (threads, weights)", results, score, current,
                  lambda n, k: f"{n}t {k}")


def measure_tiles(module, threads: Iterable[int], d_model: int, n_layer: int, reps: int,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """{threads: {rows: {candidate: median ms}}}: every layer's FC1 and FC2 products with fp32
    weights for prompt chunks of TILES_ROWS rows, through the prompt tiles with each of
    TILES_ISAS's vectors; restores nothing (the caller re-applies what it serves with)."""
    torch.manual_seed(0)
    d, f = d_model, 4 * d_model
    dims = [(f, d), (d, f)] * n_layer
    weights = [on_huge_pages(torch.randn(s) * 0.02) for s in dims]
    biases = [torch.zeros(s[0]) for s in dims]
    results: dict = {}
    for n_threads in threads:
        results[n_threads] = {}
        with torch_threads(n_threads):
            for rows in TILES_ROWS:
                xs = [torch.randn(rows, s[1]) for s in dims]
                results[n_threads][rows] = interleaved(
                    TILES_ISAS, module.set_tiles_isa,
                    lambda xs=xs: [module.linear_tiles(x, w, b)
                                   for x, w, b in zip(xs, weights, biases)],
                    reps, "prompt tiles")
                best = min(results[n_threads][rows].values())
                progress(f"prompt tiles, {n_threads} thread{'s' if n_threads > 1 else ''}, "
                         f"{rows} rows: fastest {best:.2f} ms")
    return results


def tiles_table(results: dict, score: dict[str, float], current: str | None) -> str:
    """`table` for `measure_tiles`'s results: a line per vector width."""
    return render("prompt tiles, every layer's FC1 and FC2 with fp32 weights, ms (threads x "
                  "rows)", results, score, current, lambda n, r: f"{n}t x{r}")
