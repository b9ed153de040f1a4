// CPU kernels of the decode step, where time is the time to stream weights from memory once.
//
// linear: y (B, out) = x (B, in) @ w (out, in)^T + b, x and y fp32, w fp32 / fp16 / bf16, fp32
// accumulation, any row count (inputs in groups of up to 4, or 8 in the AVX-512 kernel).
// merge:  out (n,) = base (n,) + sum_e c_e * deltas[e] (n,), all three in one dtype (fp32 /
// fp16 / bf16), fp32 accumulation: one merged expert from the stacked [E_m; deltas];
// merge_many: S of them (S coefficient rows) from one pass over the stack.
// merge_linear: a merge and a prompt chunk's product by it, one tile of weight rows at a time.
// linear_tiles: y = x @ w^T + b for a prompt chunk's rows in register tiles (and linear's and
// merge_linear's products for the row counts set_tiles names), of 256-bit or, where
// set_tiles_isa says so, 512-bit vectors (the same bits).
// With bf16 weights and 9-32 rows on a CPU with AVX512-BF16 (set_bf16_dot), products go to a
// kernel of bf16 dot products (vdpbf16ps), fused with the merge in merge_linear.
//
// Decode multiplies a handful of activation rows by large weight matrices: the time is the time
// to stream the weights from memory once. Generic GEMM libraries tile for large M and, for
// M = 1..8 on this kind of CPU, read the weights several times or use one core. Here every weight
// row is read once for all B input rows (B accumulators per weight row), 16-bit weights are
// widened in registers (F16C / a shift for bf16), and output rows are split over the torch
// intra-op thread pool. AVX2 + FMA + F16C; the Python side checks the CPU before loading this.
// Where the CPU also has AVX-512, a register-blocked variant compiled for those functions only
// (chosen at run time, from a row count that depends on the CPU family) gives the same bits.
// What Python calls is declared in cpu_decode.h and bound in bindings.cpp, a unit of its own:
// this one includes only ATen's tensor headers, and the two compile side by side.
#include "cpu_decode.h"
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum class WType { F32, F16, BF16 };

