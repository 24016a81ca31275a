// The weight and GEMM descriptions and the scalar FP8 / BF16 decoders: what the register kernels (rows_kernel.h)
// need, free of torch.
#pragma once

#include <cstdint>
#include <cstring>

namespace specdec {

// W [n, k] with contiguous rows: e4m3fn bytes with float32 block scales, or bfloat16. Row r, column c of an FP8
// weight use s[((r + n_off) / bn) * lds + (c + k_off) / bk]: a tensor-parallel shard that starts inside a block
// keeps its part of the block (n_off / k_off into it) and a copy of the block's scale.
struct Weight {
  const void* data;
  int64_t n, k;
  bool bf16;
  const float* s = nullptr;
  int64_t lds = 0, bn = 1, bk = 1, n_off = 0, k_off = 0;
};

// y [m, n] = x [m, k] @ W^T for W's rows [n_begin, n_end); x and y float32 with unit column stride
struct Gemm {
  Weight w;
  const float* x;
  int64_t ldx, m;
  float* y;
  int64_t ldy;
};

// Scalar decoders. e4m3fn -> float via half-precision bits: sign to bit 15, exponent and mantissa shifted into the
// half's low exponent bits; the half's exponent bias (15 vs 7) leaves the value 2^-8 of the byte's, exact for
// subnormals too. Kernels fold the 2^8 into the block scale (kFp8Unit). 0x7F / 0xFF (NaN in torch) read as
// +-480: the loader refuses NaN weights.
constexpr float kFp8Unit = 256.0f;

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float v;
  if (exp == 0) {
    v = float(mant) * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24
  } else {
    uint32_t bits = ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127; no inf/NaN halves arise from e4m3
    std::memcpy(&v, &bits, 4);
  }
  uint32_t out;
  std::memcpy(&out, &v, 4);
  out |= sign;
  std::memcpy(&v, &out, 4);
  return v;
}

inline uint16_t fp8_half_bits(uint8_t b) { return uint16_t(((b & 0x80) << 8) | ((b & 0x7F) << 7)); }

inline float fp8_scaled(uint8_t b) { return half_to_float(fp8_half_bits(b)); }  // the byte's value * 2^-8

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace specdec
