// The linears: y = x @ W^T for FP8 (block-scaled e4m3fn) and BF16 weights, float32 activations. The ISA paths side
// by side (portable, AVX2, AVX-512; one body, rows_kernel.h, compiled once per ISA under its target), the run-time
// choice from the CPU's flags, the route by M (register kernels for few rows, dequantized tiles and torch's GEMM for
// many), and the fp8_linear / bf16_linear ops. No -march flags: each ISA region carries its own target, so one build
// runs on any x86-64 CPU.
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#define SPECDEC_X86 1
#include <immintrin.h>
#endif

namespace specdec {

namespace portable {

struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) v[b] = fp8_scaled(uint8_t(b));
  }
};
const Fp8Table fp8_table;

struct Vec {  // one lane: what any C++ compiler runs (and may vectorize)
  using V = float;
  static constexpr int W = 1, MR = 4, NR = 4;
  static V zero() { return 0.0f; }
  static V set1(float v) { return v; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V loadx(const float* p) { return *p; }
  static V loadx_n(const float* p, int) { return *p; }  // W = 1: never partial
  static V fp8(const uint8_t* p) { return fp8_table.v[*p]; }
  static V fp8_n(const uint8_t* p, int) { return fp8(p); }
  static V bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static V bf16_n(const uint16_t* p, int) { return bf16(p); }
  static void store(float* p, V v) { *p = v; }
  static void store_n(float* p, V v, int) { *p = v; }
  static float hsum(V v) { return v; }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};

#include "rows_kernel.h"

}  // namespace portable

#ifdef SPECDEC_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct Vec {  // 8 lanes, a 4 x 3 tile: the fastest of 1..8 x 1..4 tried (16 ymm registers: the block totals spill)
  using V = __m256;
  static constexpr int W = 8, MR = 4, NR = 3;
  static __m256i first(int n) {  // lanes < n
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V loadx(const float* p) { return _mm256_loadu_ps(p); }
  static V loadx_n(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static V fp8_bytes(__m128i b) {  // 8 bytes -> halves (sign-extend, shift into place, drop the extended bit 14)
    const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(short(0xBF80)));
    return _mm256_cvtph_ps(h);
  }
  static V fp8(const uint8_t* p) { return fp8_bytes(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static V fp8_n(const uint8_t* p, int n) {
    long long b = 0;
    std::memcpy(&b, p, n);
    return fp8_bytes(_mm_cvtsi64_si128(b));
  }
  static V bf16(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static V bf16_n(const uint16_t* p, int n) {
    uint16_t b[8] = {};
    std::memcpy(b, p, 2 * n);
    return bf16(b);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, V v, int n) { _mm256_maskstore_ps(p, first(n), v); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

#include "rows_kernel.h"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma,f16c")
namespace avx512 {

struct Vec {  // 16 lanes, a 4 x 4 tile, masked loads for partial blocks
  using V = __m512;
  static constexpr int W = 16, MR = 4, NR = 4;
  static __mmask16 first(int n) { return __mmask16((1u << n) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V loadx(const float* p) { return _mm512_loadu_ps(p); }
  static V loadx_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static V fp8_bytes(__m128i b) {  // 16 bytes -> halves, as avx2::Vec::fp8_bytes
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                                       _mm256_set1_epi16(short(0xBF80)));
    return _mm512_cvtph_ps(h);
  }
  static V fp8(const uint8_t* p) { return fp8_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V fp8_n(const uint8_t* p, int n) { return fp8_bytes(_mm_maskz_loadu_epi8(first(n), p)); }
  static V bf16_bits(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
  static V bf16(const uint16_t* p) { return bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V bf16_n(const uint16_t* p, int n) { return bf16_bits(_mm256_maskz_loadu_epi16(first(n), p)); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

#include "rows_kernel.h"

}  // namespace avx512
#pragma GCC pop_options

#endif  // SPECDEC_X86

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
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k, op, ": ", name, " must be [M, ", k, "], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ", name,
                    " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.stride(1) == 1 || k <= 1, op, ": ", name,
                    "'s rows must be contiguous (stride(1) == 1), got strides ", x.strides());
  return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
}

void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == dim, op, ": ", name, " must be a ", dim, "-D ", dtype,
                    " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(), " for shape ",
                    t.sizes());
}

// fp8_linear: y [M, N] = x [M, K] @ dequant(W8 [N, K], S)^T with W8 e4m3fn and S its float32 block scales.
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t block_n,
                      int64_t block_k, int64_t n_off, int64_t k_off, c10::string_view isa,
                      std::optional<int64_t> gemm_rows) {
  constexpr const char* op = "fp8_linear";
  const Isa path = pick_isa(std::string(isa), op);
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
  const at::Tensor xf = float_rows(x, k, op, "x");
  at::Tensor y = at::empty({xf.size(0), n}, xf.options());
  const Weight wt{w.data_ptr(), n, k, false, s.data_ptr<float>(), sk, block_n, block_k, n_off, k_off};
  matmul(Gemm{wt, xf.data_ptr<float>(), xf.stride(0), xf.size(0), y.data_ptr<float>(), n}, path,
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
