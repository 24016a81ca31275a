// fp8_moe: a decode or verify step's routed experts in one call (contract: kernels/cpu_ops.py fp8_moe). Each chosen
// expert runs once on all the tokens that chose it, so its FP8 blocks are read once per step.
#include "cpu_ops.h"

#include <ATen/ops/zeros.h>

#include <cmath>

namespace specdec {

at::Tensor fp8_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_w, const at::Tensor& w13,
                   const at::Tensor& w2, const at::Tensor& s13, const at::Tensor& s2, int64_t block_n,
                   int64_t block_k, c10::string_view isa, std::optional<int64_t> gemm_rows) {
  constexpr const char* op = "fp8_moe";
  const Isa path = pick_isa(std::string(isa), op);
  check_tensor(topk_ids, at::kLong, 2, op, "topk_ids");
  check_tensor(topk_w, at::kFloat, 2, op, "topk_w");
  check_tensor(w13, at::kFloat8_e4m3fn, 3, op, "w13");
  check_tensor(w2, at::kFloat8_e4m3fn, 3, op, "w2");
  check_tensor(s13, at::kFloat, 3, op, "s13");
  check_tensor(s2, at::kFloat, 3, op, "s2");
  TORCH_CHECK_VALUE(block_n > 0 && block_k > 0, op, ": block (", block_n, ", ", block_k, ") must be positive");
  const int64_t e_count = w13.size(0), d = w13.size(2), inter = w13.size(1) / 2;
  TORCH_CHECK_VALUE(w13.size(1) % 2 == 0 && w2.size(0) == e_count && w2.size(1) == d && w2.size(2) == inter, op,
                    ": w13 [E, 2I, D] and w2 [E, D, I] disagree: ", w13.sizes(), " and ", w2.sizes());
  const int64_t g = cdiv(inter, block_n), s13k = cdiv(d, block_k), s2n = cdiv(d, block_n), s2k = cdiv(inter, block_k);
  TORCH_CHECK_VALUE(s13.size(0) == e_count && s13.size(1) == 2 * g && s13.size(2) == s13k, op, ": s13 must be [",
                    e_count, ", ", 2 * g, ", ", s13k, "] (the gate grid, then the up grid), got ", s13.sizes());
  TORCH_CHECK_VALUE(s2.size(0) == e_count && s2.size(1) == s2n && s2.size(2) == s2k, op, ": s2 must be [", e_count,
                    ", ", s2n, ", ", s2k, "], got ", s2.sizes());
  const at::Tensor xf = float_rows(x, d, op, "x");
  const int64_t t = xf.size(0), topk = topk_ids.size(1);
  TORCH_CHECK_VALUE(topk_ids.size(0) == t && topk_w.sizes() == topk_ids.sizes(), op, ": topk_ids ",
                    topk_ids.sizes(), " and topk_w ", topk_w.sizes(), " must both be [", t, ", K]");

  // the (token, slot) pairs grouped by expert, in token order within each: a counting sort
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  std::vector<int64_t> start(e_count + 1, 0);
  for (int64_t p = 0; p < t * topk; ++p) {
    TORCH_CHECK_VALUE(ids[p] >= -1 && ids[p] < e_count, op, ": topk_ids[", p / topk, ", ", p % topk, "] = ", ids[p],
                      " is not an expert id in [-1, ", e_count, ")");
    if (ids[p] >= 0) ++start[ids[p] + 1];
  }
  int64_t most = 0;
  for (int64_t e = 0; e < e_count; ++e) {
    most = std::max(most, start[e + 1]);
    start[e + 1] += start[e];
  }
  std::vector<int64_t> pairs(start[e_count]), fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < t * topk; ++p)
    if (ids[p] >= 0) pairs[fill[ids[p]]++] = p;

  at::Tensor out = at::zeros({t, d}, xf.options());
  // one buffer for every expert's rows: x gathered [most, D] | gate, up [most, 2I] | SiLU(gate) * up [most, I] |
  // down [most, D]
  std::vector<float> buf(most * (2 * d + 3 * inter));
  float *xe = buf.data(), *h = xe + most * d, *act = h + most * 2 * inter, *o = act + most * inter;
  const float* xs = xf.data_ptr<float>();
  const int64_t ldx = xf.stride(0);
  float* y = out.data_ptr<float>();
  const auto* b13 = static_cast<const uint8_t*>(w13.data_ptr());
  const auto* b2 = static_cast<const uint8_t*>(w2.data_ptr());
  const float *p13 = s13.data_ptr<float>(), *p2 = s2.data_ptr<float>(), *wts = topk_w.data_ptr<float>();
  const int64_t rows = gemm_rows.value_or(-1);
  for (int64_t e = 0; e < e_count; ++e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) continue;
    const int64_t* mine = pairs.data() + start[e];
    for (int64_t r = 0; r < c; ++r) std::memcpy(xe + r * d, xs + (mine[r] / topk) * ldx, d * sizeof(float));
    const uint8_t* we = b13 + e * 2 * inter * d;
    const float* se = p13 + e * 2 * g * s13k;
    matmul(Gemm{Weight{we, inter, d, false, se, s13k, block_n, block_k}, xe, d, c, h, 2 * inter}, path, rows);
    matmul(Gemm{Weight{we + inter * d, inter, d, false, se + g * s13k, s13k, block_n, block_k}, xe, d, c, h + inter,
                2 * inter},
           path, rows);
    for (int64_t r = 0; r < c; ++r) {
      const float *hg = h + r * 2 * inter, *hu = hg + inter;
      float* a = act + r * inter;
      for (int64_t i = 0; i < inter; ++i) a[i] = hg[i] / (1.0f + std::exp(-hg[i])) * hu[i];
    }
    const Weight down{b2 + e * d * inter, d, inter, false, p2 + e * s2n * s2k, s2k, block_n, block_k};
    matmul(Gemm{down, act, inter, c, o, d}, path, rows);
    for (int64_t r = 0; r < c; ++r) {
      const float wt = wts[mine[r]];
      const float* src = o + r * d;
      float* dst = y + (mine[r] / topk) * d;
      for (int64_t j = 0; j < d; ++j) dst[j] += wt * src[j];
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace specdec
