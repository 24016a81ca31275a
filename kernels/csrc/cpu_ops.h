// Shared by the CPU ops: the ops themselves (registered in ops.cpp), the ISA choice, the route by M, the argument
// checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

#include <string>
#include <tuple>
#include <vector>

#include "decode.h"

namespace specdec {

enum class Isa { portable, avx2, avx512 };

// The ISAs this CPU runs, best first (the names the ops' `isa` argument takes).
const std::vector<std::string>& cpu_isas();
// "auto" -> the best this CPU runs; a named ISA the CPU lacks is a ValueError naming `op` and what the CPU has.
Isa pick_isa(const std::string& isa, const char* op);
// Rows of x from which matmul takes the dequantize-then-GEMM route by default. The crossover bench/cpu_ops_bench.py
// measures grows with K, as the register kernels' per-row costs spread over more columns (one Zen 4 core: 16 rows
// at K = 128, 24 at 256, 32 at 512, 48 to 96 from K = 1024 on): K / 16, within [16, 64].
inline int64_t default_gemm_rows(int64_t k) { return std::min<int64_t>(64, std::max<int64_t>(16, k / 16)); }
// g.y = g.x @ W^T: the register kernels below gemm_rows rows of x (-1: default_gemm_rows), from there on W
// dequantized to float32 tiles and torch's GEMM. Threads (at::parallel_for) split W's rows.
void matmul(const Gemm& g, Isa isa, int64_t gemm_rows);
// W's rows [n_begin, n_end) of g.y = g.x @ W^T by the register kernels, in the calling thread (callers that thread
// over something else: heads).
void matmul_rows(const Gemm& g, Isa isa, int64_t n_begin, int64_t n_end);

// Argument checks, each a one-line ValueError naming the op and the argument.
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}
// x [M, k], float32 or bfloat16, rows contiguous -> float32 (bfloat16 converted, float32 as is).
at::Tensor float_rows(const at::Tensor& x, int64_t k, const char* op, const char* name);
// t `dim`-D, float32 or bfloat16, its last dimension contiguous -> float32 (bfloat16 converted, float32 as is).
at::Tensor float_arg(const at::Tensor& t, int64_t dim, const char* op, const char* name);
// t on the CPU, `dim`-D, of `dtype`, contiguous.
void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* op, const char* name);
// w [N, K] float8_e4m3fn and its scales s [ceil((N + n_off) / block_n), ceil((K + k_off) / block_k)] float32, both
// contiguous (fp8_linear's contract) -> their description.
Weight fp8_weight(const at::Tensor& w, const at::Tensor& s, int64_t block_n, int64_t block_k, int64_t n_off,
                  int64_t k_off, const char* op);
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The ops (contracts: kernels/cpu_ops.py).
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t block_n,
                      int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa,
                      std::optional<int64_t> gemm_rows);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, c10::string_view isa,
                       std::optional<int64_t> gemm_rows);
at::Tensor fp8_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_w, const at::Tensor& w13,
                   const at::Tensor& w2, const at::Tensor& s13, const at::Tensor& s2, int64_t block_n,
                   int64_t block_k, c10::string_view isa, std::optional<int64_t> gemm_rows);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, c10::string_view isa);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                double eps, c10::string_view isa);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, c10::string_view isa);
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
               c10::string_view isa);
at::Tensor silu_mul(const at::Tensor& h, c10::string_view isa);
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& x, const std::optional<at::Tensor>& gate_w,
                                             const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                                             int64_t top_k, bool norm_topk_prob, double routed_scaling_factor,
                                             c10::string_view isa);
at::Tensor mla_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                         const at::Tensor& ctx_lens, const at::Tensor& cu_q, const at::Tensor& tree_mask,
                         double scale, int64_t c, c10::string_view isa);
at::Tensor fp8_absorb_q(const at::Tensor& q_nope, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                        int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa);
void fp8_absorb_q_into(const at::Tensor& q_nope, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                       int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, const at::Tensor& out,
                       c10::string_view isa);
at::Tensor fp8_absorb_o(const at::Tensor& o_lat, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                        int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa);

}  // namespace specdec
