// A decoder layer's small fused ops (contracts: kernels/cpu_fused.py): rms_norm, add_rms_norm, rope, silu_mul and
// the MoE router, each one op where the torch code runs five to twenty. The ISA paths: fused_kernel.h compiled once
// per ISA (per_isa.h), chosen at run time (pick_isa); the router's expert selection is scalar, shared by every path.
#include "cpu_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <limits>
#include <utility>

#include "vec.h"

namespace specdec {

// Rows of x [., d] (and of res, when given: then sum = x + res, normed) -> y; row strides ld*.
struct NormRows {
  const float* x;
  int64_t ldx;
  const float* res;
  int64_t ldr;
  float* sum;
  int64_t lds;
  const float* w;
  float* y;
  int64_t ldy, d;
  float inv_dim, eps;
};

// x [T, H, R] -> y [T, H, R], cos / sin [T, R/2]; element strides per dimension, the last one 1.
struct RopeRows {
  const float* x;
  int64_t xt, xh;
  const float *cos, *sin;
  int64_t ct, st;
  float* y;
  int64_t yt, yh, h, r;
};

#define SPECDEC_KERNEL "fused_kernel.h"
#include "per_isa.h"

namespace {

struct Kernels {
  void (*norm)(const NormRows&, int64_t, int64_t);
  void (*rope)(const RopeRows&, int64_t, int64_t, float*);
  void (*silu_mul)(const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);
  void (*sigmoid)(const float*, float*, int64_t);
};

Kernels kernels(Isa isa) {
#ifdef SPECDEC_X86
  if (isa == Isa::avx512) return {avx512::norm_rows, avx512::rope_rows, avx512::silu_mul_rows, avx512::sigmoid};
  if (isa == Isa::avx2) return {avx2::norm_rows, avx2::rope_rows, avx2::silu_mul_rows, avx2::sigmoid};
#endif
  return {portable::norm_rows, portable::rope_rows, portable::silu_mul_rows, portable::sigmoid};
}

// Rows per thread chunk: 64 KB of float32 at least, so a parallel region is worth its start (decode runs inline).
int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_floats)); }

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

std::pair<at::Tensor, at::Tensor> norm(const char* op, const at::Tensor& x, const at::Tensor* res,
                                       const at::Tensor& w, double eps, c10::string_view isa) {
  const Isa path = pick_isa(std::string(isa), op);
  const at::Tensor xf = float_arg(x, 2, op, "x"), wf = float_arg(w, 1, op, "w");
  const int64_t t = x.size(0), d = x.size(1);
  TORCH_CHECK_VALUE(w.size(0) == d, op, ": w must be [", d, "] for x of shape ", x.sizes(), ", got ", w.sizes());
  at::Tensor rf, s;
  if (res != nullptr) {
    rf = float_arg(*res, 2, op, "residual");
    TORCH_CHECK_VALUE(res->sizes() == x.sizes() && res->scalar_type() == x.scalar_type(), op,
                      ": residual must match x (", x.scalar_type(), " ", x.sizes(), "), got ", res->scalar_type(),
                      " ", res->sizes());
    if (x.scalar_type() == at::kBFloat16) {  // the block's bfloat16 sum, rounded as torch rounds it, then its norm
      s = at::add(x, *res);
      return {norm(op, s, nullptr, w, eps, isa).first, s};
    }
    s = at::empty({t, d}, xf.options());
  }
  at::Tensor y = at::empty({t, d}, xf.options().dtype(at::kFloat));
  const NormRows a{xf.data_ptr<float>(), xf.stride(0), res ? rf.data_ptr<float>() : nullptr,
                   res ? rf.stride(0) : 0, res ? s.data_ptr<float>() : nullptr, d, wf.data_ptr<float>(),
                   y.data_ptr<float>(), d, d, float(1.0 / double(d)), float(eps)};
  const auto kern = kernels(path).norm;
  at::parallel_for(0, t, grain(d), [&](int64_t b, int64_t e) { kern(a, b, e); });
  return {as_dtype(y, x.scalar_type()), s};
}

