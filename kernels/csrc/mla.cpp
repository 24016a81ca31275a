// Absorbed MLA on a CPU (contracts: kernels/cpu_fused.py): the attention over the latent cache for a decode batch,
// a chain or a tree in one call, every length read from tensors; and kv_b's two per-head products with the weight
// kept as released (FP8 blocks), on either side of it. The ISA paths: mla_kernel.h compiled once per ISA (per_isa.h)
// and linear.cpp's register kernels, chosen at run time (pick_isa). Threads split (sequence, head) pairs or heads.
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>

#include "vec.h"

namespace specdec {

// The attention's arguments as the kernel reads them: element strides, the last dimension of q / kv / out contiguous.
struct Attn {
  const float* q;  // [T, H, D] (D = C + R)
  int64_t qt, qh;
  const void* kv;  // [S, D] float32 or bfloat16
  bool kv_bf16;
  int64_t ldkv, c, d;
  const int64_t *bt, *ctx, *cu;  // block_table [B, W], ctx_lens [B], cu_q [B + 1]
  int64_t ldbt;
  const bool* mask;  // tree_mask [T, N]
  int64_t mt, mj;
  float scale;
  float* out;  // [T, H, C]
  int64_t ot, oh;
};

constexpr int64_t kKeys = 32;  // keys per chunk: their rows stay in L1 / L2 while every query row of a task reads them
constexpr int64_t kRows = 64;  // (query, head) rows per pass over the keys, bounding the scratch
constexpr int64_t kGroup = 4;  // (query, head) rows per register tile

// Up to kGroup (query, head) rows of one task against one chunk of keys: each key vector loaded once serves all
// the group's rows (the key rows come from L2; the group's query rows and totals stay in L1 and registers).
struct Group {
  const float* q[kGroup];  // the rows' queries [d]
  float* p[kGroup];        // scores, then softmax terms [kc]
  float* acc[kGroup];      // running sums [c]
  float f[kGroup];         // the factor each row's sums take before this chunk's terms (its max grew)
};

// q_lat [T, H, C] = per head h, x [T, H, dn] @ dequant(W)[h (dn + dv) : h (dn + dv) + dn, :]
struct AbsorbQ {
  Weight w;  // FP8 [H (dn + dv), C]
  const float* x;
  int64_t xt, xh;
  float* y;
  int64_t yt, yh, t, dn, dv;
};

#define SPECDEC_KERNEL "mla_kernel.h"
#include "per_isa.h"

namespace {

struct Kernels {
  void (*attend)(const Attn&, int64_t, int64_t, int64_t, std::vector<float>&);
  void (*absorb_q)(const AbsorbQ&, int64_t, std::vector<float>&);
};

Kernels kernels(Isa isa) {
#ifdef SPECDEC_X86
  if (isa == Isa::avx512) return {avx512::attend, avx512::absorb_q_head};
  if (isa == Isa::avx2) return {avx2::attend, avx2::absorb_q_head};
#endif
  return {portable::attend, portable::absorb_q_head};
}

void check_meta(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  check_cpu(t, "mla_attention", name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == dim, "mla_attention: ", name, " must be a ", dim, "-D ",
                    dtype, " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

// kv_b as fp8_absorb_q / fp8_absorb_o take it, checked against x [T, H, width] -> x as float32 and W's description.
std::pair<at::Tensor, Weight> absorb_args(const char* op, const at::Tensor& x, const char* name, int64_t width,
                                          const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                                          int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off) {
  const at::Tensor xf = float_arg(x, 3, op, name);
  TORCH_CHECK_VALUE(x.size(2) == width, op, ": ", name, " must be [T, H, ", width, "], got shape ", x.sizes());
  const Weight wt = fp8_weight(w, s, block_n, block_k, n_off, k_off, op);
  TORCH_CHECK_VALUE(dn > 0 && dv > 0 && wt.n == x.size(1) * (dn + dv), op, ": w must be [H (dn + dv), C] = [",
                    x.size(1), " * (", dn, " + ", dv, "), C] for ", name, " of shape ", x.sizes(), ", got ",
                    w.sizes());
  return {xf, wt};
}

}  // namespace

at::Tensor mla_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                         const at::Tensor& ctx_lens, const at::Tensor& cu_q, const at::Tensor& tree_mask,
                         double scale, int64_t c, c10::string_view isa) {
  constexpr const char* op = "mla_attention";
  const Isa path = pick_isa(std::string(isa), op);
  const at::Tensor qf = float_arg(q, 3, op, "q");
  const int64_t t = q.size(0), h = q.size(1), d = q.size(2);
  check_cpu(kv_cache, op, "kv_cache");
  TORCH_CHECK_VALUE((kv_cache.scalar_type() == at::kFloat || kv_cache.scalar_type() == at::kBFloat16) &&
                        kv_cache.dim() == 2 && kv_cache.size(1) == d && (d <= 1 || kv_cache.stride(1) == 1),
                    op, ": kv_cache must be float32 or bfloat16 [slots, ", d, "] (q's C + R), rows contiguous, got ",
                    kv_cache.scalar_type(), " ", kv_cache.sizes(), " strides ", kv_cache.strides());
  TORCH_CHECK_VALUE(c > 0 && c <= d, op, ": c=", c, " must be in [1, ", d, "] (q's C + R)");
  check_meta(block_table, at::kLong, 2, "block_table");
  check_meta(ctx_lens, at::kLong, 1, "ctx_lens");
  check_meta(cu_q, at::kLong, 1, "cu_q");
  check_meta(tree_mask, at::kBool, 2, "tree_mask");
  const int64_t b_count = block_table.size(0), width = block_table.size(1), slots = kv_cache.size(0);
  TORCH_CHECK_VALUE(ctx_lens.size(0) == b_count && cu_q.size(0) == b_count + 1, op, ": ctx_lens ", ctx_lens.sizes(),
                    " and cu_q ", cu_q.sizes(), " must be [B] and [B + 1] for block_table of shape ",
                    block_table.sizes());
  TORCH_CHECK_VALUE(tree_mask.size(0) == t, op, ": tree_mask must be [", t, ", N] (a row per query), got ",
                    tree_mask.sizes());
  const at::Tensor bt = block_table.contiguous(), ctx = ctx_lens.contiguous(), cu = cu_q.contiguous();
  const int64_t *btp = bt.data_ptr<int64_t>(), *ctxp = ctx.data_ptr<int64_t>(), *cup = cu.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(b_count == 0 || cup[0] == 0, op, ": cu_q[0] must be 0, got ", b_count ? cup[0] : 0);
  for (int64_t b = 0; b < b_count; ++b)
    TORCH_CHECK_VALUE(cup[b + 1] >= cup[b] && cup[b + 1] <= t, op, ": cu_q must rise from 0 to at most T = ", t,
                      ", got cu_q[", b, ":", b + 2, "] = ", cup[b], ", ", cup[b + 1]);
  for (int64_t b = 0; b < b_count; ++b) {
    const int64_t n = cup[b + 1] - cup[b];
    if (n == 0) continue;  // no queries: its row is not read
    TORCH_CHECK_VALUE(ctxp[b] >= 0 && ctxp[b] + n <= width && n <= tree_mask.size(1), op, ": sequence ", b, " has ",
                      ctxp[b], " cached and ", n, " new keys; block_table rows hold ", width, ", tree_mask rows ",
                      tree_mask.size(1));
    for (int64_t i = 0; i < ctxp[b] + n; ++i)
      TORCH_CHECK_VALUE(btp[b * width + i] >= 0 && btp[b * width + i] < slots, op, ": block_table[", b, ", ", i,
                        "] = ", btp[b * width + i], " is not a slot of kv_cache (", slots, " rows)");
  }
  at::Tensor out = at::empty({t, h, c}, qf.options());
  const int64_t used = b_count ? cup[b_count] : 0;
  std::fill(out.data_ptr<float>() + used * h * c, out.data_ptr<float>() + t * h * c, 0.0f);  // padding rows
  const Attn a{qf.data_ptr<float>(), qf.stride(0), qf.stride(1), kv_cache.data_ptr(),
               kv_cache.scalar_type() == at::kBFloat16, kv_cache.stride(0), c, d, btp, ctxp, cup, width,
               tree_mask.data_ptr<bool>(), tree_mask.stride(0), tree_mask.stride(1), float(scale),
               out.data_ptr<float>(), h * c, c};
  const auto kern = kernels(path).attend;
  at::parallel_for(0, b_count * h, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;
    for (int64_t i = begin; i < end;) {  // (sequence, head) pairs; a sequence's heads in one task share key reads
      const int64_t b = i / h, h0 = i % h, h1 = std::min(h, h0 + end - i);
      kern(a, b, h0, h1, buf);
      i += h1 - h0;
    }
  });
  return out;
}

void fp8_absorb_q_into(const at::Tensor& q_nope, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                       int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, const at::Tensor& out,
                       c10::string_view isa) {
  constexpr const char* op = "fp8_absorb_q";
  const Isa path = pick_isa(std::string(isa), op);
  const auto [xf, wt] = absorb_args(op, q_nope, "q_nope", dn, w, s, dn, dv, block_n, block_k, n_off, k_off);
  const int64_t t = q_nope.size(0), h = q_nope.size(1);
  check_cpu(out, op, "out");
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == t && out.size(1) == h && out.size(2) == wt.k &&
                        out.scalar_type() == q_nope.scalar_type() && (wt.k <= 1 || out.stride(2) == 1),
                    op, ": out must be ", q_nope.scalar_type(), " [", t, ", ", h, ", ", wt.k,
                    "] with its last dimension contiguous, got ", out.scalar_type(), " ", out.sizes(), " strides ",
                    out.strides());
  const at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), xf.options());
  const AbsorbQ a{wt, xf.data_ptr<float>(), xf.stride(0), xf.stride(1), y.data_ptr<float>(), y.stride(0),
                  y.stride(1), t, dn, dv};
  const auto kern = kernels(path).absorb_q;
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scol;
    for (int64_t i = begin; i < end; ++i) kern(a, i, scol);
  });
  if (!y.is_same(out)) out.copy_(y);
}