template <WType T>
inline __m256 load8(const void* w, int64_t i) {
  if constexpr (T == WType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (T == WType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <WType T>
inline float load1(const void* w, int64_t i) {
  if constexpr (T == WType::F32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (T == WType::F16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(w)[i]);
  } else {
    uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// One weight row x NB input rows (2 <= NB <= 4; one input: rows_one) per pass over `in`: 2 * NB
// accumulators and the NB input vectors stay in registers. Every dot product is split into the
// same two interleaved partial sums (elements i mod 16 < 8 and >= 8), whatever NB is, so a row's
// result does not depend on which other rows share the batch; two sums also keep two FMAs in
// flight per input (an FMA's latency is several cycles). One weight row at a time keeps the reads
// one sequential stream, which the hardware prefetcher follows best (measured on Zen 4, one
// core: 20 GB/s against 15 GB/s for four rows read side by side).
// Software prefetch for one input and 16-bit weights, bytes ahead in the row (0: none; set by
// the Python side per CPU, set_single_prefetch). On a Zen 4 or a Xeon the hardware prefetcher
// streams one row faster alone (below); on a Zen 3 VM (AVX2 only) GPT-2-small's products at one
// bf16 input, one core, 2 MiB pages: 19.1-20.8 ms without, 17.1-18.0 at 1 KiB, 15.9-16.4 at
// 2 KiB, 16.9-17.1 at 3-4 KiB (fp32 weights: no gain at any distance).
int64_t single_prefetch = 0;

template <WType T, int NB>  // NB >= 2 (one input: rows_one, below)
inline void block(const float* x, int64_t ldx, int64_t in, const char* w, float* y,
                  int64_t ldy) {
  static_assert(NB >= 2 && NB <= 4, "one input runs rows_one");
  constexpr int64_t elem = T == WType::F32 ? 4 : 2;
  __m256 a[2][NB];
  for (int u = 0; u < 2; ++u)
    for (int b = 0; b < NB; ++b) a[u][b] = _mm256_setzero_ps();
  int64_t i = 0;
  // Software prefetch 256 elements ahead (into the next row near the end: the row read next)
  // for 16-bit weights with 2-3 inputs and for any weights with 4; a single stream (one input,
  // or fp32 weights with 1-3 inputs) runs faster on the hardware prefetcher alone. Measured on
  // Zen 4, GPT-2-small products on one core: 16-bit weights with 2-3 inputs 20.4 -> 18.3 ms
  // with it; fp32 with one input 21.3 ms without, 26.8 with; bf16 with one input, weights on
  // 2 MiB pages (memory.py), 8.9 ms without, 10.2 with.
  constexpr bool prefetch = T == WType::F32 ? NB >= 4 : NB >= 2;
  for (; i + 16 <= in; i += 16) {
    if constexpr (prefetch) _mm_prefetch(w + (i + 256) * elem, _MM_HINT_T0);
    for (int u = 0; u < 2; ++u) {
      __m256 wv = load8<T>(w, i + 8 * u);
      for (int b = 0; b < NB; ++b)
        a[u][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + i + 8 * u), a[u][b]);
    }
  }
  if (i + 8 <= in) {
    __m256 wv = load8<T>(w, i);
    for (int b = 0; b < NB; ++b)
      a[0][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + i), a[0][b]);
    i += 8;
  }
  for (int b = 0; b < NB; ++b) {
    float s = hsum(_mm256_add_ps(a[0][b], a[1][b]));
    for (int64_t j = i; j < in; ++j) s += load1<T>(w, j) * x[b * ldx + j];
    y[b * ldy] = s;
  }
}

constexpr int64_t RB = 4;  // weight rows per step of a task: read from memory once for all inputs

// One input: consecutive weight rows, each dot product in block's two sums (elements i mod 16
// < 8 and >= 8) in block's order, so the same bits as with 2-4 inputs, in one loop with nothing
// else in it, 64 elements a pass. One input is the decode step at B=1, which streams every weight
// once, 3 KiB a row for GPT-2-small, so what runs between rows counts: as a one-input block
// called per row from a call per 4 rows (as larger batches need), GPT-2-small's one-input
// products took 7-14 % longer with fp32 weights and 1-5 % longer with 16-bit ones (Zen 3 VM, one
// and two cores, same bits), and the engine's B=1 step 1.06-1.14x as long.
template <WType T>
inline void rows_one(const float* x, int64_t in, const char* w, int64_t ldw_bytes, float* y,
                     int64_t rows) {
  constexpr int64_t elem = T == WType::F32 ? 4 : 2;
  const int64_t ahead = T != WType::F32 ? single_prefetch : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const char* wr = w + r * ldw_bytes;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {
      if (ahead > 0) {  // 128 bytes of 16-bit weights a pass: two cache lines
        _mm_prefetch(wr + i * elem + ahead, _MM_HINT_T0);
        _mm_prefetch(wr + i * elem + ahead + 64, _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int v = 0; v < 64; v += 16) {
        a0 = _mm256_fmadd_ps(load8<T>(wr, i + v), _mm256_loadu_ps(x + i + v), a0);
        a1 = _mm256_fmadd_ps(load8<T>(wr, i + v + 8), _mm256_loadu_ps(x + i + v + 8), a1);
      }
    }
    for (; i + 16 <= in; i += 16) {
      a0 = _mm256_fmadd_ps(load8<T>(wr, i), _mm256_loadu_ps(x + i), a0);
      a1 = _mm256_fmadd_ps(load8<T>(wr, i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    if (i + 8 <= in) {
      a0 = _mm256_fmadd_ps(load8<T>(wr, i), _mm256_loadu_ps(x + i), a0);
      i += 8;
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < in; ++i) s += load1<T>(wr, i) * x[i];
    y[r] = s;
  }
}

// block<T, NB> over consecutive weight rows (2-4 inputs)
template <WType T, int NB>
inline void rows_nb(const float* x, int64_t ldx, int64_t in, const char* w, int64_t ldw_bytes,
                    float* y, int64_t ldy, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) block<T, NB>(x, ldx, in, w + r * ldw_bytes, y + r, ldy);
}

template <WType T>
void rows_avx2(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w,
               int64_t ldw_bytes, int64_t out, float* y, int64_t o, int64_t rows) {
  // inputs in groups of up to 4; the block's weight rows come from memory for the first
  // group and from cache for the others
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * out + o;
    const char* wo = w + o * ldw_bytes;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: rows_one<T>(xb, in, wo, ldw_bytes, yb, rows); break;
      case 2: rows_nb<T, 2>(xb, ldx, in, wo, ldw_bytes, yb, out, rows); break;
      case 3: rows_nb<T, 3>(xb, ldx, in, wo, ldw_bytes, yb, out, rows); break;
      default: rows_nb<T, 4>(xb, ldx, in, wo, ldw_bytes, yb, out, rows); break;
    }
  }
}

// ---- AVX-512 (F, BW, DQ, VL): compiled for those functions only, chosen at run time ----------
// One 16-lane accumulator holds exactly the AVX2 kernel's two 8-lane partial sums (lanes 0-7:
// elements i mod 16 < 8, lanes 8-15: the others), updated by the same FMAs in the same order,
// and reduced the same way, so both kernels give the same bits. What the 32 registers buy is
// register blocking: NR weight rows x NB inputs per pass, each loaded weight vector used NB
// times and each input vector NR times. With several inputs the AVX2 kernel is bound by its
// loads (one input load per FMA); here it is NR + NB loads per NR * NB FMAs.
#define CAMEX_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

template <WType T>
CAMEX_AVX512 inline __m512 load16(const void* w, int64_t i) {
  if constexpr (T == WType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    if constexpr (T == WType::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Software prefetch in the AVX-512 kernel, bytes ahead of the read position in every weight row:
// `near` into L1 (0: none) and `far` into L2 (0: none) of Avx512Tuning below. Zen 4, first: 1 KiB
// near (bf16 with 8 inputs 37.6 -> 35.5 ms against 512 bytes); the far prefetch with four rows
// then saved 40 % there too (see rows_avx512).
// A Xeon with AMX: a second prefetch into L2 keeps more of the row in flight than one stream's
// hardware prefetcher does. GPT-2-small's products, one core, 2 MiB pages, 1 KiB near + 8 KiB
// far against 1 KiB alone: bf16 one input 24.8 -> 17.5 ms, four 29.1 -> 22.8, eight 33.6 ->
// 29.3; fp32 four inputs 41.1 -> 34.3, eight 46.5 -> 42.5 (two cores: bf16 one input 14.8 ->
// 12.2, fp32 sixteen 37.4 -> 33.2). 2 KiB + 16 KiB is another 1-8 % (four rows per pass, fp32
// one input 37.4 -> 34.3, bf16 four inputs 20.1-25.7 -> 18.6-24.4).
//
// The AVX-512 kernel's settings, one set for fp32 weights and one for 16-bit weights (tune(),
// from the CPU's vendor by the Python side): from `from` inputs it replaces the AVX2 kernel, it
// reads two weight rows side by side from `pair` inputs and four from `quad` (0: never), and
// prefetches `near` bytes ahead into L1 and `far` into L2. The defaults are Zen 4's; see
// wide_for and rows_avx512.
struct Avx512Tuning {
  int64_t from, pair, quad, near, far;
};
Avx512Tuning tuning_fp32{3, 0, 5, 2048, 16384}, tuning_16bit{2, 0, 2, 2048, 16384};

template <WType T>
inline const Avx512Tuning& tuning_for() {
  return T == WType::F32 ? tuning_fp32 : tuning_16bit;
}

template <WType T, int NR, int NB>
CAMEX_AVX512 inline void block512(const float* x, int64_t ldx, int64_t in, const char* w,
                                  int64_t ldw_bytes, float* y, int64_t ldy) {
  const int64_t near = tuning_for<T>().near, far = tuning_for<T>().far;
  __m512 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const char* p = w + r * ldw_bytes + i * (T == WType::F32 ? 4 : 2);
      if (near > 0) _mm_prefetch(p + near, _MM_HINT_T0);
      if (far > 0) _mm_prefetch(p + far, _MM_HINT_T1);
      wv[r] = load16<T>(w + r * ldw_bytes, i);
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + b * ldx + i);
      for (int r = 0; r < NR; ++r) a[r][b] = _mm512_fmadd_ps(wv[r], xv, a[r][b]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const char* wr = w + r * ldw_bytes;
    for (int b = 0; b < NB; ++b) {
      __m256 lo = _mm512_castps512_ps256(a[r][b]), hi = _mm512_extractf32x8_ps(a[r][b], 1);
      int64_t j = i;
      if (j + 8 <= in) {
        lo = _mm256_fmadd_ps(load8<T>(wr, j), _mm256_loadu_ps(x + b * ldx + j), lo);
        j += 8;
      }
      float s = hsum(_mm256_add_ps(lo, hi));
      for (; j < in; ++j) s += load1<T>(wr, j) * x[b * ldx + j];
      y[b * ldy + r] = s;
    }
  }
}

template <WType T, int NR>
CAMEX_AVX512 inline void inputs512(const float* x, int64_t B, int64_t ldx, int64_t in,
                                   const char* w, int64_t ldw_bytes, float* y, int64_t ldy) {
  // NR weight rows against every input, up to 8 inputs per pass (4 with 4 rows): at most 16
  // accumulators
  for (int64_t b0 = 0; b0 < B; b0 += NR >= 4 ? 4 : 8) {
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * ldy;
    if constexpr (NR >= 4) {
      switch (std::min<int64_t>(4, B - b0)) {
        case 1: block512<T, NR, 1>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
        case 2: block512<T, NR, 2>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
        case 3: block512<T, NR, 3>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
        default: block512<T, NR, 4>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      }
      continue;
    }
    switch (std::min<int64_t>(8, B - b0)) {
      case 1: block512<T, NR, 1>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 2: block512<T, NR, 2>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 3: block512<T, NR, 3>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 4: block512<T, NR, 4>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 5: block512<T, NR, 5>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 6: block512<T, NR, 6>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      case 7: block512<T, NR, 7>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
      default: block512<T, NR, 8>(xb, ldx, in, w, ldw_bytes, yb, ldy); break;
    }
  }
}

int avx512_rows_override = 0;  // benchmarking: weight rows per pass (0: by batch size)

template <WType T>
CAMEX_AVX512 void rows_avx512(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w,
                              int64_t ldw_bytes, int64_t out, float* y, int64_t o,
                              int64_t rows) {
  // One weight row at a time keeps the sequential stream the prefetcher follows best with the
  // near prefetch alone; on Zen 4 two rows side by side won from 7 inputs (bf16 at 8 inputs: 37
  // vs 40 ms per step's products on one core), on a Xeon with AMX they never do (bf16 at 8
  // inputs 41.6 vs 49.5 ms, fp32 59.6 vs 67.5).
  // With the far prefetch, four rows win on Zen 4 too (GPT-2-small's products, 2 MiB pages,
  // medians of 6 interleaved passes, one core / two, against pairs from 7 and 1 KiB near alone):
  // fp32 8 inputs 61.1 -> 34.4 / 31.4 -> 18.5 ms, 16 inputs 97.0 -> 57.9 / 49.8 -> 30.5; bf16 4
  // inputs 26.3 -> 15.4 / 11.6 -> 8.6, 8 inputs 40.5 -> 25.2 / 23.1 -> 14.9. Per kind of weights
  // (`python -m camex_runtime.kernels --tune`, medians of 5-8 interleaved passes): fp32 at 3
  // and 4 inputs runs single rows with the far prefetch (one core 31 and 30 ms with four rows
  // or AVX2 -> 24-26), four rows from 5; bf16 takes four rows from 2 inputs (one core 18-20 ->
  // 12-13 ms at 2 and 3 inputs).
  // On a Xeon with AMX, four rows side by side win: four streams from memory (GPT-2-small's
  // products, one core, fp32: 1 input 32.3 -> 29.4 ms, 4 inputs 49.8 -> 40.3, 16 inputs 91.1 ->
  // 68.7; bf16 with the far prefetch, three runs: 1 input 16.8-22.8 -> 15.4-19.9, 4 inputs
  // 22.5-26.4 -> 18.6-24.4, level at 8) and fewer loads per FMA from cache (4 + 4 per 16 FMAs:
  // fp32 fc1 / fc2 by 32 inputs 3.0 / 3.5 -> 1.9 / 1.8 ms, which merge_linear's tiles are).
  const Avx512Tuning& t = tuning_for<T>();
  const int nr = avx512_rows_override > 0 ? avx512_rows_override
                 : t.quad > 0 && B >= t.quad ? 4
                 : t.pair > 0 && B >= t.pair ? 2 : 1;
  int64_t r = 0;
  if (nr == 4)
    for (; r + 4 <= rows; r += 4)
      inputs512<T, 4>(x, B, ldx, in, w + (o + r) * ldw_bytes, ldw_bytes, y + o + r, out);
  if (nr >= 2)
    for (; r + 2 <= rows; r += 2)
      inputs512<T, 2>(x, B, ldx, in, w + (o + r) * ldw_bytes, ldw_bytes, y + o + r, out);
  for (; r < rows; ++r)
    inputs512<T, 1>(x, B, ldx, in, w + (o + r) * ldw_bytes, ldw_bytes, y + o + r, out);
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return yes;
}

bool use_avx512 = has_avx512();  // set_isa("avx2") turns it off (tests compare the two)

bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// From how many rows bf16 weights' products in linear_into and merge_linear go to the bf16 dot
// kernel (dot_tile; 0: never). Set by the Python side per CPU family (set_bf16_dot).
int64_t bf16_dot_from = 0;

inline bool dot_for_bf16(int64_t B) {
  return bf16_dot_from > 0 && use_avx512 && B >= bf16_dot_from;
}

// On Zen 4, the AVX2 kernel is as fast or faster for one fp32 input (26 vs 32 ms per step's
// products, the 512-bit loads slow the single stream) and two, and for one 16-bit input; with
// more inputs the AVX2 kernel is bound by loads, not memory, and the blocked AVX-512 one wins.
// On a Xeon with AMX the AVX-512 kernel (with its software prefetch) wins from one input:
// GPT-2-small's products at one input, one core, 2 MiB pages, 42.6 -> 33.4 ms fp32 and 31.7 ->
// 23.6 ms bf16. Both kernels give the same bits.
template <WType T>
inline bool wide_for(int64_t B) {
  return use_avx512 && (B >= tuning_for<T>().from || avx512_rows_override > 0);
}

// The weights the next tile will read, prefetched into L2 while this one computes: `n` spans of
// `bytes` each (weight rows, or a merge's [base; deltas]), a line of each in turn, as that tile
// reads them, `per` lines every `every` calls of `step` (one call per step of the products'
// inner loop). The bf16 dot kernel issues two lines a step (merge_linear_dot). (The prompt
// tiles' earlier form spread its lines over the whole tile: GPT-2-small's block products, 32
// rows, fp32, weights read cold, one Zen 4 core: 82-86 ms without, 77-79 with the lines issued
// during the tile's first group of inputs, 62-66 spread over all of it.)
struct TilePrefetch {
  const char* span[17];
  int64_t n = 0, bytes = 0, next = 0;  // n spans of `bytes` each; lines issued so far
  int64_t every = 1, per = 2, tick = 0;
  inline void step() {
    if (++tick < every) return;
    tick = 0;
    for (int64_t j = 0; j < per; ++j) {
      const int64_t line = next / n;
      if (line * 64 >= bytes) return;
      _mm_prefetch(span[next % n] + line * 64, _MM_HINT_T1);
      ++next;
    }
  }
  // The next tile of a merge: `bytes` of [base; deltas] (E < 17 deltas) from byte `at` of each
  // stream, `per` lines a step.
  static TilePrefetch of_merge(const char* base, const char* deltas, int64_t ld_bytes, int64_t E,
                               int64_t at, int64_t bytes, int64_t per) {
    TilePrefetch pf;
    pf.n = E + 1;
    pf.per = per;
    pf.bytes = bytes;
    pf.span[0] = base + at;
    for (int64_t e = 0; e < E; ++e) pf.span[e + 1] = deltas + e * ld_bytes + at;
    return pf;
  }
};

// `n` elements of `v` starting on a 64-byte line (glibc aligns a vector's data to 16 bytes
// only: a 32- or 64-byte load from it then straddles two lines in a half or all of the loads,
// and whether it did depended on the heap's state when the buffer was made).
template <typename E>
E* aligned64(std::vector<E>& v, int64_t n) {
  constexpr int64_t pad = 64 / sizeof(E);
  if (static_cast<int64_t>(v.size()) < n + pad) v.resize(n + pad);
  return reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(v.data()) + 63) &
                              ~static_cast<uintptr_t>(63));
}

// ---- Prompt tiles: more rows than a decode batch, where the CPU has no faster GEMM ---------
// With a prompt chunk's rows the products are bound by arithmetic, not by memory: the kernels
// above load an input vector per FMA and keep two partial sums per output (for their batch
// invariance), and on a CPU without a 16-bit GEMM torch would widen every 16-bit weight matrix
// to fp32 on each call before its GEMM (which without AVX-512 also splits small row counts
// poorly over threads; Python's kernels.tiles_take says where the tiles serve).
// Here the inputs are packed transposed once per call, in blocks of 16 inputs (8 for a last
// block of at most 8): block[k][j] = x[b0 + j][k], zeros past the last input. A tile is 6 weight
// rows x one block: per k, one or two input vectors and 6 broadcast weights feed 12 FMAs (6
// with an 8-input block), one accumulator per output, 12 of the 16 AVX2 registers. (The tiles
// before these were dot products along k, 3 weight rows x 4 inputs and a lane sum per output at
// the end: those need all 16 registers, so the compiler reloaded a weight vector for every
// input, 10 loads per 12 FMAs, and each tile read its inputs from L2.) Every output is a chain
// of FMAs s = fma(w[r][k], x[b][k], s) over k from s = 0, one chain per TILE_SPAN elements of k,
// the chains' sums added in order, then the bias: its bits depend on neither the other rows,
// nor the tile, nor the thread that computes it. (One chain over all of k would be ~4x less
// accurate at k = 3,072 than torch's fp32 GEMM; chains of 256 are as accurate, 64 no better.)
// 16-bit weight rows are widened once per group of 6 into a scratch row each (exact), which
// every block of inputs reads; fp32 rows are read in place (a last group of fewer than 6 rows
// is copied beside zero rows). During its first block a group prefetches the next group's
// rows into L2. Zen 3 VM (AVX2/FMA/F16C), one core, 32 inputs, weights in cache: 3,072 x 768
// and 768 x 3,072 products at 88-92 GFLOP/s with fp32 weights, 85-86 with bf16, against
// 62-77 for the dot-product tiles (torch's fp32 GEMM peaks at ~91 there, for long prompts).
constexpr int64_t TILE_ROWS = 6;     // weight rows per tile
constexpr int64_t TILE_INPUTS = 16;  // inputs per block (a last block of <= 8: 8)
constexpr int64_t TILE_SPAN = 256;   // elements of k per chain

// The packed inputs of one call: blocks of TILE_INPUTS inputs ([in][16]), the last one of 8
// lanes ([in][8]) when at most 8 inputs are left.
struct PackedInputs {
  at::Tensor storage;  // this call's (a chunk of a long prompt's would be too big to keep)
  const float* data = nullptr;
  int64_t B = 0, in = 0;
  int64_t blocks() const { return (B + TILE_INPUTS - 1) / TILE_INPUTS; }
  int64_t width(int64_t blk) const {  // lanes of block blk
    return B - blk * TILE_INPUTS > 8 ? TILE_INPUTS : 8;
  }
  const float* block(int64_t blk) const { return data + blk * TILE_INPUTS * in; }
};

// x[b0 .. b0+n) (n <= 8 rows, row stride ldx) transposed into dst[k][lanes] at lanes j0..j0+8
// (rows past n: zeros): 8 x 8 register transposes, a scalar tail for in % 8.
inline void pack8(const float* x, int64_t n, int64_t ldx, int64_t in, float* dst, int64_t lanes) {
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j)
      r[j] = j < n ? _mm256_loadu_ps(x + j * ldx + k) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    float* d = dst + k * lanes;
    _mm256_storeu_ps(d + 0 * lanes, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + 1 * lanes, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * lanes, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * lanes, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * lanes, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * lanes, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * lanes, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * lanes, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
  for (; k < in; ++k)
    for (int64_t j = 0; j < 8; ++j) dst[k * lanes + j] = j < n ? x[j * ldx + k] : 0.f;
}

// x (B, in), row stride ldx, packed for the tiles (the allocator aligns the buffer to 64 bytes)
inline PackedInputs pack_inputs(const float* x, int64_t B, int64_t ldx, int64_t in) {
  PackedInputs p;
  p.B = B, p.in = in;
  p.storage = at::empty({p.blocks() * TILE_INPUTS * in}, at::TensorOptions().dtype(at::kFloat));
  float* const dst = p.storage.data_ptr<float>();
  for (int64_t blk = 0; blk < p.blocks(); ++blk) {
    const int64_t b0 = blk * TILE_INPUTS, lanes = p.width(blk);
    float* d = dst + blk * TILE_INPUTS * in;
    for (int64_t j0 = 0; j0 < lanes; j0 += 8)
      pack8(x + (b0 + j0) * ldx, std::max<int64_t>(0, std::min<int64_t>(8, B - b0 - j0)), ldx,
            in, d + j0, lanes);
  }
  p.data = dst;
  return p;
}

// y[b][r] = sum_k w_r[k] * xt[k][b] for TILE_ROWS (6, spelled out below) weight rows (fp32,
// any stride apart) and one block of NV * 8 inputs; the first nb inputs and nr rows are stored
// (y row stride ldy). Each k-span of TILE_SPAN elements is its own chain from zero, the spans'
// sums added in order. `next`: rows to prefetch into L2 meanwhile (next_esz bytes an element).
template <int NV>
inline void tile(const float* xt, int64_t in, const float* const* wr, float* y, int64_t ldy,
                 int64_t nb, int64_t nr, const char* const* next, int64_t next_esz) {
  alignas(32) float t[TILE_ROWS][TILE_INPUTS] = {};
  for (int64_t k0 = 0; k0 < in; k0 += TILE_SPAN) {
    const int64_t k1 = std::min(in, k0 + TILE_SPAN);
    const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3], *w4 = wr[4], *w5 = wr[5];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;  // the second 8 inputs
    for (int64_t k = k0; k < k1; ++k) {
      if (next != nullptr && (k & 15) == 0)
        for (int r = 0; r < TILE_ROWS; ++r) _mm_prefetch(next[r] + k * next_esz, _MM_HINT_T1);
      const __m256 x0 = _mm256_loadu_ps(xt + k * 8 * NV);
      const __m256 x1 = NV == 2 ? _mm256_loadu_ps(xt + k * 16 + 8) : x0;
      __m256 v;
#define CAMEX_TILE_ROW(r)                              \
      v = _mm256_broadcast_ss(w##r + k);               \
      a##r = _mm256_fmadd_ps(v, x0, a##r);             \
      if constexpr (NV == 2) b##r = _mm256_fmadd_ps(v, x1, b##r);
      CAMEX_TILE_ROW(0) CAMEX_TILE_ROW(1) CAMEX_TILE_ROW(2)
      CAMEX_TILE_ROW(3) CAMEX_TILE_ROW(4) CAMEX_TILE_ROW(5)
#undef CAMEX_TILE_ROW
    }
    static_assert(TILE_ROWS == 6, "the accumulators above are spelled out for 6 rows");
    const __m256 as[TILE_ROWS] = {a0, a1, a2, a3, a4, a5};
    const __m256 bs[TILE_ROWS] = {b0, b1, b2, b3, b4, b5};
    for (int r = 0; r < TILE_ROWS; ++r) {
      _mm256_store_ps(t[r], _mm256_add_ps(_mm256_load_ps(t[r]), as[r]));
      if constexpr (NV == 2)
        _mm256_store_ps(t[r] + 8, _mm256_add_ps(_mm256_load_ps(t[r] + 8), bs[r]));
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < nr; ++r) y[b * ldy + r] = t[r][b];
}

// `tile` with 512-bit vectors, for NZ (1 or 2) whole blocks of TILE_INPUTS inputs side by side
// (xt0, xt1: their packed data; nb inputs of the 16 * NZ stored): a vector of 16 inputs where
// `tile` holds two of 8, the same chains of FMAs over k in the same order and the same spans'
// sums, so every output has the bits `tile` gives it. Where a core runs 512-bit FMAs at full
// width (Zen 5) that is twice the products per instruction; two blocks give each broadcast
// weight two FMAs and twelve independent chains (FMA latency x ports). Chosen per CPU by the
// Python side (set_tiles_isa).
template <int NZ>
CAMEX_AVX512 void tile512(const float* xt0, const float* xt1, int64_t in, const float* const* wr,
                          float* y, int64_t ldy, int64_t nb, int64_t nr, const char* const* next,
                          int64_t next_esz, TilePrefetch* tp = nullptr) {
  alignas(64) float t[TILE_ROWS][NZ * TILE_INPUTS] = {};
  for (int64_t k0 = 0; k0 < in; k0 += TILE_SPAN) {
    const int64_t k1 = std::min(in, k0 + TILE_SPAN);
    const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3], *w4 = wr[4], *w5 = wr[5];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;  // the second block
    for (int64_t k = k0; k < k1; ++k) {
      if (next != nullptr && (k & 15) == 0)
        for (int r = 0; r < TILE_ROWS; ++r) _mm_prefetch(next[r] + k * next_esz, _MM_HINT_T1);
      if (tp != nullptr) tp->step();
      const __m512 x0 = _mm512_loadu_ps(xt0 + k * TILE_INPUTS);
      const __m512 x1 = NZ == 2 ? _mm512_loadu_ps(xt1 + k * TILE_INPUTS) : x0;
      __m512 v;
#define CAMEX_TILE_ROW(r)                              \
      v = _mm512_set1_ps(w##r[k]);                     \
      a##r = _mm512_fmadd_ps(v, x0, a##r);             \
      if constexpr (NZ == 2) b##r = _mm512_fmadd_ps(v, x1, b##r);
      CAMEX_TILE_ROW(0) CAMEX_TILE_ROW(1) CAMEX_TILE_ROW(2)
      CAMEX_TILE_ROW(3) CAMEX_TILE_ROW(4) CAMEX_TILE_ROW(5)
#undef CAMEX_TILE_ROW
    }
    const __m512 as[TILE_ROWS] = {a0, a1, a2, a3, a4, a5};
    const __m512 bs[TILE_ROWS] = {b0, b1, b2, b3, b4, b5};
    for (int r = 0; r < TILE_ROWS; ++r) {
      _mm512_store_ps(t[r], _mm512_add_ps(_mm512_load_ps(t[r]), as[r]));
      if constexpr (NZ == 2)
        _mm512_store_ps(t[r] + TILE_INPUTS,
                        _mm512_add_ps(_mm512_load_ps(t[r] + TILE_INPUTS), bs[r]));
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < nr; ++r) y[b * ldy + r] = t[r][b];
}

// Whether the tiles use tile512 for whole blocks of inputs (set_tiles_isa; off by default).
bool tiles_avx512 = false;

// y[:, o:o+rows] = x @ w[o:o+rows]^T (+ bias) for all inputs (packed) by tiles: each group of
// TILE_ROWS weight rows (widened / gathered once) passes over every block of inputs.
template <WType T>
void tiles_into(const PackedInputs& xp, const char* w, int64_t ldw_bytes, int64_t out,
                const float* bias, float* y, int64_t o, int64_t rows, TilePrefetch* tp = nullptr) {
  const int64_t in = xp.in;
  thread_local std::vector<float> wide;
  const int64_t ld = (in + 15) / 16 * 16;
  float* const scratch = aligned64(wide, TILE_ROWS * ld);
  for (int64_t g = o; g < o + rows; g += TILE_ROWS) {
    const int64_t nr = std::min(TILE_ROWS, o + rows - g);
    const float* wr[TILE_ROWS];
    for (int64_t r = 0; r < TILE_ROWS; ++r) {
      const char* row = w + (g + r) * ldw_bytes;
      float* dst = scratch + r * ld;
      wr[r] = dst;
      if (r >= nr) {  // rows past the matrix: zeros (their outputs are not stored)
        std::memset(dst, 0, in * sizeof(float));
      } else if constexpr (T == WType::F32) {
        if (nr == TILE_ROWS) wr[r] = reinterpret_cast<const float*>(row);
        else std::memcpy(dst, row, in * sizeof(float));
      } else {
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) _mm256_storeu_ps(dst + i, load8<T>(row, i));
        for (; i < in; ++i) dst[i] = load1<T>(row, i);
      }
    }
    const char* next[TILE_ROWS];  // the next group's rows, prefetched during the first block
    const bool pf = g + 2 * TILE_ROWS <= o + rows;
    for (int64_t r = 0; r < TILE_ROWS; ++r) next[r] = w + (g + TILE_ROWS + r) * ldw_bytes;
    constexpr int64_t esz = T == WType::F32 ? 4 : 2;
    for (int64_t blk = 0; blk < xp.blocks();) {
      const int64_t b0 = blk * TILE_INPUTS;
      float* yb = y + b0 * out + g;
      const char* const* nx = pf && blk == 0 ? next : nullptr;
      const bool whole = xp.width(blk) == TILE_INPUTS;
      if (tiles_avx512 && whole && blk + 1 < xp.blocks() && xp.width(blk + 1) == TILE_INPUTS) {
        tile512<2>(xp.block(blk), xp.block(blk + 1), in, wr, yb, out,
                   std::min(2 * TILE_INPUTS, xp.B - b0), nr, nx, esz, tp);
        blk += 2;
        continue;
      }
      const int64_t nb = std::min(TILE_INPUTS, xp.B - b0);
      if (tiles_avx512 && whole)
        tile512<1>(xp.block(blk), nullptr, in, wr, yb, out, nb, nr, nx, esz, tp);
      else if (whole)
        tile<2>(xp.block(blk), in, wr, yb, out, nb, nr, nx, esz);
      else
        tile<1>(xp.block(blk), in, wr, yb, out, nb, nr, nx, esz);
      ++blk;
    }
  }
  if (bias != nullptr)
    for (int64_t b = 0; b < xp.B; ++b)
      for (int64_t r = o; r < o + rows; ++r) y[b * out + r] += bias[r];
}

// All of y, the groups of weight rows split over threads.
template <WType T>
void tiles_run(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w,
               int64_t ldw_bytes, int64_t out, const float* bias, float* y) {
  const PackedInputs xp = pack_inputs(x, B, ldx, in);
  const int64_t groups = (out + TILE_ROWS - 1) / TILE_ROWS;
  at::parallel_for(0, groups, 4, [&](int64_t lo, int64_t hi) {
    const int64_t o = lo * TILE_ROWS;
    tiles_into<T>(xp, w, ldw_bytes, out, bias, y, o, std::min(hi * TILE_ROWS, out) - o);
  });
}

// For which row counts the products inside linear_into and merge_linear (and so ffn's) use the
// tiles, per kind of weights ([fp32, fp16, bf16]; from 0: never). Set by the Python side per CPU
// (set_tiles, from kernels.tiles_take), so that a merged expert's prompt rows get the same bits
// whether its merge was just made (merge_linear) or comes from the cache (ffn), as linear gives
// them where Python multiplies.
int64_t tiles_from[3] = {0, 0, 0};
int64_t tiles_to[3] = {0, 0, 0};

template <WType T>
inline bool tiles_for(int64_t B) {
  constexpr int k = T == WType::F32 ? 0 : T == WType::F16 ? 1 : 2;
  return tiles_from[k] > 0 && B >= tiles_from[k] && B <= tiles_to[k];
}

// y[:, o:o+rows] = x @ w[o:o+rows]^T (+ bias) for all B inputs by the linear kernel: one task's
// output rows
template <WType T>
inline void rows_into(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w,
                      int64_t ldw_bytes, int64_t out, const float* bias, float* y, int64_t o,
                      int64_t rows, bool wide) {
  if (wide)
    rows_avx512<T>(x, B, ldx, in, w, ldw_bytes, out, y, o, rows);
  else
    rows_avx2<T>(x, B, ldx, in, w, ldw_bytes, out, y, o, rows);
  if (bias != nullptr)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < rows; ++r) y[b * out + o + r] += bias[o + r];
}

template <WType T>
void run(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w, int64_t ldw_bytes,
         int64_t out, const float* bias, float* y) {
  if (tiles_for<T>(B)) {
    tiles_run<T>(x, B, ldx, in, w, ldw_bytes, out, bias, y);
    return;
  }
  const int64_t blocks = (out + RB - 1) / RB;
  const bool wide = wide_for<T>(B);
  at::parallel_for(0, blocks, 4, [&](int64_t lo, int64_t hi) {
    if (B <= 4 && !wide) {  // one group of inputs: the task's rows in one loop
      const int64_t o = lo * RB;
      rows_into<T>(x, B, ldx, in, w, ldw_bytes, out, bias, y, o, std::min(hi * RB, out) - o,
                   wide);
      return;
    }
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t o = g * RB;
      rows_into<T>(x, B, ldx, in, w, ldw_bytes, out, bias, y, o, std::min(RB, out - o), wide);
    }
  });
}

template <WType T>
inline void store8(void* out, int64_t i, __m256 v) {
  if constexpr (T == WType::F32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  } else if constexpr (T == WType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {  // round to nearest even, as torch's float -> bfloat16
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    bits = _mm256_srli_epi32(bits, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), packed);
  }
}

template <WType T>
CAMEX_AVX512 inline void store16(void* out, int64_t i, __m512 v) {
  if constexpr (T == WType::F32) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  } else if constexpr (T == WType::F16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {  // round to nearest even, as store8
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  }
}

template <WType T>
inline void store1(void* out, int64_t i, float v) {
  if constexpr (T == WType::F32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (T == WType::F16) {
    static_cast<uint16_t*>(out)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  } else {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    static_cast<uint16_t*>(out)[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// Software prefetch in every stream of a merge ([base; deltas]), bytes ahead of the read
// position, one prefetch per cache line (0: none; set by the Python side per CPU,
// set_merge_prefetch; the AVX-512 loops only). Eight streams read side by side are more than
// the hardware prefetcher keeps ahead of on the Xeon VM: 12 layers' bf16 fc1 and fc2 merges of
// GPT-2-small with 7 deltas (906 MB), one core, medians 84 / 77 ms without, 64-67 at 512 B to
// 2 KiB, 69 at 4 KiB; two cores 44 -> 36 ms at 1 KiB. Same bits either way. One distance per
// kind of stack, fp32 and 16-bit: on the Zen 5 VM 16-bit merges gain from it while fp32 ones
// move within the noise either way. (All measured with the delta count read at run time; with
// it compiled in, with_deltas below, the Zen 5 merges run at a plain read's pace and the
// distance moves them within ~10 %.)
int64_t merge_prefetch[2] = {0, 0};

template <WType T>
inline int64_t merge_ahead() { return merge_prefetch[T == WType::F32 ? 0 : 1]; }

template <WType T, class N>
CAMEX_AVX512 inline void prefetch_streams(const char* base, const char* deltas, int64_t ld_bytes,
                                          N E, int64_t i, int64_t ahead) {
  constexpr int64_t elem = T == WType::F32 ? 4 : 2;
  if (ahead == 0 || (i * elem) % 64 != 0) return;  // once per line of the stack
  _mm_prefetch(base + i * elem + ahead, _MM_HINT_T0);
  for (int64_t e = 0; e < E; ++e) _mm_prefetch(deltas + e * ld_bytes + i * elem + ahead, _MM_HINT_T0);
}

// The number of deltas E as a compile-time constant where it is 1-15 (with_deltas), or read at
// run time past that. With E known the loops over deltas unroll and the coefficients stay in
// registers; read at run time, the same merge loop ran at half the pace on the Zen 5 VM (12
// layers' bf16 fc1 and fc2 merges of GPT-2-small from 7 deltas, 906 MB, one core, medians of 9:
// 71-92 -> 34-38 ms, the pace of a plain read of the same bytes). The kernels take E as `N E`,
// N either std::integral_constant or int64_t: one body, the same FMAs in the same order, so the
// same bits either way.
constexpr int64_t MAX_COMPILED_DELTAS = 15;

template <int64_t K = 1, class F>
inline void with_deltas(int64_t E, F&& f) {
  if constexpr (K > MAX_COMPILED_DELTAS) {
    f(E);
  } else {
    if (E == K) return f(std::integral_constant<int64_t, K>{});
    with_deltas<K + 1>(E, std::forward<F>(f));
  }
}

// merge_range's vectors 16 elements at a time where the CPU has AVX-512: per element the same
// FMAs in the same order as 8 at a time, so the same bits. Returns where it stopped (the caller
// finishes [i, b) 8 and 1 at a time, as without it).
template <WType T, class N>
CAMEX_AVX512 int64_t merge16(const char* base, const char* deltas, int64_t ld_bytes,
                             const float* cs, N E, int64_t a, int64_t b, char* out) {
  const int64_t ahead = merge_ahead<T>();
  int64_t i = a;
  for (; i + 16 <= b; i += 16) {
    prefetch_streams<T>(base, deltas, ld_bytes, E, i, ahead);
    __m512 acc = load16<T>(base, i);
    for (int64_t e = 0; e < E; ++e)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(cs[e]), load16<T>(deltas + e * ld_bytes, i), acc);
    store16<T>(out, i, acc);
  }
  return i;
}

// The same for S outputs from one read of [base; deltas] (E < 16)
template <WType T, class N>
CAMEX_AVX512 int64_t merge16_many(const char* base, const char* deltas, int64_t ld_bytes,
                                  const float* c, N E, int64_t S, int64_t a, int64_t b,
                                  char* const* outs) {
  __m512 v[16];
  const int64_t ahead = merge_ahead<T>();
  int64_t i = a;
  for (; i + 16 <= b; i += 16) {
    prefetch_streams<T>(base, deltas, ld_bytes, E, i, ahead);
    v[0] = load16<T>(base, i);
    for (int64_t e = 0; e < E; ++e) v[e + 1] = load16<T>(deltas + e * ld_bytes, i);
    for (int64_t s = 0; s < S; ++s) {
      const float* cs = c + s * E;
      __m512 acc = v[0];
      for (int64_t e = 0; e < E; ++e) acc = _mm512_fmadd_ps(_mm512_set1_ps(cs[e]), v[e + 1], acc);
      store16<T>(outs[s], i, acc);
    }
  }
  return i;
}

template <WType T, class N>
void merge_range_of(const char* base, const char* deltas, int64_t ld_bytes, const float* c,
                    N E, int64_t S, int64_t a, int64_t b, char* const* outs) {
  if (S > 1 && E < 16) {  // widen each vector of [base; deltas] once, then every output
    __m256 v[16];
    int64_t i = use_avx512 ? merge16_many<T>(base, deltas, ld_bytes, c, E, S, a, b, outs) : a;
    for (; i + 8 <= b; i += 8) {
      v[0] = load8<T>(base, i);
      for (int64_t e = 0; e < E; ++e) v[e + 1] = load8<T>(deltas + e * ld_bytes, i);
      for (int64_t s = 0; s < S; ++s) {
        const float* cs = c + s * E;
        __m256 acc = v[0];
        for (int64_t e = 0; e < E; ++e) acc = _mm256_fmadd_ps(_mm256_set1_ps(cs[e]), v[e + 1], acc);
        store8<T>(outs[s], i, acc);
      }
    }
    for (; i < b; ++i)
      for (int64_t s = 0; s < S; ++s) {
        float acc = load1<T>(base, i);
        for (int64_t e = 0; e < E; ++e) acc = std::fma(c[s * E + e], load1<T>(deltas + e * ld_bytes, i), acc);
        store1<T>(outs[s], i, acc);
      }
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    const float* cs = c + s * E;
    char* out = outs[s];
    int64_t i = use_avx512 ? merge16<T>(base, deltas, ld_bytes, cs, E, a, b, out) : a;
    for (; i + 8 <= b; i += 8) {
      __m256 acc = load8<T>(base, i);
      for (int64_t e = 0; e < E; ++e)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(cs[e]), load8<T>(deltas + e * ld_bytes, i), acc);
      store8<T>(out, i, acc);
    }
    for (; i < b; ++i) {
      float acc = load1<T>(base, i);
      for (int64_t e = 0; e < E; ++e) acc = std::fma(cs[e], load1<T>(deltas + e * ld_bytes, i), acc);
      store1<T>(out, i, acc);
    }
  }
}

// S merged experts from one pass over the stack: each vector of [base; deltas] (8 elements; 16
// with AVX-512, merge16_many) is read and widened once and every output's vector written from
// registers (more than 15 deltas: each element range is read from memory once and re-read from
// cache per output). The same FMAs in the same order per output as a lone merge, the scalar
// tails included (std::fma, where `acc += c * d` left the rounding to the compiler's
// contraction choices, which differed with the delta count): the bits do not depend on S, on
// how the elements are cut into ranges, nor on an element's position. Elements [a, b).
template <WType T>
void merge_range(const char* base, const char* deltas, int64_t ld_bytes, const float* c,
                 int64_t E, int64_t S, int64_t a, int64_t b, char* const* outs) {
  with_deltas(E, [&](auto n) { merge_range_of<T>(base, deltas, ld_bytes, c, n, S, a, b, outs); });
}

template <WType T>
void merge_run(const char* base, const char* deltas, int64_t ld_bytes, const float* c, int64_t E,
               int64_t S, int64_t n, char* const* outs) {
  at::parallel_for(0, (n + 1023) / 1024, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk)
      merge_range<T>(base, deltas, ld_bytes, c, E, S, blk * 1024, std::min(n, blk * 1024 + 1024),
                     outs);
  });
}

// merge_q8: merged experts from int8 deltas with one fp32 scale per (expert, weight row), the
// opt-in "int8 expert deltas" layout (engine/moe.py): out[r] = base[r] + sum_e (c_e * scale[e][r])
// * q[e][r], fp32 accumulation, the per-row coefficient c_e * scale[e][r] rounded to fp32 first.
// Per merged element 1 byte per delta instead of 2 (bf16) or 4 (fp32): the first token's merges
// are bound by the bytes they read. Each vector of q is widened int8 -> int32 -> fp32 and fused
// into the accumulator in expert order, the same FMAs at every width (16, 8, 1) and for every
// output count S, so the bits depend on neither. Rows [r0, r1) of R rows of C elements.
CAMEX_AVX512 inline __m512 load16_q8(const int8_t* q, int64_t i) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
}

inline __m256 load8_q8(const int8_t* q, int64_t i) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i))));
}

