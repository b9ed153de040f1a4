"""Native CPU kernels for the decode step, chosen per CPU at start-up.

- `linear(x, w, b)` computes `x @ w.T + b` like `F.linear`. For a few rows of fp32 activations
  (`max_rows`: 16 with fp32 weights, 8 with 16-bit ones; decode steps: one row per running
  sequence) on an x86 CPU with AVX2, FMA and F16C it runs
  `cpu_decode.cpp`, which streams each weight row from memory once for all rows, widens
  fp16/bf16 weights in registers and splits the output rows over torch's intra-op threads
  (an AVX-512 variant where the CPU has it, from a row count tuned per CPU family and kind of
  weights, `AVX512_TUNING`: same bits, more work per load). More rows (prompt chunks) go to
  the native prompt tiles where `tiles_take` says so — up to `tiles_max_rows` rows, 16-bit
  weights on CPUs without a 16-bit GEMM, fp32 ones on CPUs without AVX-512 or from a vendor in
  `TILES_FP32_AVX512_VENDORS`; 512-bit vectors where `tiles_isa` says so, the same bits —
  and otherwise to `F.linear`: fp16/bf16 weights with fp32
  activations use the CPU's 16-bit GEMM there (AVX512-BF16/AMX, AVX512-FP16), or are widened
  to fp32 a slice at a time (`widened_linear`) for torch's fp32 GEMM.
- `decode_attention(...)` writes one decode step's keys/values into the KV cache and attends
  each row over its own cached positions (fp32), in one call instead of a dozen small ops and
  a general attention kernel sized for long queries; None where it does not apply.
- `native().layers(...)`: a span of pre-norm blocks for a few fp32 rows in one call (GIL
  released once), each block's FFN dense or a group of merged experts; `native().attn_block`
  and `norm`: a block's attention half and a norm alone, for a layer that breaks the span (the
  fused decode step, engine/fused_decode.py, which checks where they apply); `ffn(...)` a
  merged expert's FFN in one call (decode rows, and prompt segments up to `MERGE_LINEAR_ROWS`
  with fp32 weights, or bf16 ones with `bf16_dot()`), or None where it does not apply;
  `hidden` its hidden function alone; `serving_hidden` that function for prompt rows of any
  count (a served model's dense FFNs, merged experts past `ffn`'s rows), split over threads.
- `merge(base, deltas, coeffs, out)` writes `base + coeffs @ deltas` (one merged expert) in one
  pass over the weights, in their own dtype with fp32 accumulation; elsewhere `torch.addmm`.
  `merge_many` writes several (rows that opened segments in the same step) in one pass.
- `merge_linear(x, base, deltas, coeffs, out, bias)`: a merge and a prompt chunk's product by
  the merged weight in one pass, a tile of weight rows at a time (fp32 weights and up to
  `MERGE_LINEAR_ROWS` rows, and bf16 weights from `BF16_DOT_FROM` rows where `bf16_dot()`;
  None elsewhere: merge, then `linear`).
- `bf16_dot()`: on CPUs with AVX512-BF16 of a family in `BF16_DOT_VENDORS`, bf16 weights'
  products of `BF16_DOT_FROM` to `MERGE_LINEAR_ROWS` rows in `merge_linear` and `ffn` (prompt
  segments through a merged expert) are sums of bf16 pair products (vdpbf16ps) on activations
  rounded to bf16, as the CPU's bf16 GEMM computes them, fused with the merge.
The extension is compiled on first use with torch's C++-extension builder (a C++ compiler and
ninja; `build.py` says where it is cached, how concurrent and interrupted builds are handled,
and how an image ships it prebuilt) and loaded only on a CPU that has those instructions. Where
it cannot be had, `linear` is plain `F.linear` and `status()` says why.

`CAMEX_KERNELS` chooses: `auto` (default: native where available), `torch` (never native),
`native` (fail loudly where unavailable). `CAMEX_KERNELS_TUNING` replaces the CPU family's
AVX-512 settings and `CAMEX_MERGE_PREFETCH` the merges' prefetch distance (`python -m
camex_runtime.kernels --tune` measures both on the CPU at hand and prints the values). Knows
nothing about models.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from camex_runtime.kernels import build

log = logging.getLogger("camex.kernels")


class Avx512Tuning(NamedTuple):
    """How the AVX-512 linear kernel runs for one kind of weights on one CPU family. Every
    choice gives the same bits."""
    avx512_from: int  # inputs from which it replaces the AVX2 kernel
    pair_from: int  # inputs from which it reads two weight rows side by side (0: never)
    quad_from: int  # ... four rows (0: never)
    prefetch_near: int  # software prefetch into L1, bytes ahead in each weight row (0: none)
    prefetch_far: int  # ... into L2 (0: none)


WEIGHT_KINDS = ("fp32", "16bit")  # fp32 weights; fp16 / bf16 weights (half the bytes per row)


def weight_kind(dtype: torch.dtype) -> str:
    """The `WEIGHT_KINDS` entry whose tuning serves weights of `dtype`."""
    return "fp32" if dtype == torch.float32 else "16bit"


# Per CPU vendor and kind of weights; GPT-2-small's products, 2 MiB pages (`python -m
# camex_runtime.kernels --tune` measures the candidates on the CPU it runs on). Zen 4, fp32: AVX2 is
# as fast or faster at 1 and 2 inputs (one input 17.9 vs 28.6 ms on one core); at 3 and 4 inputs
# AVX-512 a row at a time (one core ~31 -> 24-26 ms), from 5 four weight rows at a time, with a
# 2 KiB near and a 16 KiB far prefetch (first tuned without the far prefetch: pairs from 7, 1 KiB
# near; the far prefetch and four rows then took the products at 8 inputs from 61 to 34 ms on one
# core, 31 to 19 on two; see rows_avx512 in cpu_decode.cpp). Zen 4, 16-bit: four rows from 2 inputs
# (bf16 at 2 and 3 inputs 18-23 ms -> 12-13 on one core, 10.4-11.8 -> 8.6-9.5 on two); at one input
# AVX2 (10.0-10.9 vs 12.3 ms with four rows). A Xeon with AMX (one core): AVX-512 wins from one
# input (fp32 42.6 -> 33.4 ms, bf16 31.7 -> 23.6; two cores 31.7 -> 24.9 and 19.5 -> 15.4) and pairs
# never do (8 inputs: fp32 59.6 vs 67.5, bf16 41.6 vs 49.5), but four rows do (fp32 one input 32.3
# -> 29.4 ms, 16 inputs 91.1 -> 68.7; bf16 8-13 % up to 4 inputs, level at 8; see rows_avx512), and
# a second prefetch 16 KiB ahead into L2 saves up to 30 % (bf16 one input 24.8 -> 17.5 ms at 8 KiB;
# see block512 in cpu_decode.cpp). Zen 5 (AMD family 26, full-width 512-bit FMAs; a 2-core VM,
# `--tune` three times plus a narrower grid twice, 9-11 passes a cell): fp32 as Zen 4 (AVX-512
# from one input gains nothing there, the products are at memory pace); 16-bit, AVX-512 a row at
# a time from one input and four rows from 4 (one core, ms: one input 8.2-8.3 -> 7.5-7.9, two
# 10.1-10.3 -> 7.9-8.3, three 10.0-10.2 -> 8.8-9.1, four 9.4-10.0 -> 9.6-9.9; two cores, one input
# 5.8-6.7 -> 5.6-6.1, two 7.2-7.3 -> 5.9-6.2). Keys are "vendor/family" (/proc/cpuinfo's
# "cpu family") or the vendor alone; a CPU of a vendor not here gets Zen 4's.
AVX512_TUNING = {
    "AuthenticAMD": {"fp32": Avx512Tuning(3, 0, 5, 2048, 16384),
                     "16bit": Avx512Tuning(2, 0, 2, 2048, 16384)},
    "AuthenticAMD/26": {"fp32": Avx512Tuning(3, 0, 5, 2048, 16384),
                        "16bit": Avx512Tuning(1, 0, 4, 2048, 16384)},
    "GenuineIntel": {"fp32": Avx512Tuning(1, 0, 1, 2048, 16384),
                     "16bit": Avx512Tuning(1, 0, 1, 2048, 16384)},
}

# the environment this module reads (deploy files may set them; tests check the names)
ENV_VARS = ("CAMEX_KERNELS", "CAMEX_KERNELS_DIR", "CAMEX_KERNELS_TUNING", "CAMEX_MERGE_PREFETCH")

# Rows the native kernels take (`max_rows`); beyond them torch's GEMM is as fast or faster.
# GPT-2-small's block products on a Zen 4 core, native vs torch, one thread / two:
# - fp32 weights: 8 rows 33.6 vs 33.9 / 17.0 vs 17.2 ms; 10 rows 40.0 vs 45.2 / 20.6 vs 33.6;
#   16 rows 51.7 vs 52.0 / 26.2 vs 36.2 (earlier, with AVX2 only: 118.9 vs 84.7 at 32 rows);
# - bf16 weights (torch: the CPU's bf16 GEMM, activations rounded to bf16): 8 rows 22.3 vs 22.6
#   / 12.0 vs 11.9; 10 rows 27.9 vs 23.7 / 14.0 vs 13.1; 16 rows 40.1 vs 28.5 / 19.9 vs 15.3.
# Batches up to this size are batch-invariant bit for bit; larger prefill chunks go to torch's
# GEMM, or to the prompt tiles (`tiles_take`).
MAX_ROWS = 8  # 16-bit weights
MAX_ROWS_FP32 = 16  # fp32 weights
# The prompt tiles (cpu_decode.cpp, tiles_run): more rows than max_rows, the inputs packed
# transposed in blocks of 16, register tiles of 6 weight rows x 16 inputs (broadcast weights),
# one chain of FMAs per output and 256 elements of k (bits independent of the other rows, but
# not the linear kernel's). They take 16-bit weights' products on CPUs without a 16-bit GEMM,
# where torch would widen the whole matrix on every call before its fp32 GEMM, and fp32 ones up
# to TILES_MAX_ROWS_FP32 rows on CPUs without AVX-512 (and AMD ones with it, below), whose fp32
# GEMM in torch splits small row counts poorly over threads. GPT-2-small's block products (3
# blocks, weights read cold) on a 2-core Zen 3 VM (AVX2/F16C), tiles / torch (widening 16-bit
# weights a slice at a time), medians, one thread and two:
# - bf16: 16 rows 0.61 / 0.37, 64 rows 0.83 / 0.66, 128 rows 0.89 / 0.74, 256 rows 0.95-0.97 /
#   0.88-0.93, 512 rows 0.99-1.00 / 0.89-0.99, 768 rows 0.96 / 0.91 (86-89 GFLOP/s on one
#   thread from 64 rows, 156-168 on two);
# - fp32: 32 rows 0.73 / 0.56, 64 rows 0.82 / 0.68, 128 rows 0.94 / 0.80, 256 rows 0.99-1.00 /
#   0.92-0.98, 384 rows 1.00-1.01 / 0.95-0.97, 512 rows 1.04 / 0.93-1.03.
# (The earlier tiles, 3 weight rows x 4 inputs of dot products, ran at 62-71 GFLOP/s there and
# gave way to torch from 64 fp32 and 128 16-bit rows; the dense model's 32-token prefill in the
# engine took 99 ms on one thread, 85 with these, in fp32 and in bf16 alike.)
# On AMD CPUs with AVX-512 too (Zen 4 runs 512-bit FMAs as two 256-bit halves, so torch's wider
# GEMM gains no width there, and on two threads it splits a prompt's rows poorly), up to
# TILES_MAX_ROWS_FP32_AVX512 rows; on Intel CPUs with AVX-512 fp32 keeps torch's GEMM (a 2-core
# Xeon VM with AMX, full-width FMAs: torch's won from 32 rows, GPT-2-small's 12 blocks' products
# at 32 rows 66-69 / 60-63 ms on one thread, 256 rows 493-518 / 261). Those limits were measured
# with the earlier tiles (Zen 4, 12 blocks, tiles / torch, one thread and two: GPT-2-small 32
# rows 0.73 / 0.52, 128 rows 0.97 / 0.75, 256 rows 1.03 / 0.91; a Llama of that width alike) and
# not since: on AVX-512 CPUs these tiles are the same AVX2 code (but on Zen 5, below).
TILES_MAX_ROWS_FP32 = 256
TILES_MAX_ROWS_FP32_AVX512 = 256
# The tiles' vectors per CPU ("vendor/family" or vendor, as AVX512_TUNING): where a core runs
# 512-bit FMAs at full width (Zen 5, AMD family 26) a 512-bit vector holds a block's 16 inputs
# and two blocks run side by side (cpu_decode.cpp, tile512), the same bits as the 256-bit tiles.
# Zen 5 VM, GPT-2-small's 12 blocks' fp32 products, medians: 32 rows 33.8 -> 17.9 ms on one
# thread (107 -> 203 GFLOP/s), 20.8 -> 11.8 on two; 16 rows 0.70x, 64 and 256 rows 0.54-0.60x.
# Zen 4 splits a 512-bit FMA in two halves and keeps the measured 256-bit tiles (not measured
# with these); `CAMEX_TILES_ISA` (avx2, avx512) overrides the table.
TILES_AVX512 = {"AuthenticAMD/26": True}
# With 512-bit tiles the tiles take up to TILES_MAX_ROWS_512BIT rows: torch's fp32 GEMM ran at
# ~80 GFLOP/s on one Zen 5 core (~160 on two) at any row count, the tiles (same 12 blocks,
# tiles / torch, one thread and two) 256 rows 0.48 / 0.59, 512 rows 0.51 / 0.56, 1024 rows
# 0.55 / 0.63, 2048 rows 0.95 / 0.66 (every group of weight rows reads all the packed inputs,
# which stop fitting in cache); fp16 weights (against widening and torch) 512 rows 0.52 / 0.51.
TILES_MAX_ROWS_512BIT = 1024
# 16-bit weights' chunks go to the tiles up to TILES_MAX_ROWS_16BIT rows on CPUs without
# AVX-512; beyond that, widening the matrix once per call (in slices of WIDEN_SLICE_BYTES) and
# torch's fp32 GEMM, which the widening amortises over the rows: at 512 rows the two were even
# above, and a dense GPT-2-small 512-token bf16 prefill in the engine took 1.17-1.23 s that way
# against 1.20-1.25 through the tiles (one thread; two: 0.71-0.72 either way). With AVX-512
# (AMD, fp16 weights; Intel CPUs without a 16-bit GEMM) the limit is the fp32 one,
# TILES_MAX_ROWS_FP32_AVX512.
TILES_MAX_ROWS_16BIT = 256
WIDEN_SLICE_BYTES = 16 << 20  # fp32 bytes of weight rows widened at a time beyond the tiles
TILES_FP32_AVX512_VENDORS = ("AuthenticAMD",)
# A decode step of one sequence with 16-bit weights streams each weight row once. On the Zen 4
# and Xeon VMs (AVX-512) the hardware prefetcher alone streams it fastest; on the AVX2-only Zen 3
# VM a software prefetch 2 KiB ahead makes GPT-2-small's one-row bf16 products ~20 % faster on
# one core (cpu_decode.cpp, single_prefetch). Same bits either way.
SINGLE_PREFETCH_AVX2_ONLY = 2048
# A merge reads E+1 streams side by side ([E_m; Δ_1..Δ_E]), more than the hardware prefetcher
# keeps ahead of on the Xeon VM (AVX-512, AMX): a software prefetch a line at a time, 1 KiB
# ahead in every stream, takes GPT-2-small's 12 layers' bf16 fc1 + fc2 merges with 7 deltas
# (906 MB) from 84-87 to 68-70 ms on one core and from 44 to 36 on two, i.e. 10.5 -> 13 GB/s,
# a GEMV's pace there (fp32, already at it: 133 -> 128 ms, 65 -> 64 on two); merge_many of 8
# experts from one pass 182 -> 148 ms on one core, 88 -> 74 on two. Zen 4 keeps the hardware
# prefetcher alone: on its VM (`--tune --kinds merge`, three runs) 1 KiB ahead makes the
# same merges 1.31-1.33x slower (one core: fp32 68-70 -> 100-104 ms, bf16 36-39 -> 52-58), 256 B
# ahead is 1.5-4 % faster than none, but a 32-token prompt's first token with 7+1 bf16 experts
# moves 2-4 % either way with it (sooner on one thread, later on two). Same bits either way.
# Zen 5 (the 2-core VM, `--tune --kinds merge` four times) differs by kind of stack: 16-bit
# merges gain from a prefetch in every run (one core 70-80 -> 56-64 ms at 512 B, two 38-46 ->
# 35-39), fp32 ones move within the noise either way (256 B ahead -8 % to +9 % on one core, -11 %
# to +0 % on two), so 512 B for 16-bit stacks only.
# Per CPU as `AVX512_TUNING` is keyed ("vendor/family", then the vendor), per kind of weights;
# none on a CPU not here or without AVX-512. `CAMEX_MERGE_PREFETCH` overrides it (`python -m
# camex_runtime.kernels --tune` measures the distances on the CPU at hand).
MERGE_PREFETCH = {"GenuineIntel": {"fp32": 1024, "16bit": 1024},
                  "AuthenticAMD/26": {"fp32": 0, "16bit": 512}}
MERGE_PREFETCH_MAX = 65536
TILE_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The bf16 dot kernel (cpu_decode.cpp, dot_tile) serves bf16 weights' products from this many
# rows to MERGE_LINEAR_ROWS, in merge_linear (a prompt segment's merge and its products in one
# pass) and in ffn (the same segment through the cached entry: the same bits), on CPUs with
# AVX512-BF16 of these vendors. Zen 4, GPT-2-small with 7+1 experts, one core: a 32-row segment's
# fc1 / fc2 merge and product 3.1 / 2.7 ms against 3.5-4.2 / 3.1-3.3 for the merge and then
# torch's bf16 GEMM. On a 2-core Xeon VM with AMX it saves nothing: 12 layers' fc1 + fc2, a
# 32-row segment's merge and product, one thread, 104.2 / 104.7 ms against 102.5 / 105.6 for
# the merge and then torch's (AMX) GEMM; the merge's read of the stack is the cost either
# way, so Intel CPUs keep torch's GEMM.
BF16_DOT_FROM = MAX_ROWS + 1
BF16_DOT_VENDORS = ("AuthenticAMD",)
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
_lock = threading.Lock()
_state: dict = {"module": None, "status": None}


def _cpuinfo(field: str) -> str | None:
    """The value of /proc/cpuinfo's first `field` line (the first CPU's), None where there is
    none (another OS, a field this CPU does not report)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere), read once: the prompt
    path asks on every product."""
    return frozenset((_cpuinfo("flags") or "").split())


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD"; "" where unknown)."""
    return _cpuinfo("vendor_id") or ""