at::Tensor fp8_absorb_q(const at::Tensor& q_nope, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                        int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa) {
  check_cpu(q_nope, "fp8_absorb_q", "q_nope");
  TORCH_CHECK_VALUE(q_nope.dim() == 3 && w.dim() == 2, "fp8_absorb_q: q_nope must be [T, H, dn] and w 2-D, got ",
                    q_nope.sizes(), " and ", w.sizes());
  at::Tensor out = at::empty({q_nope.size(0), q_nope.size(1), w.size(1)}, q_nope.options());
  fp8_absorb_q_into(q_nope, w, s, dn, dv, block_n, block_k, n_off, k_off, out, isa);
  return out;
}

at::Tensor fp8_absorb_o(const at::Tensor& o_lat, const at::Tensor& w, const at::Tensor& s, int64_t dn, int64_t dv,
                        int64_t block_n, int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa) {
  constexpr const char* op = "fp8_absorb_o";
  const Isa path = pick_isa(std::string(isa), op);
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D [H (dn + dv), C], got ", w.sizes());
  const auto [xf, wt] = absorb_args(op, o_lat, "o_lat", w.size(1), w, s, dn, dv, block_n, block_k, n_off, k_off);
  const int64_t t = o_lat.size(0), h = o_lat.size(1);
  at::Tensor y = at::empty({t, h, dv}, xf.options());
  const float* x = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xt = xf.stride(0), xh = xf.stride(1);
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // head i's value rows: W[i (dn + dv) + dn + v, :], v < dv
      const int64_t r0 = i * (dn + dv) + dn;
      const Weight rows{static_cast<const uint8_t*>(wt.data) + r0 * wt.k, dv, wt.k, false, wt.s, wt.lds, wt.bn,
                        wt.bk, wt.n_off + r0, wt.k_off};
      matmul_rows(Gemm{rows, x + i * xh, xt, t, yp + i * dv, h * dv}, path, 0, dv);
    }
  });
  return o_lat.scalar_type() == at::kFloat ? y : y.to(o_lat.scalar_type());
}

}  // namespace specdec