template <WType T, class N>
CAMEX_AVX512 int64_t merge16_q8(const char* base, const int8_t* const* q, const float* cr,
                                N E, int64_t S, int64_t C, char* const* outs) {
  constexpr int64_t elem = T == WType::F32 ? 4 : 2;
  const int64_t ahead = merge_ahead<T>();
  __m512 v[16];
  int64_t i = 0;
  for (; i + 16 <= C; i += 16) {
    if (ahead) {  // once per cache line of each stream
      if ((i * elem) % 64 == 0) _mm_prefetch(base + i * elem + ahead, _MM_HINT_T0);
      if (i % 64 == 0)
        for (int64_t e = 0; e < E; ++e) _mm_prefetch(reinterpret_cast<const char*>(q[e] + i) + ahead, _MM_HINT_T0);
    }
    for (int64_t e = 0; e < E; ++e) v[e] = load16_q8(q[e], i);
    const __m512 b = load16<T>(base, i);
    for (int64_t s = 0; s < S; ++s) {
      __m512 acc = b;
      for (int64_t e = 0; e < E; ++e) acc = _mm512_fmadd_ps(_mm512_set1_ps(cr[s * E + e]), v[e], acc);
      store16<T>(outs[s], i, acc);
    }
  }
  return i;
}

template <WType T, class N>
void merge_q8_rows_of(const char* base, const int8_t* q, const float* scales, const float* c,
                      N E, int64_t S, int64_t R, int64_t C, int64_t r0, int64_t r1,
                      char* const* outs) {
  constexpr int64_t elem = T == WType::F32 ? 4 : 2;
  std::vector<float> cr(S * E);
  std::vector<const int8_t*> qr(E);
  std::vector<char*> orow(S);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t e = 0; e < E; ++e) cr[s * E + e] = c[s * E + e] * scales[e * R + r];
      orow[s] = outs[s] + r * C * elem;
    }
    for (int64_t e = 0; e < E; ++e) qr[e] = q + (e * R + r) * C;
    const char* br = base + r * C * elem;
    int64_t i = use_avx512 ? merge16_q8<T>(br, qr.data(), cr.data(), E, S, C, orow.data()) : 0;
    __m256 v[16];
    for (; i + 8 <= C; i += 8) {
      for (int64_t e = 0; e < E; ++e) v[e] = load8_q8(qr[e], i);
      const __m256 b = load8<T>(br, i);
      for (int64_t s = 0; s < S; ++s) {
        __m256 acc = b;
        for (int64_t e = 0; e < E; ++e) acc = _mm256_fmadd_ps(_mm256_set1_ps(cr[s * E + e]), v[e], acc);
        store8<T>(orow[s], i, acc);
      }
    }
    for (; i < C; ++i)
      for (int64_t s = 0; s < S; ++s) {
        float acc = load1<T>(br, i);
        for (int64_t e = 0; e < E; ++e) acc = std::fma(cr[s * E + e], static_cast<float>(qr[e][i]), acc);
        store1<T>(orow[s], i, acc);
      }
  }
}

