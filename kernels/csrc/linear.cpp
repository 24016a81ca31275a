// The linears: y = x @ W^T for FP8 (block-scaled e4m3fn) and BF16 weights, float32 activations. The ISA paths (one
// body, rows_kernel.h, compiled once per ISA by per_isa.h against vec.h's Vec), the run-time choice from the CPU's
// flags, the route by M (register kernels for few rows, dequantized tiles and torch's GEMM for many), and the
// fp8_linear / bf16_linear ops.
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#include "vec.h"

namespace specdec {

#define SPECDEC_KERNEL "rows_kernel.h"
#include "per_isa.h"

namespace {

std::vector<std::string> detect_isas() {
  std::vector<std::string> isas;
#ifdef SPECDEC_X86
  __builtin_cpu_init();
  const bool base = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (base && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    isas.push_back("avx512");
  if (base && __builtin_cpu_supports("avx2")) isas.push_back("avx2");
#endif
  isas.push_back("portable");
  return isas;
}

struct Kernels {
  void (*rows)(const Gemm&, int64_t, int64_t);
  void (*dequant)(const Weight&, int64_t, int64_t, float*);
};

Kernels kernels(Isa isa) {
#ifdef SPECDEC_X86
  if (isa == Isa::avx512) return {avx512::rows, avx512::dequant};
  if (isa == Isa::avx2) return {avx2::rows, avx2::dequant};
#endif
  return {portable::rows, portable::dequant};
}

// Rows per thread chunk: at least 64 KB of weights, so a parallel region is worth its start.
int64_t grain(const Weight& w) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, w.k * (w.bf16 ? 2 : 1)));
}

// Many rows of x: W dequantized tile by tile (16 MB of float32 at most) and torch's GEMM on each.
void gemm_route(const Gemm& g, const Kernels& kern) {
  const Weight& w = g.w;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::from_blob(const_cast<float*>(g.x), {g.m, w.k}, {g.ldx, 1}, opts);
  const at::Tensor y = at::from_blob(g.y, {g.m, w.n}, {g.ldy, 1}, opts);
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, w.k));
  at::Tensor tile = at::empty({std::min(rows, w.n), w.k}, opts);
  for (int64_t r0 = 0; r0 < w.n; r0 += rows) {
    const int64_t r1 = std::min(w.n, r0 + rows);
    float* t = tile.data_ptr<float>();
    at::parallel_for(r0, r1, grain(w), [&](int64_t b, int64_t e) { kern.dequant(w, b, e, t + (b - r0) * w.k); });
    at::Tensor out = y.narrow(1, r0, r1 - r0);
    if (out.is_contiguous()) {
      at::mm_out(out, x, tile.narrow(0, 0, r1 - r0).t());
    } else {
      out.copy_(at::mm(x, tile.narrow(0, 0, r1 - r0).t()));
    }
  }
}

}  // namespace

const std::vector<std::string>& cpu_isas() {
  static const std::vector<std::string> isas = detect_isas();
  return isas;
}

Isa pick_isa(const std::string& isa, const char* op) {
  const std::vector<std::string>& have = cpu_isas();
  const std::string& name = isa == "auto" ? have.front() : isa;
  TORCH_CHECK_VALUE(name == "avx512" || name == "avx2" || name == "portable", op, ": isa='", isa,
                    "' is not one of auto, avx512, avx2, portable");
  if (std::find(have.begin(), have.end(), name) == have.end()) {
    std::string list;
    for (const auto& h : have) list += (list.empty() ? "" : ", ") + h;
    TORCH_CHECK_VALUE(false, op, ": isa='", isa, "' is not available on this CPU (it runs ", list, ")");
  }
  return name == "avx512" ? Isa::avx512 : name == "avx2" ? Isa::avx2 : Isa::portable;
}

void matmul_rows(const Gemm& g, Isa isa, int64_t n_begin, int64_t n_end) { kernels(isa).rows(g, n_begin, n_end); }