@functools.cache
def cpu_family() -> int:
    """The CPU's family number (/proc/cpuinfo's "cpu family": 25 for Zen 3 and 4, 26 for Zen 5, 6
    for Intel's cores; 0 where unknown), read once: `tiles_isa` asks on every prompt product."""
    value = _cpuinfo("cpu family") or ""
    return int(value) if value.isdigit() else 0


def per_cpu(table: dict, vendor: str, family: int, default):
    """`table`'s entry for a CPU of `vendor` and `family`: the "vendor/family" key where the
    family was measured on its own, else the vendor's, else `default`."""
    return table.get(f"{vendor}/{family}", table.get(vendor, default))


def avx512_tuning(vendor: str, family: int = 0) -> dict[str, Avx512Tuning]:
    """`AVX512_TUNING` for a CPU of `vendor` and `family` (per kind of weights): the family's
    own where measured, else the vendor's, else Zen 4's."""
    return per_cpu(AVX512_TUNING, vendor, family, AVX512_TUNING["AuthenticAMD"])


def format_tuning(tuning: dict[str, Avx512Tuning]) -> str:
    """The `CAMEX_KERNELS_TUNING` text of `tuning` ("fp32=4,0,4,2048,16384;16bit=...")."""
    return ";".join(f"{kind}={','.join(map(str, t))}" for kind, t in tuning.items())


