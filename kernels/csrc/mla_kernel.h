// Absorbed MLA's kernels of one ISA (mla.cpp compiles this once per ISA with per_isa.h): the attention over the
// latent rows, and the FP8 product that folds kv_b's key half into the query. No #include here: the target region
// covers these definitions only.

// g.p[r][i] = g.q[r] . key[i] over d columns for keys [i0, i0 + NK): a G x NK register tile, so each step over d
// loads G + NK vectors for G * NK multiply-adds.
template <int G, int NK>
inline void dots_tile(const Group& g, const float* const* key, int64_t i0, int64_t d) {
  using V = Vec::V;
  V s[G][NK];
  for (int r = 0; r < G; ++r)
    for (int k = 0; k < NK; ++k) s[r][k] = Vec::zero();
  int64_t j = 0;
  for (; j + Vec::W <= d; j += Vec::W) {
    V kv[NK];
    for (int k = 0; k < NK; ++k) kv[k] = Vec::loadx(key[i0 + k] + j);
    for (int r = 0; r < G; ++r) {
      const V qv = Vec::loadx(g.q[r] + j);
      for (int k = 0; k < NK; ++k) s[r][k] = Vec::fma(qv, kv[k], s[r][k]);
    }
  }
  if (j < d) {
    const int n = int(d - j);
    V kv[NK];
    for (int k = 0; k < NK; ++k) kv[k] = Vec::loadx_n(key[i0 + k] + j, n);
    for (int r = 0; r < G; ++r) {
      const V qv = Vec::loadx_n(g.q[r] + j, n);
      for (int k = 0; k < NK; ++k) s[r][k] = Vec::fma(qv, kv[k], s[r][k]);
    }
  }
  for (int r = 0; r < G; ++r)
    for (int k = 0; k < NK; ++k) g.p[r][i0 + k] = Vec::hsum(s[r][k]);
}

template <int G>
void dots(const Group& g, const float* const* key, int64_t kc, int64_t d) {
  int64_t i = 0;
  for (; i + Vec::NR <= kc; i += Vec::NR) dots_tile<G, Vec::NR>(g, key, i, d);
  for (; i < kc; ++i) dots_tile<G, 1>(g, key, i, d);
}

// NV vectors of columns from j (n lanes in the last): acc[r] = acc[r] * f[r] + sum_i p[r][i] * key[i].
template <int G, int NV>
inline void accumulate_strip(const Group& g, const float* const* key, int64_t kc, int64_t j, int n) {
  using V = Vec::V;
  const auto load = [n](const float* ptr, int v) {
    return v == NV - 1 && n < Vec::W ? Vec::loadx_n(ptr, n) : Vec::loadx(ptr);
  };
  V a[G][NV];
  for (int r = 0; r < G; ++r)
    for (int v = 0; v < NV; ++v) a[r][v] = Vec::mul(load(g.acc[r] + j + v * Vec::W, v), Vec::set1(g.f[r]));
  for (int64_t i = 0; i < kc; ++i) {
    V k[NV];
    for (int v = 0; v < NV; ++v) k[v] = load(key[i] + j + v * Vec::W, v);
    for (int r = 0; r < G; ++r) {
      const V pv = Vec::set1(g.p[r][i]);
      for (int v = 0; v < NV; ++v) a[r][v] = Vec::fma(pv, k[v], a[r][v]);
    }
  }
  for (int r = 0; r < G; ++r)
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1 && n < Vec::W) {
        Vec::store_n(g.acc[r] + j + v * Vec::W, a[r][v], n);
      } else {
        Vec::store(g.acc[r] + j + v * Vec::W, a[r][v]);
      }
    }
}

template <int G>
void accumulate(const Group& g, const float* const* key, int64_t kc, int64_t c) {
  int64_t j = 0;
  for (; j + Vec::NR * Vec::W <= c; j += Vec::NR * Vec::W) accumulate_strip<G, Vec::NR>(g, key, kc, j, Vec::W);
  for (; j < c; j += Vec::W) accumulate_strip<G, 1>(g, key, kc, j, int(std::min<int64_t>(Vec::W, c - j)));
}

// p[i] = e^(p[i] - mx) for the visible keys, exactly 0 for the others; returns their sum.
inline float softmax_terms(float* p, const bool* visible, int64_t kc, float mx) {
  using V = Vec::V;
  const V m = Vec::set1(mx);
  int64_t i = 0;
  for (; i + Vec::W <= kc; i += Vec::W) Vec::store(p + i, vexp(Vec::sub(Vec::loadx(p + i), m)));
  if (i < kc) Vec::store_n(p + i, vexp(Vec::sub(Vec::loadx_n(p + i, int(kc - i)), m)), int(kc - i));
  float sum = 0.0f;
  for (i = 0; i < kc; ++i) sum += visible[i] ? p[i] : (p[i] = 0.0f);
  return sum;
}

