// The register kernels of one ISA. linear.cpp compiles this once per ISA (per_isa.h) against that ISA's `Vec`
// (vec.h: lanes W, register tile MR x NR, and the load / decode / fma primitives); so one body serves every ISA and
// each copy is compiled for its own. No #include here: the target region covers these definitions only.
//
// A tile is MR rows of x by NR rows of W. Each K block accumulates x * decoded W in float32 vectors, then adds the
// block's sum times its scale into the totals: the scale costs one FMA per block, not one multiply per weight.

template <bool BF16>
inline Vec::V load_w(const Weight& w, int64_t r, int64_t c) {
  if constexpr (BF16) {
    return Vec::bf16(static_cast<const uint16_t*>(w.data) + r * w.k + c);
  } else {
    return Vec::fp8(static_cast<const uint8_t*>(w.data) + r * w.k + c);
  }
}

template <bool BF16>
inline Vec::V load_w_n(const Weight& w, int64_t r, int64_t c, int n) {
  if constexpr (BF16) {
    return Vec::bf16_n(static_cast<const uint16_t*>(w.data) + r * w.k + c, n);
  } else {
    return Vec::fp8_n(static_cast<const uint8_t*>(w.data) + r * w.k + c, n);
  }
}

// Row r's scales, one per K block (a BF16 weight: one block, scale 1), each to be multiplied by unit<BF16>().
template <bool BF16>
inline const float* scale_row(const Weight& w, int64_t r) {
  static const float one = 1.0f;
  return BF16 ? &one : w.s + ((r + w.n_off) / w.bn) * w.lds;
}

template <bool BF16>
inline float unit() {  // FP8 decodes to 2^-8 of the byte's value
  return BF16 ? 1.0f : kFp8Unit;
}

// The end of K block kb in this weight's columns (a BF16 weight is one block).
template <bool BF16>
inline int64_t block_end(const Weight& w, int64_t kb) {
  if constexpr (BF16) {
    return w.k;
  } else {
    return std::min(w.k, (kb + 1) * w.bk - w.k_off);
  }
}

template <bool BF16, int MR, int NR>
void tile(const Gemm& g, int64_t m0, int64_t n0) {
  using V = Vec::V;
  constexpr int64_t es = BF16 ? 2 : 1;  // bytes per weight
  const Weight& w = g.w;
  const float* x = g.x + m0 * g.ldx;
  // the next tile's rows, fetched while this one computes (none past W's end)
  const char* next = static_cast<const char*>(w.data) + (n0 + NR) * w.k * es;
  const bool ahead = n0 + 2 * NR <= w.n;
  const float* srow[NR];
  for (int j = 0; j < NR; ++j) srow[j] = scale_row<BF16>(w, n0 + j);
  V tot[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tot[i][j] = Vec::zero();
  for (int64_t lo = 0, kb = 0; lo < w.k; ++kb) {
    const int64_t hi = block_end<BF16>(w, kb);
    V acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = Vec::zero();
    int64_t c = lo;
    for (; c + Vec::W <= hi; c += Vec::W) {
      if (ahead && ((c * es) & 63) < Vec::W * es)  // once per cache line of each row
        for (int j = 0; j < NR; ++j) Vec::prefetch(next + (j * w.k + c) * es);
      V wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = load_w<BF16>(w, n0 + j, c);
      for (int i = 0; i < MR; ++i) {
        const V xv = Vec::loadx(x + i * g.ldx + c);
        for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(xv, wv[j], acc[i][j]);
      }
    }
    if (c < hi) {  // the last columns of the block, fewer than the lanes (K, the block or a cut block)
      const int n = int(hi - c);
      V wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = load_w_n<BF16>(w, n0 + j, c, n);
      for (int i = 0; i < MR; ++i) {
        const V xv = Vec::loadx_n(x + i * g.ldx + c, n);
        for (int j = 0; j < NR; ++j) acc[i][j] = Vec::fma(xv, wv[j], acc[i][j]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const V sc = Vec::set1(srow[j][kb] * unit<BF16>());
      for (int i = 0; i < MR; ++i) tot[i][j] = Vec::fma(acc[i][j], sc, tot[i][j]);
    }
    lo = hi;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) g.y[(m0 + i) * g.ldy + n0 + j] = Vec::hsum(tot[i][j]);
}

// The last r < MR rows of x (r = 0: none).
template <bool BF16, int NR, int MR>
inline void tile_rest(const Gemm& g, int64_t m0, int64_t n0, int64_t r) {
  if constexpr (MR > 0) {
    if (r == MR) {
      tile<BF16, MR, NR>(g, m0, n0);
    } else {
      tile_rest<BF16, NR, MR - 1>(g, m0, n0, r);
    }
  }
}

template <bool BF16, int NR>
inline void tile_column(const Gemm& g, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + Vec::MR <= g.m; m0 += Vec::MR) tile<BF16, Vec::MR, NR>(g, m0, n0);
  tile_rest<BF16, NR, Vec::MR - 1>(g, m0, n0, g.m - m0);
}

// Rows [n_begin, n_end) of y's columns. N tiles outside, M tiles inside: a tile's weight rows come from memory
// once for all of x's rows and stay in cache while the M tiles reuse them.
template <bool BF16>
void rows_t(const Gemm& g, int64_t n_begin, int64_t n_end) {
  int64_t n0 = n_begin;
  for (; n0 + Vec::NR <= n_end; n0 += Vec::NR) tile_column<BF16, Vec::NR>(g, n0);
  for (; n0 < n_end; ++n0) tile_column<BF16, 1>(g, n0);
}

void rows(const Gemm& g, int64_t n_begin, int64_t n_end) {
  if (g.w.bf16) {
    rows_t<true>(g, n_begin, n_end);
  } else {
    rows_t<false>(g, n_begin, n_end);
  }
}

// W's rows [r0, r1) as float32 with their scales applied, into out [r1 - r0, k]. Decoded value times
// (scale * 2^8) rounds once, so this equals torch's w.float() * scale bit for bit.
template <bool BF16>
void dequant_t(const Weight& w, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + (r - r0) * w.k;
    for (int64_t lo = 0, kb = 0; lo < w.k; ++kb) {
      const int64_t hi = block_end<BF16>(w, kb);
      const Vec::V sc = Vec::set1(scale_row<BF16>(w, r)[kb] * unit<BF16>());
      int64_t c = lo;
      for (; c + Vec::W <= hi; c += Vec::W) Vec::store(o + c, Vec::mul(load_w<BF16>(w, r, c), sc));
      if (c < hi) Vec::store_n(o + c, Vec::mul(load_w_n<BF16>(w, r, c, int(hi - c)), sc), int(hi - c));
      lo = hi;
    }
  }
}

void dequant(const Weight& w, int64_t r0, int64_t r1, float* out) {
  if (w.bf16) {
    dequant_t<true>(w, r0, r1, out);
  } else {
    dequant_t<false>(w, r0, r1, out);
  }
}