def parse_tuning(text: str) -> dict[str, Avx512Tuning]:
    """`CAMEX_KERNELS_TUNING`: "KIND=FROM,PAIR,QUAD,NEAR,FAR" for fp32 and/or 16bit weights,
    separated by ";" (what `python -m camex_runtime.kernels --tune` prints). Raises ValueError
    with what is wrong."""
    where = f"CAMEX_KERNELS_TUNING={text!r}"
    tuning: dict[str, Avx512Tuning] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, sep, values = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in WEIGHT_KINDS:
            raise ValueError(f"{where}: each part is KIND=FROM,PAIR,QUAD,NEAR,FAR with KIND "
                             f"one of {', '.join(WEIGHT_KINDS)}; got {part!r}")
        if kind in tuning:
            raise ValueError(f"{where}: {kind} is given twice")
        try:
            t = Avx512Tuning(*(int(v) for v in values.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {kind} needs five integers (AVX-512 from, pairs from, "
                             f"fours from, near and far prefetch bytes); got {values!r}") from None
        if t.avx512_from < 1 or t.pair_from < 0 or t.quad_from < 0 or not (
                0 <= t.prefetch_near <= 1 << 20 and 0 <= t.prefetch_far <= 1 << 20):
            raise ValueError(f"{where}: {kind}: AVX-512 from >= 1, pairs and fours from >= 0 "
                             "(0: never), prefetch distances 0 to 1048576 bytes")
        tuning[kind] = t
    if not tuning:
        raise ValueError(f"{where}: empty; unset it to use the CPU family's tuning")
    return tuning


def chosen_tuning() -> dict[str, Avx512Tuning]:
    """The tuning the kernels run with: the CPU family's (`avx512_tuning`), with the kinds
    `CAMEX_KERNELS_TUNING` names replaced."""
    tuning = dict(avx512_tuning(cpu_vendor(), cpu_family()))
    text = os.environ.get("CAMEX_KERNELS_TUNING", "")
    if text.strip():
        tuning.update(parse_tuning(text))
    return tuning


def _load():
    """Compile (or reuse) and import the extension; (module or None, status text)."""
    mode = os.environ.get("CAMEX_KERNELS", "auto")
    if mode not in ("auto", "torch", "native"):
        raise ValueError(f"CAMEX_KERNELS must be auto, torch or native, got {mode!r}")
    if mode == "torch":
        return None, "torch (CAMEX_KERNELS=torch)"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    reason = f"this CPU lacks {', '.join(missing)}" if missing else None
    module = None
    if reason is None:
        try:
            module = build.load_module()
        except Exception as e:  # no compiler, no ninja, a read-only cache: serve with torch
            # a compiler's error is at the end of a long command line: the whole text goes to
            # the log, the status keeps its head
            log.warning("native kernels unavailable: %s: %s", type(e).__name__, e)
            reason = (f"the extension did not build ({type(e).__name__}: {str(e)[:200]}; "
                      "the full error is in the log)")
    if module is None:
        if mode == "native":
            raise RuntimeError(f"CAMEX_KERNELS=native but {reason}")
        return None, f"torch ({reason})"
    tuning = chosen_tuning()
    for kind, t in tuning.items():
        module.tune(kind, *t)
    isa = "AVX2/FMA/F16C"
    if module.isa() == "avx512":
        isa += ", AVX-512 from " + ", ".join(
            f"{t.avx512_from} row{'s' if t.avx512_from > 1 else ''} ({kind})"
            for kind, t in tuning.items())
        if os.environ.get("CAMEX_KERNELS_TUNING", "").strip():
            isa += " set by CAMEX_KERNELS_TUNING"
    module.set_single_prefetch(single_prefetch())
    ahead = merge_prefetch()
    apply_merge_prefetch(module, ahead)
    module.set_bf16_dot(BF16_DOT_FROM if module.has_bf16_dot()
                        and cpu_vendor() in BF16_DOT_VENDORS else 0)
    dot = (f"; AVX512-BF16 dot products for bf16 merged-expert segments of {BF16_DOT_FROM}-"
           f"{MERGE_LINEAR_ROWS} rows" if module.bf16_dot() else "")
    tiles = []
    for name, dtype in TILE_KINDS.items():  # the same choice inside merge_linear and ffn
        first = max_rows(dtype) + 1
        takes = tiles_take(dtype, first)
        if takes:
            tiles.append(f"{name} {first}-{tiles_max_rows(dtype)}")
        module.set_tiles(name, first if takes else 0, tiles_max_rows(dtype))
    vectors = module.set_tiles_isa(tiles_isa())
    wide = (" of 512-bit vectors" + (" set by CAMEX_TILES_ISA"
                                     if os.environ.get("CAMEX_TILES_ISA", "").strip() else "")
            if vectors == "avx512" else "")
    tiles_text = (f"; prompt tiles for {', '.join(tiles)} rows{wide}, torch's GEMM beyond"
                  if tiles else "")
    set_by = (" set by CAMEX_MERGE_PREFETCH"
              if os.environ.get("CAMEX_MERGE_PREFETCH", "").strip() else "")
    ahead_text = merge_prefetch_text(ahead, set_by)
    return module, (f"native ({isa} weight-streaming linear and merge{ahead_text}{dot}"
                    f"{tiles_text})")


def single_prefetch() -> int:
    """Bytes ahead the AVX2 kernel prefetches in a weight row for one input with 16-bit
    weights: SINGLE_PREFETCH_AVX2_ONLY on CPUs without AVX-512, else none."""
    return 0 if "avx512f" in cpu_flags() else SINGLE_PREFETCH_AVX2_ONLY


def merge_prefetch() -> dict[str, int]:
    """Bytes ahead merges prefetch in each stream of the stack (the AVX-512 loops do), per kind
    of weights: this CPU's `MERGE_PREFETCH` entry where it has AVX-512, else none, with the
    kinds `CAMEX_MERGE_PREFETCH` names replaced (`parse_merge_prefetch`). Raises ValueError for
    a bad value."""
    ahead = dict.fromkeys(WEIGHT_KINDS, 0)
    if "avx512f" in cpu_flags():
        ahead.update(per_cpu(MERGE_PREFETCH, cpu_vendor(), cpu_family(), {}))
    text = os.environ.get("CAMEX_MERGE_PREFETCH", "").strip()
    if text:
        ahead.update(parse_merge_prefetch(text))
    return ahead


def parse_merge_prefetch(text: str) -> dict[str, int]:
    """`CAMEX_MERGE_PREFETCH`: "BYTES" for every kind of weights, or "KIND=BYTES" for fp32
    and/or 16bit separated by ";" (what `python -m camex_runtime.kernels --tune` prints), each
    an integer from 0 (no prefetch) to MERGE_PREFETCH_MAX. Raises ValueError with what is
    wrong."""
    where = f"CAMEX_MERGE_PREFETCH={text!r}"

    def number(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = -1
        if not 0 <= n <= MERGE_PREFETCH_MAX:
            raise ValueError(f"{where}: bytes ahead, an integer from 0 (no prefetch) to "
                             f"{MERGE_PREFETCH_MAX} (or KIND=BYTES per kind, fp32 and 16bit, "
                             "separated by ';'); unset it for this CPU's default")
        return n
    if "=" not in text:
        return dict.fromkeys(WEIGHT_KINDS, number(text.strip()))
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(";")):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"{where}: KIND=BYTES with KIND one of {', '.join(WEIGHT_KINDS)}, "
                             f"got {part!r}")
        if kind in out:
            raise ValueError(f"{where}: {kind} given twice")
        out[kind] = number(value.strip())
    return out


def format_merge_prefetch(ahead: dict[str, int]) -> str:
    """The `CAMEX_MERGE_PREFETCH` text of `ahead`: "BYTES" where every kind has the same
    distance, else "fp32=BYTES;16bit=BYTES"."""
    if len(set(ahead.values())) == 1:
        return str(next(iter(ahead.values())))
    return ";".join(f"{kind}={n}" for kind, n in ahead.items())


def apply_merge_prefetch(module, ahead: dict[str, int] | None = None) -> None:
    """Set the extension's merge prefetch per kind of weights (`merge_prefetch()` by
    default)."""
    for kind, n in (merge_prefetch() if ahead is None else ahead).items():
        module.set_merge_prefetch(n, kind)


def merge_prefetch_text(ahead: dict[str, int], set_by: str) -> str:
    """The status's words for the merges' prefetch ("" for none, unless set by the
    environment)."""
    if len(set(ahead.values())) == 1:
        n = next(iter(ahead.values()))
        return (f" (prefetching {bytes_text(n)} ahead in each stream{set_by})" if n
                else f" (no prefetch{set_by})" if set_by else "")
    words = [f"{'16-bit' if kind == '16bit' else kind} stacks "
             + (f"{bytes_text(n)} ahead" if n else "none") for kind, n in ahead.items()]
    return f" (prefetching in each stream: {', '.join(words)}{set_by})"


def bytes_text(n: int) -> str:
    """2048 -> "2 KiB", 768 -> "768 B"."""
    return f"{n // 1024} KiB" if n and n % 1024 == 0 else f"{n} B"


def max_rows(weight_dtype: torch.dtype) -> int:
    """The most activation rows the linear kernel takes for weights of `weight_dtype` (decode
    batches, each row with the bits it gets alone): 16 for fp32, 8 for 16-bit weights."""
    return MAX_ROWS_FP32 if weight_dtype == torch.float32 else MAX_ROWS


def tiles_max_rows(weight_dtype: torch.dtype) -> int:
    """The most rows `tiles_take` gives the tiles for weights of `weight_dtype` (where it
    gives them any): TILES_MAX_ROWS_512BIT where the tiles run 512-bit vectors (`tiles_isa`),
    else TILES_MAX_ROWS_FP32_AVX512 on CPUs with AVX-512; without it, TILES_MAX_ROWS_FP32 for
    fp32 weights and TILES_MAX_ROWS_16BIT for 16-bit ones."""
    if "avx512f" in cpu_flags():
        return TILES_MAX_ROWS_512BIT if tiles_isa() == "avx512" else TILES_MAX_ROWS_FP32_AVX512
    return TILES_MAX_ROWS_FP32 if weight_dtype == torch.float32 else TILES_MAX_ROWS_16BIT


def tiles_isa() -> str:
    """The prompt tiles' vectors on this CPU: "avx512" where `TILES_AVX512` says so (or
    `CAMEX_TILES_ISA` asks and the CPU has AVX-512), else "avx2". Raises ValueError for a
    `CAMEX_TILES_ISA` that is neither or names AVX-512 on a CPU without it."""
    has = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= cpu_flags()
    asked = os.environ.get("CAMEX_TILES_ISA", "").strip()
    if asked:
        if asked not in ("avx2", "avx512"):
            raise ValueError(f"CAMEX_TILES_ISA must be avx2 or avx512, got {asked!r}")
        if asked == "avx512" and not has:
            raise ValueError("CAMEX_TILES_ISA=avx512 but this CPU has no AVX-512 (F, BW, DQ, VL)")
        return asked
    wide = has and per_cpu(TILES_AVX512, cpu_vendor(), cpu_family(), False)
    return "avx512" if wide else "avx2"


def tiles_take(weight_dtype: torch.dtype, rows: int) -> bool:
    """Whether `linear` gives `rows` rows by weights of `weight_dtype` to the native prompt
    tiles: never a decode batch (`max_rows` or fewer rows); beyond it up to `tiles_max_rows`,
    where the comments above TILES_MAX_ROWS_FP32 and TILES_MAX_ROWS_16BIT say (and why)."""
    if not max_rows(weight_dtype) < rows <= tiles_max_rows(weight_dtype):
        return False
    if weight_dtype == torch.float32:
        return "avx512f" not in cpu_flags() or cpu_vendor() in TILES_FP32_AVX512_VENDORS
    return weight_dtype in TILE_KINDS.values() and not native_16bit_gemm(weight_dtype)


def native():
    """The extension module, or None (loading it once, thread-safe)."""
    if _state["status"] is None:
        with _lock:
            if _state["status"] is None:
                _state["module"], _state["status"] = _load()
                log.info("linear kernels: %s", _state["status"])
    return _state["module"]


def status() -> str:
    """Which kernels serve linear layers, and why."""
    native()
    return _state["status"]


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """`F.linear(x, w, b)`; fp32 activations with fp16/bf16 weights are allowed (computed in
    fp32, as the native kernel does)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows > 0 and x.dtype == torch.float32 and x.device.type == "cpu" and w.stride(-1) == 1
            and (b is None or b.dtype == torch.float32)):
        decode = rows <= max_rows(w.dtype)
        if decode or tiles_take(w.dtype, rows):
            mod = native()
            if mod is not None:
                # (rows, in) activations, a decode step's, go in as they are: each torch call
                # after a step's weight stream runs from cold caches (tens of us on a CPU)
                flat = x.dim() == 2
                x2 = x if flat else x.reshape(rows, x.shape[-1])
                if x2.stride(-1) != 1:
                    x2 = x2.contiguous()
                y = mod.linear(x2, w, b) if decode else mod.linear_tiles(x2, w, b)
                return y if flat else y.view(*x.shape[:-1], w.shape[0])
    if w.dtype != x.dtype:  # 16-bit weights, fp32 activations, more rows than decode has
        if w.device.type == "cpu" and x.dtype == torch.float32:
            if native_16bit_gemm(w.dtype):
                # prompt chunks: the CPU's own 16-bit GEMM (oneDNN) beats widening every weight
                # matrix per call 2-2.7x (GPT-2-small, Zen 4, 16-64 rows); the products then
                # round the activations to 16 bits, as serving in that dtype would
                y = F.linear(x.to(w.dtype), w).float()
                return y if b is None else y + b
            return widened_linear(x, w, b)
        w = w.to(x.dtype)
        b = None if b is None else b.to(x.dtype)
    return F.linear(x, w, b)


def widened_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """`F.linear(x, w.float(), b)` for 16-bit weights w with fp32 x, widening at most
    WIDEN_SLICE_BYTES of w at a time: an output head of a large vocabulary (a Llama's 128k x
    4,096 is 2 GiB in fp32) is never widened whole."""
    out_features, in_features = w.shape
    per = max(1, WIDEN_SLICE_BYTES // (4 * max(in_features, 1)))
    bias = None if b is None else b.float()
    if out_features <= per:
        return F.linear(x, w.float(), bias)
    y = x.new_empty(*x.shape[:-1], out_features)
    for o in range(0, out_features, per):
        y[..., o:o + per] = F.linear(x, w[o:o + per].float(),
                                     None if bias is None else bias[o:o + per])
    return y


NATIVE_16BIT_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"),
                      torch.float16: ("avx512_fp16", "amx_fp16")}


def native_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (AVX512-BF16/AMX, AVX512-FP16)."""
    return bool(set(NATIVE_16BIT_FLAGS.get(dtype, ())) & cpu_flags())


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     layer: int, slots: Tensor, positions: Tensor,
                     window: int | None = None, softcap: float | None = None,
                     sinks: Tensor | None = None) -> Tensor | None:
    """q (B, H, hd), k and v (B, KV, hd) of one decode step; k_cache / v_cache (n_layer, slots,
    KV, max_len, hd). Writes k and v at (layer, slots[b], :, positions[b]) and returns each row's
    attention over its positions [0, positions[b]] (the last `window` of them when given; scores
    capped at ±softcap when given; each head's sink logit in its softmax when `sinks` (H,) is
    given) (B, H, hd), or None (nothing written) where the native kernel
    does not apply: not fp32 on the CPU, or no native kernels."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == k_cache.dtype
            == v_cache.dtype == torch.float32 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    mod = native()
    if mod is None or sinks is not None and sinks.dtype != torch.float32:
        return None
    return mod.decode_attention(q, k, v, k_cache, v_cache, layer, slots, positions, window or 0,
                                softcap or 0.0, sinks)


def bf16_dot() -> bool:
    """Whether bf16 weights' products of `BF16_DOT_FROM` to `MERGE_LINEAR_ROWS` rows in
    `merge_linear` and `ffn` use the bf16 dot kernel here."""
    mod = native()
    return mod is not None and mod.bf16_dot() > 0


def ffn_rows(weight_dtype: torch.dtype) -> int:
    """The most rows `ffn` takes: decode batches, and where `merge_linear` takes the weights
    (fp32; bf16 with `bf16_dot()`; 16-bit weights the prompt tiles take) also the prompt
    segments it takes, so that a merged expert gives a prompt the same bits whether its merge
    was just made (merge_linear + hidden) or came from the cache (ffn)."""
    if merge_linear_rows(weight_dtype, MERGE_LINEAR_ROWS):
        return MERGE_LINEAR_ROWS
    return max_rows(weight_dtype)


# The gated FFNs of the native kernels: an FFNKind's activation -> the kernels' gate code
NATIVE_GATES = {"swiglu": 0, "geglu": 1, "swigluoai": 2}
NATIVE_ACTIVATIONS = ("gelu_tanh", *NATIVE_GATES)


def gate_args(activation: str, params: tuple[float, ...] = ()) -> tuple[bool, int, float, float]:
    """(gated, gate code, limit, alpha): how `ffn` / `hidden` / `layers` take an activation
    (`params`: the clamped SwiGLU's (limit, alpha))."""
    limit, alpha = params if activation == "swigluoai" else (0.0, 0.0)
    return activation != "gelu_tanh", NATIVE_GATES.get(activation, 0), float(limit), float(alpha)


def ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
        activation: str, params: tuple[float, ...] = ()) -> Tensor | None:
    """`fc2(hidden(fc1(x)))` for fp32 rows x (n, d) in one native call: GELU (tanh approximation)
    for activation "gelu_tanh", SwiGLU with [gate; up] stacked in w1 for "swiglu", GeGLU
    (gelu_tanh on the gate) likewise for "geglu", GPT-OSS's clamped SwiGLU for "swigluoai"
    (`params` (limit, alpha)). None where the native kernel does not apply (more than
    `ffn_rows` rows, not fp32 on the CPU, another activation, no native kernels): the caller
    computes it with torch."""
    if not (activation in NATIVE_ACTIVATIONS and x.dim() == 2
            and 0 < x.shape[0] <= ffn_rows(w1.dtype) and x.dtype == torch.float32
            and x.device.type == "cpu" and x.is_contiguous() and w1.stride(-1) == 1
            and w2.stride(-1) == 1
            and all(b is None or (b.dtype == torch.float32 and b.is_contiguous())
                    for b in (b1, b2))):
        return None
    mod = native()
    if mod is None:
        return None
    return mod.ffn(x, w1, b1, w2, b2, *gate_args(activation, params))