// G rows from row m0 of the task (row m: token q0 + m / hh, head h0 + m % hh) against keys [k0, k0 + kc).
template <int G>
void attend_group(const Attn& a, int64_t b, int64_t h0, int64_t hh, int64_t m0, int64_t k0, int64_t kc,
                  const float* const* key, float* p, float* acc, float* mx, float* l) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t q0 = a.cu[b], ctx = a.ctx[b];
  Group g;
  int64_t tok[G];
  for (int r = 0; r < G; ++r) {
    tok[r] = q0 + (m0 + r) / hh;
    g.q[r] = a.q + tok[r] * a.qt + (h0 + (m0 + r) % hh) * a.qh;
    g.p[r] = p + r * kKeys;
    g.acc[r] = acc + r * a.c;
  }
  dots<G>(g, key, kc, a.d);
  bool visible[kKeys];
  for (int r = 0; r < G; ++r) {
    float top = -inf;
    for (int64_t i = 0; i < kc; ++i) {
      const int64_t j = k0 + i - ctx;  // >= 0: the step's own key j, seen iff tree_mask[t, j]
      visible[i] = j < 0 || a.mask[tok[r] * a.mt + j * a.mj];
      g.p[r][i] *= a.scale;
      if (visible[i]) top = std::max(top, g.p[r][i]);
    }
    if (top == -inf) {  // no key of this chunk for this row: its sums stay
      std::fill(g.p[r], g.p[r] + kc, 0.0f);
      g.f[r] = 1.0f;
      continue;
    }
    const float nm = std::max(mx[r], top);
    g.f[r] = mx[r] == -inf ? 0.0f : std::exp(mx[r] - nm);
    l[r] = l[r] * g.f[r] + softmax_terms(g.p[r], visible, kc, nm);
    mx[r] = nm;
  }
  accumulate<G>(g, key, kc, a.c);
}

template <int G>
inline void attend_rest(const Attn& a, int64_t b, int64_t h0, int64_t hh, int64_t m0, int64_t k0, int64_t kc,
                        const float* const* key, float* p, float* acc, float* mx, float* l, int64_t rows) {
  if constexpr (G > 0) {
    if (rows == G) {
      attend_group<G>(a, b, h0, hh, m0, k0, kc, key, p, acc, mx, l);
    } else {
      attend_rest<G - 1>(a, b, h0, hh, m0, k0, kc, key, p, acc, mx, l, rows);
    }
  }
}

// Sequence b's queries at heads [h0, h1): out[t, h] = softmax(scale * q[t, h] . keys) @ keys[:, :c] over the keys
// query t sees. The keys come in chunks of kKeys, each read once for a block of up to kRows (query, head) rows;
// the softmax runs online (a running max per row, earlier terms rescaled when it grows). buf: this thread's
// scratch.
void attend(const Attn& a, int64_t b, int64_t h0, int64_t h1, std::vector<float>& buf) {
  const int64_t q0 = a.cu[b], n = a.cu[b + 1] - q0, len = a.ctx[b] + n, hh = h1 - h0;
  const int64_t c = a.c, d = a.d, rows = n * hh, mr = std::min(rows, kRows);
  buf.resize(mr * (c + kKeys + 2) + (a.kv_bf16 ? kKeys * d : 0));
  float *acc = buf.data(), *p = acc + mr * c, *mx = p + mr * kKeys, *l = mx + mr, *kf = l + mr;
  const float* key[kKeys];
  for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
    const int64_t mc = std::min(kRows, rows - m0);
    std::fill(acc, acc + mc * c, 0.0f);
    std::fill(mx, mx + mc, -std::numeric_limits<float>::infinity());
    std::fill(l, l + mc, 0.0f);
    for (int64_t k0 = 0; k0 < len; k0 += kKeys) {
      const int64_t kc = std::min(kKeys, len - k0);
      for (int64_t i = 0; i < kc; ++i) {
        const int64_t slot = a.bt[b * a.ldbt + k0 + i];
        if (!a.kv_bf16) {
          key[i] = static_cast<const float*>(a.kv) + slot * a.ldkv;
          continue;
        }
        const uint16_t* src = static_cast<const uint16_t*>(a.kv) + slot * a.ldkv;
        float* dst = kf + i * d;  // a bfloat16 row to float32 once, for every query row
        int64_t j = 0;
        for (; j + Vec::W <= d; j += Vec::W) Vec::store(dst + j, Vec::bf16(src + j));
        if (j < d) Vec::store_n(dst + j, Vec::bf16_n(src + j, int(d - j)), int(d - j));
        key[i] = dst;
      }
      for (int64_t m = 0; m < mc; m += kGroup)
        attend_rest<kGroup>(a, b, h0, hh, m0 + m, k0, kc, key, p + m * kKeys, acc + m * c, mx + m, l + m,
                            std::min(kGroup, mc - m));
    }
    for (int64_t m = 0; m < mc; ++m) {  // a query that saw no key: 0 / 0, NaN, as softmax over nothing
      const int64_t t = q0 + (m0 + m) / hh, h = h0 + (m0 + m) % hh;
      float* o = a.out + t * a.ot + h * a.oh;
      for (int64_t j = 0; j < c; ++j) o[j] = acc[m * c + j] / l[m];
    }
  }
}