template <WType T>
void merge_q8_rows(const char* base, const int8_t* q, const float* scales, const float* c,
                   int64_t E, int64_t S, int64_t R, int64_t C, int64_t r0, int64_t r1,
                   char* const* outs) {
  with_deltas(E, [&](auto n) { merge_q8_rows_of<T>(base, q, scales, c, n, S, R, C, r0, r1, outs); });
}

// The bf16 dot kernel, for prompt segments of 9-32 rows through a merged expert with bf16
// weights. There the widening kernels above lose to the CPU's bf16 GEMM, and a merge followed by
// that GEMM costs the sum of the two: the merge is bound by memory, the products by arithmetic.
// Here the activations are rounded to bf16 once (as the bf16 GEMM does) and each product is a
// sum of vdpbf16ps pair products in fp32, 32 elements a step: one 16-lane accumulator per (weight
// row, activation row), reduced by the same tree for every output (reduce4), so an output's bits
// depend on neither the row count nor how rows are grouped or split over threads. merge_linear
// merges a tile of weight rows, multiplies it while it is in cache, and meanwhile prefetches the
// next tile's [base; deltas] into L2 (TilePrefetch): the next merge finds part of its input there.
// GPT-2-small fc1 / fc2 with 7 deltas, 32 rows, one Zen 4 core: 3.1 / 2.7 ms against 3.5-4.2 /
// 3.1-3.3 for the merge and then torch's bf16 GEMM.
#define CAMEX_BF16DOT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// Four accumulators' lane sums, the same tree for each: (l0 + l2) + (l1 + l3) within each 128-bit
// lane, then (L0 + L2) + (L1 + L3) over the 128-bit lanes. Lanes of different accumulators never
// meet, so an output does not depend on its neighbours (unused ones are zero vectors).
CAMEX_BF16DOT inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 v = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[b][r] = sum_k xb[b][k] * w[r][k] (+ bias[r]) for NR <= 4 weight rows (row stride `in`) and
// NB activation rows (bf16, row stride `in`); y row stride ldy.
template <int NR, int NB>
CAMEX_BF16DOT inline void dot_block(const uint16_t* xb, int64_t in, const uint16_t* w,
                                    const float* bias, float* y, int64_t ldy, TilePrefetch* pf) {
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= in; k += 32) {
    if (pf != nullptr) pf->step();
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * in + k);
    for (int b = 0; b < NB; ++b) {
      const __m512i xv = _mm512_loadu_si512(xb + b * in + k);
      for (int r = 0; r < NR; ++r)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (k < in) {  // the last 1-31 elements, zeros beyond
    const __mmask32 m = (__mmask32(1) << (in - k)) - 1;
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * in + k);
    for (int b = 0; b < NB; ++b) {
      const __m512i xv = _mm512_maskz_loadu_epi16(m, xb + b * in + k);
      for (int r = 0; r < NR; ++r)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    float sums[4];
    _mm_storeu_ps(sums, reduce4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
    for (int r = 0; r < NR; ++r) y[b * ldy + r] = bias != nullptr ? sums[r] + bias[r] : sums[r];
  }
}

template <int NR>
CAMEX_BF16DOT void dot_rows(const uint16_t* xb, int64_t B, int64_t in, const uint16_t* w,
                            const float* bias, float* y, int64_t ldy, TilePrefetch* pf) {
  constexpr int NB = 6;  // 24 accumulators, 4 weight vectors and an activation vector
  int64_t b = 0;
  for (; b + NB <= B; b += NB) dot_block<NR, NB>(xb + b * in, in, w, bias, y + b * ldy, ldy, pf);
  const uint16_t* xr = xb + b * in;
  float* yr = y + b * ldy;
  switch (B - b) {
    case 1: dot_block<NR, 1>(xr, in, w, bias, yr, ldy, pf); break;
    case 2: dot_block<NR, 2>(xr, in, w, bias, yr, ldy, pf); break;
    case 3: dot_block<NR, 3>(xr, in, w, bias, yr, ldy, pf); break;
    case 4: dot_block<NR, 4>(xr, in, w, bias, yr, ldy, pf); break;
    case 5: dot_block<NR, 5>(xr, in, w, bias, yr, ldy, pf); break;
    default: break;
  }
}

// y[:, o:o+rows] = xb @ w[o:o+rows]^T (+ bias) for all B rows; w bf16 (out, in) row-major.
CAMEX_BF16DOT void dot_tile(const uint16_t* xb, int64_t B, int64_t in, const uint16_t* w,
                            int64_t o, int64_t rows, const float* bias, float* y, int64_t out,
                            TilePrefetch* pf) {
  for (int64_t r = 0; r < rows; r += 4) {
    const uint16_t* wr = w + (o + r) * in;
    const float* br = bias != nullptr ? bias + o + r : nullptr;
    float* yr = y + o + r;
    switch (std::min<int64_t>(4, rows - r)) {
      case 4: dot_rows<4>(xb, B, in, wr, br, yr, out, pf); break;
      case 3: dot_rows<3>(xb, B, in, wr, br, yr, out, pf); break;
      case 2: dot_rows<2>(xb, B, in, wr, br, yr, out, pf); break;
      default: dot_rows<1>(xb, B, in, wr, br, yr, out, pf); break;
    }
  }
}

// x (B, in) fp32 with row stride ldx -> xb (B, in) bf16, rounded to nearest even.
CAMEX_BF16DOT void round_rows_bf16(const float* x, int64_t B, int64_t ldx, int64_t in,
                                   uint16_t* xb) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * ldx;
    uint16_t* o = xb + b * in;
    int64_t i = 0;
    for (; i + 16 <= in; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
    for (; i < in; ++i) store1<WType::BF16>(o, i, xr[i]);
  }
}

constexpr int64_t DOT_TILE = 16;  // weight rows per task of linear_dot

// y (B, out) = x @ w^T (+ bias) by the bf16 dot kernel; w bf16 with row stride `in`.
void linear_dot(const float* x, int64_t B, int64_t ldx, int64_t in, const uint16_t* w,
                int64_t out, const float* bias, float* y) {
  std::vector<uint16_t> xs;
  uint16_t* const xb = aligned64(xs, B * in);
  round_rows_bf16(x, B, ldx, in, xb);
  at::parallel_for(0, (out + DOT_TILE - 1) / DOT_TILE, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      dot_tile(xb, B, in, w, t * DOT_TILE, std::min(DOT_TILE, out - t * DOT_TILE), bias, y,
               out, nullptr);
  });
}

