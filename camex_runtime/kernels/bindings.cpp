// The Python module of the native kernels (cpu_decode.cpp): pybind11 bindings only.
//
// A unit of its own so the two compile side by side: pybind11 and torch's Python headers take
// about as long to compile as all the kernels, which need only ATen's tensor headers.
#include <torch/csrc/utils/pybind.h>

#include "cpu_decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_isa", &set_isa, "choose the linear kernel's instruction set (tests, benchmarks)",
        py::arg("isa"), py::arg("rows") = 0);
  m.def("isa", &isa);
  m.def("tune", &tune,
        "for fp32 or 16-bit weights: inputs from which AVX-512 runs, and two / four weight rows "
        "per pass (0: never); software prefetch distances in bytes into L1 and L2 (0: none)",
        py::arg("weights"), py::arg("avx512_from"), py::arg("pair_from"), py::arg("quad_from"),
        py::arg("prefetch_near"), py::arg("prefetch_far"));
  m.def("tuning", &tuning, py::arg("weights"));
  m.def("has_bf16_dot", &has_bf16_dot, "whether this CPU has AVX512-BF16");
  m.def("set_bf16_dot", &set_bf16_dot,
        "from how many rows bf16 weights' products use the bf16 dot kernel (0: never)",
        py::arg("from_rows"));
  m.def("bf16_dot", &bf16_dot);
  m.def("set_single_prefetch", &set_single_prefetch,
        "bytes ahead the AVX2 kernel prefetches for one input with 16-bit weights (0: none)",
        py::arg("bytes"));
  m.def("set_merge_prefetch", &set_merge_prefetch,
        "bytes ahead merges prefetch in each stream of [base; deltas], AVX-512 loops (0: none), "
        "for stacks of `weights` (\"fp32\", \"16bit\"; \"\": both)",
        py::arg("bytes"), py::arg("weights") = "");
  m.def("merge_prefetch_of", &merge_prefetch_of,
        "bytes ahead merges of `weights` stacks prefetch (\"fp32\" or \"16bit\")",
        py::arg("weights"));
  m.def("set_tiles", &set_tiles,
        "for weights of `kind`: the row counts [from, to] whose products in linear and "
        "merge_linear use the prompt tiles (from 0: never)",
        py::arg("kind"), py::arg("from_rows"), py::arg("to_rows"));
  m.def("tiles", &tiles, py::arg("kind"));
  m.def("set_tiles_isa", &set_tiles_isa,
        "the prompt tiles' vectors: \"avx2\" or \"avx512\" (the same bits)", py::arg("isa"));
  m.def("tiles_isa", &tiles_isa);
  // Without the GIL: the kernels touch no Python object, and while a decode step streams
  // weights the server's event loop thread must be free to send the previous token.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("linear", &linear, "weight-streaming y = x @ w.T + b for a few fp32 rows", nogil());
  m.def("linear_tiles", &linear_tiles,
        "y = x @ w.T + b for many fp32 rows (prompt chunks), register tiles", nogil());
  m.def("decode_attention", &decode_attention,
        "write one decode step's keys/values into the cache and attend, per row", nogil());
  m.def("norm", &norm, "row-wise LayerNorm / RMSNorm of (B, d) fp32", nogil());
  m.def("attn_block", &attn_block,
        "x + attention half of a pre-norm block, one decode token per row", nogil());
  m.def("ffn", &ffn,
        "a (merged) FFN, GELU, or a gated one (SwiGLU, GeGLU, clamped SwiGLU) with [gate; up] "
        "stacked",
        nogil());
  m.def("hidden", &hidden, "the FFN's hidden function as ffn applies it", nogil());
  m.def("hidden_pair", &hidden_pair, "a gated hidden function of separate gate and up", nogil());
  m.def("layers", &layers,
        "a span of pre-norm blocks (attention, norm, dense or merged-expert FFN groups) for "
        "one decode token per row", nogil());
  m.def("merge", &merge, "out = base + coeffs @ deltas, streamed once, fp32 accumulation",
        nogil());
  m.def("merge_linear", &merge_linear,
        "w = base + coeffs @ deltas and x @ w.T + bias, a tile of w at a time", nogil());
  m.def("merge_many", &merge_many,
        "outs[s] = base + coeffs[s] @ deltas for every s, the stack streamed once", nogil());
  m.def("quantize_q8", &quantize_q8,
        "q, scales = the rows of w - b as int8 with one fp32 scale per row", nogil());
  m.def("merge_q8_many", &merge_q8_many,
        "outs[s] = base + sum_e coeffs[s][e] * scales[e][:, None] * q[e] (int8 deltas with one "
        "scale per row) for every s, one pass", nogil());
}