// Whether b's elements are a's (same start and strides) or share no byte range with them.
bool same_or_apart(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return true;
  if (a.data_ptr() == b.data_ptr() && a.strides() == b.strides()) return true;
  const auto span = [](const at::Tensor& t) {
    const auto* lo = static_cast<const char*>(t.data_ptr());
    int64_t last = 0;
    for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
    return std::pair{lo, lo + (last + 1) * int64_t(t.element_size())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a1 <= b0 || b1 <= a0;
}

void rope_run(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
              const at::Tensor& out, Isa path) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": x must be [T, R] or [T, H, R], got shape ", x.sizes());
  const at::Tensor xf = float_arg(x, x.dim(), op, "x");
  const int64_t t = x.size(0), r = x.size(-1), h = x.dim() == 3 ? x.size(1) : 1;
  TORCH_CHECK_VALUE(r % 2 == 0, op, ": x's last dimension (R = ", r, ") must be even: interleaved pairs");
  for (const auto& [c, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_cpu(*c, op, name);
    TORCH_CHECK_VALUE(c->scalar_type() == at::kFloat && c->dim() == 2 && c->size(0) == t && c->size(1) == r / 2 &&
                          (r == 2 || c->stride(1) == 1),
                      op, ": ", name, " must be float32 [", t, ", ", r / 2, "] with contiguous rows, got ",
                      c->scalar_type(), " ", c->sizes(), " strides ", c->strides());
  }
  check_cpu(out, op, "out");
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                        (r <= 1 || out.stride(-1) == 1),
                    op, ": out must be ", x.scalar_type(), " ", x.sizes(), " with its last dimension contiguous, got ",
                    out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out must not have elements that share memory, got strides ", out.strides());
  TORCH_CHECK_VALUE(same_or_apart(out, x), op, ": out must be x itself (in place) or apart from it, not over part of",
                    " it");
  // bfloat16: the float32 result into a float32 buffer, rounded into out once
  const at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), xf.options());
  const int64_t three = x.dim() == 3;
  const RopeRows a{xf.data_ptr<float>(), xf.stride(0), three ? xf.stride(1) : 0, cos.data_ptr<float>(),
                   sin.data_ptr<float>(), cos.stride(0), sin.stride(0), y.data_ptr<float>(), y.stride(0),
                   three ? y.stride(1) : 0, h, r};
  const auto kern = kernels(path).rope;
  at::parallel_for(0, t, grain(h * r), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(r);
    kern(a, b, e, tmp.data());
  });
  if (!y.is_same(out)) out.copy_(y);
}

// torch.topk(v[:n], k) as a CPU computes it (aten/src/ATen/native/TopKImpl.h, sorted): the same std::partial_sort
// or std::nth_element + std::sort of (value, index) pairs under the same comparison, so equal values break the same
// way and the order is torch's. q: scratch of n pairs.
void topk_like_torch(const float* v, int64_t n, int64_t k, std::vector<std::pair<double, int64_t>>& q,
                     int64_t* idx, float* val) {
  q.resize(n);
  for (int64_t j = 0; j < n; ++j) q[j] = {v[j], j};
  const auto larger = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
  };
  if (k * 64 <= n) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), larger);
  } else {
    std::nth_element(q.begin(), q.begin() + k - 1, q.end(), larger);
    std::sort(q.begin(), q.begin() + k - 1, larger);
  }
  for (int64_t j = 0; j < k; ++j) {
    if (idx != nullptr) idx[j] = q[j].second;
    if (val != nullptr) val[j] = float(q[j].first);
  }
}

}  // namespace

at::Tensor float_arg(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                    " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, op, ": ", name,
                    "'s last dimension must be contiguous (stride 1), got strides ", t.strides());
  return as_dtype(t, at::kFloat);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, c10::string_view isa) {
  return norm("rms_norm", x, nullptr, w, eps, isa).first;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                double eps, c10::string_view isa) {
  auto [y, s] = norm("add_rms_norm", x, &residual, w, eps, isa);
  return {y, as_dtype(s, x.scalar_type())};
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, c10::string_view isa) {
  const Isa path = pick_isa(std::string(isa), "rope");
  check_cpu(x, "rope", "x");
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_run("rope", x, cos, sin, out, path);
  return out;
}

void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
               c10::string_view isa) {
  rope_run("rope", x, cos, sin, out, pick_isa(std::string(isa), "rope"));  // what callers call: rope(out=...)
}