def hidden(u: Tensor, activation: str, params: tuple[float, ...] = ()) -> Tensor:
    """The FFN's hidden function exactly as `ffn` applies it (native): u (n, f) -> GELU(u) for
    "gelu_tanh", u (n, 2f) with [gate; up] -> silu(gate) * up for "swiglu" (gelu_tanh(gate) *
    up for "geglu", the clamped SwiGLU for "swigluoai"). Only where `merge_linear_takes` the
    rows (native kernels present)."""
    return native().hidden(u, *gate_args(activation, params))


def serving_hidden(ins: list[Tensor], activation: str,
                   params: tuple[float, ...] = ()) -> Tensor | None:
    """An FFN's hidden function of its input projections' outputs, as `ffn` computes it,
    for rows of any count (prompt chunks; leading dims kept): `ins` = [u] for "gelu_tanh" or
    a gate stacked as [gate; up] in u's last dim, [gate, up] for a gate made apart. One pass
    over the rows, split over torch's threads: ~3.7x torch's tanh GELU on a Zen 3 core and ~2x
    its silu(gate) * up (the elementwise ops, each element the bits `ffn` gives it). None where
    it does not apply (not contiguous fp32 on the CPU, another activation, no native kernels):
    the caller applies the FFNKind's own hidden function."""
    if not (activation in NATIVE_ACTIVATIONS and len(ins) in (1, 2)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                    and t.dim() >= 1 and t.shape == ins[0].shape for t in ins)):
        return None
    mod = native()
    if mod is None:
        return None
    glu, gate, limit, alpha = gate_args(activation, params)
    lead, width = ins[0].shape[:-1], ins[0].shape[-1]
    rows = [t.reshape(-1, width) for t in ins]
    if len(ins) == 2:
        if not glu:
            return None
        out = mod.hidden_pair(rows[0], rows[1], gate, limit, alpha)
    else:
        if glu and width % 2:
            return None
        out = mod.hidden(rows[0], glu, gate, limit, alpha)
    return out.view(*lead, out.shape[-1])


