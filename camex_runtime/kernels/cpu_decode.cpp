// CPU kernels of the decode step, where time is the time to stream weights from memory once.
//
// linear: y (B, out) = x (B, in) @ w (out, in)^T + b, x and y fp32, w fp32 / fp16 / bf16, fp32
// accumulation, B <= 8 rows per pass.
// merge:  out (n,) = base (n,) + sum_e c_e * deltas[e] (n,), all three in one dtype (fp32 /
// fp16 / bf16), fp32 accumulation: one merged expert from the stacked [E_m; deltas].
//
// Decode multiplies a handful of activation rows by large weight matrices: the time is the time
// to stream the weights from memory once. Generic GEMM libraries tile for large M and, for
// M = 1..8 on this kind of CPU, read the weights several times or use one core. Here every weight
// row is read once for all B input rows (B accumulators per weight row), 16-bit weights are
// widened in registers (F16C / a shift for bf16), and output rows are split over the torch
// intra-op thread pool. AVX2 + FMA + F16C; the Python side checks the CPU before loading this.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

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

// R weight rows x NB input rows per pass: R * NB accumulators stay in registers.
template <WType T, int R, int NB>
inline void block(const float* x, int64_t ldx, int64_t in, const char* w, int64_t ldw_bytes,
                  float* acc /* R * NB */) {
  __m256 a[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + i);
    for (int r = 0; r < R; ++r) {
      __m256 wv = load8<T>(w + r * ldw_bytes, i);
      for (int b = 0; b < NB; ++b) a[r][b] = _mm256_fmadd_ps(wv, xv[b], a[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      float s = hsum(a[r][b]);
      for (int64_t j = i; j < in; ++j) s += load1<T>(w + r * ldw_bytes, j) * x[b * ldx + j];
      acc[r * NB + b] = s;
    }
}

template <WType T, int NB>
void rows_nb(const float* x, int64_t ldx, int64_t in, const char* w, int64_t ldw_bytes,
             int64_t out, const float* bias, float* y, int64_t ldy) {
  constexpr int R = NB <= 2 ? 4 : (NB <= 4 ? 2 : 1);
  at::parallel_for(0, (out + R - 1) / R, 16, [&](int64_t lo, int64_t hi) {
    float acc[R * NB];
    for (int64_t g = lo; g < hi; ++g) {
      int64_t o = g * R;
      if (o + R <= out) {
        block<T, R, NB>(x, ldx, in, w + o * ldw_bytes, ldw_bytes, acc);
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < NB; ++b)
            y[b * ldy + o + r] = acc[r * NB + b] + (bias ? bias[o + r] : 0.f);
      } else {
        for (; o < out; ++o) {
          block<T, 1, NB>(x, ldx, in, w + o * ldw_bytes, ldw_bytes, acc);
          for (int b = 0; b < NB; ++b) y[b * ldy + o] = acc[b] + (bias ? bias[o] : 0.f);
        }
      }
    }
  });
}

template <WType T>
void run(const float* x, int64_t B, int64_t ldx, int64_t in, const char* w, int64_t ldw_bytes,
         int64_t out, const float* bias, float* y) {
  for (int64_t b0 = 0; b0 < B; b0 += 8) {  // groups of up to 8 rows: weights read once a group
    int64_t nb = std::min<int64_t>(8, B - b0);
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * out;
    switch (nb) {
      case 1: rows_nb<T, 1>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 2: rows_nb<T, 2>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 3: rows_nb<T, 3>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 4: rows_nb<T, 4>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 5: rows_nb<T, 5>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 6: rows_nb<T, 6>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      case 7: rows_nb<T, 7>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
      default: rows_nb<T, 8>(xb, ldx, in, w, ldw_bytes, out, bias, yb, out); break;
    }
  }
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

template <WType T>
void merge_run(const char* base, const char* deltas, int64_t ld_bytes, const float* c, int64_t E,
               int64_t n, char* out) {
  const int64_t elem = T == WType::F32 ? 4 : 2;
  at::parallel_for(0, (n + 1023) / 1024, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t a = blk * 1024, b = std::min(n, a + 1024);
      int64_t i = a;
      for (; i + 8 <= b; i += 8) {
        __m256 acc = load8<T>(base, i);
        for (int64_t e = 0; e < E; ++e)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(c[e]), load8<T>(deltas + e * ld_bytes, i), acc);
        store8<T>(out, i, acc);
      }
      for (; i < b; ++i) {
        float acc = load1<T>(base, i);
        for (int64_t e = 0; e < E; ++e) acc += c[e] * load1<T>(deltas + e * ld_bytes, i);
        store1<T>(out, i, acc);
      }
    }
  });
  (void)elem;
}

}  // namespace

// base (n,) and out (n,) contiguous, deltas (E, n) with contiguous rows, one floating dtype;
// coeffs (E,) fp32: out = base + coeffs @ deltas.
void merge(const torch::Tensor& base, const torch::Tensor& deltas, const torch::Tensor& coeffs,
           torch::Tensor out) {
  TORCH_CHECK(base.is_contiguous() && out.is_contiguous() && deltas.dim() == 2 &&
              deltas.stride(1) == 1 && base.numel() == deltas.size(1) &&
              out.numel() == base.numel(), "merge layout");
  TORCH_CHECK(base.scalar_type() == deltas.scalar_type() && out.scalar_type() == base.scalar_type(),
              "merge dtypes");
  auto c = coeffs.to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == deltas.size(0), "one coefficient per delta");
  const char* bp = static_cast<const char*>(base.data_ptr());
  const char* dp = static_cast<const char*>(deltas.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t ld = deltas.stride(0) * deltas.element_size(), E = deltas.size(0), n = base.numel();
  switch (base.scalar_type()) {
    case at::kFloat: merge_run<WType::F32>(bp, dp, ld, c.data_ptr<float>(), E, n, op); break;
    case at::kHalf: merge_run<WType::F16>(bp, dp, ld, c.data_ptr<float>(), E, n, op); break;
    case at::kBFloat16: merge_run<WType::BF16>(bp, dp, ld, c.data_ptr<float>(), E, n, op); break;
    default: TORCH_CHECK(false, "merge dtype must be float32, float16 or bfloat16");
  }
}

// x (B, in) fp32 with unit stride in its last dim; w (out, in) fp32/fp16/bf16 with unit stride
// in its last dim; bias (out,) fp32 or None. Returns y (B, out) fp32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1 && w.stride(1) == 1, "layout");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu only");
  const int64_t B = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({B, out}, x.options());
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous(), "bias");
    b = bias->data_ptr<float>();
  }
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t ldw = w.stride(0) * w.element_size();
  switch (w.scalar_type()) {
    case at::kFloat: run<WType::F32>(x.data_ptr<float>(), B, x.stride(0), in, wp, ldw, out, b, y.data_ptr<float>()); break;
    case at::kHalf: run<WType::F16>(x.data_ptr<float>(), B, x.stride(0), in, wp, ldw, out, b, y.data_ptr<float>()); break;
    case at::kBFloat16: run<WType::BF16>(x.data_ptr<float>(), B, x.stride(0), in, wp, ldw, out, b, y.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "weight dtype must be float32, float16 or bfloat16");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "weight-streaming y = x @ w.T + b for a few fp32 rows");
  m.def("merge", &merge, "out = base + coeffs @ deltas, streamed once, fp32 accumulation");
}
