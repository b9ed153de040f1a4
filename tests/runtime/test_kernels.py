"""Native CPU kernels (camex_runtime.kernels) against torch, and mixed precision serving
(16-bit weights, fp32 activations) against fp32 and pure 16-bit serving."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from camex_runtime import Engine, kernels
from camex_runtime.engine.precision import Precision
from engine_models import build_folded

HAS_FLAGS = set(kernels.REQUIRED_FLAGS) <= kernels.cpu_flags()


def test_kernels_are_native_exactly_where_the_cpu_has_the_instructions():
    status = kernels.status()
    if HAS_FLAGS:  # this kind of machine (and CI): AVX2/FMA/F16C, a compiler, ninja
        assert status.startswith("native"), status
    else:
        assert status.startswith("torch (this CPU lacks"), status


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32])
def test_linear_equals_torch(wdtype, rows):
    torch.manual_seed(rows)
    big = torch.randn(50, 40).to(wdtype)
    w = big[:, :37]  # a row stride wider than the row, and an input width that is no multiple of 8
    x, b = torch.randn(rows, 37), torch.randn(50)
    want = F.linear(x, w.float(), b)
    # prompt-sized row counts may use the CPU's 16-bit GEMM (activations rounded to 16 bits)
    tol = 2 ** -6 if (rows > kernels.MAX_ROWS and wdtype != torch.float32
                      and kernels.native_16bit_gemm(wdtype)) else 1e-6
    for bias in (b, None):
        got = kernels.linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, 50)
        assert rel(got, F.linear(x, w.float(), bias)) <= tol
    assert rel(kernels.linear(x.view(rows, 1, 37), w, b).view(rows, 50), want) <= tol


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [75, 155])  # 155 = 2 x 64 + 16 + 8 + 3: every step and tail
def test_linear_rows_do_not_depend_on_the_batch_or_the_threads(wdtype, width):
    """Batched decode must give each sequence exactly what it gets alone (greedy tokens are
    compared bit for bit), so a row's product may not depend on how many rows share the call or
    on how the output rows are split over threads. (One input runs its own loop over the rows,
    64 elements a pass; two to four another; more in groups of four.)"""
    torch.manual_seed(3)
    w, b = torch.randn(301, width).to(wdtype), torch.randn(301)
    x = torch.randn(kernels.MAX_ROWS, width)
    alone = torch.cat([kernels.linear(x[i:i + 1], w, b) for i in range(len(x))])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in range(2, kernels.MAX_ROWS + 1):  # on AVX-512: both kernels, both blockings
                assert torch.equal(kernels.linear(x[:rows], w, b), alone[:rows]), (n, rows)
    finally:
        torch.set_num_threads(threads)


HAS_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= kernels.cpu_flags()


@pytest.mark.skipif(not (HAS_FLAGS and HAS_AVX512), reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_avx512_linear_gives_the_avx2_kernels_bits(wdtype):
    """The AVX-512 kernel (several inputs: register-blocked) must reproduce the AVX2 kernel bit
    for bit at every row count and blocking: which one runs depends on the batch size. (The bf16
    dot kernel, which the module runs for bf16 weights from BF16_DOT_FROM rows where it is on,
    is off here: it computes other bits by design, tested below.)"""
    mod = kernels.native()
    torch.manual_seed(5)
    w, b = torch.randn(203, 91).to(wdtype), torch.randn(203)  # 91 = 5 x 16 + 8 + 3: every tail
    x = torch.randn(kernels.MAX_ROWS + 5, 91)  # the module itself takes any row count
    dot = mod.bf16_dot()
    mod.set_bf16_dot(0)
    try:
        assert mod.set_isa("avx2", 0) == "avx2" and mod.isa() == "avx2"
        want = {n: mod.linear(x[:n], w, b) for n in (*range(1, kernels.MAX_ROWS + 1), len(x))}
        assert rel(want[len(x)], F.linear(x, w.float(), b)) <= 1e-6
        for rows_per_pass in (0, 1, 2, 4):
            assert mod.set_isa("avx512", rows_per_pass) == "avx512"
            for n, y in want.items():
                assert torch.equal(mod.linear(x[:n], w, b), y), (rows_per_pass, n)
        # the per-CPU-family settings for this kind of weights (which inputs run AVX-512,
        # when rows go in pairs or fours, how far ahead it prefetches)
        mod.set_isa("auto", 0)
        kind, other = kernels.weight_kind(wdtype), kernels.weight_kind(
            torch.bfloat16 if wdtype == torch.float32 else torch.float32)
        others = mod.tuning(other)
        for tuning in [*(t[kind] for t in kernels.AVX512_TUNING.values()), (3, 5, 0, 0, 0),
                       (8, 2, 3, 64, 4096), (2, 0, 5, 0, 100), (1, 0, 1, 1 << 20, 1 << 20)]:
            assert mod.tune(kind, *tuning) == tuning and mod.tuning(kind) == tuning
            for n, y in want.items():
                assert torch.equal(mod.linear(x[:n], w, b), y), (tuning, n)
        assert mod.tuning(other) == others  # each kind of weights has its own
        with pytest.raises(RuntimeError, match="rows"):
            mod.set_isa("avx512", 3)
        for bad in ((0, 0, 0, 0, 0), (1, 0, 0, -1, 0), (1, 0, 0, 0, (1 << 20) + 1)):
            with pytest.raises(RuntimeError, match="tune"):
                mod.tune(kind, *bad)
        with pytest.raises(RuntimeError, match="fp32.*16bit"):
            mod.tune("int8", 1, 0, 0, 0, 0)
    finally:
        mod.set_isa("auto", 0)
        mod.set_bf16_dot(dot)
        for k, t in kernels.chosen_tuning().items():
            mod.tune(k, *t)
    assert mod.isa() == "avx512"


def test_avx512_tuning_follows_the_cpu_vendor_and_family(monkeypatch):
    """Measured vendors (and families) get their own settings per kind of weights; any other
    gets Zen 4's."""
    monkeypatch.delenv("CAMEX_KERNELS_TUNING", raising=False)
    assert kernels.avx512_tuning("GenuineIntel") == kernels.AVX512_TUNING["GenuineIntel"]
    zen4 = {"fp32": (3, 0, 5, 2048, 16384), "16bit": (2, 0, 2, 2048, 16384)}
    assert kernels.avx512_tuning("AuthenticAMD") == zen4
    assert kernels.avx512_tuning("HygonGenuine") == kernels.avx512_tuning("") == zen4
    # a family measured on its own (Zen 5) gets its settings; a family not measured, its vendor's
    assert kernels.avx512_tuning("AuthenticAMD", 25) == zen4
    zen5 = kernels.avx512_tuning("AuthenticAMD", 26)
    assert zen5 == kernels.AVX512_TUNING["AuthenticAMD/26"] and zen5 != zen4
    assert kernels.avx512_tuning("GenuineIntel", 6) == kernels.AVX512_TUNING["GenuineIntel"]
    assert kernels.avx512_tuning("HygonGenuine", 26) == zen4
    for key, per_kind in kernels.AVX512_TUNING.items():
        assert set(per_kind) == set(kernels.WEIGHT_KINDS), key
    family = kernels.cpu_family()
    assert family >= 0 and (family > 0) == ("cpu family" in Path("/proc/cpuinfo").read_text())
    # the three readers of /proc/cpuinfo against a parse of the first CPU's lines written here
    first = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    assert kernels.cpu_vendor() == first.get("vendor_id", "")
    assert kernels.cpu_flags() == frozenset(first.get("flags", "").split())
    assert family == int(first.get("cpu family", "0"))
    assert set(kernels.AVX512_TUNING["GenuineIntel"]) == set(kernels.WEIGHT_KINDS)
    assert kernels.chosen_tuning() == kernels.avx512_tuning(
        kernels.cpu_vendor(), kernels.cpu_family())
    mod = kernels.native()
    if mod is not None:
        for kind, t in kernels.chosen_tuning().items():
            assert mod.tuning(kind) == t
            start = f"{t.avx512_from} row{'s' if t.avx512_from > 1 else ''} ({kind})"
            assert (start in kernels.status()) == (mod.isa() == "avx512")