// y[t][c0 .. c0 + NV W) += (sum over rows r of x[t][r] * W[r, c]) * scol[c] for MT tokens; n_last: lanes of the last
// vector (W, or fewer at the end of a row).
template <int MT, int NV>
inline void absorb_strip(const AbsorbQ& a, int64_t r_begin, int64_t r_end, const float* const* x, float* const* y,
                         const float* scol, int64_t c0, int n_last) {
  using V = Vec::V;
  const uint8_t* w = static_cast<const uint8_t*>(a.w.data);
  V acc[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::zero();
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint8_t* wr = w + r * a.w.k + c0;
    V wv[NV];
    for (int j = 0; j < NV; ++j)
      wv[j] = j == NV - 1 && n_last < Vec::W ? Vec::fp8_n(wr + j * Vec::W, n_last) : Vec::fp8(wr + j * Vec::W);
    for (int i = 0; i < MT; ++i) {
      const V xv = Vec::set1(x[i][r - r_begin]);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NV; ++j) {
      float* yp = y[i] + c0 + j * Vec::W;
      const float* sp = scol + c0 + j * Vec::W;
      const int n = j == NV - 1 ? n_last : Vec::W;
      if (n == Vec::W) {
        Vec::store(yp, Vec::fma(acc[i][j], Vec::loadx(sp), Vec::loadx(yp)));
      } else {
        Vec::store_n(yp, Vec::fma(acc[i][j], Vec::loadx_n(sp, n), Vec::loadx_n(yp, n)), n);
      }
    }
}

// MT tokens from t0, W's rows [r_begin, r_end) (one row block of head h's key rows) over every column.
template <int MT>
void absorb_tile(const AbsorbQ& a, int64_t h, int64_t r_begin, int64_t r_end, int64_t t0, const float* scol) {
  const float* x[MT];
  float* y[MT];
  for (int i = 0; i < MT; ++i) {
    x[i] = a.x + (t0 + i) * a.xt + h * a.xh + (r_begin - h * (a.dn + a.dv));
    y[i] = a.y + (t0 + i) * a.yt + h * a.yh;
  }
  const int64_t c = a.w.k;
  int64_t c0 = 0;
  for (; c0 + Vec::NR * Vec::W <= c; c0 += Vec::NR * Vec::W)
    absorb_strip<MT, Vec::NR>(a, r_begin, r_end, x, y, scol, c0, Vec::W);
  for (; c0 < c; c0 += Vec::W)
    absorb_strip<MT, 1>(a, r_begin, r_end, x, y, scol, c0, int(std::min<int64_t>(Vec::W, c - c0)));
}

template <int MT>
inline void absorb_rest(const AbsorbQ& a, int64_t h, int64_t r_begin, int64_t r_end, int64_t t0, int64_t mt,
                        const float* scol) {
  if constexpr (MT > 0) {
    if (mt == MT) {
      absorb_tile<MT>(a, h, r_begin, r_end, t0, scol);
    } else {
      absorb_rest<MT - 1>(a, h, r_begin, r_end, t0, mt, scol);
    }
  }
}

// Head h of q_lat: y[t, h, :] = sum_d x[t, h, d] * dequant(W)[h (dn + dv) + d, :]. Each row block's partial sums
// take their scales once, per column (scol: the block row's scales spread over the columns, times 2^8).
void absorb_q_head(const AbsorbQ& a, int64_t h, std::vector<float>& scol) {
  const Weight& w = a.w;
  const int64_t r0 = h * (a.dn + a.dv);
  for (int64_t t = 0; t < a.t; ++t) std::fill(a.y + t * a.yt + h * a.yh, a.y + t * a.yt + h * a.yh + w.k, 0.0f);
  scol.resize(w.k);
  for (int64_t lo = 0; lo < a.dn;) {
    const int64_t blk = (r0 + lo + w.n_off) / w.bn, hi = std::min(a.dn, (blk + 1) * w.bn - w.n_off - r0);
    for (int64_t c = 0; c < w.k; ++c) scol[c] = w.s[blk * w.lds + (c + w.k_off) / w.bk] * kFp8Unit;
    int64_t t0 = 0;
    for (; t0 + Vec::MR <= a.t; t0 += Vec::MR) absorb_tile<Vec::MR>(a, h, r0 + lo, r0 + hi, t0, scol.data());
    absorb_rest<Vec::MR - 1>(a, h, r0 + lo, r0 + hi, t0, a.t - t0, scol.data());
    lo = hi;
  }
}
