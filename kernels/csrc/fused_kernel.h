// The fused elementwise kernels of one ISA (fused.cpp compiles this once per ISA with per_isa.h). Each works on a
// range of rows, so the ops thread over rows. No #include here: the target region covers these definitions only.
//
// Float32 operations run in the order of the torch code each replaces (model/layers.py's RMSNorm and apply_rope,
// F.silu(a) * b, torch.sigmoid), with no fused multiply-add where that code has none; sums of many terms differ in
// their order only.

// One row: y = (x * rsqrt(mean(x^2) + eps)) * w. The last d % W columns take partial loads and stores.
inline void norm_row(const NormRows& a, const float* x, float* y) {
  using V = Vec::V;
  const int64_t d = a.d;
  V acc = Vec::zero();
  int64_t j = 0;
  for (; j + Vec::W <= d; j += Vec::W) {
    const V v = Vec::loadx(x + j);
    acc = Vec::add(acc, Vec::mul(v, v));
  }
  if (j < d) {
    const V v = Vec::loadx_n(x + j, int(d - j));
    acc = Vec::add(acc, Vec::mul(v, v));
  }
  const V r = Vec::set1(1.0f / std::sqrt(Vec::hsum(acc) * a.inv_dim + a.eps));  // RMSNorm: mul, add, then rsqrt
  for (j = 0; j + Vec::W <= d; j += Vec::W)
    Vec::store(y + j, Vec::mul(Vec::mul(Vec::loadx(x + j), r), Vec::loadx(a.w + j)));
  if (j < d) {
    const int n = int(d - j);
    Vec::store_n(y + j, Vec::mul(Vec::mul(Vec::loadx_n(x + j, n), r), Vec::loadx_n(a.w + j, n)), n);
  }
}

void norm_rows(const NormRows& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * a.ldx;
    if (a.res != nullptr) {  // the sum first: it is both an output and the norm's input
      float* s = a.sum + r * a.lds;
      const float* q = a.res + r * a.ldr;
      int64_t j = 0;
      for (; j + Vec::W <= a.d; j += Vec::W) Vec::store(s + j, Vec::add(Vec::loadx(x + j), Vec::loadx(q + j)));
      if (j < a.d) {
        const int n = int(a.d - j);
        Vec::store_n(s + j, Vec::add(Vec::loadx_n(x + j, n), Vec::loadx_n(q + j, n)), n);
      }
      x = s;
    }
    norm_row(a, x, a.y + r * a.ldy);
  }
}

// Pairs W at a time (Vec::pairs splits them into even and odd lanes), the last r/2 % W one by one. x is read into
// `tmp` first when y is x itself (in place), so every pair is read before its row is written.
void rope_rows(const RopeRows& a, int64_t t0, int64_t t1, float* tmp) {
  using V = Vec::V;
  const int64_t half = a.r / 2;
  for (int64_t t = t0; t < t1; ++t) {
    const float *c = a.cos + t * a.ct, *s = a.sin + t * a.st;
    for (int64_t h = 0; h < a.h; ++h) {
      const float* x = a.x + t * a.xt + h * a.xh;
      float* y = a.y + t * a.yt + h * a.yh;
      if (x == y) x = static_cast<const float*>(std::memcpy(tmp, x, a.r * sizeof(float)));
      int64_t i = 0;
      for (; i + Vec::W <= half; i += Vec::W) {
        V x1, x2;
        Vec::pairs(x + 2 * i, x1, x2);
        const V cv = Vec::loadx(c + i), sv = Vec::loadx(s + i);
        Vec::store(y + i, Vec::sub(Vec::mul(x1, cv), Vec::mul(x2, sv)));
        Vec::store(y + half + i, Vec::add(Vec::mul(x2, cv), Vec::mul(x1, sv)));
      }
      for (; i < half; ++i) {
        const float x1 = x[2 * i], x2 = x[2 * i + 1];
        y[i] = x1 * c[i] - x2 * s[i];
        y[half + i] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

inline Vec::V silu_mul_v(Vec::V a, Vec::V b) {  // F.silu(a) * b: a / (1 + e^-a), times b
  return Vec::mul(Vec::div(a, Vec::add(Vec::set1(1.0f), vexp(Vec::sub(Vec::zero(), a)))), b);
}

void silu_mul_rows(const float* h, int64_t ldh, float* y, int64_t ldy, int64_t inter, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float *a = h + r * ldh, *b = a + inter;
    float* o = y + r * ldy;
    int64_t j = 0;
    for (; j + Vec::W <= inter; j += Vec::W) Vec::store(o + j, silu_mul_v(Vec::loadx(a + j), Vec::loadx(b + j)));
    if (j < inter) {
      const int n = int(inter - j);
      Vec::store_n(o + j, silu_mul_v(Vec::loadx_n(a + j, n), Vec::loadx_n(b + j, n)), n);
    }
  }
}

inline Vec::V sigmoid_v(Vec::V x) {  // torch.sigmoid: 1 / (1 + e^-x)
  const Vec::V one = Vec::set1(1.0f);
  return Vec::div(one, Vec::add(one, vexp(Vec::sub(Vec::zero(), x))));
}

void sigmoid(const float* x, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + Vec::W <= n; j += Vec::W) Vec::store(y + j, sigmoid_v(Vec::loadx(x + j)));
  if (j < n) Vec::store_n(y + j, sigmoid_v(Vec::loadx_n(x + j, int(n - j))), int(n - j));
}