def test_tuning_from_the_environment_is_checked_and_replaces_only_the_kinds_it_names(
        monkeypatch):
    text = "fp32=3,0,5,1024,8192; 16bit=1,2,0,0,0"
    parsed = kernels.parse_tuning(text)
    assert parsed == {"fp32": (3, 0, 5, 1024, 8192), "16bit": (1, 2, 0, 0, 0)}
    assert kernels.parse_tuning(kernels.format_tuning(parsed)) == parsed
    monkeypatch.setenv("CAMEX_KERNELS_TUNING", "16bit=1,0,1,4096,32768")
    vendor = kernels.avx512_tuning(
        kernels.cpu_vendor(), kernels.cpu_family())
    assert kernels.chosen_tuning() == {"fp32": vendor["fp32"], "16bit": (1, 0, 1, 4096, 32768)}
    for bad, why in [("", "empty"), ("fp32", "KIND="), ("int8=1,0,0,0,0", "KIND="),
                     ("fp32=1,0,0", "five integers"), ("fp32=1,0,0,0,x", "five integers"),
                     ("fp32=0,0,0,0,0", ">= 1"), ("16bit=1,0,0,0,2000000", "prefetch"),
                     ("fp32=1,0,0,0,0;fp32=2,0,0,0,0", "twice")]:
        with pytest.raises(ValueError, match=why):
            kernels.parse_tuning(bad)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLAGS, reason="needs a CPU with AVX2/FMA/F16C")
