// Functions of `Vec`, one body for every ISA (per_isa.h). No #include here: the target region covers these
// definitions only.

// e^x in float32 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n), within 2 ulp
// of the exact value for x in [-87.3, 88.0]; x below gives ~1e-38 (not 0: callers that need exact zeros, a softmax's
// masked keys, set them), x above gives 2^127, NaN stays NaN.
inline Vec::V vexp(Vec::V x) {
  using V = Vec::V;
  x = Vec::min(Vec::set1(88.0f), Vec::max(Vec::set1(-87.3f), x));  // this order keeps a NaN x
  const V n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  V r = Vec::fma(n, Vec::set1(-0.693359375f), x);  // ln 2 in two parts: n * the first is exact
  r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);
  V p = Vec::set1(1.9875691500e-4f);
  p = Vec::fma(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fma(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fma(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fma(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fma(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::add(Vec::fma(p, Vec::mul(r, r), r), Vec::set1(1.0f));
  return Vec::mul(p, Vec::pow2(n));
}
