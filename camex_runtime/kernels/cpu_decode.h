// What cpu_decode.cpp exports to its Python bindings (bindings.cpp); each is described where it
// is defined. Only ATen's tensor header: the kernels' unit never parses pybind11 or torch's C++
// frontend, the slowest part of a build.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

using OptT = c10::optional<at::Tensor>;
using Tuning = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;

// instruction set and per-CPU-family settings
std::string set_isa(const std::string& isa, int64_t rows);
std::string isa();
Tuning tune(const std::string& weights, int64_t from, int64_t pair, int64_t quad, int64_t near,
            int64_t far);
Tuning tuning(const std::string& weights);
bool has_bf16_dot();
int64_t set_bf16_dot(int64_t from);
int64_t bf16_dot();
int64_t set_single_prefetch(int64_t bytes);
int64_t set_merge_prefetch(int64_t bytes, const std::string& weights);
int64_t merge_prefetch_of(const std::string& weights);
int64_t set_tiles(const std::string& kind, int64_t from, int64_t to);
std::tuple<int64_t, int64_t> tiles(const std::string& kind);
std::string set_tiles_isa(const std::string& isa);
std::string tiles_isa();

// kernels
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const OptT& bias);
at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& w, const OptT& bias);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                            const at::Tensor& v_new, at::Tensor kc, at::Tensor vc,
                            int64_t layer, const at::Tensor& slots, const at::Tensor& positions,
                            int64_t window, double softcap, const OptT& sinks);
at::Tensor norm(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, double eps,
                bool rms);
at::Tensor attn_block(const at::Tensor& x, const OptT& norm_w, const OptT& norm_b,
                      double eps, bool rms, const at::Tensor& w_qkv, const OptT& b_qkv,
                      const at::Tensor& w_o, const OptT& b_o, const OptT& q_norm,
                      const OptT& k_norm, at::Tensor kc, at::Tensor vc,
                      int64_t layer, const at::Tensor& slots, const at::Tensor& positions,
                      const OptT& cos, const OptT& sin, int64_t H, int64_t KV,
                      int64_t window, const OptT& out_norm, double softcap,
                      const OptT& sinks, bool norm_after_rope);
at::Tensor ffn(const at::Tensor& h, const at::Tensor& w1, const OptT& b1, const at::Tensor& w2,
               const OptT& b2, bool glu, int64_t gate, double limit, double alpha);
at::Tensor hidden(const at::Tensor& u, bool glu, int64_t gate, double limit, double alpha);
at::Tensor hidden_pair(const at::Tensor& gate, const at::Tensor& up, int64_t kind, double limit,
                       double alpha);
at::Tensor layers(at::Tensor x, const std::vector<std::vector<OptT>>& blocks,
                  const std::vector<double>& eps, const std::vector<int64_t>& ints,
                  const std::vector<std::vector<std::vector<OptT>>>& ffns,
                  const std::vector<OptT>& acc_slots, const OptT& seg_sum, at::Tensor kc,
                  at::Tensor vc, const at::Tensor& slots, const at::Tensor& positions,
                  const OptT& cos, const OptT& sin, const OptT& cos_local,
                  const OptT& sin_local, int64_t H, int64_t KV, const OptT& final_w,
                  const OptT& final_b, double final_eps, bool final_rms, double softcap,
                  double swiglu_limit, double swiglu_alpha);
void merge(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coeffs,
           at::Tensor out);
at::Tensor merge_linear(const at::Tensor& x, const at::Tensor& base, const at::Tensor& deltas,
                        const at::Tensor& coeffs, at::Tensor w, const OptT& bias);
void merge_many(const at::Tensor& base, const at::Tensor& deltas, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outs);
void quantize_q8(const at::Tensor& w, const at::Tensor& b, at::Tensor q, at::Tensor scales);
void merge_q8_many(const at::Tensor& base, const at::Tensor& q, const at::Tensor& scales,
                   const at::Tensor& coeffs, const std::vector<at::Tensor>& outs);