void matmul(const Gemm& g, Isa isa, int64_t gemm_rows) {
  if (g.m == 0 || g.w.n == 0) return;
  const Kernels kern = kernels(isa);
  if (g.m >= (gemm_rows < 0 ? default_gemm_rows(g.w.k) : gemm_rows)) {
    gemm_route(g, kern);
    return;
  }
  at::parallel_for(0, g.w.n, grain(g.w), [&](int64_t b, int64_t e) { kern.rows(g, b, e); });
}

at::Tensor float_rows(const at::Tensor& x, int64_t k, const char* op, const char* name) {
  check_cpu(x, op, name);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k, op, ": ", name, " must be [M, ", k, "], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ", name,
                    " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.stride(1) == 1 || k <= 1, op, ": ", name,
                    "'s rows must be contiguous (stride(1) == 1), got strides ", x.strides());
  return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
}

void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == dim, op, ": ", name, " must be a ", dim, "-D ", dtype,
                    " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(), " for shape ",
                    t.sizes());
}

Weight fp8_weight(const at::Tensor& w, const at::Tensor& s, int64_t block_n, int64_t block_k, int64_t n_off,
                  int64_t k_off, const char* op) {
  check_tensor(w, at::kFloat8_e4m3fn, 2, op, "w");
  check_tensor(s, at::kFloat, 2, op, "s");
  TORCH_CHECK_VALUE(block_n > 0 && block_k > 0 && n_off >= 0 && n_off < block_n && k_off >= 0 && k_off < block_k,
                    op, ": block (", block_n, ", ", block_k, ") needs positive sizes and an offset (", n_off, ", ",
                    k_off, ") inside them");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t sn = cdiv(n + n_off, block_n), sk = cdiv(k + k_off, block_k);
  TORCH_CHECK_VALUE(s.size(0) == sn && s.size(1) == sk, op, ": s must be [", sn, ", ", sk, "] for w of shape ",
                    w.sizes(), " in ", block_n, "x", block_k, " blocks at offset (", n_off, ", ", k_off, "), got ",
                    s.sizes());
  return Weight{w.data_ptr(), n, k, false, s.data_ptr<float>(), sk, block_n, block_k, n_off, k_off};
}

// fp8_linear: y [M, N] = x [M, K] @ dequant(W8 [N, K], S)^T with W8 e4m3fn and S its float32 block scales.
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t block_n,
                      int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa,
                      std::optional<int64_t> gemm_rows) {
  constexpr const char* op = "fp8_linear";
  const Isa path = pick_isa(std::string(isa), op);
  const Weight wt = fp8_weight(w, s, block_n, block_k, n_off, k_off, op);
  const at::Tensor xf = float_rows(x, wt.k, op, "x");
  at::Tensor y = at::empty({xf.size(0), wt.n}, xf.options());
  matmul(Gemm{wt, xf.data_ptr<float>(), xf.stride(0), xf.size(0), y.data_ptr<float>(), wt.n}, path,
         gemm_rows.value_or(-1));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// bf16_linear: y [M, V] = x [M, D] @ W [V, D]^T with W bfloat16 (the head), exact bf16 -> float32, float32 sums.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, c10::string_view isa,
                       std::optional<int64_t> gemm_rows) {
  constexpr const char* op = "bf16_linear";
  const Isa path = pick_isa(std::string(isa), op);
  check_tensor(w, at::kBFloat16, 2, op, "w");
  const at::Tensor xf = float_rows(x, w.size(1), op, "x");
  const int64_t n = w.size(0);
  at::Tensor y = at::empty({xf.size(0), n}, xf.options());
  const Weight wt{w.data_ptr(), n, w.size(1), true};
  matmul(Gemm{wt, xf.data_ptr<float>(), xf.stride(0), xf.size(0), y.data_ptr<float>(), n}, path,
         gemm_rows.value_or(-1));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace specdec