def merge(base: Tensor, deltas: Tensor, coeffs: Tensor, out: Tensor) -> Tensor:
    """out (n,) = base (n,) + coeffs (E,) @ deltas (E, n), written in place; returns out."""
    if base.device.type == "cpu" and base.dtype == deltas.dtype == out.dtype and \
            base.is_contiguous() and out.is_contiguous() and deltas.stride(-1) == 1:
        mod = native()
        if mod is not None:
            mod.merge(base, deltas, coeffs, out)
            return out
    n, E = base.numel(), deltas.shape[0]
    torch.addmm(base.view(1, n), coeffs.view(1, E).to(deltas.dtype), deltas.view(E, n),
                out=out.view(1, n))
    return out


# Rows `merge_linear` takes (and `ffn` with fp32 weights, so that an entry from the cache gives
# the same bits). Its tiles multiply every row of x while the tile is in cache, and the cached
# entry then goes through the linear kernel, which GEMM libraries beat on many rows. GPT-2-small
# on one Zen 4 core, fp32, per layer: merge_linear saves 0.8-1.3 ms at 32 rows and ~0.3 at 64;
# the native FFN costs 5.1 ms against torch's 5.0 at 32 rows, 9.6 against 8.4 at 64. Longer
# segments amortise their merge anyway.
MERGE_LINEAR_ROWS = 32