// merge_linear for bf16 weights by the dot kernel: tiles of ~24 KiB per span (16 rows of
// GPT-2-small's fc1, 4 of fc2), each merged (merge_range: merge()'s bits), then multiplied while
// the next tile's spans are prefetched.
void merge_linear_dot(const float* x, int64_t B, int64_t in, const char* base, const char* deltas,
                      int64_t ld_bytes, const float* c, int64_t E, char* w, int64_t out,
                      const float* bias, float* y) {
  std::vector<uint16_t> xs;
  uint16_t* const xb = aligned64(xs, B * in);
  round_rows_bf16(x, B, in, in, xb);
  const int64_t tile = std::max<int64_t>(4, 12288 / in / 4 * 4);
  at::parallel_for(0, (out + tile - 1) / tile, 1, [&](int64_t lo, int64_t hi) {
    char* const outs[1] = {w};
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t o = t * tile, rows = std::min(tile, out - o);
      merge_range<WType::BF16>(base, deltas, ld_bytes, c, E, 1, o * in, (o + rows) * in, outs);
      TilePrefetch pf;
      if (t + 1 < hi && E < 17)  // this task's next tile
        pf = TilePrefetch::of_merge(base, deltas, ld_bytes, E, (o + rows) * in * 2,
                                    std::min(tile, out - o - rows) * in * 2, 2);
      dot_tile(xb, B, in, reinterpret_cast<const uint16_t*>(w), o, rows, bias, y, out,
               pf.n > 0 ? &pf : nullptr);
    }
  });
}

// Merge and apply in one pass, for a prompt chunk's rows x (B, in): tiles of MERGE_TILE weight
// rows are merged (merge_range: the pool entry gets the same bits as merge()) and, while the
// tile is in cache, multiplied by every row of x (the linear kernel: each row's result the bits
// a decode step would get). Against a merge and then a GEMM this saves re-reading the merged
// weights, and with two threads one thread's products run while the other waits on memory.
// Measured on Zen 4 (GPT-2-small fc1 and fc2 with 7 deltas, 32 rows, fp32): 4.6-5.3 ms per
// linear against 5.3-5.6 ms on one core, ~3.0 ms against 3.8-4.3 ms on two.
// Where the prompt tiles multiply (tiles_for), a tile is whole groups of TILE_ROWS weight rows,
// about MERGE_SPAN_BYTES of each stream, and x is packed for them once per call: 16 rows had
// left a partial group per tile (with the earlier 3-row tiles, whole groups were 0.95x the time
// of 16-row tiles: Zen 3 VM, GPT-2-small fc1 + fc2 of one layer, 32 rows, fp32, one and two
// threads). Prefetching the next tile's [base; deltas] during the products, as merge_linear_dot
// does, made the call slower there (bf16, one thread, 8.7 -> 11.1 ms; with any hint), when the
// tiles read their inputs from L2; with the broadcast tiles as well (12 layers' bf16 fc1 + fc2,
// 32 rows, one thread: 92-106 ms without, 105-137 with all, 5-25 % or a line per 8 elements of k
// of the next tile, T0 / T1 / T2 / NTA). With the 512-bit tiles (Zen 5) it pays: one line of the
// next tile's [base; deltas] into L2 per step of the products (a third of that tile; two or
// three lines a step, or one every second or third step, were slower) — 12 layers' fp32 fc1 +
// fc2 by 32 rows, 7 deltas, one thread, five pairs of processes: 84-123 -> 75-104 ms (the VM's
// pace moved between pairs, the prefetch won in every pair); two threads 62-77 -> 59-78, no
// clear change.
constexpr int64_t MERGE_TILE = 16;
constexpr int64_t MERGE_SPAN_BYTES = 24 * 1024;

template <WType T>
void merge_linear_run(const float* x, int64_t B, int64_t in, const char* base, const char* deltas,
                      int64_t ld_bytes, const float* c, int64_t E, char* w, int64_t out,
                      const float* bias, float* y) {
  if constexpr (T == WType::BF16) {
    if (dot_for_bf16(B)) {
      merge_linear_dot(x, B, in, base, deltas, ld_bytes, c, E, w, out, bias, y);
      return;
    }
  }
  constexpr int64_t esz = T == WType::F32 ? 4 : 2;
  const bool wide = wide_for<T>(B);
  const bool tiles = tiles_for<T>(B);
  PackedInputs packed;
  if (tiles) packed = pack_inputs(x, B, in, in);
  const int64_t tile =
      tiles ? std::max<int64_t>(TILE_ROWS, MERGE_SPAN_BYTES / (in * esz) / TILE_ROWS * TILE_ROWS)
            : MERGE_TILE;
  at::parallel_for(0, (out + tile - 1) / tile, 1, [&](int64_t lo, int64_t hi) {
    char* const outs[1] = {w};
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t o = t * tile, rows = std::min(tile, out - o);
      merge_range<T>(base, deltas, ld_bytes, c, E, 1, o * in, (o + rows) * in, outs);
      TilePrefetch pf;  // with 512-bit tiles: a line of this task's next tile per step
      if (tiles && tiles_avx512 && t + 1 < hi && E < 17)
        pf = TilePrefetch::of_merge(base, deltas, ld_bytes, E, (o + rows) * in * esz,
                                    std::min(tile, out - o - rows) * in * esz, 1);
      if (tiles)
        tiles_into<T>(packed, w, in * esz, out, bias, y, o, rows, pf.n > 0 ? &pf : nullptr);
      else
        rows_into<T>(x, B, in, in, w, in * esz, out, bias, y, o, rows, wide);
    }
  });
}

// exp(x) for x <= 0 (softmax after subtracting the max), 8 lanes: Cephes' expf (range reduction
// by ln 2, degree-5 polynomial, exponent by integer add); relative error ~2e-7 over the range.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// softmax(q . K[0..L) * scale) @ V[0..L) for one query head; K, V rows of hd floats; s: L floats.
// softcap > 0 caps each score first: softcap * tanh(score / softcap) (Gemma 2). A sink (not
// null: the head's logit, GPT-OSS) is one more softmax column without a value.
void attend_one(const float* q, const float* K, const float* V, int64_t L, int64_t hd, float scale,
                float softcap, const float* sink, float* s, float* out) {
  float mx = sink != nullptr ? *sink : -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    s[j] = dot(q, K + j * hd, hd) * scale;
    if (softcap > 0.f) s[j] = std::tanh(s[j] / softcap) * softcap;
    mx = std::max(mx, s[j]);
  }
  __m256 vsum = _mm256_setzero_ps(), vmx = _mm256_set1_ps(mx);
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
    _mm256_storeu_ps(s + j, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  float sum = hsum(vsum);
  for (; j < L; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  if (sink != nullptr) sum += std::exp(*sink - mx);
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  for (j = 0; j < L; ++j) {
    const float w = s[j] * inv;
    const float* v = V + j * hd;
    int64_t i = 0;
    __m256 vw = _mm256_set1_ps(w);
    for (; i + 8 <= hd; i += 8)
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < hd; ++i) out[i] += w * v[i];
  }
}

}  // namespace

// base (n,) and every out (n,) contiguous, deltas (E, n) with contiguous rows, one floating
// dtype; coeffs (S, E) fp32: outs[s] = base + coeffs[s] @ deltas, one pass over the stack.
void merge_many(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outs) {
  TORCH_CHECK(base.is_contiguous() && deltas.dim() == 2 && deltas.stride(1) == 1 &&
              base.numel() == deltas.size(1), "merge layout");
  auto c = coeffs.to(at::kFloat).contiguous();
  const int64_t E = deltas.size(0), S = static_cast<int64_t>(outs.size()), n = base.numel();
  TORCH_CHECK(c.dim() == 2 && c.size(0) == S && c.size(1) == E,
              "one row of coefficients per output, one coefficient per delta");
  std::vector<char*> op(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(outs[s].is_contiguous() && outs[s].numel() == n, "merge layout");
    TORCH_CHECK(base.scalar_type() == deltas.scalar_type() &&
                outs[s].scalar_type() == base.scalar_type(), "merge dtypes");
    op[s] = static_cast<char*>(outs[s].data_ptr());
  }
  if (!S) return;
  const char* bp = static_cast<const char*>(base.data_ptr());
  const char* dp = static_cast<const char*>(deltas.data_ptr());
  const int64_t ld = deltas.stride(0) * deltas.element_size();
  const float* cp = c.data_ptr<float>();
  switch (base.scalar_type()) {
    case at::kFloat: merge_run<WType::F32>(bp, dp, ld, cp, E, S, n, op.data()); break;
    case at::kHalf: merge_run<WType::F16>(bp, dp, ld, cp, E, S, n, op.data()); break;
    case at::kBFloat16: merge_run<WType::BF16>(bp, dp, ld, cp, E, S, n, op.data()); break;
    default: TORCH_CHECK(false, "merge dtype must be float32, float16 or bfloat16");
  }
}

// The rows of w - b (both (R, C), one floating dtype) as int8 with one fp32 scale per row:
// scale = max |d| * (1/127), q = round-half-even(d / scale) (d / 1 where the row is zero),
// clamped to [-127, 127]. The same fp32 operations as kernels.quantize_q8's torch path, so the
// same bits; one pass to find each row's largest magnitude and one to write it, rows over
// threads (GPT-2-small's 7+1 experts: ~0.5 GB of deltas at load).
template <WType T>
void quantize_rows(const char* w, const char* b, int64_t C, int8_t* q, float* scales,
                   int64_t r0, int64_t r1) {
  std::vector<float> d(C);
  for (int64_t r = r0; r < r1; ++r) {
    float amax = 0.0f;
    for (int64_t j = 0; j < C; ++j) {
      d[j] = load1<T>(w, r * C + j) - load1<T>(b, r * C + j);
      amax = std::max(amax, std::fabs(d[j]));
    }
    const float s = amax * (1.0f / 127.0f);
    scales[r] = s;
    const float step = s > 0.0f ? s : 1.0f;
    int8_t* qr = q + r * C;
    for (int64_t j = 0; j < C; ++j)
      qr[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(d[j] / step))));
  }
}

void quantize_q8(const at::Tensor& w, const at::Tensor& b, at::Tensor q, at::Tensor scales) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && b.is_contiguous() && w.sizes() == b.sizes() &&
              w.scalar_type() == b.scalar_type(), "quantize_q8: w and b (R, C), one layout");
  const int64_t R = w.size(0), C = w.size(1);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.numel() == R * C,
              "quantize_q8: q (R, C) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == R,
              "quantize_q8: scales (R,) float32");
  const char* wp = static_cast<const char*>(w.data_ptr());
  const char* bp = static_cast<const char*>(b.data_ptr());
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t lo, int64_t hi) {
    switch (w.scalar_type()) {
      case at::kFloat: quantize_rows<WType::F32>(wp, bp, C, qp, sp, lo, hi); break;
      case at::kHalf: quantize_rows<WType::F16>(wp, bp, C, qp, sp, lo, hi); break;
      case at::kBFloat16: quantize_rows<WType::BF16>(wp, bp, C, qp, sp, lo, hi); break;
      default: TORCH_CHECK(false, "quantize_q8: float32, float16 or bfloat16 weights");
    }
  });
}

// base (R, C) and every out (R, C) contiguous in one floating dtype, q (E, R, C) int8 and
// scales (E, R) fp32 contiguous, coeffs (S, E) fp32: outs[s] = base + sum_e coeffs[s][e] *
// scales[e][:, None] * q[e], one pass over [base; q] for all S (merge_q8_rows).
void merge_q8_many(const at::Tensor& base, const at::Tensor& q, const at::Tensor& scales,
                   const at::Tensor& coeffs, const std::vector<at::Tensor>& outs) {
  TORCH_CHECK(base.dim() == 2 && base.is_contiguous() && q.dim() == 3 && q.is_contiguous() &&
              q.scalar_type() == at::kChar && q.size(1) == base.size(0) &&
              q.size(2) == base.size(1), "merge_q8 layout: base (R, C), q (E, R, C) int8");
  const int64_t E = q.size(0), R = base.size(0), C = base.size(1);
  const int64_t S = static_cast<int64_t>(outs.size());
  TORCH_CHECK(E <= 16, "merge_q8: at most 16 deltas");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == E && scales.size(1) == R, "merge_q8 scales: (E, R) float32");
  auto c = coeffs.to(at::kFloat).contiguous();
  TORCH_CHECK(c.dim() == 2 && c.size(0) == S && c.size(1) == E,
              "one row of coefficients per output, one coefficient per delta");
  std::vector<char*> op(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(outs[s].is_contiguous() && outs[s].numel() == R * C &&
                outs[s].scalar_type() == base.scalar_type(), "merge_q8 outputs: base's layout");
    op[s] = static_cast<char*>(outs[s].data_ptr());
  }
  if (!S || !R) return;
  const char* bp = static_cast<const char*>(base.data_ptr());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t lo, int64_t hi) {
    switch (base.scalar_type()) {
      case at::kFloat: merge_q8_rows<WType::F32>(bp, qp, sp, cp, E, S, R, C, lo, hi, op.data()); break;
      case at::kHalf: merge_q8_rows<WType::F16>(bp, qp, sp, cp, E, S, R, C, lo, hi, op.data()); break;
      case at::kBFloat16: merge_q8_rows<WType::BF16>(bp, qp, sp, cp, E, S, R, C, lo, hi, op.data()); break;
      default: TORCH_CHECK(false, "merge_q8 base dtype must be float32, float16 or bfloat16");
    }
  });
}

void merge(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coeffs,
           at::Tensor out) {
  merge_many(base, deltas, coeffs.reshape({1, -1}), {out});
}