def test_the_server_process_applies_the_tuning_from_the_environment():
    """A fresh process with CAMEX_KERNELS_TUNING runs with it and says so; a bad value is a
    clear error (exit 2), not a silent default."""
    import os
    import subprocess
    import sys

    from tests.server.live_server import ROOT

    code = ("from camex_runtime import kernels\nm = kernels.native()\n"
            "print(kernels.status())\nprint(m.tuning('fp32'), m.tuning('16bit'))")
    env = {**os.environ, "CAMEX_KERNELS_TUNING": "fp32=2,0,3,1024,0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    vendor = kernels.avx512_tuning(
        kernels.cpu_vendor(), kernels.cpu_family())
    assert out.stdout.splitlines()[-1] == f"(2, 0, 3, 1024, 0) {tuple(vendor['16bit'])}"
    assert ("set by CAMEX_KERNELS_TUNING" in out.stdout) == HAS_AVX512
    env["CAMEX_KERNELS_TUNING"] = "fp32=2,0"
    bad = subprocess.run([sys.executable, "-m", "camex_runtime.kernels"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "five integers" in bad.stderr, bad.stderr
    del env["CAMEX_KERNELS_TUNING"]
    env["CAMEX_MERGE_PREFETCH"] = "512"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "prefetching 512 B ahead in each stream set by CAMEX_MERGE_PREFETCH" in out.stdout
    env["CAMEX_MERGE_PREFETCH"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "(no prefetch set by CAMEX_MERGE_PREFETCH)" in out.stdout
    env["CAMEX_MERGE_PREFETCH"] = "fp32=0;16bit=256"  # a distance per kind of stack
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("(prefetching in each stream: fp32 stacks none, 16-bit stacks 256 B ahead set by "
            "CAMEX_MERGE_PREFETCH)") in out.stdout
    env["CAMEX_MERGE_PREFETCH"] = "2 KiB"
    bad = subprocess.run([sys.executable, "-m", "camex_runtime.kernels"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "CAMEX_MERGE_PREFETCH='2 KiB'" in bad.stderr, bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLAGS, reason="needs a CPU with AVX2/FMA/F16C")
def test_tune_command_measures_every_candidate_and_prints_the_best(tmp_path):
    """`python -m camex_runtime.kernels --tune` on tiny shapes: every candidate timed in every
    cell (with the same bits, which it checks), the best by its score, printed as a value
    CAMEX_KERNELS_TUNING takes. Without AVX-512 there is nothing to tune: exit 2, said so."""
    import json
    import subprocess
    import sys

    from camex_runtime.kernels import tuning
    from tests.server.live_server import ROOT

    out = subprocess.run([sys.executable, "-m", "camex_runtime.kernels", "--tune", "--threads",
                          "1,2", "--reps", "1", "--d-model", "32", "--layers", "1", "--vocab",
                          "64", "--json", str(tmp_path / "tune.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if not HAS_AVX512:
        assert out.returncode == 2 and "no AVX-512" in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    best_line = next(line for line in out.stdout.splitlines() if line.startswith("fastest here"))
    best = kernels.parse_tuning(best_line.split("=", 1)[1].strip("'"))
    report = json.loads((tmp_path / "tune.json").read_text())
    assert report["best"] == kernels.format_tuning(best)
    for kind in kernels.WEIGHT_KINDS:
        k = report["kinds"][kind]
        grid = tuning.candidates(max(tuning.ROWS[kind]))
        assert k["candidates"] == {n: list(t) for n, t in grid.items()}
        assert set(k["ms"]) == {"1", "2"}
        for per_rows in k["ms"].values():
            assert [int(r) for r in per_rows] == list(tuning.ROWS[kind])
            assert all(set(cell) == set(grid) and min(cell.values()) > 0
                       for cell in per_rows.values())
        assert k["score"][k["best"]] == min(k["score"].values()) >= 1.0
        assert tuple(best[kind]) == tuple(grid[k["best"]])
        assert f"{kind} weights, ms per decode step" in out.stdout
    merge = report["merge"]
    names = {tuning.merge_name(a): a for a in tuning.MERGE_DISTANCES}
    assert merge["candidates"] == names and set(merge["ms"]) == {"1", "2"}
    for per_kind in merge["ms"].values():
        assert set(per_kind) == set(tuning.DTYPES)
        assert all(set(cell) == set(names) and min(cell.values()) > 0
                   for cell in per_kind.values())
    for kind in kernels.WEIGHT_KINDS:  # a best distance per kind of stack, by its own cells
        score = merge["score"][kind]
        assert score[merge["best"][kind]] == min(score.values()) >= 1.0
        assert merge["best_bytes"][kind] == names[merge["best"][kind]]
        cells = [per_kind[kind] for per_kind in merge["ms"].values()]
        for name in names:  # scored on this kind's cells alone
            mean_log = sum(math.log(c[name] / min(c.values())) for c in cells) / len(cells)
            assert score[name] == pytest.approx(math.exp(mean_log), rel=1e-9), (kind, name)
    assert merge["serving_with"] == kernels.merge_prefetch()
    said = next(line for line in out.stdout.splitlines() if line.startswith("merges fastest"))
    best = kernels.parse_merge_prefetch(said.split("=", 1)[1].strip("'"))
    assert best == merge["best_bytes"]
    assert "merges of every layer's FC1 and FC2" in out.stdout
    tiles = report["tiles"]  # the prompt tiles' vectors, scored the same way
    assert set(tiles["ms"]) == {"1", "2"} and tiles["serving_with"] == kernels.tiles_isa()
    for per_rows in tiles["ms"].values():
        assert [int(r) for r in per_rows] == list(tuning.TILES_ROWS)
        assert all(set(cell) == set(tuning.TILES_ISAS) and min(cell.values()) > 0
                   for cell in per_rows.values())
    assert tiles["score"][tiles["best"]] == min(tiles["score"].values()) >= 1.0
    assert tiles["best_isa"] == tuning.TILES_ISAS[tiles["best"]]
    assert f"prompt tiles fastest here: CAMEX_TILES_ISA={tiles['best_isa']}" in out.stdout
    assert f"prompt tiles serve with: CAMEX_TILES_ISA={kernels.tiles_isa()}" in out.stdout


def test_tuning_times_candidates_in_turn_and_refuses_one_that_changes_bits():
    """`tuning.interleaved` applies every candidate once per pass (a warm-up pass, then the
    timed ones) and reports each one's median; a candidate whose outputs differ from the
    first's is a kernel bug, not a faster setting."""
    from camex_runtime.kernels import tuning

    applied = []
    state = {"scale": 1.0}
    buf = torch.ones(4)

    def run():
        buf.fill_(state["scale"])  # the same buffer every time, as merges write theirs
        return [buf]
    same = tuning.interleaved({"a": 1.0, "b": 1.0}, lambda v: (applied.append(v),
                              state.update(scale=v)), run, reps=3, what="toy")
    assert set(same) == {"a", "b"} and min(same.values()) >= 0 and len(applied) == 8
    with pytest.raises(AssertionError, match="toy: the setting 'b' changed the result's bits"):
        tuning.interleaved({"a": 1.0, "b": 2.0}, lambda v: state.update(scale=v), run, reps=1,
                           what="toy")


def test_choosing_a_tuning_weighs_every_cell():
    """The score is the geometric mean of time / fastest over every cell: a candidate that is
    fastest in one cell but slow elsewhere loses to one near the best everywhere."""
    from camex_runtime.kernels import tuning

    results = {1: {1: {"spiky": 1.0, "steady": 1.1}, 2: {"spiky": 3.0, "steady": 1.0}},
               2: {1: {"spiky": 1.0, "steady": 1.05}}}
    name, score = tuning.choose(results)
    assert name == "steady"
    assert score["spiky"] == pytest.approx(3 ** (1 / 3))
    assert score["steady"] == pytest.approx((1.1 * 1.05) ** (1 / 3))


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_stay_native_and_batch_invariant_up_to_their_row_limit(monkeypatch, wdtype):
    """The linear kernel up to max_rows rows (16 with fp32 weights, 8 with 16-bit ones: a
    decode batch), every row the bits it gets alone; one row more leaves it, for the prompt
    tiles where tiles_take says so on this CPU, else for torch."""
    torch.manual_seed(3)
    w, b = torch.randn(40, 56).to(wdtype), torch.randn(40)
    limit = kernels.max_rows(wdtype)
    assert limit == (kernels.MAX_ROWS_FP32 if wdtype == torch.float32 else kernels.MAX_ROWS)
    x = torch.randn(limit + 1, 56)
    calls = []
    mod = kernels.native()

    class Spy:
        def linear(self, *args):
            calls.append(("linear", args[0].shape[0]))
            return mod.linear(*args)

        def linear_tiles(self, *args):
            calls.append(("tiles", args[0].shape[0]))
            return mod.linear_tiles(*args)
    monkeypatch.setattr(kernels, "native", lambda: Spy())
    batch = kernels.linear(x[:limit], w, b)
    alone = [kernels.linear(x[i:i + 1], w, b) for i in range(limit)]
    assert torch.equal(batch, torch.cat(alone))
    assert rel(batch, F.linear(x[:limit], w.float(), b)) <= 1e-6  # widened exactly
    kernels.linear(x, w, b)
    more = [("tiles", limit + 1)] if kernels.tiles_take(wdtype, limit + 1) else []
    assert calls == [("linear", limit)] + [("linear", 1)] * limit + more


def test_large_row_counts_and_16bit_activations_leave_the_linear_kernel():
    """More rows than a decode batch: torch's GEMM or the prompt tiles. 16-bit weights with
    fp32 activations use the CPU's native 16-bit GEMM where it has one (activations rounded to
    16 bits), else the weights widened (exact, in the tiles or by torch)."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 16).bfloat16(), torch.randn(24)
    x = torch.randn(kernels.max_rows(torch.bfloat16) + 1, 16)
    got = kernels.linear(x, w, b)
    assert got.dtype == torch.float32
    if kernels.native_16bit_gemm(torch.bfloat16):
        assert torch.allclose(got, F.linear(x.bfloat16(), w).float() + b)
        assert rel(got, F.linear(x, w.float(), b)) <= 2 ** -6
    else:
        assert rel(got, F.linear(x, w.float(), b)) <= 1e-6
    assert rel(kernels.linear(x, w.float(), b), F.linear(x, w.float(), b)) <= 1e-6
    xb = x[:4].bfloat16()
    assert torch.equal(kernels.linear(xb, w), F.linear(xb, w))


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,inp,rows", [(40, 56, 9), (29, 61, 33), (31, 3003, 45)])
def test_prompt_tiles_equal_torch_and_each_row_keeps_its_bits(wdtype, out, inp, rows):
    """The prompt tiles compute x @ w.T + b (16-bit weights widened exactly) for any shape:
    output rows that fill no whole tile of 6 (29, 31, 40), input widths that are no multiple
    of 8 (61, 3003: the packing's 8 x 8 transposes leave a tail) and span several chains of 256
    (3003), row counts that fill no whole block of 16 inputs (9; 33: a last block of 8 lanes;
    45). Each output is the same chains of FMAs wherever it is computed, so a row gets the same
    bits alone (a block of 8 lanes), in any batch, in any order, from a strided view, on one
    thread or two."""
    mod = kernels.native()
    torch.manual_seed(out + inp)
    w = torch.randn(out, inp + 3).to(wdtype)[:, :inp]  # a row stride wider than the row
    b = torch.randn(out)
    x = torch.randn(rows, inp + 5)[:, :inp]
    want = F.linear(x, w.float(), b)
    got = mod.linear_tiles(x, w, b)
    assert got.shape == (rows, out) and rel(got, want) <= 1e-6
    assert rel(mod.linear_tiles(x, w, None), F.linear(x, w.float())) <= 1e-6
    assert torch.equal(mod.linear_tiles(x.contiguous(), w, b), got)
    order = torch.randperm(rows)
    assert torch.equal(mod.linear_tiles(x[order], w, b), got[order])
    alone = torch.cat([mod.linear_tiles(x[i:i + 1], w, b) for i in range(rows)])
    assert torch.equal(alone, got)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(mod.linear_tiles(x, w, b), got), n
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="bias"):
        mod.linear_tiles(x, w, torch.randn(out + 1))
    with pytest.raises(RuntimeError, match="weight dtype"):
        mod.linear_tiles(x, w.to(torch.float64), None)


AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"}


@pytest.mark.skipif(kernels.native() is None or not HAS_AVX512,
                    reason="needs the native kernels on a CPU with AVX-512")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
def test_prompt_tiles_of_512_bit_vectors_give_the_256_bit_tiles_bits(wdtype):
    """tile512 holds a block's 16 inputs in one vector and runs two blocks side by side: every
    output is the same chain of FMAs, so it has the 256-bit tiles' bits for every row count
    (one whole block, two, two and a block of 8 lanes, an odd pair), on one thread or two, in
    linear_tiles and in merge_linear (whose merged weights are the same either way)."""
    mod = kernels.native()
    torch.manual_seed(11)
    out, inp, E = 47, 611, 3  # a last group of 5 weight rows; three chains of 256, a tail of 3
    w = torch.randn(out, inp).to(wdtype)
    b = torch.randn(out)
    base = torch.randn(out * inp).to(wdtype)
    deltas = torch.randn(E, out * inp).to(wdtype)
    coeffs = torch.rand(E)
    threads, isa = torch.get_num_threads(), mod.tiles_isa()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in (9, 16, 17, 24, 25, 32, 40, 45, 48, 64, 70):
                x = torch.randn(rows, inp + 4)[:, :inp]
                got = {}
                for vectors in ("avx2", "avx512"):
                    assert mod.set_tiles_isa(vectors) == vectors == mod.tiles_isa()
                    merged = torch.empty(out, inp, dtype=wdtype)
                    xc = x.contiguous()
                    y = (mod.merge_linear(xc, base, deltas, coeffs, merged, b)
                         if kernels.merge_linear_takes(xc, base, merged) else None)
                    got[vectors] = (mod.linear_tiles(x, w, b), y, merged if y is not None
                                    else None)
                (a, ma, wa), (z, mz, wz) = got["avx2"], got["avx512"]
                assert torch.equal(a, z), (n, rows)
                assert rel(z, F.linear(x, w.float(), b)) <= 1e-6
                assert (ma is None) == (mz is None)
                if wdtype == torch.float32 and 17 <= rows <= kernels.MERGE_LINEAR_ROWS:
                    assert ma is not None, rows  # a prompt segment's rows: merge_linear takes them
                if ma is not None:
                    assert torch.equal(wa, wz) and torch.equal(ma, mz), (n, rows)
    finally:
        torch.set_num_threads(threads)
        mod.set_tiles_isa(isa)
    with pytest.raises(RuntimeError, match="avx2.*avx512"):
        mod.set_tiles_isa("sse")


def test_the_tiles_vectors_follow_the_cpu_family_and_the_environment(monkeypatch):
    """512-bit tiles where TILES_AVX512 names the CPU (Zen 5), 256-bit ones elsewhere (Zen 4,
    Intel, no AVX-512); CAMEX_TILES_ISA overrides, and a bad value, or avx512 on a CPU without
    it, is a clear error. The loaded module runs what tiles_isa says and the status names it."""
    monkeypatch.delenv("CAMEX_TILES_ISA", raising=False)
    real = kernels.tiles_isa()
    avx512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    for flags, vendor, family, want in [
            (avx512, "AuthenticAMD", 26, "avx512"), (avx512, "AuthenticAMD", 25, "avx2"),
            (avx512, "GenuineIntel", 6, "avx2"), (AVX2_ONLY, "AuthenticAMD", 26, "avx2"),
            (avx512 - {"avx512vl"}, "AuthenticAMD", 26, "avx2")]:
        monkeypatch.setattr(kernels, "cpu_flags", lambda f=flags: frozenset(f))
        monkeypatch.setattr(kernels, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(kernels, "cpu_family", lambda f=family: f)
        assert kernels.tiles_isa() == want, (vendor, family)
        monkeypatch.setenv("CAMEX_TILES_ISA", "avx2")
        assert kernels.tiles_isa() == "avx2"
        monkeypatch.setenv("CAMEX_TILES_ISA", "avx512")
        if "avx512vl" in flags:
            assert kernels.tiles_isa() == "avx512"
        else:
            with pytest.raises(ValueError, match="no AVX-512"):
                kernels.tiles_isa()
        monkeypatch.setenv("CAMEX_TILES_ISA", "avx1024")
        with pytest.raises(ValueError, match="avx2 or avx512"):
            kernels.tiles_isa()
        monkeypatch.delenv("CAMEX_TILES_ISA")
    mod = kernels.native()
    if mod is not None:
        assert mod.tiles_isa() == real
        assert ("rows of 512-bit vectors" in kernels.status()) == (real == "avx512")


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
@pytest.mark.parametrize("flags", [AVX2_ONLY, AVX512_BF16], ids=["avx2-only", "avx512-bf16"])
@pytest.mark.parametrize("family", [25, 26])
def test_prompt_tiles_take_what_the_cpu_multiplies_slowly(monkeypatch, flags, vendor, family):
    """Where the CPU has no 16-bit GEMM, 16-bit weights' prompt chunks go to the tiles up to
    TILES_MAX_ROWS_16BIT rows without AVX-512 (TILES_MAX_ROWS_FP32_AVX512 with it), longer ones
    to torch's fp32 GEMM on weights widened a slice at a time; where the CPU has one (bf16 here,
    not fp16), they go to it. fp32 chunks go to the tiles up to TILES_MAX_ROWS_FP32 rows on CPUs
    without AVX-512 and TILES_MAX_ROWS_FP32_AVX512 on AMD ones with it, not on Intel ones with
    it. Where the tiles run 512-bit vectors (AMD family 26, Zen 5) both limits are
    TILES_MAX_ROWS_512BIT. kernels.linear follows that choice: the tiles' own result where they
    take the rows."""
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(kernels, "cpu_family", lambda: family)
    monkeypatch.delenv("CAMEX_TILES_ISA", raising=False)
    avx512 = "avx512f" in flags
    wide = avx512 and vendor == "AuthenticAMD" and family == 26
    assert kernels.tiles_isa() == ("avx512" if wide else "avx2")
    most512 = kernels.TILES_MAX_ROWS_512BIT if wide else kernels.TILES_MAX_ROWS_FP32_AVX512
    first = kernels.MAX_ROWS + 1
    most16 = most512 if avx512 else kernels.TILES_MAX_ROWS_16BIT
    assert kernels.tiles_max_rows(torch.bfloat16) == kernels.tiles_max_rows(torch.float16) == most16
    assert kernels.tiles_take(torch.bfloat16, first) is not avx512
    assert kernels.tiles_take(torch.bfloat16, most16) is not avx512
    assert kernels.tiles_take(torch.float16, first) and kernels.tiles_take(torch.float16, most16)
    assert not kernels.tiles_take(torch.bfloat16, most16 + 1)
    assert not kernels.tiles_take(torch.float16, most16 + 1)
    assert not kernels.tiles_take(torch.float64, 64)  # the tiles read fp32 / fp16 / bf16 only
    fp32_tiles = not avx512 or vendor == "AuthenticAMD"
    fp32_first = kernels.MAX_ROWS_FP32 + 1
    assert kernels.tiles_take(torch.float32, fp32_first) is fp32_tiles
    most = most512 if avx512 else kernels.TILES_MAX_ROWS_FP32
    assert kernels.tiles_max_rows(torch.float32) == most
    assert kernels.tiles_take(torch.float32, most) is fp32_tiles
    assert not kernels.tiles_take(torch.float32, most + 1)
    mod = kernels.native()
    if mod is None:
        return
    tiled = []

    class Spy:  # which rows went to the tiles (the rest is torch's, or the CPU's 16-bit GEMM)
        def linear_tiles(self, *args):
            tiled.append(args[0].shape[0])
            return mod.linear_tiles(*args)
    monkeypatch.setattr(kernels, "native", lambda: Spy())
    torch.manual_seed(1)
    for wdtype, rows in ((torch.bfloat16, first), (torch.float16, 70), (torch.float32, 20),
                         (torch.float32, kernels.TILES_MAX_ROWS_FP32 + 1),
                         (torch.float32, most + 1), (torch.bfloat16, most16 + 1),
                         (torch.float16, most16 + 1)):
        w, b, x = torch.randn(30, 24).to(wdtype), torch.randn(30), torch.randn(rows, 24)
        tiled.clear()
        got = kernels.linear(x, w, b)
        assert (tiled == [rows]) is kernels.tiles_take(wdtype, rows), (wdtype, rows)
        if kernels.tiles_take(wdtype, rows):
            assert torch.equal(got, mod.linear_tiles(x, w, b))
        elif not kernels.native_16bit_gemm(wdtype):
            assert rel(got, F.linear(x, w.float(), b)) <= 1e-6


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
def test_the_single_row_prefetch_follows_the_cpu_and_changes_no_bits(monkeypatch):
    """One row of 16-bit weights is prefetched 2 KiB ahead on CPUs without AVX-512 (the AVX2-only
    Zen 3 streams it faster so) and not on those with it (the hardware prefetcher alone is
    faster there); the distance decides how the row is read, never what is computed."""
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX2_ONLY)
    assert kernels.single_prefetch() == kernels.SINGLE_PREFETCH_AVX2_ONLY > 0
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX512_BF16)
    assert kernels.single_prefetch() == 0
    monkeypatch.undo()
    mod = kernels.native()
    torch.manual_seed(2)
    try:
        for wdtype in (torch.bfloat16, torch.float16, torch.float32):
            w, b, x = torch.randn(70, 3001).to(wdtype), torch.randn(70), torch.randn(1, 3001)
            outs = []
            for ahead in (0, 64, 2048, 65536):
                mod.set_single_prefetch(ahead)
                outs.append(mod.linear(x, w, b))
            assert all(torch.equal(o, outs[0]) for o in outs), wdtype
            assert rel(outs[0], F.linear(x, w.float(), b)) <= 1e-6
        with pytest.raises(RuntimeError, match="0 to 65536"):
            mod.set_single_prefetch(-1)
    finally:
        mod.set_single_prefetch(kernels.single_prefetch())


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
def test_the_merge_prefetch_follows_the_cpu_and_changes_no_bits(monkeypatch):
    """Merges prefetch per CPU and kind of stack: 1 KiB ahead in every stream on Intel CPUs
    with AVX-512 (measured faster on the Xeon), 512 B for 16-bit stacks on Zen 5, none
    elsewhere; the environment replaces all kinds or the ones it names; the status says so,
    and the distance decides how the stack is read, never what a merge writes (merge,
    merge_many, merge_linear; ranges that end past the buffer included)."""
    none = {"fp32": 0, "16bit": 0}
    for vendor, family, flags, want in (
            ("GenuineIntel", 6, AVX512_BF16, {"fp32": 1024, "16bit": 1024}),
            ("GenuineIntel", 6, AVX2_ONLY, none), ("AuthenticAMD", 25, AVX512_BF16, none),
            ("AuthenticAMD", 26, AVX512_BF16, {"fp32": 0, "16bit": 512}),
            ("AuthenticAMD", 26, AVX2_ONLY, none), ("HygonGenuine", 24, AVX512_BF16, none)):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(kernels, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(kernels, "cpu_family", lambda family=family: family)
        assert kernels.merge_prefetch() == want, (vendor, family)
    assert kernels.merge_prefetch() == none  # a vendor not measured (the last above)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX512_BF16)
    for text, want in (("512", {"fp32": 512, "16bit": 512}), (" 0 ", none),
                       ("65536", {"fp32": 65536, "16bit": 65536}),
                       ("16bit=256", {"fp32": 1024, "16bit": 256}),  # fp32 keeps the CPU's
                       ("fp32=0; 16bit=2048", {"fp32": 0, "16bit": 2048})):
        monkeypatch.setenv("CAMEX_MERGE_PREFETCH", text)
        assert kernels.merge_prefetch() == want, text
        assert kernels.parse_merge_prefetch(kernels.format_merge_prefetch(want)) == want
    for text, why in (("-1", "integer from 0"), ("65537", "integer from 0"),
                      ("1k", "integer from 0"), ("1.5", "integer from 0"),
                      ("16bit=", "integer from 0"), ("int8=512", "KIND=BYTES"),
                      ("fp32=0;;16bit=1", "KIND=BYTES"), ("fp32=1;fp32=2", "twice")):
        monkeypatch.setenv("CAMEX_MERGE_PREFETCH", text)
        with pytest.raises(ValueError, match=f"CAMEX_MERGE_PREFETCH=.*{why}"):
            kernels.merge_prefetch()
    monkeypatch.undo()
    assert ("prefetching" in kernels.status()) is any(kernels.merge_prefetch().values())
    mod = kernels.native()
    torch.manual_seed(3)
    n, E = 69 * 45, 7  # three blocks of 1024 and a tail; rows of 45 for merge_linear
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
            coeffs, x = torch.rand(3, E), torch.randn(5, 45)
            got = []
            for ahead in (0, 64, 1024, 65536):
                mod.set_merge_prefetch(ahead, "fp32" if dtype == torch.float32 else "16bit")
                other = "16bit" if dtype == torch.float32 else "fp32"
                mod.set_merge_prefetch(0 if ahead else 512, other)  # the other kind's alone
                assert mod.merge_prefetch_of(other) == (0 if ahead else 512)
                outs = [torch.empty(n, dtype=dtype) for _ in range(3)]
                mod.merge_many(base, deltas, coeffs, outs)
                alone = torch.empty(n, dtype=dtype)
                mod.merge(base, deltas, coeffs[0], alone)
                w = torch.empty(n // 45, 45, dtype=dtype)
                y = kernels.merge_linear(x, base, deltas, coeffs[0], w)
                got.append((outs, alone, w, y))
            for outs, alone, w, y in got[1:]:
                assert all(torch.equal(a, b) for a, b in zip(outs, got[0][0])), dtype
                assert torch.equal(alone, got[0][1]), dtype
                assert (y is None) == (got[0][3] is None), dtype  # declined: nothing written
                assert y is None or (torch.equal(w, got[0][2]) and torch.equal(y, got[0][3]))
            want = (base.float() + coeffs[0] @ deltas.float()).to(dtype)
            tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
            assert rel(got[0][1].float(), want.float()) <= tol
        with pytest.raises(RuntimeError, match="0 to 65536"):
            mod.set_merge_prefetch(-1)
        with pytest.raises(RuntimeError, match="fp32"):
            mod.set_merge_prefetch(64, "int8")
    finally:
        kernels.apply_merge_prefetch(mod)
    assert {k: mod.merge_prefetch_of(k) for k in kernels.WEIGHT_KINDS} == kernels.merge_prefetch()


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
def test_the_native_products_take_the_tiles_for_the_rows_python_gives_them():
    """merge_linear and ffn multiply inside the extension: it holds the same choice as
    kernels.tiles_take (set at load, said in the status), so a merged expert's prompt rows get
    the tiles' bits whether the merge was just made or came from the cache, and the row counts
    outside it keep the linear kernel's."""
    mod = kernels.native()
    status = kernels.status()
    said = status.split("prompt tiles for")[1] if "prompt tiles for" in status else ""
    for name, dtype in kernels.TILE_KINDS.items():
        first = kernels.max_rows(dtype) + 1
        lo, hi = mod.tiles(name)
        assert lo == (first if kernels.tiles_take(dtype, first) else 0)
        assert (lo > 0) == (name in said)
        if lo:  # the status says the rows: "fp32 17-64, bf16 9-128, ..."
            assert f"{name} {lo}-{hi}" in said
            assert kernels.tiles_take(dtype, hi)  # fp32: not one row more (tested above)
            assert hi == kernels.tiles_max_rows(dtype)
    with pytest.raises(RuntimeError, match="kind"):
        mod.set_tiles("int8", 9, 10)
    with pytest.raises(RuntimeError, match="from <= to"):
        mod.set_tiles("fp32", 9, 8)
    saved = mod.tiles("fp32")
    torch.manual_seed(5)
    w, b = torch.randn(20, 40), torch.randn(20)
    try:
        mod.set_tiles("fp32", 3, 5)
        for rows in (2, 3, 5, 6):
            x = torch.randn(rows, 40)
            tiled = 3 <= rows <= 5
            assert torch.equal(mod.linear(x, w, b), mod.linear_tiles(x, w, b)) is tiled
            alone = torch.cat([mod.linear(x[i:i + 1], w, b) for i in range(rows)])
            assert torch.equal(mod.linear(x, w, b), alone) is not tiled
    finally:
        mod.set_tiles("fp32", *saved)


@pytest.mark.parametrize("H,KV,hd", [(4, 4, 16), (6, 2, 12), (2, 1, 64)])
def test_decode_attention_writes_the_cache_and_equals_sdpa_per_row(H, KV, hd):
    """Ragged positions, slots out of order, grouped-query heads, a head size that is no
    multiple of 8, q/k/v as strided views of one fused projection (as the model makes them).
    Without the native kernels it declines (None, nothing written): the engine uses sdpa."""
    torch.manual_seed(H * hd)
    n_layer, S, max_len, layer = 3, 5, 40, 1
    kc, vc = torch.randn(n_layer, S, KV, max_len, hd), torch.randn(n_layer, S, KV, max_len, hd)
    before = kc.clone(), vc.clone()
    slots, positions = torch.tensor([3, 0, 4]), torch.tensor([7, 0, 33])
    B = len(slots)
    qkv = torch.randn(B, (H + 2 * KV) * hd)
    q, k, v = (t.view(B, -1, hd) for t in qkv.split([H * hd, KV * hd, KV * hd], dim=-1))
    got = kernels.decode_attention(q, k, v, kc, vc, layer, slots, positions)
    if kernels.native() is None:
        assert got is None and torch.equal(kc, before[0]) and torch.equal(vc, before[1])
        return
    assert got.shape == (B, H, hd)
    written = torch.zeros_like(kc, dtype=torch.bool)
    for b, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
        assert torch.equal(kc[layer, s, :, p], k[b]) and torch.equal(vc[layer, s, :, p], v[b])
        written[layer, s, :, p] = True
        keys, values = kc[layer, s, :, :p + 1], vc[layer, s, :, :p + 1]  # (KV, p+1, hd)
        want = F.scaled_dot_product_attention(q[b][:, None], keys.repeat_interleave(H // KV, 0),
                                              values.repeat_interleave(H // KV, 0))[:, 0]
        assert rel(got[b], want) <= 1e-5
        # a row's result is the same computed alone (batched == solo)
        alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], kc, vc, layer,
                                         slots[b:b + 1], positions[b:b + 1])
        assert torch.equal(alone[0], got[b])
    assert torch.equal(kc[~written], before[0][~written])  # nothing else in the cache moved
    assert torch.equal(vc[~written], before[1][~written])


@pytest.mark.skipif(kernels.native() is None, reason="no native kernels here")
@pytest.mark.parametrize("window", [1, 5, 34])
def test_decode_attention_with_a_window_sees_only_the_last_window_positions(window):
    """Sliding-window attention: row b attends to positions (p - window, p], as transformers'
    rule `k > q - window`; rows nearer the start than the window see them all."""
    torch.manual_seed(window)
    H, KV, hd, max_len = 4, 2, 16, 40
    kc, vc = torch.randn(2, 3, KV, max_len, hd), torch.randn(2, 3, KV, max_len, hd)
    slots, positions = torch.tensor([2, 0, 1]), torch.tensor([9, 2, 33])
    q, k, v = torch.randn(3, H, hd), torch.randn(3, KV, hd), torch.randn(3, KV, hd)
    got = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions, window)
    for b, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
        first = max(0, p + 1 - window)
        keys, values = kc[1, s, :, first:p + 1], vc[1, s, :, first:p + 1]
        want = F.scaled_dot_product_attention(q[b][:, None], keys.repeat_interleave(H // KV, 0),
                                              values.repeat_interleave(H // KV, 0))[:, 0]
        assert rel(got[b], want) <= 1e-5
    full = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions)
    assert torch.equal(full[1], got[1]) == (window >= 3)  # position 2: within every window >= 3
    assert not torch.equal(full[2], got[2]) or window >= 34


@pytest.mark.skipif(kernels.native() is None, reason="no native kernels here")
@pytest.mark.parametrize("window", [None, 6])
def test_decode_attention_soft_caps_scores_as_the_torch_reference(window):
    """Gemma 2's cap c: each score c * tanh(s / c) before the softmax, in the kernel as in
    `scored_attention` (the torch path, transformers' eager formula); scores of these
    sizes (|s| up to ~10) are changed by a cap of 2, so a kernel ignoring it differs."""
    from camex_runtime.layers import scored_attention

    torch.manual_seed(11)
    H, KV, hd, max_len, cap = 4, 2, 16, 40, 2.0
    kc, vc = torch.randn(2, 3, KV, max_len, hd) * 2, torch.randn(2, 3, KV, max_len, hd)
    slots, positions = torch.tensor([2, 0, 1]), torch.tensor([9, 2, 33])
    q, k, v = torch.randn(3, H, hd) * 2, torch.randn(3, KV, hd) * 2, torch.randn(3, KV, hd)
    got = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions, window, cap)
    for b, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
        first = 0 if window is None else max(0, p + 1 - window)
        keys, values = kc[1, s, :, first:p + 1], vc[1, s, :, first:p + 1]
        want = scored_attention(q[b][None, :, None], keys[None], values[None], cap)[0, :, 0]
        assert rel(got[b], want) <= 1e-5
    uncapped = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions, window)
    assert rel(uncapped, got) > 1e-2


@pytest.mark.skipif(kernels.native() is None, reason="no native kernels here")
@pytest.mark.parametrize("window", [None, 6])
def test_decode_attention_sinks_as_the_torch_reference(window):
    """GPT-OSS's sinks: each head's logit is one more softmax column without a value, in the
    kernel as in `scored_attention` (transformers' eager formula) — with a cap too; sinks the
    size of the scores take weight off every key, so a kernel ignoring them differs."""
    from camex_runtime.layers import scored_attention

    torch.manual_seed(12)
    H, KV, hd, max_len = 4, 2, 16, 40
    kc, vc = torch.randn(2, 3, KV, max_len, hd), torch.randn(2, 3, KV, max_len, hd)
    slots, positions = torch.tensor([2, 0, 1]), torch.tensor([9, 0, 33])
    q, k, v = torch.randn(3, H, hd) * 2, torch.randn(3, KV, hd), torch.randn(3, KV, hd)
    sinks = torch.tensor([3.0, -2.0, 0.5, 30.0])  # the last outweighs every key
    for cap in (None, 2.0):
        got = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions, window, cap,
                                       sinks)
        for b, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
            first = 0 if window is None else max(0, p + 1 - window)
            keys, values = kc[1, s, :, first:p + 1], vc[1, s, :, first:p + 1]
            want = scored_attention(q[b][None, :, None], keys[None], values[None], cap,
                                    sinks)[0, :, 0]
            assert rel(got[b], want) <= 1e-5
        plain = kernels.decode_attention(q, k, v, kc, vc, 1, slots, positions, window, cap)
        assert rel(plain, got) > 1e-2
        # the heavy sink leaves its head's output near zero: attention to nothing
        assert got[:, 3].abs().max() < 0.1 * plain[:, 3].abs().max()


def test_decode_attention_declines_what_it_does_not_compute():
    q, kv = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    cache = torch.zeros(1, 1, 2, 4, 8)
    half = [t.bfloat16() for t in (q, kv, kv, cache, cache)]
    assert kernels.decode_attention(*half, 0, torch.tensor([0]), torch.tensor([0])) is None
    assert kernels.decode_attention(q, kv, kv, cache.transpose(3, 4), cache, 0,
                                    torch.tensor([0]), torch.tensor([0])) is None
    assert torch.equal(cache, torch.zeros_like(cache))


@pytest.fixture(params=["native", "torch"])
def merge_path(request, monkeypatch):
    """Both merge paths: the native kernel where this CPU has it, and the torch fallback that
    CUDA and CPUs without the extension use."""
    if request.param == "native" and kernels.native() is None:
        pytest.skip(f"no native kernels here: {kernels.status()}")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "native", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_equals_addmm(dtype, merge_path):
    torch.manual_seed(1)
    n, E = 1037, 5
    base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
    coeffs = torch.rand(E)
    want = (base.float() + coeffs @ deltas.float()).to(dtype)
    out = torch.empty(n, dtype=dtype)
    kernels.merge(base, deltas, coeffs, out)
    # fp32 sums in another order: at most one unit in the last place of the 16-bit result
    tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert rel(out.float(), want.float()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_many_gives_each_output_the_bits_of_a_lone_merge(dtype, merge_path):
    """Several merged experts from one pass over the stack: blocks of 1024 elements, so n
    spans three blocks and a tail, and more experts than the vector path keeps in registers;
    each output must not depend on how many share the pass."""
    torch.manual_seed(2)
    n = 2 * 1024 + 37
    for E, S in ((5, 1), (5, 2), (5, 5), (17, 3)):
        base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
        coeffs = torch.rand(S, E)
        outs = [torch.full((n,), float("nan"), dtype=dtype) for _ in range(S)]
        kernels.merge_many(base, deltas, coeffs, outs)
        for c, got in zip(coeffs, outs):
            alone = torch.empty(n, dtype=dtype)
            kernels.merge(base, deltas, c, alone)
            assert torch.equal(got, alone)
            want = (base.float() + c @ deltas.float()).to(dtype)
            tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
            assert rel(got.float(), want.float()) <= tol
    kernels.merge_many(base, deltas, torch.empty(0, E), [])  # nothing to merge: no error


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merges_of_compiled_delta_counts_give_the_run_time_counts_bits(dtype):
    """The native merges compile their loop over deltas for 1-15 deltas and read the count at
    run time past that. Merging E deltas must give the bits of the same merge padded past the
    compiled counts with zero coefficients (an FMA by zero adds an exact zero): for every E,
    one output and several from one pass, with each instruction set this CPU has."""
    mod = kernels.native()
    torch.manual_seed(4)
    n, total = 1024 + 29, 17
    isas = ["avx2"] + (["avx512"] if HAS_AVX512 else [])
    try:
        for E in range(1, total - 1):
            base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
            padded = torch.cat([deltas, torch.randn(total - E, n).to(dtype)])
            coeffs = torch.rand(2, E)
            zero_padded = torch.cat([coeffs, torch.zeros(2, total - E)], 1)
            for isa in isas:
                mod.set_isa(isa, 0)
                compiled = [torch.full((n,), float("nan"), dtype=dtype) for _ in range(2)]
                run_time = [torch.full((n,), float("nan"), dtype=dtype) for _ in range(2)]
                kernels.merge_many(base, deltas, coeffs, compiled)
                kernels.merge_many(base, padded, zero_padded, run_time)
                for a, b in zip(compiled, run_time):
                    assert not a.isnan().any() and torch.equal(a, b), (isa, E)
                alone = torch.empty(n, dtype=dtype)
                kernels.merge(base, deltas, coeffs[0], alone)
                assert torch.equal(alone, compiled[0]), (isa, E)
                kernels.merge(base, padded, zero_padded[0], alone)
                assert torch.equal(alone, compiled[0]), (isa, E)
    finally:
        mod.set_isa("auto", 0)


@pytest.mark.skipif(not (HAS_FLAGS and HAS_AVX512), reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_avx512_merges_give_the_avx2_merges_bits(dtype):
    """Merges 16 elements at a time (AVX-512) and 8 at a time (AVX2) must write the same bits,
    one output or several from one pass, with tails of every length after the wide vectors."""
    mod = kernels.native()
    torch.manual_seed(3)
    try:
        for n in (13, 1024 + 29, 2 * 1024 + 37):  # 29 = 16 + 8 + 5
            for E, S in ((5, 1), (5, 3), (7, 8), (17, 2)):
                base, deltas = torch.randn(n).to(dtype), torch.randn(E, n).to(dtype)
                coeffs = torch.rand(S, E)
                if S == 3 and dtype != torch.float32:  # exact ties: rounding to even decides
                    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
                    base = (1 + ulp * (torch.arange(n) % 64)).to(dtype)  # odd and even last bits
                    deltas[0] = ulp / 2
                    coeffs[0] = torch.tensor([1.0] + [0.0] * (E - 1))
                got = {}
                for isa in ("avx2", "avx512"):
                    mod.set_isa(isa, 0)
                    outs = [torch.full((n,), float("nan"), dtype=dtype) for _ in range(S)]
                    kernels.merge_many(base, deltas, coeffs, outs)
                    alone = torch.full((n,), float("nan"), dtype=dtype)
                    kernels.merge(base, deltas, coeffs[0], alone)
                    got[isa] = (outs, alone)
                for a, b in zip(got["avx2"][0], got["avx512"][0]):
                    assert torch.equal(a, b), (n, E, S)
                assert torch.equal(got["avx2"][1], got["avx512"][1]), (n, E)
                assert not got["avx512"][1].isnan().any()
    finally:
        mod.set_isa("auto", 0)


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_merge_linear_writes_the_merge_and_returns_the_linear_kernels_rows(isa):
    """A prompt chunk's merge and product in one pass: the pool entry gets merge()'s bits, and
    every row of the product the bits the linear kernel gives that row alone (what a decode step
    computes) — or, for row counts the prompt tiles take on this CPU, the tiles' bits, as the
    cached entry gets them in ffn — at any row count, with output rows that fill no whole tile,
    with and without a bias, on one thread and on two."""
    if isa == "avx512" and not HAS_AVX512:
        pytest.skip("needs a CPU with AVX-512")
    mod = kernels.native()
    torch.manual_seed(7)
    out_rows, width, E = 53, 91, 5  # 53 = 3 tiles of 16 and 5 rows; 91: every vector tail
    base, deltas = torch.randn(out_rows * width), torch.randn(E, out_rows * width)
    coeffs, bias = torch.rand(E), torch.randn(out_rows)
    merged = torch.empty(out_rows, width)
    kernels.merge(base, deltas, coeffs, merged.view(-1))
    threads = torch.get_num_threads()
    try:
        mod.set_isa(isa, 0)
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in (1, 3, 4, 17, kernels.MERGE_LINEAR_ROWS):
                x = torch.randn(rows, width)
                for b in (bias, None):
                    out = torch.full((out_rows, width), float("nan"))
                    y = kernels.merge_linear(x, base, deltas, coeffs, out, b)
                    assert torch.equal(out, merged), (n, rows)
                    if kernels.tiles_take(torch.float32, rows):
                        assert torch.equal(y, mod.linear_tiles(x, merged, b)), (n, rows)
                        assert torch.equal(y, mod.linear(x, merged, b)), (n, rows)
                    else:
                        alone = torch.cat([mod.linear(x[i:i + 1], merged, b)
                                           for i in range(rows)])
                        assert torch.equal(y, alone), (n, rows)
                    assert rel(y, F.linear(x, merged, b)) <= 1e-6
    finally:
        torch.set_num_threads(threads)
        mod.set_isa("auto", 0)


@pytest.mark.skipif(kernels.native() is None, reason=f"no native kernels: {kernels.status()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_linear_with_16bit_weights_on_the_prompt_tiles(dtype):
    """16-bit weights on a CPU without a native 16-bit GEMM, prompt rows beyond a decode batch:
    merge_linear writes merge()'s bits and returns the prompt tiles' product (what `ffn` gives
    the rows from the cached entry), on one thread and on two, with and without a bias; decode-
    sized row counts are declined with nothing written. Where the CPU has its own 16-bit GEMM
    (or the bf16 dot kernel) the tiles take none of these rows and neither does merge_linear."""
    mod = kernels.native()
    torch.manual_seed(5)
    out_rows, width, E = 53, 91, 5  # tiles of whole 3-row groups and a remainder; 91: odd
    base = torch.randn(out_rows * width).to(dtype)
    deltas = torch.randn(E, out_rows * width).to(dtype)
    coeffs, bias = torch.rand(E), torch.randn(out_rows)
    merged = torch.empty(out_rows, width, dtype=dtype)
    kernels.merge(base, deltas, coeffs, merged.view(-1))
    threads = torch.get_num_threads()
    dot = dtype == torch.bfloat16 and kernels.bf16_dot()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in (kernels.max_rows(dtype), kernels.max_rows(dtype) + 1, 17,
                         kernels.MERGE_LINEAR_ROWS):
                x = torch.randn(rows, width)
                for b in (bias, None):
                    out = torch.full((out_rows, width), float("nan"), dtype=dtype)
                    y = kernels.merge_linear(x, base, deltas, coeffs, out, b)
                    if dot:  # the bf16 dot kernel's own test covers these rows
                        continue
                    if not kernels.tiles_take(dtype, rows):
                        assert y is None and out.isnan().all(), (n, rows)
                        continue
                    assert torch.equal(out, merged), (n, rows)
                    assert torch.equal(y, mod.linear_tiles(x, merged, b)), (n, rows)
                    assert torch.equal(y, kernels.linear(x, merged, b)), (n, rows)
                    assert rel(y, F.linear(x, merged.float(), b)) <= 1e-6
    finally:
        torch.set_num_threads(threads)
    takes = kernels.tiles_take(dtype, kernels.MERGE_LINEAR_ROWS)
    assert takes == (not kernels.native_16bit_gemm(dtype))
    assert kernels.ffn_rows(dtype) == (kernels.MERGE_LINEAR_ROWS if takes or dot
                                       else kernels.max_rows(dtype))


HAS_BF16_DOT = kernels.native() is not None and kernels.native().has_bf16_dot()


def test_the_bf16_dot_kernel_is_chosen_per_cpu_family():
    """On by default only on a CPU with AVX512-BF16 of a family in BF16_DOT_VENDORS, and said
    so in the status; refused where the CPU lacks the instructions."""
    mod = kernels.native()
    if mod is None:
        assert not kernels.bf16_dot()
        return
    expected = HAS_BF16_DOT and kernels.cpu_vendor() in kernels.BF16_DOT_VENDORS
    assert kernels.bf16_dot() == expected == ("AVX512-BF16 dot" in kernels.status())
    tiles = kernels.tiles_take(torch.bfloat16, kernels.MERGE_LINEAR_ROWS)
    assert kernels.ffn_rows(torch.bfloat16) == (kernels.MERGE_LINEAR_ROWS if expected or tiles
                                                else kernels.max_rows(torch.bfloat16))
    with pytest.raises(RuntimeError, match="row count"):
        mod.set_bf16_dot(-1)
    if not HAS_BF16_DOT:
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            mod.set_bf16_dot(kernels.BF16_DOT_FROM)


@pytest.mark.skipif(not HAS_BF16_DOT, reason="needs a CPU with AVX512-BF16")
def test_bf16_dot_products_have_the_same_bits_whatever_the_rows_threads_or_path():
    """bf16 weights and 9-32 rows (prompt segments through a merged expert): merge_linear writes
    merge()'s bits and returns the dot kernel's product, which the linear path (what `ffn` runs
    for a cached entry) gives too; a row's result does not depend on the rows beside it nor on
    the thread count; the products are those of the bf16-rounded activations with fp32 sums."""
    mod = kernels.native()
    saved, threads = mod.bf16_dot(), torch.get_num_threads()
    torch.manual_seed(11)
    out_rows, width, E = 53, 91, 5  # 53: tiles and groups of four with a remainder; 91: odd
    base = torch.randn(out_rows * width).bfloat16()
    deltas = torch.randn(E, out_rows * width).bfloat16()
    coeffs, bias = torch.rand(E), torch.randn(out_rows)
    merged = torch.empty(out_rows, width, dtype=torch.bfloat16)
    kernels.merge(base, deltas, coeffs, merged.view(-1))
    x = torch.randn(kernels.MERGE_LINEAR_ROWS, width)
    first: dict = {}
    try:
        mod.set_bf16_dot(kernels.BF16_DOT_FROM)
        for n in (1, 2):
            torch.set_num_threads(n)
            for b in (bias, None):
                full = mod.linear(x, merged, b)
                assert rel(full, F.linear(x.bfloat16().float(), merged.float(), b)) <= 1e-5
                assert rel(full, F.linear(x, merged.float(), b)) > 1e-5  # x was rounded
                assert torch.equal(full, first.setdefault(b is None, full)), n
                for lo, hi in ((0, 9), (5, 22), (23, 32)):
                    assert torch.equal(mod.linear(x[lo:hi].contiguous(), merged, b), full[lo:hi])
                for rows in (kernels.BF16_DOT_FROM, 17, kernels.MERGE_LINEAR_ROWS):
                    out = torch.full((out_rows, width), float("nan"), dtype=torch.bfloat16)
                    y = kernels.merge_linear(x[:rows], base, deltas, coeffs, out, b)
                    assert torch.equal(out, merged) and torch.equal(y, full[:rows]), (n, rows)
        below = kernels.BF16_DOT_FROM - 1  # decode-sized: merge, then the decode kernels
        assert kernels.merge_linear(x[:below], base, deltas, coeffs, merged.clone()) is None
        assert not torch.equal(mod.linear(x[:below], merged, bias), first[False][:below])
        mod.set_bf16_dot(0)
        assert not kernels.bf16_dot()
        assert kernels.merge_linear(x, base, deltas, coeffs, merged.clone()) is None
    finally:
        torch.set_num_threads(threads)
        mod.set_bf16_dot(saved)


def test_merge_linear_declines_what_it_does_not_compute():
    """Too many rows for the tile to stay in cache, 16-bit weights with fewer rows than the bf16
    dot kernel takes, or a strided input: None, and the output is not touched (the caller
    merges, then applies)."""
    base, deltas, coeffs = torch.randn(8 * 16), torch.randn(3, 8 * 16), torch.rand(3)
    out = torch.zeros(8, 16)
    too_many = torch.randn(kernels.MERGE_LINEAR_ROWS + 1, 16)
    assert kernels.merge_linear(too_many, base, deltas, coeffs, out) is None
    half = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert kernels.merge_linear(torch.randn(4, 16), base.bfloat16(), deltas.bfloat16(), coeffs,
                                half) is None
    assert kernels.merge_linear(torch.randn(16, 4).t(), base, deltas, coeffs, out) is None
    assert not out.any() and not half.any()


def test_mixed_precision_serves_16bit_weights_with_fp32_activations(tmp_path, monkeypatch):
    """On a CPU with the kernels, a bf16 engine streams bf16 weights and computes in fp32, and
    agrees with the fp32 engine as well as computing in bf16 does."""
    path = build_folded(tmp_path / "lm", T=4)
    prompt = list(range(3, 17))
    logits = {}
    for name in ("fp32", "mixed", "pure"):
        if name == "pure":
            monkeypatch.setenv("CAMEX_PRECISION", "pure")
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        engine = Engine.from_pretrained(path, dtype=dtype, max_batch_size=1, strategy="merged")
        runner = engine.runner
        rows = [runner.prefill(0, prompt, "segment", max_new_tokens=6)]
        tokens = list(prompt)
        for t in (5, 9, 2, 7, 11):
            tokens.append(t)
            rows.append(runner.decode([0], [t], [tokens])[0])
        logits[name] = torch.stack(rows).float()
        if name == "mixed":
            mixed = kernels.native() is not None
            want = Precision(torch.bfloat16, torch.float32 if mixed else torch.bfloat16)
            assert runner.precision == want
            assert runner.kv.k.dtype == want.compute
            assert runner.cache.pool["fc1_weight"].dtype == torch.bfloat16
            assert runner.moe[0].w1.dtype == torch.bfloat16
            assert engine.info()["precision"] == want.describe()
    ref = logits["fp32"]
    err = {k: rel(v, ref) for k, v in logits.items() if k != "fp32"}
    assert err["mixed"] <= 0.03 and err["pure"] <= 0.03
    # widened weights are exact, but which of the two lands closer to fp32 on one tiny random
    # model is chance (measured 0.0103 vs 0.0088 on an 8-token prompt, 0.0094 vs 0.0098 on
    # 14); mixed must not be materially worse
    assert err["mixed"] <= 1.25 * err["pure"], err


def test_precision_override_is_checked_and_honoured(monkeypatch):
    from camex_runtime.engine.precision import choose
    cpu = torch.device("cpu")
    monkeypatch.setenv("CAMEX_PRECISION", "fast")
    with pytest.raises(ValueError, match="CAMEX_PRECISION must be auto, pure or mixed"):
        choose(cpu, torch.bfloat16, True)
    monkeypatch.setenv("CAMEX_PRECISION", "pure")
    assert choose(cpu, torch.bfloat16, True) == Precision(torch.bfloat16, torch.bfloat16)
    for mode in ("mixed", "auto"):
        monkeypatch.setenv("CAMEX_PRECISION", mode)
        compute = torch.float32 if kernels.native() is not None else torch.bfloat16
        assert choose(cpu, torch.bfloat16, True) == Precision(torch.bfloat16, compute)
        assert choose(cpu, torch.float16, True) == Precision(torch.float16,
                                                             compute if compute == torch.float32
                                                             else torch.float16)
        assert choose(cpu, torch.bfloat16, False) == Precision(torch.bfloat16, torch.bfloat16)
        assert choose(cpu, torch.float32, True) == Precision(torch.float32, torch.float32)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_long_chunks_widen_16bit_weights_a_slice_at_a_time(monkeypatch, wdtype):
    """Beyond the tiles, 16-bit weights are widened for torch's fp32 GEMM at most
    WIDEN_SLICE_BYTES at a time (an output head of a large vocabulary would be GiBs in fp32),
    and the slices give F.linear on the whole widened matrix."""
    torch.manual_seed(6)
    w, b = torch.randn(30, 24).to(wdtype), torch.randn(30)
    x = torch.randn(2, 150, 24)  # batch dims kept, as F.linear keeps them
    widened = []
    real = F.linear

    def recording(x_, w_, b_=None):
        widened.append(tuple(w_.shape))
        return real(x_, w_, b_)
    monkeypatch.setattr(kernels.F, "linear", recording)
    monkeypatch.setattr(kernels, "WIDEN_SLICE_BYTES", 4 * 24 * 7)  # 7 weight rows a slice
    for bias in (b, None):
        widened.clear()
        got = kernels.widened_linear(x, w, bias)
        assert got.shape == (2, 150, 30) and got.dtype == torch.float32
        assert widened == [(7, 24)] * 4 + [(2, 24)]
        assert rel(got, real(x, w.float(), bias)) <= 1e-6
    monkeypatch.setattr(kernels, "WIDEN_SLICE_BYTES", 1 << 20)  # all of it in one slice
    widened.clear()
    assert rel(kernels.widened_linear(x, w, b), real(x, w.float(), b)) <= 1e-6
    assert widened == [(30, 24)]
    if not kernels.native_16bit_gemm(wdtype):  # kernels.linear gives long chunks to it
        widened.clear()
        rows = kernels.tiles_max_rows(wdtype) + 1
        got = kernels.linear(torch.randn(rows, 24), w, b)
        assert got.shape == (rows, 30) and widened == [(30, 24)]