def merge_linear_takes(x: Tensor, stack: Tensor, out: Tensor) -> bool:
    """Whether `merge_linear` takes activations x with weights of `stack` into `out` here (and
    `ffn` the same rows): fp32 weights; bf16 ones from `BF16_DOT_FROM` rows with `bf16_dot()`;
    16-bit ones where the prompt tiles take the rows (`tiles_take`: a CPU without a native
    16-bit GEMM), each tile of the merge multiplied while it is in cache."""
    if not (x.dim() == 2 and 0 < x.shape[0] <= MERGE_LINEAR_ROWS and x.device.type == "cpu"
            and x.dtype == torch.float32 and stack.dtype == out.dtype and x.is_contiguous()
            and out.is_contiguous() and stack.stride(-1) == 1 and native() is not None):
        return False
    return merge_linear_rows(stack.dtype, x.shape[0])


def merge_linear_rows(weight_dtype: torch.dtype, rows: int) -> bool:
    """The weight dtype and row count part of `merge_linear_takes` (rows up to
    MERGE_LINEAR_ROWS), which `ffn_rows` shares: fp32 weights at any count; bf16 ones from
    `BF16_DOT_FROM` rows with `bf16_dot()`; 16-bit ones where `tiles_take` gives the rows to the
    prompt tiles."""
    if weight_dtype == torch.float32:
        return True
    if weight_dtype == torch.bfloat16 and bf16_dot():
        return rows >= BF16_DOT_FROM
    return tiles_take(weight_dtype, rows)