at::Tensor silu_mul(const at::Tensor& h, c10::string_view isa) {
  constexpr const char* op = "silu_mul";
  const Isa path = pick_isa(std::string(isa), op);
  const at::Tensor hf = float_arg(h, 2, op, "h");
  const int64_t t = h.size(0), inter = h.size(1) / 2;
  TORCH_CHECK_VALUE(h.size(1) % 2 == 0, op, ": h must be [T, 2I] (gate | up), got shape ", h.sizes());
  at::Tensor y = at::empty({t, inter}, hf.options());
  const float* src = hf.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t ldh = hf.stride(0);
  const auto kern = kernels(path).silu_mul;
  at::parallel_for(0, t, grain(3 * inter), [&](int64_t b, int64_t e) { kern(src, ldh, dst, inter, inter, b, e); });
  return as_dtype(y, h.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& x, const std::optional<at::Tensor>& gate_w,
                                             const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                                             int64_t top_k, bool norm_topk_prob, double routed_scaling_factor,
                                             c10::string_view isa) {
  constexpr const char* op = "moe_route";
  const Isa path = pick_isa(std::string(isa), op);
  const at::Tensor xf = float_arg(x, 2, op, "x");
  at::Tensor logits = xf;
  if (gate_w.has_value()) {
    check_cpu(*gate_w, op, "gate_w");
    TORCH_CHECK_VALUE(gate_w->scalar_type() == at::kFloat && gate_w->dim() == 2 && gate_w->size(1) == x.size(1), op,
                      ": gate_w must be float32 [E, ", x.size(1), "] for x of shape ", x.sizes(), ", got ",
                      gate_w->scalar_type(), " ", gate_w->sizes());
    logits = at::mm(xf, gate_w->t());  // Gate.forward's own matmul: the same logits, bit for bit
  }
  logits = logits.contiguous();
  const int64_t t = logits.size(0), e_count = logits.size(1);
  check_tensor(bias, at::kFloat, 1, op, "bias");
  check_cpu(bias, op, "bias");
  TORCH_CHECK_VALUE(bias.size(0) == e_count, op, ": bias must be [", e_count, "] (one per expert), got ", bias.sizes());
  TORCH_CHECK_VALUE(n_group >= 1 && e_count % n_group == 0 && (n_group == 1 || e_count / n_group >= 2), op,
                    ": n_group=", n_group, " must split the ", e_count, " experts into equal groups of 2 or more");
  const int64_t gsize = e_count / n_group, kept = n_group == 1 ? e_count : std::max<int64_t>(0, topk_group) * gsize;
  TORCH_CHECK_VALUE(n_group == 1 || (topk_group >= 1 && topk_group <= n_group), op, ": topk_group=", topk_group,
                    " must be in [1, n_group=", n_group, "]");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= kept, op, ": top_k=", top_k, " must be in [1, ", kept,
                    "] (the experts of the groups kept)");
  at::Tensor weights = at::empty({t, top_k}, logits.options());
  at::Tensor ids = at::empty({t, top_k}, logits.options().dtype(at::kLong));
  std::vector<float> scores(t * e_count);
  kernels(path).sigmoid(logits.data_ptr<float>(), scores.data(), t * e_count);
  const float *sc = scores.data(), *bi = bias.data_ptr<float>();
  float* wt = weights.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity(), scale = float(routed_scaling_factor);
  std::vector<std::pair<double, int64_t>> q;
  std::vector<float> choice(e_count), group(n_group), top2(2);
  std::vector<int64_t> keep(topk_group > 0 ? topk_group : 0);
  std::vector<bool> in(n_group);
  for (int64_t i = 0; i < t; ++i) {
    const float* s = sc + i * e_count;
    for (int64_t e = 0; e < e_count; ++e) choice[e] = s[e] + bi[e];  // the bias only chooses
    if (n_group > 1) {  // a group's score: the sum of its top two; experts outside the topk_group best are out
      for (int64_t g = 0; g < n_group; ++g) {
        topk_like_torch(choice.data() + g * gsize, gsize, 2, q, nullptr, top2.data());
        group[g] = top2[0] + top2[1];
      }
      topk_like_torch(group.data(), n_group, topk_group, q, keep.data(), nullptr);
      std::fill(in.begin(), in.end(), false);
      for (int64_t g : keep) in[g] = true;
      for (int64_t e = 0; e < e_count; ++e)
        if (!in[e / gsize]) choice[e] = -inf;
    }
    int64_t* ti = id + i * top_k;
    float* tw = wt + i * top_k;
    topk_like_torch(choice.data(), e_count, top_k, q, ti, nullptr);
    float sum = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) sum += (tw[k] = s[ti[k]]);
    const float denom = sum + 1e-20f;
    for (int64_t k = 0; k < top_k; ++k) tw[k] = (norm_topk_prob ? tw[k] / denom : tw[k]) * scale;
  }
  return {weights, ids};
}

}  // namespace specdec