// x (B, in) fp32 contiguous; base (out * in,) and w (out, in) contiguous, deltas (E, out * in)
// with contiguous rows, one floating dtype; coeffs (E,) fp32; bias (out,) fp32 or None (the
// merged bias). Writes w = base + coeffs @ deltas (as merge()) and returns x @ w^T + bias
// (B, out) fp32.
at::Tensor merge_linear(const at::Tensor& x, const at::Tensor& base,
                        const at::Tensor& deltas, const at::Tensor& coeffs,
                        at::Tensor w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x layout");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "weight layout");
  const int64_t B = x.size(0), in = x.size(1), out = w.size(0);
  TORCH_CHECK(base.is_contiguous() && base.numel() == out * in && deltas.dim() == 2 &&
              deltas.stride(1) == 1 && deltas.size(1) == out * in, "merge layout");
  TORCH_CHECK(base.scalar_type() == deltas.scalar_type() && w.scalar_type() == base.scalar_type(),
              "merge dtypes");
  auto c = coeffs.to(at::kFloat).contiguous();
  const int64_t E = deltas.size(0);
  TORCH_CHECK(c.numel() == E, "one coefficient per delta");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({B, out}, x.options());
  const char* bp = static_cast<const char*>(base.data_ptr());
  const char* dp = static_cast<const char*>(deltas.data_ptr());
  char* wp = static_cast<char*>(w.data_ptr());
  const int64_t ld = deltas.stride(0) * deltas.element_size();
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: merge_linear_run<WType::F32>(xp, B, in, bp, dp, ld, cp, E, wp, out, b, yp); break;
    case at::kHalf: merge_linear_run<WType::F16>(xp, B, in, bp, dp, ld, cp, E, wp, out, b, yp); break;
    case at::kBFloat16: merge_linear_run<WType::BF16>(xp, B, in, bp, dp, ld, cp, E, wp, out, b, yp); break;
    default: TORCH_CHECK(false, "weight dtype must be float32, float16 or bfloat16");
  }
  return y;
}

void linear_into(const float* x, int64_t B, int64_t ldx, const at::Tensor& w,
                 const float* bias, float* y);

// linear's and linear_tiles' arguments: x (B, in) fp32, w (out, in), unit stride in the last dims
static void check_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1 && w.stride(1) == 1, "layout");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu only");
}

// x (B, in) fp32 with unit stride in its last dim; w (out, in) fp32/fp16/bf16 with unit stride
// in its last dim; bias (out,) fp32 or None. Returns y (B, out) fp32 (linear_into: bf16 weights
// from bf16_dot_from rows by the bf16 dot kernel, as ffn and merge_linear compute them).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w,
                  const c10::optional<at::Tensor>& bias) {
  check_linear(x, w);
  const int64_t B = x.size(0), out = w.size(0);
  auto y = at::empty({B, out}, x.options());
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous(), "bias");
    b = bias->data_ptr<float>();
  }
  TORCH_CHECK(b == nullptr || bias->numel() == out, "bias");
  linear_into(x.data_ptr<float>(), B, x.stride(0), w, b, y.data_ptr<float>());
  return y;
}

// x (B, in) fp32 with unit stride in its last dim; w (out, in) fp32/fp16/bf16 with unit stride
// in its last dim; bias (out,) fp32 or None. Returns y (B, out) = x @ w^T + bias by the prompt
// tiles (tiles_run): any row count, each output's bits independent of the other rows.
const float* fp32_or_null(const c10::optional<at::Tensor>& t, int64_t n, const char* what);

at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias) {
  check_linear(x, w);
  const int64_t B = x.size(0), in = w.size(1), out = w.size(0);
  auto y = at::empty({B, out}, x.options());
  const float* b = fp32_or_null(bias, out, "bias");
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t ldw = w.stride(0) * w.element_size();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: tiles_run<WType::F32>(xp, B, x.stride(0), in, wp, ldw, out, b, yp); break;
    case at::kHalf: tiles_run<WType::F16>(xp, B, x.stride(0), in, wp, ldw, out, b, yp); break;
    case at::kBFloat16: tiles_run<WType::BF16>(xp, B, x.stride(0), in, wp, ldw, out, b, yp); break;
    default: TORCH_CHECK(false, "weight dtype must be float32, float16 or bfloat16");
  }
  return y;
}

// One decode step's attention for B rows, fp32: writes each row's new key and value into the
// cache at (layer, slot, :, pos), then attends over that row's positions [0, pos] — or, with
// a window w > 0 (sliding-window attention), [max(0, pos + 1 - w), pos] — a ragged batch
// needs no mask, and each row's result does not depend on the others. Query heads share
// key/value heads in groups (H / KV); sinks (H floats, or null) join each head's softmax. Row b's
// query head h is at q + b * qs + h * qh, its new
// key/value head g at k + b * ks + g * kh (v alike); K / V (n_layer, S, KV, max_len, hd)
// contiguous; out (B, H, hd) contiguous.
void attend_rows(const float* q, int64_t qs, int64_t qh, const float* k, int64_t ks, int64_t kh,
                 const float* v, int64_t vs, int64_t vh, float* K, float* V, int64_t S, int64_t max_len, int64_t layer,
                 const int64_t* slp, const int64_t* pp, int64_t B, int64_t H, int64_t KV,
                 int64_t hd, float* op, int64_t window, float softcap, const float* sinks) {
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    longest = std::max(longest, pp[b] + 1);
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t at = (((layer * S + slp[b]) * KV + g) * max_len + pp[b]) * hd;
      std::memcpy(K + at, k + b * ks + g * kh, hd * 4);
      std::memcpy(V + at, v + b * vs + g * vh, hd * 4);
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t group = H / KV;
  // a thread per ~64k multiply-adds at least: short contexts are cheaper on one thread than
  // waking another
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * longest * hd));
  at::parallel_for(0, B * H, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(longest);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / H, h = t % H, g = h / group;
      const int64_t first = window > 0 ? std::max<int64_t>(0, pp[b] + 1 - window) : 0;
      const int64_t base = (((layer * S + slp[b]) * KV + g) * max_len + first) * hd;
      attend_one(q + b * qs + h * qh, K + base, V + base, pp[b] + 1 - first, hd, scale,
                 softcap, sinks != nullptr ? sinks + h : nullptr, s.data(), op + t * hd);
    }
  });
}

void check_cache(const at::Tensor& kc, const at::Tensor& vc) {
  TORCH_CHECK(kc.dim() == 5 && vc.sizes() == kc.sizes(), "KV cache: (n_layer, slots, KV, max_len, hd)");
  TORCH_CHECK(kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat &&
              kc.is_contiguous() && vc.is_contiguous(), "KV cache: contiguous fp32");
}

// slots and positions as int64 (B,), each checked against the cache.
std::pair<at::Tensor, at::Tensor> rows_of(const at::Tensor& slots,
                                          const at::Tensor& positions, int64_t B,
                                          const at::Tensor& kc) {
  auto sl = slots.to(at::kLong).contiguous(), ps = positions.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == B && ps.numel() == B, "one slot and position per row");
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slp[b] >= 0 && slp[b] < kc.size(1) && pp[b] >= 0 && pp[b] < kc.size(3),
                "slot or position");
  return {sl, ps};
}

// q (B, H, hd), k_new / v_new (B, KV, hd) with unit stride in hd; kc / vc (n_layer, S, KV,
// max_len, hd) contiguous; slots, positions (B,) int64. Returns (B, H, hd).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                            const at::Tensor& v_new, at::Tensor kc, at::Tensor vc,
                            int64_t layer, const at::Tensor& slots,
                            const at::Tensor& positions, int64_t window, double softcap,
                            const c10::optional<at::Tensor>& sinks) {
  TORCH_CHECK(window >= 0, "window: 0 (none) or the positions a query sees");
  TORCH_CHECK(softcap >= 0, "softcap: 0 (none) or the cap of the scores");
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3, "decode_attention shapes");
  check_cache(kc, vc);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_new.scalar_type() == at::kFloat &&
              v_new.scalar_type() == at::kFloat, "decode_attention is fp32");
  TORCH_CHECK(q.stride(2) == 1 && k_new.stride(2) == 1 && v_new.stride(2) == 1,
              "decode_attention layout");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), KV = k_new.size(1);
  TORCH_CHECK(kc.size(2) == KV && kc.size(4) == hd && k_new.size(0) == B && v_new.size(0) == B &&
              v_new.size(1) == KV && H % KV == 0 && layer >= 0 && layer < kc.size(0),
              "decode_attention sizes");
  auto [sl, ps] = rows_of(slots, positions, B, kc);
  auto out = at::empty({B, H, hd}, q.options());
  attend_rows(q.data_ptr<float>(), q.stride(0), q.stride(1), k_new.data_ptr<float>(),
              k_new.stride(0), k_new.stride(1), v_new.data_ptr<float>(), v_new.stride(0),
              v_new.stride(1), kc.data_ptr<float>(),
              vc.data_ptr<float>(), kc.size(1), kc.size(3), layer, sl.data_ptr<int64_t>(),
              ps.data_ptr<int64_t>(), B, H, KV, hd, out.data_ptr<float>(), window,
              static_cast<float>(softcap), fp32_or_null(sinks, H, "attention sinks"));
  return out;
}

// ---- fused decode blocks ---------------------------------------------------------------------
// A decode step through a pre-norm block is a dozen small operations around its products; from
// Python each costs an interpreter round trip and a dispatch (~2.5 ms of a 13 ms GPT-2-small
// bf16 step on one core). These run a block's attention half and FFN half in one call each,
// every row on its own (so a row's result does not depend on its batch), with the linear
// kernel above for the products.

// y (B, out) = x (B, in) @ w^T + bias, any weight dtype the linear kernel takes
void linear_into(const float* x, int64_t B, int64_t ldx, const at::Tensor& w,
                 const float* bias, float* y) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.device().is_cpu(), "weight layout");
  const int64_t in = w.size(1), out = w.size(0);
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t ldw = w.stride(0) * w.element_size();
  switch (w.scalar_type()) {
    case at::kFloat: run<WType::F32>(x, B, ldx, in, wp, ldw, out, bias, y); break;
    case at::kHalf: run<WType::F16>(x, B, ldx, in, wp, ldw, out, bias, y); break;
    case at::kBFloat16:  // the dot kernel reads rows back to back (a pool entry's layout)
      if (dot_for_bf16(B) && ldw == in * 2)
        linear_dot(x, B, ldx, in, reinterpret_cast<const uint16_t*>(wp), out, bias, y);
      else
        run<WType::BF16>(x, B, ldx, in, wp, ldw, out, bias, y);
      break;
    default: TORCH_CHECK(false, "weight dtype must be float32, float16 or bfloat16");
  }
}

const float* fp32_or_null(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, what,
              ": ", n, " contiguous fp32 values");
  return t->data_ptr<float>();
}

// y = norm(x) per row of d: LayerNorm (x - mean) / sqrt(var + eps) * w + b (b may be null)
// when `layer_norm`, else RMSNorm x / sqrt(mean(x^2) + eps) * w. Statistics in double.
void norm_rows(const float* x, int64_t B, int64_t d, const float* w, const float* b,
               bool layer_norm, double eps, float* y) {
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < d; ++i) {
      sum += xr[i];
      sq += static_cast<double>(xr[i]) * xr[i];
    }
    if (layer_norm) {
      const double mean = sum / d, var = std::max(0.0, sq / d - mean * mean);
      const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      for (int64_t i = 0; i < d; ++i)
        yr[i] = (xr[i] - m) * rstd * w[i] + (b != nullptr ? b[i] : 0.f);
    } else {
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / d + eps));
      for (int64_t i = 0; i < d; ++i) yr[i] = w[i] * (xr[i] * rstd);
    }
  }
}

// exp(x) for any x (overflow clamped at e^88, underflow at e^-87.3)
inline __m256 exp8_any(__m256 x) { return exp8(_mm256_min_ps(x, _mm256_set1_ps(88.f))); }

// out[i] = op(a[i], b[i]) for i < n (b: a second input, or `a` again for a function of one),
// 8 lanes at a time; the last n % 8 go through the same vector code on a zero-padded copy, so an
// element's bits depend neither on where it stands nor on how the range is split (over rows,
// over threads). `out` may be `a` or `b`.
template <typename Op>
inline void map8(const float* a, const float* b, float* out, int64_t n, Op op) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, op(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  if (i < n) {
    alignas(32) float ta[8] = {}, tb[8] = {}, to[8];
    std::memcpy(ta, a + i, (n - i) * sizeof(float));
    std::memcpy(tb, b + i, (n - i) * sizeof(float));
    _mm256_store_ps(to, op(_mm256_load_ps(ta), _mm256_load_ps(tb)));
    std::memcpy(out + i, to, (n - i) * sizeof(float));
  }
}

// GPT-2's GELU (tanh approximation): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with
// tanh(u) = sign(u) (1 - e^(-2|u|)) / (1 + e^(-2|u|))
inline __m256 gelu8(__m256 v) {
  const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
  const __m256 t = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, u)));
  __m256 th = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
  th = _mm256_or_ps(th, _mm256_and_ps(sign, u));
  return _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, th));
}