def merge_linear(x: Tensor, base: Tensor, deltas: Tensor, coeffs: Tensor, out: Tensor,
                 bias: Tensor | None = None) -> Tensor | None:
    """Write out (n_out, n_in) = base + coeffs (E,) @ deltas (E, n_out·n_in) like `merge` (the
    same bits) and return `F.linear(x, out, bias)` for x (B, n_in), in one pass over the stack.
    None (nothing written) where the native kernel does not take it (`merge_linear_takes`):
    not fp32 activations on the CPU, more than MERGE_LINEAR_ROWS rows, 16-bit weights that
    neither the bf16 dot kernel (`bf16_dot()`, from BF16_DOT_FROM rows) nor the prompt tiles
    (`tiles_take`) take, no native kernels. With fp32 weights
    each row of the product is the linear kernel's, the bits a decode step gets for it; with
    bf16 weights the bf16 dot kernel's, the bits `ffn` gives the same rows from the finished
    entry. (Fused with the widening linear kernel, bf16 was slower on one Zen 4 core than a
    merge and then the CPU's bf16 GEMM: GPT-2-small fc1 and fc2, 32 rows, 3.8 and 3.5 ms
    against 3.3 and 2.9.)"""
    if not (merge_linear_takes(x, base, out) and base.is_contiguous() and deltas.dtype == base.dtype
            and deltas.stride(-1) == 1
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))):
        return None
    return native().merge_linear(x, base, deltas, coeffs, out, bias)


