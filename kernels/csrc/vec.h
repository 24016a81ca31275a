// One ISA's float vector and its primitives, per path: portable (one lane: what any C++ compiler runs and may
// vectorize), AVX2 and AVX-512. A kernel body written against `Vec` (rows_kernel.h, fused_kernel.h, mla_kernel.h) is
// compiled once per ISA by per_isa.h. No -march flags: each ISA region carries its own target, so one build runs on
// any x86-64 CPU and the ops pick a path at run time (cpu_ops.h's pick_isa).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "decode.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPECDEC_X86 1
#include <immintrin.h>
#endif

#define SPECDEC_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")") namespace avx2 {
#define SPECDEC_AVX512_BEGIN                                                                                  \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,fma,f16c\")") namespace avx512 {
#define SPECDEC_ISA_END \
  }                     \
  _Pragma("GCC pop_options")

namespace specdec {

// max(a, b) on every path is SSE's: a > b ? a : b, so a NaN in `a` gives b and a NaN in `b` stays.

namespace portable {

struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) v[b] = fp8_scaled(uint8_t(b));
  }
};
inline const Fp8Table fp8_table;

struct Vec {
  using V = float;
  static constexpr int W = 1, MR = 4, NR = 4;
  static V zero() { return 0.0f; }
  static V set1(float v) { return v; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V round(V a) { return std::nearbyint(a); }
  static V pow2(V n) {  // 2^n for an integer n in [-126, 127] (NaN: anything, as the vector paths)
    const uint32_t bits = uint32_t((n == n ? int32_t(n) : 0) + 127) << 23;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  }
  static V loadx(const float* p) { return *p; }
  static V loadx_n(const float* p, int) { return *p; }  // W = 1: never partial
  static V fp8(const uint8_t* p) { return fp8_table.v[*p]; }
  static V fp8_n(const uint8_t* p, int) { return fp8(p); }
  static V bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static V bf16_n(const uint16_t* p, int) { return bf16(p); }
  static void pairs(const float* p, V& even, V& odd) {  // W pairs (x0, x1), (x2, x3)...: evens, odds
    even = p[0];
    odd = p[1];
  }
  static void store(float* p, V v) { *p = v; }
  static void store_n(float* p, V v, int) { *p = v; }
  static float hsum(V v) { return v; }
  static float hmax(V v) { return v; }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};

}  // namespace portable

#ifdef SPECDEC_X86

SPECDEC_AVX2_BEGIN

struct Vec {  // 8 lanes, a 4 x 3 tile: the fastest of 1..8 x 1..4 tried (16 ymm registers: the block totals spill)
  using V = __m256;
  static constexpr int W = 8, MR = 4, NR = 3;
  static __m256i first(int n) {  // lanes < n
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
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
  static void pairs(const float* p, V& even, V& odd) {
    const V a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);  // a0..a7, b0..b7 -> a0 a2 b0 b2 | a4 a6 b4 b6
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, V v, int n) { _mm256_maskstore_ps(p, first(n), v); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

SPECDEC_ISA_END

SPECDEC_AVX512_BEGIN

struct Vec {  // 16 lanes, a 4 x 4 tile, masked loads for partial blocks
  using V = __m512;
  static constexpr int W = 16, MR = 4, NR = 4;
  static __mmask16 first(int n) { return __mmask16((1u << n) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
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
  static void pairs(const float* p, V& even, V& odd) {
    const V a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const __m512i i = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even = _mm512_permutex2var_ps(a, i, b);
    odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(i, _mm512_set1_epi32(1)), b);
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

SPECDEC_ISA_END

#endif  // SPECDEC_X86

#define SPECDEC_KERNEL "vec_math.h"
#include "per_isa.h"

}  // namespace specdec