// silu(g) = g / (1 + e^-g)
inline __m256 silu8(__m256 g) {
  const __m256 e = exp8_any(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// The hidden function of an FFN, elementwise: kind 0 silu(gate) * up (SwiGLU), 1
// gelu_tanh(gate) * up (GeGLU, Gemma), 2 GPT-OSS's clamped SwiGLU (with its limit and slope),
// 3 gelu_tanh(x) alone (GPT-2; no up)
struct Gate {
  int64_t kind = 0;
  float limit = 0.f, alpha = 0.f;
};
constexpr int64_t GELU_ALONE = 3;

// GPT-OSS's clamped SwiGLU: (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g), g =
// min(gate, limit) (transformers' order: the sigmoid's product first)
inline __m256 clamped_swiglu8(__m256 gate, __m256 up, __m256 hi, __m256 lo, __m256 a) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 g = _mm256_min_ps(gate, hi);
  const __m256 u = _mm256_max_ps(_mm256_min_ps(up, hi), lo);
  const __m256 e = exp8_any(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(g, a)));
  const __m256 glu = _mm256_mul_ps(g, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  return _mm256_mul_ps(_mm256_add_ps(u, one), glu);
}

// out[i] = the hidden function of gate[i] (and up[i]) for i < n, on this thread; `out` may be
// `gate` or `up` (GELU_ALONE: `up` is not read, pass `gate`)
void gate_mul(const Gate& g, const float* gate, const float* up, float* out, int64_t n) {
  switch (g.kind) {
    case GELU_ALONE:
      map8(gate, gate, out, n, [](__m256 v, __m256) { return gelu8(v); });
      break;
    case 1:
      map8(gate, up, out, n, [](__m256 v, __m256 u) { return _mm256_mul_ps(gelu8(v), u); });
      break;
    case 2: {
      const __m256 hi = _mm256_set1_ps(g.limit), lo = _mm256_set1_ps(-g.limit);
      const __m256 a = _mm256_set1_ps(g.alpha);
      map8(gate, up, out, n,
           [&](__m256 v, __m256 u) { return clamped_swiglu8(v, u, hi, lo, a); });
      break;
    }
    default:
      map8(gate, up, out, n, [](__m256 v, __m256 u) { return _mm256_mul_ps(silu8(v), u); });
  }
}

// Elements per task when a hidden function is split over torch's intra-op threads (~1.7 ns an
// element for GELU on a Zen 3 core: ~50 us a task, against a few us to wake a thread)
constexpr int64_t HIDDEN_GRAIN = 32768;

// gate_mul over n elements, split over threads (the same bits: map8)
void gate_mul_parallel(const Gate& g, const float* gate, const float* up, float* out, int64_t n) {
  at::parallel_for(0, n, HIDDEN_GRAIN, [&](int64_t lo, int64_t hi) {
    gate_mul(g, gate + lo, up + lo, out + lo, hi - lo);
  });
}

// GELU in place over n values
void gelu_tanh(float* x, int64_t n) { gate_mul_parallel(Gate{GELU_ALONE}, x, x, x, n); }

// out (B, f) = the gated hidden function of u (B, 2f), [gate; up] in each row (a merged
// expert's serving layout), rows split over threads
void gate_mul_stacked(const Gate& g, const float* u, int64_t B, int64_t f, float* out) {
  at::parallel_for(0, B, std::max<int64_t>(1, HIDDEN_GRAIN / std::max<int64_t>(1, f)),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) gate_mul(g, u + b * 2 * f, u + b * 2 * f + f, out + b * f, f);
  });
}

Gate gate_of(int64_t kind, double limit, double alpha) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "gate: 0 silu, 1 gelu_tanh, 2 clamped SwiGLU");
  TORCH_CHECK(kind != 2 || (limit > 0 && alpha > 0), "clamped SwiGLU: a positive limit and slope");
  return Gate{kind, static_cast<float>(limit), static_cast<float>(alpha)};
}

// rotary positions in place on one head's first `rot` values: x * cos + rotate_half(x) * sin
inline void rotate(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
  }
}

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
              x.device().is_cpu(), "x: (B, d) contiguous fp32 on the CPU");
}

// y = norm(x) with weight `w` (and bias `b`), or a copy of x where there is no norm (w
// undefined: OLMo 2's blocks have no pre-norm).
void norm_or_copy(const float* x, int64_t B, int64_t d, const c10::optional<at::Tensor>& w,
                  const c10::optional<at::Tensor>& b, bool rms, double eps, float* y) {
  const float* wp = fp32_or_null(w, d, "norm weight");
  if (wp == nullptr) {
    std::memcpy(y, x, B * d * sizeof(float));
    return;
  }
  norm_rows(x, B, d, wp, fp32_or_null(b, d, "norm bias"), !rms, eps, y);
}

// Row-wise norm of x (B, d): LayerNorm with `bias` (or none), or RMSNorm (rms = true).
at::Tensor norm(const at::Tensor& x, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_rows(x);
  const int64_t B = x.size(0), d = x.size(1);
  auto y = at::empty_like(x);
  norm_rows(x.data_ptr<float>(), B, d, fp32_or_null(weight, d, "norm weight"),
            fp32_or_null(bias, d, "norm bias"), !rms, eps, y.data_ptr<float>());
  return y;
}

// x (B, d) + o_proj(attention(qkv_proj(norm(x)))) for one decode token per row: the fused qkv
// projection (rows: H query heads, KV key heads, KV value heads of hd), when q_norm / k_norm
// are given an RMSNorm (eps: the block norm's) of every query / key head with those (hd,)
// weights (Qwen3), rotary positions from the cos / sin tables (max_pos, rot) when given, the
// keys and values written into the cache at (layer, slot, :, position), each row attending
// over its own positions (the last `window` of them when window > 0), its scores capped at
// ±softcap when softcap > 0, each head's sink (sinks: (H,), GPT-OSS) in its softmax when given;
// with norm_after_rope the per-head q/k norms apply to the rotated heads (Hunyuan).
// Without norm_w the block has no pre-norm (OLMo 2: x itself goes
// into the projection); q_norm / k_norm of H * hd / KV * hd values norm all query / key heads
// of a row together (OLMo 2) instead of each head.
at::Tensor attn_block(const at::Tensor& x, const c10::optional<at::Tensor>& norm_w,
                      const c10::optional<at::Tensor>& norm_b, double eps, bool rms,
                      const at::Tensor& w_qkv, const c10::optional<at::Tensor>& b_qkv,
                      const at::Tensor& w_o, const c10::optional<at::Tensor>& b_o,
                      const c10::optional<at::Tensor>& q_norm,
                      const c10::optional<at::Tensor>& k_norm,
                      at::Tensor kc, at::Tensor vc, int64_t layer,
                      const at::Tensor& slots, const at::Tensor& positions,
                      const c10::optional<at::Tensor>& cos,
                      const c10::optional<at::Tensor>& sin, int64_t H, int64_t KV,
                      int64_t window, const c10::optional<at::Tensor>& out_norm, double softcap,
                      const c10::optional<at::Tensor>& sinks, bool norm_after_rope) {
  check_rows(x);
  check_cache(kc, vc);
  TORCH_CHECK(window >= 0, "window: 0 (none) or the positions a query sees");
  TORCH_CHECK(softcap >= 0, "softcap: 0 (none) or the cap of the scores");
  const int64_t B = x.size(0), d = x.size(1), hd = kc.size(4);
  TORCH_CHECK(kc.size(2) == KV && H % KV == 0 && layer >= 0 && layer < kc.size(0) &&
              w_qkv.size(0) == (H + 2 * KV) * hd && w_qkv.size(1) == d &&
              w_o.size(0) == d && w_o.size(1) == H * hd, "attn_block sizes");
  auto [sl, ps] = rows_of(slots, positions, B, kc);
  const int64_t* pp = ps.data_ptr<int64_t>();
  const int64_t nq = (H + 2 * KV) * hd;
  auto h = at::empty({B, d}, x.options());
  auto qkv = at::empty({B, nq}, x.options());
  auto o = at::empty({B, H * hd}, x.options());
  auto y = at::empty({B, d}, x.options());
  norm_or_copy(x.data_ptr<float>(), B, d, norm_w, norm_b, rms, eps, h.data_ptr<float>());
  linear_into(h.data_ptr<float>(), B, d, w_qkv, fp32_or_null(b_qkv, nq, "qkv bias"),
              qkv.data_ptr<float>());
  float* qp = qkv.data_ptr<float>();
  const bool all_heads = q_norm.has_value() && q_norm->defined() && H > 1 &&
                         q_norm->numel() == H * hd;
  const float* qn = fp32_or_null(q_norm, all_heads ? H * hd : hd, "q_norm weight");
  const float* kn = fp32_or_null(k_norm, all_heads ? KV * hd : hd, "k_norm weight");
  TORCH_CHECK((qn == nullptr) == (kn == nullptr), "q_norm and k_norm come together");
  if (qn != nullptr && all_heads) {  // in place, as below: queries together, then keys
    for (int64_t b = 0; b < B; ++b) {
      norm_rows(qp + b * nq, 1, H * hd, qn, nullptr, false, eps, qp + b * nq);
      norm_rows(qp + b * nq + H * hd, 1, KV * hd, kn, nullptr, false, eps, qp + b * nq + H * hd);
    }
  }
  auto head_norms = [&]() {  // in place: norm_rows reads a head's statistics before it writes
    for (int64_t b = 0; b < B; ++b)
      for (int64_t head = 0; head < H + KV; ++head) {
        float* hp = qp + b * nq + head * hd;
        norm_rows(hp, 1, hd, head < H ? qn : kn, nullptr, false, eps, hp);
      }
  };
  if (qn != nullptr && !all_heads && !norm_after_rope) head_norms();
  if (cos.has_value() && cos->defined()) {
    TORCH_CHECK(sin.has_value() && sin->defined() && cos->dim() == 2 && sin->sizes() == cos->sizes() &&
                cos->is_contiguous() && sin->is_contiguous() && cos->scalar_type() == at::kFloat &&
                sin->scalar_type() == at::kFloat && cos->size(1) <= hd && cos->size(1) % 2 == 0,
                "rotary tables: (max_pos, rot) contiguous fp32, rot even and <= head_dim");
    const int64_t rot = cos->size(1);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pp[b] < cos->size(0), "position beyond the rotary tables");
      const float* c = cos->data_ptr<float>() + pp[b] * rot;
      const float* s = sin->data_ptr<float>() + pp[b] * rot;
      for (int64_t head = 0; head < H + KV; ++head) rotate(qp + b * nq + head * hd, c, s, rot);
    }
  }
  if (qn != nullptr && !all_heads && norm_after_rope) head_norms();  // (Hunyuan)
  attend_rows(qp, nq, hd, qp + H * hd, nq, hd, qp + (H + KV) * hd, nq, hd, kc.data_ptr<float>(),
              vc.data_ptr<float>(), kc.size(1), kc.size(3), layer, sl.data_ptr<int64_t>(), pp,
              B, H, KV, hd, o.data_ptr<float>(), window, static_cast<float>(softcap),
              fp32_or_null(sinks, H, "attention sinks"));
  linear_into(o.data_ptr<float>(), B, H * hd, w_o, fp32_or_null(b_o, d, "o bias"),
              y.data_ptr<float>());
  float* yp = y.data_ptr<float>();
  const float* on = fp32_or_null(out_norm, d, "attention output norm weight");
  if (on != nullptr) norm_rows(yp, B, d, on, nullptr, !rms, eps, yp);  // Gemma: in place
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < B * d; ++i) yp[i] += xp[i];
  return y;
}

// y (B, d) = down(hidden(up(h))) for h (B, d): GPT-2's GELU FFN, or a gated one (SwiGLU,
// silu(gate(h)) * up(h), or the `gate`'s other kinds), with the gate either its own matrix
// (w_gate) or, `stacked`, the first half of w_up's rows (the serving layout of a merged expert:
// [gate; up] as one matrix).
void ffn_into(const float* h, int64_t B, int64_t d, const c10::optional<at::Tensor>& w_gate,
              const c10::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
              const c10::optional<at::Tensor>& b_up, const at::Tensor& w_down,
              const c10::optional<at::Tensor>& b_down, bool stacked, float* y,
              const Gate& gate = Gate{}) {
  const bool gate_matrix = w_gate.has_value() && w_gate->defined();
  TORCH_CHECK(!(gate_matrix && stacked), "a gate matrix or a stacked gate, not both");
  const int64_t rows = w_up.size(0), f = stacked ? rows / 2 : rows;
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == d && w_down.dim() == 2 && w_down.size(0) == d &&
              w_down.size(1) == f && (!stacked || rows % 2 == 0) &&
              (!gate_matrix || (w_gate->size(0) == f && w_gate->size(1) == d)), "ffn sizes");
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto u = at::empty({B, rows}, opts);
  float* up = u.data_ptr<float>();
  linear_into(h, B, d, w_up, fp32_or_null(b_up, rows, "up bias"), up);
  at::Tensor hid_t;
  const float* hid = up;
  if (gate_matrix) {
    auto g = at::empty({B, f}, opts);
    linear_into(h, B, d, *w_gate, fp32_or_null(b_gate, f, "gate bias"), g.data_ptr<float>());
    gate_mul_parallel(gate, g.data_ptr<float>(), up, up, B * f);
  } else if (stacked) {
    hid_t = at::empty({B, f}, opts);
    gate_mul_stacked(gate, up, B, f, hid_t.data_ptr<float>());
    hid = hid_t.data_ptr<float>();
  } else {
    gelu_tanh(up, B * f);
  }
  linear_into(hid, B, f, w_down, fp32_or_null(b_down, d, "down bias"), y);
}

// FFN(h) for h (B, d) with [gate; up] stacked in w1 when `glu` (the gate of kind `gate`, see
// Gate; `limit` and `alpha` for the clamped SwiGLU), else GELU (a merged expert from the pool,
// merge_cache's layout)
at::Tensor ffn(const at::Tensor& h, const at::Tensor& w1,
               const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
               const c10::optional<at::Tensor>& b2, bool glu, int64_t gate, double limit,
               double alpha) {
  check_rows(h);
  const int64_t B = h.size(0), d = h.size(1);
  auto y = at::empty({B, d}, h.options());
  ffn_into(h.data_ptr<float>(), B, d, c10::nullopt, c10::nullopt, w1, b1, w2, b2, glu,
           y.data_ptr<float>(), gate_of(gate, limit, alpha));
  return y;
}

// The FFN's hidden function alone, as ffn() applies it: u (B, f) -> GELU(u), or u (B, 2f) with
// [gate; up] per row -> silu(gate) * up (B, f), when `glu` (the gate of kind `gate`). For a
// product made elsewhere (merge_linear, a prompt chunk's GEMM) that must give ffn()'s bits.
at::Tensor hidden(const at::Tensor& u, bool glu, int64_t gate, double limit, double alpha) {
  check_rows(u);
  const Gate g = gate_of(gate, limit, alpha);
  const int64_t B = u.size(0), rows = u.size(1), f = glu ? rows / 2 : rows;
  TORCH_CHECK(!glu || rows % 2 == 0, "a stacked gate needs an even width");
  auto out = at::empty({B, f}, u.options());
  const float* up = u.data_ptr<float>();
  if (glu)
    gate_mul_stacked(g, up, B, f, out.data_ptr<float>());
  else
    gate_mul_parallel(Gate{GELU_ALONE}, up, up, out.data_ptr<float>(), B * f);
  return out;
}