def merge_many(base: Tensor, deltas: Tensor, coeffs: Tensor, outs: list[Tensor]) -> None:
    """outs[s] (n,) = base (n,) + coeffs[s] @ deltas (E, n) for each of S outputs (coeffs
    (S, E)), written in place. Natively one pass over [base; deltas] for all S (a batch of
    merges costs about one merge's read plus S writes) and bit for bit `merge` per output."""
    if base.device.type == "cpu" and deltas.stride(-1) == 1 and base.is_contiguous() and all(
            o.is_contiguous() and o.dtype == base.dtype for o in outs) and \
            base.dtype == deltas.dtype:
        mod = native()
        if mod is not None:
            mod.merge_many(base, deltas, coeffs, list(outs))
            return
    for c, out in zip(coeffs, outs):
        merge(base, deltas, c, out)


def quantize_q8(w: Tensor, b: Tensor, q: Tensor, scales: Tensor) -> None:
    """The rows of d = w − b (both (R, C)) as int8 with one fp32 scale per row, written into q
    (R, C) int8 and scales (R,) fp32: scale = max |d| · (1/127), q = d / scale rounded half to
    even (a zero row: scale 0, q 0), symmetric, in [−127, 127]. Natively one pass per row to
    measure and one to write, rows over threads; elsewhere the same fp32 operations in torch,
    the same bits."""
    if w.device.type == "cpu" and w.is_contiguous() and b.is_contiguous() and \
            q.is_contiguous() and scales.is_contiguous() and w.dtype == b.dtype:
        mod = native()
        if mod is not None:
            mod.quantize_q8(w, b, q, scales)
            return
    d = w.float() - b.float()
    s = d.abs().amax(1) * torch.tensor(1.0 / 127.0, dtype=torch.float32)
    step = torch.where(s > 0, s, torch.ones_like(s))
    scales.copy_(s)
    q.copy_(torch.round(d / step[:, None]).clamp_(-127, 127).to(torch.int8))


MERGE_Q8_MAX_DELTAS = 16  # the native int8 merge keeps each delta's vector in a register


def merge_q8_many(base: Tensor, q: Tensor, scales: Tensor, coeffs: Tensor,
                  outs: list[Tensor]) -> None:
    """outs[s] (R, C) = base (R, C) + Σ_e coeffs[s, e] · scales[e, :, None] · q[e] for int8
    deltas q (E, R, C) with one fp32 scale per (delta, row), scales (E, R): merged experts from
    the int8-delta layout (engine/moe.py), written in place. Natively one pass over [base; q]
    for all S outputs, fp32 accumulation, the per-row coefficient coeffs[s, e]·scales[e, r]
    rounded to fp32 first, the same bits for every S; elsewhere (no native kernels, a GPU, more
    than MERGE_Q8_MAX_DELTAS deltas) the same sum with torch in fp32, within rounding of the
    native result."""
    c = coeffs.float().reshape(len(outs), q.shape[0])
    if base.device.type == "cpu" and q.shape[0] <= MERGE_Q8_MAX_DELTAS and \
            base.is_contiguous() and q.is_contiguous() and \
            scales.dtype == torch.float32 and scales.is_contiguous() and \
            all(o.is_contiguous() and o.dtype == base.dtype for o in outs):
        mod = native()
        if mod is not None:
            mod.merge_q8_many(base, q, scales, c, list(outs))
            return
    for cs, out in zip(c.to(base.device), outs):
        rows = cs[:, None] * scales  # (E, R): each delta row's coefficient
        acc = base.to(torch.float32, copy=True)
        for e in range(q.shape[0]):
            acc.addcmul_(rows[e, :, None], q[e].float())
        out.view_as(base).copy_(acc)