// The gated hidden function of a gate and an up projection made apart (a dense FFN's
// gate_proj and up_proj): gate, up (B, f) -> (B, f), the bits ffn() gives with a gate matrix.
at::Tensor hidden_pair(const at::Tensor& gate, const at::Tensor& up, int64_t kind, double limit,
                       double alpha) {
  check_rows(gate);
  check_rows(up);
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up: the same shape");
  auto out = at::empty_like(gate);
  gate_mul_parallel(gate_of(kind, limit, alpha), gate.data_ptr<float>(), up.data_ptr<float>(),
                    out.data_ptr<float>(), gate.numel());
  return out;
}


const at::Tensor& given(const OptT& t, const char* what) {
  TORCH_CHECK(t.has_value() && t->defined(), what, " is required");
  return *t;
}

// A span of pre-norm blocks for one decode token per row, in one call: one release of the GIL
// for the whole span instead of two per block, so the server's event loop thread sends the
// previous token while the weights stream, and the decode thread does not queue for the GIL
// behind it after every block. Per block i (layer ints[10i]):
//   x = attn_block(x)                               (blocks[i][0..7]: norm, qkv, o, q/k norms;
//                                                    [10]: the attention output's norm, Gemma;
//                                                    [12]: the heads' sinks, GPT-OSS)
//   h = norm2(x)                                    (blocks[i][8..9]; no weight: h = x, and
//                                                    none in [0] either: OLMo 2's blocks)
//   seg_sum[acc_slots[i][b], ints[10i+4]] += h[b]   (rows b with acc_slots[i][b] >= 0, if given)
//   x = x + [norm(]FFN_g(h)[)] on the rows of each  (ffns[i]: rows (none: all), gate, gate bias,
//       group g, normed by blocks[i][11] if given    up, up bias, down, down bias)
// ints per block: layer, norm1 is RMS, norm2 is RMS, [gate; up] stacked in `up`, MoE index,
// attention window (0: none), rotary positions (0: none in this block, NoPE), a gated FFN's
// gate (Gate: 0 SwiGLU, 1 GeGLU, 2 the clamped SwiGLU with swiglu_limit and swiglu_alpha), the
// local rotary tables (1: cos_local / sin_local, Gemma 3), per-head q/k norms after the rotation
// (1, Hunyuan); eps per block: norm1's, norm2's.
// Each row's FFN comes from exactly one group: a dense block has one group of all rows, a
// merged-expert block a group per merged expert its rows use. With final_w, the result goes
// through the model's final norm; softcap > 0 caps every block's attention scores (Gemma 2).
// The same arithmetic as
// attn_block + norm + ffn + add called one by one, so the same bits.
at::Tensor layers(at::Tensor x, const std::vector<std::vector<OptT>>& blocks,
                  const std::vector<double>& eps, const std::vector<int64_t>& ints,
                  const std::vector<std::vector<std::vector<OptT>>>& ffns,
                  const std::vector<OptT>& acc_slots, const OptT& seg_sum, at::Tensor kc,
                  at::Tensor vc, const at::Tensor& slots,
                  const at::Tensor& positions, const OptT& cos, const OptT& sin,
                  const OptT& cos_local, const OptT& sin_local,
                  int64_t H, int64_t KV, const OptT& final_w, const OptT& final_b,
                  double final_eps, bool final_rms, double softcap, double swiglu_limit,
                  double swiglu_alpha) {
  check_rows(x);
  const size_t L = blocks.size();
  TORCH_CHECK(eps.size() == 2 * L && ints.size() == 10 * L && ffns.size() == L &&
              acc_slots.size() == L, "layers: one entry per block in every list");
  const int64_t B = x.size(0), d = x.size(1);
  std::vector<char> seen(B);
  for (size_t i = 0; i < L; ++i) {
    const auto& k = blocks[i];
    TORCH_CHECK(k.size() == 13, "layers: 13 tensors per block");
    const int64_t* f = ints.data() + 10 * i;
    const OptT& c = f[8] ? cos_local : cos;
    const OptT& s = f[8] ? sin_local : sin;
    x = attn_block(x, k[0], k[1], eps[2 * i], f[1] != 0,
                   given(k[2], "qkv weight"), k[3], given(k[4], "o weight"), k[5], k[6], k[7],
                   kc, vc, f[0], slots, positions, f[6] ? c : OptT(), f[6] ? s : OptT(), H,
                   KV, f[5], k[10], softcap, k[12], f[9] != 0);
    auto h = at::empty({B, d}, x.options());
    float* hp = h.data_ptr<float>();
    norm_or_copy(x.data_ptr<float>(), B, d, k[8], k[9], f[2] != 0, eps[2 * i + 1], hp);
    if (acc_slots[i].has_value() && acc_slots[i]->defined()) {
      const auto& a = *acc_slots[i];
      const auto& sum = given(seg_sum, "seg_sum");
      TORCH_CHECK(a.scalar_type() == at::kLong && a.is_contiguous() && a.numel() == B,
                  "acc_slots: (B,) int64");
      TORCH_CHECK(sum.scalar_type() == at::kFloat && sum.is_contiguous() && sum.dim() == 3 &&
                  sum.size(2) == d && f[4] >= 0 && f[4] < sum.size(1),
                  "seg_sum: (slots, MoE layers, d) contiguous fp32");
      const int64_t* ap = a.data_ptr<int64_t>();
      float* sp = sum.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        if (ap[b] < 0) continue;
        TORCH_CHECK(ap[b] < sum.size(0), "acc_slots: slot out of range");
        float* dst = sp + (ap[b] * sum.size(1) + f[4]) * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += hp[b * d + j];
      }
    }
    auto y = at::empty({B, d}, x.options());
    float* yp = y.data_ptr<float>();
    std::fill(seen.begin(), seen.end(), 0);
    for (const auto& g : ffns[i]) {
      TORCH_CHECK(g.size() == 7, "layers: 7 entries per FFN group");
      const auto& up = given(g[3], "up weight");
      const auto& down = given(g[5], "down weight");
      if (!(g[0].has_value() && g[0]->defined())) {  // all rows
        TORCH_CHECK(ffns[i].size() == 1, "an all-rows FFN group must be the only one");
        std::fill(seen.begin(), seen.end(), 1);
        ffn_into(hp, B, d, g[1], g[2], up, g[4], down, g[6], f[3] != 0, yp,
                 gate_of(f[7], swiglu_limit, swiglu_alpha));
        continue;
      }
      const auto& rows = *g[0];
      TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1 &&
                  rows.numel() > 0 && rows.numel() <= B, "FFN group rows: (n,) int64");
      const int64_t n = rows.numel();
      const int64_t* rp = rows.data_ptr<int64_t>();
      auto hg = at::empty({n, d}, x.options());
      auto yg = at::empty({n, d}, x.options());
      for (int64_t r = 0; r < n; ++r) {
        TORCH_CHECK(rp[r] >= 0 && rp[r] < B && !seen[rp[r]], "FFN groups: each row once");
        seen[rp[r]] = 1;
        std::memcpy(hg.data_ptr<float>() + r * d, hp + rp[r] * d, d * sizeof(float));
      }
      ffn_into(hg.data_ptr<float>(), n, d, g[1], g[2], up, g[4], down, g[6], f[3] != 0,
               yg.data_ptr<float>(), gate_of(f[7], swiglu_limit, swiglu_alpha));
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(yp + rp[r] * d, yg.data_ptr<float>() + r * d, d * sizeof(float));
    }
    TORCH_CHECK(std::all_of(seen.begin(), seen.end(), [](char c) { return c != 0; }),
                "FFN groups: every row in one");
    const float* fn = fp32_or_null(k[11], d, "FFN output norm weight");
    if (fn != nullptr) norm_rows(yp, B, d, fn, nullptr, f[2] == 0, eps[2 * i + 1], yp);
    const float* xp = x.data_ptr<float>();
    for (int64_t j = 0; j < B * d; ++j) yp[j] += xp[j];
    x = y;
  }
  if (final_w.has_value() && final_w->defined()) {
    auto y = at::empty_like(x);
    norm_rows(x.data_ptr<float>(), B, d, fp32_or_null(*final_w, d, "norm weight"),
              fp32_or_null(final_b, d, "norm bias"), !final_rms, final_eps, y.data_ptr<float>());
    return y;
  }
  return x;
}

// "avx512" or "avx2": the instruction set linear() uses; "auto" picks the widest this CPU has.
std::string set_isa(const std::string& isa, int64_t rows) {
  TORCH_CHECK(isa == "auto" || isa == "avx2" || isa == "avx512", "isa: auto, avx2 or avx512");
  TORCH_CHECK(isa != "avx512" || has_avx512(), "this CPU has no AVX-512 (F, BW, DQ, VL)");
  TORCH_CHECK(rows == 0 || rows == 1 || rows == 2 || rows == 4, "rows: 0 (by batch size), 1, 2 or 4");
  use_avx512 = isa == "avx2" ? false : has_avx512();
  avx512_rows_override = static_cast<int>(rows);
  return use_avx512 ? "avx512" : "avx2";
}

// From how many rows bf16 weights' products go to the bf16 dot kernel (0: never); returns it.
int64_t set_bf16_dot(int64_t from) {
  TORCH_CHECK(from >= 0, "set_bf16_dot: a row count, 0 for never");
  TORCH_CHECK(from == 0 || has_avx512_bf16(), "this CPU has no AVX512-BF16");
  bf16_dot_from = from;
  return bf16_dot_from;
}


// For which row counts [from, to] weights of `kind` ("fp32", "fp16", "bf16") get the prompt
// tiles inside linear and merge_linear (from 0: never); returns from.
// tiles_from / tiles_to's index of a kind of weights
static int tile_kind(const std::string& kind) {
  TORCH_CHECK(kind == "fp32" || kind == "fp16" || kind == "bf16",
              "tiles: kind \"fp32\", \"fp16\" or \"bf16\"");
  return kind == "fp32" ? 0 : kind == "fp16" ? 1 : 2;
}

int64_t set_tiles(const std::string& kind, int64_t from, int64_t to) {
  const int k = tile_kind(kind);
  TORCH_CHECK(from >= 0 && (from == 0 || to >= from), "set_tiles: rows from <= to, from 0 for never");
  tiles_from[k] = from;
  tiles_to[k] = from == 0 ? 0 : to;
  return from;
}

// "avx512" or "avx2": the vectors of the prompt tiles (the same bits either way); returns it.
std::string set_tiles_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512", "set_tiles_isa: \"avx2\" or \"avx512\"");
  TORCH_CHECK(isa == "avx2" || has_avx512(), "this CPU has no AVX-512 (F, BW, DQ, VL)");
  tiles_avx512 = isa == "avx512";
  return tiles_isa();
}

std::string tiles_isa() { return tiles_avx512 ? "avx512" : "avx2"; }

std::tuple<int64_t, int64_t> tiles(const std::string& kind) {
  const int k = tile_kind(kind);
  return {tiles_from[k], tiles_to[k]};
}

// Bytes ahead of the read position that the AVX2 kernel prefetches for one input with 16-bit
// weights (0: none); returns it.
int64_t set_single_prefetch(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= 65536, "set_single_prefetch: 0 to 65536 bytes");
  single_prefetch = bytes;
  return single_prefetch;
}

// Bytes ahead of the read position that merges prefetch in every stream of the stack (AVX-512
// loops; 0: none), for stacks of `weights` ("fp32", "16bit"; "": both); returns it.
int64_t set_merge_prefetch(int64_t bytes, const std::string& weights) {
  TORCH_CHECK(bytes >= 0 && bytes <= 65536, "set_merge_prefetch: 0 to 65536 bytes");
  TORCH_CHECK(weights.empty() || weights == "fp32" || weights == "16bit",
              "set_merge_prefetch: weights \"fp32\", \"16bit\" or \"\" (both)");
  if (weights != "16bit") merge_prefetch[0] = bytes;
  if (weights != "fp32") merge_prefetch[1] = bytes;
  return bytes;
}

// The distance merges of `weights` stacks prefetch at ("fp32" or "16bit").
int64_t merge_prefetch_of(const std::string& weights) {
  TORCH_CHECK(weights == "fp32" || weights == "16bit",
              "merge_prefetch_of: weights \"fp32\" or \"16bit\"");
  return merge_prefetch[weights == "fp32" ? 0 : 1];
}

Avx512Tuning& tuning_of(const std::string& weights) {
  TORCH_CHECK(weights == "fp32" || weights == "16bit", "tune: weights \"fp32\" or \"16bit\"");
  return weights == "fp32" ? tuning_fp32 : tuning_16bit;
}

Tuning tuning(const std::string& weights) {
  const Avx512Tuning& t = tuning_of(weights);
  return {t.from, t.pair, t.quad, t.near, t.far};
}

// The per-CPU-family settings of the linear kernel for fp32 or 16-bit weights (see
// Avx512Tuning); returns them. None changes a result's bits.
Tuning tune(const std::string& weights, int64_t from, int64_t pair, int64_t quad, int64_t near,
            int64_t far) {
  Avx512Tuning& t = tuning_of(weights);
  TORCH_CHECK(from >= 1 && pair >= 0 && quad >= 0,
              "tune: avx512_from >= 1, pair_from and quad_from >= 0 (0: never)");
  TORCH_CHECK(near >= 0 && far >= 0 && near <= (1 << 20) && far <= (1 << 20),
              "tune: prefetch distances in bytes, 0 (none) to 1 MiB");
  t = {from, pair, quad, near, far};
  return tuning(weights);
}

std::string isa() { return use_avx512 ? "avx512" : "avx2"; }
bool has_bf16_dot() { return has_avx512_bf16(); }
int64_t bf16_dot() { return bf16_dot_from; }
