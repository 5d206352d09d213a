// Standalone checker and micro-benchmark for the NVFP4 kernels (no JAX, no XLA):
// the target for compute-sanitizer and for timing kernel variants.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/nvfp4_check.cu ffi/nvfp4_kernels.cu -o nvfp4_check
//   ./nvfp4_check check            # correctness against a float64 CPU reference
//   ./nvfp4_check bench [reps]     # graph-timed variants, weights rotated past L2
//   RJ_BENCH_G=1 ./nvfp4_check bench [reps]  # the general kernel's U and W at M = 4, 8
//   ./nvfp4_check profile M N K    # plain launches of the library kernel (for ncu)
//
// Exit code 0 only if every check passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nvfp4_kernels.cuh"
#include "nvfp4_kernels.h"
#include "tests/host_util.h"

namespace {

// ------------------------------------------------------------ host formats --

const float kE2M1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};

double E2M1Value(uint8_t code) {
  const double v = kE2M1[code & 7];
  return (code & 8) ? -v : v;
}

double E4M3ValueSlow(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -v : v;
}

double E4M3Value(uint8_t b) {
  static const std::vector<double> table = [] {
    std::vector<double> t(256);
    for (int i = 0; i < 256; ++i) t[i] = E4M3ValueSlow(static_cast<uint8_t>(i));
    return t;
  }();
  return table[b];
}

// float -> e4m3 with round-to-nearest-even, saturating to 448 (input in [0, 448]).
uint8_t E4M3FromFloat(float v) {
  uint8_t best = 0;
  double bestd = INFINITY;
  for (int b = 0; b <= 0x7E; ++b) {
    const double d = std::fabs(E4M3Value(static_cast<uint8_t>(b)) - static_cast<double>(v));
    if (d < bestd || (d == bestd && (b & 1) == 0 && (best & 1) == 1)) {
      bestd = d;
      best = static_cast<uint8_t>(b);
    }
  }
  return best;
}

float RoundE2M1Host(float v) {
  const float a = std::fabs(v);
  const float r = a > 5.f     ? 6.f
                  : a >= 3.5f ? 4.f
                  : a > 2.5f  ? 3.f
                  : a >= 1.75f ? 2.f
                  : a > 1.25f ? 1.5f
                  : a >= 0.75f ? 1.f
                  : a > 0.25f ? 0.5f
                              : 0.f;
  return std::copysign(r, v);
}


// The W4A4 activation quantizer, float32 operation for operation.
void QuantizeHost(const std::vector<uint16_t>& x, int M, int K, bool per_row, float input_scale,
                  std::vector<uint16_t>& xhat, std::vector<float>& gx) {
  xhat.assign(static_cast<size_t>(M) * K, 0);
  gx.assign(M, 0.f);
  for (int m = 0; m < M; ++m) {
    float g = input_scale;
    if (per_row) {
      float amax = 0.f;
      for (int k = 0; k < K; ++k) amax = std::max(amax, std::fabs(FloatFromBf16(x[m * K + k])));
      g = amax > 0.f ? amax / 2688.f : 1.f;
    }
    gx[m] = g;
    const float six_g = 6.f * g;
    for (int b = 0; b < K / 16; ++b) {
      float amax = 0.f;
      for (int i = 0; i < 16; ++i)
        amax = std::max(amax, std::fabs(FloatFromBf16(x[m * K + b * 16 + i])));
      float s = amax / six_g;
      s = std::min(std::max(s, 0.f), 448.f);
      float sf = static_cast<float>(E4M3Value(E4M3FromFloat(s)));
      if (sf == 0.f) sf = 1.f;
      const float denom = sf * g;
      for (int i = 0; i < 16; ++i) {
        const float v = FloatFromBf16(x[m * K + b * 16 + i]);
        xhat[m * K + b * 16 + i] = Bf16FromFloat(RoundE2M1Host(v / denom) * sf);
      }
    }
  }
}

template <int U, int W, bool P = true>
cudaError_t LaunchVariant(const nvfp4::GemvArgs& a, cudaStream_t s) {
  const nvfp4::KParams kp = nvfp4::ToKParams(a);
  return nvfp4::LaunchGemvConfig<U, W>(kp, nvfp4::UseVec16(a), s, P);
}

// The wide path (K % 256 == 0) with U items in flight, W warps; XS: 1 staged
// activations where they fit, 0 activations from global memory.
template <int U, int W, int XS>
cudaError_t LaunchWide(const nvfp4::GemvArgs& a, cudaStream_t s) {
  const nvfp4::KParams kp = nvfp4::ToKParams(a);
  if (!nvfp4::WideOk(kp)) return nvfp4::LaunchGemvConfig<2, 8>(kp, nvfp4::UseVec16(a), s);
  return nvfp4::LaunchWideConfig<U, W>(kp, s, XS);
}

struct Variant {
  const char* name;
  cudaError_t (*fn)(const nvfp4::GemvArgs&, cudaStream_t);
};

const Variant kVariants[] = {
    {"lib", [](const nvfp4::GemvArgs& a, cudaStream_t s) { return nvfp4::LaunchGemv(a, s); }},
    {"v2", [](const nvfp4::GemvArgs& a, cudaStream_t s) { return nvfp4::LaunchGemv(a, s, 1); }},
    {"wU2W8g", LaunchWide<2, 8, 0>},
    {"wU3W8", LaunchWide<3, 8, 1>},
    {"wU2W4", LaunchWide<2, 4, 1>},
    {"wU4W4", LaunchWide<4, 4, 1>},
    {"wU2W16", LaunchWide<2, 16, 1>},
    {"gU2W16", LaunchVariant<2, 16>},
    {"gU2W12", LaunchVariant<2, 12>},
};

// The general kernel (GemvKernel) at other pipeline depths U and warp counts W, beside the
// library's choice (kVariants[0]) (RJ_BENCH_G=1).
const Variant kGeneralVariants[] = {
    kVariants[0],                     {"gU2W8", LaunchVariant<2, 8>},   {"gU4W8", LaunchVariant<4, 8>},
    {"gU8W8", LaunchVariant<8, 8>},   {"gU2W16", LaunchVariant<2, 16>}, {"gU4W16", LaunchVariant<4, 16>},
    {"gU4W4", LaunchVariant<4, 4>},   {"gU2W12", LaunchVariant<2, 12>}, {"gU3W12", LaunchVariant<3, 12>},
    {"gU2W24", LaunchVariant<2, 24>}};

// Benchmark-only variants: the GEMV with the residual add + RMSNorm folded in
// (LaunchGemvAddNorm, library choice / unfused route), on scratch operands
// sized for the largest benchmark shape (timing only; Check covers correctness).
struct NormScratch {
  void *h = nullptr, *w = nullptr, *r = nullptr, *xn = nullptr;
};
NormScratch& Scratch() {
  static NormScratch s;
  if (!s.h) {
    const size_t bytes = size_t{16} * 25600 * 2;  // M <= 16, K <= 25600
    CK(cudaMalloc(&s.h, bytes));
    CK(cudaMalloc(&s.w, bytes));
    CK(cudaMalloc(&s.r, bytes));
    CK(cudaMalloc(&s.xn, bytes));
    CK(cudaMemset(s.h, 0x3C, bytes));  // bf16 ~1.0: finite, nonzero rows
    CK(cudaMemset(s.w, 0x3C, bytes));
  }
  return s;
}
template <int V>
cudaError_t LaunchAddNormBench(const nvfp4::GemvArgs& a, cudaStream_t st) {
  NormScratch& s = Scratch();
  return nvfp4::LaunchGemvAddNorm(a, s.h, s.w, 1e-6f, s.r, s.xn, st, V);
}
const Variant kBenchNormVariants[] = {
    {"norm", LaunchAddNormBench<0>},   // wide path with the norm in its staging (M <= 2)
    {"norm2k", LaunchAddNormBench<1>},  // add+norm kernel, then the GEMV
    {"normw", LaunchAddNormBench<2>},   // wide path with the norm staged, at any M
};

// ------------------------------------------------------------- correctness --

struct Case {
  int M, N, K;
  bool w4a4;
  bool per_row;
  int code_misalign;  // byte offset of the codes pointer (forces the 8-byte path)
  bool odd_scales = false;  // negative scales everywhere, one NaN scale in row 0
  int add_norm = 0;  // LaunchGemvAddNorm (x = residual stream) with variant add_norm - 1:
                     // 1 the library choice, 2 the unfused route, 3 the wide kernel forced,
                     // 4 the wide kernel in K pairs (8-row tiles) forced where it serves,
                     // 5 the wide kernel wherever the GEMV alone takes it, at any M
  bool mma_order = false;  // codes uploaded in the MMA word order (GemvArgs::codes_order 1)
};

struct Lcg {
  std::mt19937_64 r;
  explicit Lcg(uint64_t s) : r(s) {}
  uint32_t U32() { return static_cast<uint32_t>(r()); }
  double Normal() { return std::normal_distribution<double>(0.0, 1.0)(r); }
};

bool RunCase(const Case& c, uint64_t seed, double* err_out,
             cudaError_t (*launch)(const nvfp4::GemvArgs&, cudaStream_t) = nullptr) {
  Lcg rng(seed);
  const int M = c.M, N = c.N, K = c.K;
  std::vector<uint8_t> codes(static_cast<size_t>(N) * K / 2), scales(static_cast<size_t>(N) * K / 16);
  for (auto& b : codes) b = static_cast<uint8_t>(rng.U32());
  for (auto& b : scales) {
    const uint32_t r = rng.U32() % 100;
    // mostly normal scales, some subnormal and some zero blocks
    b = r < 3 ? 0 : r < 8 ? static_cast<uint8_t>(1 + rng.U32() % 7)
                          : static_cast<uint8_t>(0x20 + rng.U32() % (0x7E - 0x20 + 1));
    if (c.odd_scales && rng.U32() % 4 == 0) b |= 0x80;  // negative (or -0)
  }
  if (c.odd_scales) scales[(K / 16) / 2] = 0x7F;  // NaN block in row 0: y[:, 0] is NaN
  const float wscale = 0.0137f;
  std::vector<uint16_t> x(static_cast<size_t>(M) * K);
  for (auto& v : x) v = Bf16FromFloat(static_cast<float>(rng.Normal() * 1.7));
  if (M > 1) {  // one all-zero row and one tiny row exercise the per-row scale
    for (int k = 0; k < K; ++k) x[static_cast<size_t>(M - 1) * K + k] = 0;
  }
  const float input_scale = 0.0021f;
  // add_norm: x is the residual stream; the GEMV reads rmsnorm(x + h) * nw.
  std::vector<uint16_t> hres(x.size()), nw(K), rres(x.size()), xn(x.size());
  if (c.add_norm) {
    for (auto& v : hres) v = Bf16FromFloat(static_cast<float>(rng.Normal() * 0.5));
    for (auto& v : nw) v = Bf16FromFloat(static_cast<float>(0.5 + rng.Normal() * 0.2));
    for (int m = 0; m < M; ++m) {
      double ss = 0;
      for (int k = 0; k < K; ++k) {
        const size_t i = static_cast<size_t>(m) * K + k;
        rres[i] = Bf16FromFloat(FloatFromBf16(x[i]) + FloatFromBf16(hres[i]));
        ss += double(FloatFromBf16(rres[i])) * FloatFromBf16(rres[i]);
      }
      const double inv = 1.0 / std::sqrt(ss / K + 1e-6);
      for (int k = 0; k < K; ++k) {
        const size_t i = static_cast<size_t>(m) * K + k;
        const float n = FloatFromBf16(Bf16FromFloat(static_cast<float>(FloatFromBf16(rres[i]) * inv)));
        xn[i] = Bf16FromFloat(FloatFromBf16(nw[k]) * n);
      }
    }
  }

  // Device buffers.
  uint8_t *d_codes_raw, *d_scales;
  uint16_t *d_x, *d_y, *d_xhat;
  float *d_ws, *d_is, *d_gx;
  CK(cudaMalloc(&d_codes_raw, codes.size() + 64));
  CK(cudaMalloc(&d_scales, scales.size() + 16));
  CK(cudaMalloc(&d_x, x.size() * 2));
  CK(cudaMalloc(&d_xhat, x.size() * 2));
  CK(cudaMalloc(&d_y, static_cast<size_t>(M) * N * 2));
  CK(cudaMalloc(&d_ws, 4));
  CK(cudaMalloc(&d_is, 4));
  CK(cudaMalloc(&d_gx, M * 4));
  uint8_t* d_codes = d_codes_raw + c.code_misalign;
  const std::vector<uint8_t> codes_up = c.mma_order ? ToMmaOrder(codes) : codes;
  CK(cudaMemcpy(d_codes, codes_up.data(), codes.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_scales, scales.data(), scales.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ws, &wscale, 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_is, &input_scale, 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_y, 0xFF, static_cast<size_t>(M) * N * 2));  // poison: bf16 NaN

  nvfp4::GemvArgs a;
  a.x = d_x;
  a.codes = d_codes;
  a.scales = d_scales;
  a.wscale = d_ws;
  a.y = d_y;
  a.M = M;
  a.N = N;
  a.K = K;
  a.codes_order = c.mma_order ? 1 : 0;
  bool ok = true;
  std::vector<uint16_t> xref = c.add_norm ? xn : x;
  std::vector<float> gx_ref(M, 1.f);
  if (c.w4a4) {
    CK(nvfp4::LaunchQuantizeActivations(d_x, d_is, c.per_row, d_xhat, d_gx, M, K, 0));
    std::vector<uint16_t> xhat_ref, xhat(x.size());
    QuantizeHost(x, M, K, c.per_row, input_scale, xhat_ref, gx_ref);
    std::vector<float> gx(M);
    CK(cudaMemcpy(xhat.data(), d_xhat, xhat.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gx.data(), d_gx, M * 4, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < xhat.size(); ++i) bad += xhat[i] != xhat_ref[i];
    for (int m = 0; m < M; ++m) bad += std::memcmp(&gx[m], &gx_ref[m], 4) != 0;
    if (bad) {
      std::printf("  quantizer mismatch: %zu values differ from the host quantizer\n", bad);
      ok = false;
    }
    xref = xhat_ref;
    a.x = d_xhat;
    a.xscale = d_gx;
    a.xscale_per_row = true;
  }
  const char* why = nvfp4::GemvUnsupportedReason(a);
  if (why) {
    std::printf("  unsupported: %s\n", why);
    return false;
  }
  uint16_t *d_h = nullptr, *d_nw = nullptr, *d_r = nullptr, *d_xn = nullptr;
  if (c.add_norm) {
    CK(cudaMalloc(&d_h, x.size() * 2));
    CK(cudaMalloc(&d_nw, static_cast<size_t>(K) * 2));
    CK(cudaMalloc(&d_r, x.size() * 2));
    CK(cudaMalloc(&d_xn, x.size() * 2));
    CK(cudaMemcpy(d_h, hres.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_nw, nw.data(), static_cast<size_t>(K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(d_r, 0xFF, x.size() * 2));
    CK(nvfp4::LaunchGemvAddNorm(a, d_h, d_nw, 1e-6f, d_r, d_xn, 0, c.add_norm - 1));
  } else {
    CK(launch ? launch(a, 0) : nvfp4::LaunchGemv(a, 0));
  }
  CK(cudaDeviceSynchronize());
  if (c.add_norm) {
    std::vector<uint16_t> r(x.size());
    CK(cudaMemcpy(r.data(), d_r, r.size() * 2, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < r.size(); ++i) bad += r[i] != rres[i];
    if (bad) {
      std::printf("  residual r: %zu values differ from x + h\n", bad);
      ok = false;
    }
    CK(cudaFree(d_h));
    CK(cudaFree(d_nw));
    CK(cudaFree(d_r));
    CK(cudaFree(d_xn));
  }
  std::vector<uint16_t> y(static_cast<size_t>(M) * N);
  CK(cudaMemcpy(y.data(), d_y, y.size() * 2, cudaMemcpyDeviceToHost));

  // float64 reference of the dequantized operands.
  std::vector<double> w(static_cast<size_t>(K));
  double num = 0, den = 0, worst_out = 0;
  size_t unwritten = 0, nan_mismatch = 0, off_outputs = 0;
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const uint8_t byte = codes[static_cast<size_t>(n) * K / 2 + k / 2];
      const uint8_t code = (k & 1) ? byte >> 4 : byte & 15;
      w[k] = E2M1Value(code) * E4M3Value(scales[static_cast<size_t>(n) * K / 16 + k / 16]) * wscale;
    }
    for (int m = 0; m < M; ++m) {
      double ref = 0, absum = 0;
      for (int k = 0; k < K; ++k) {
        const double p = static_cast<double>(FloatFromBf16(xref[static_cast<size_t>(m) * K + k])) * w[k];
        ref += p;
        absum += std::fabs(p);
      }
      ref *= gx_ref[m];
      absum *= std::fabs(gx_ref[m]);
      const float got = FloatFromBf16(y[static_cast<size_t>(m) * N + n]);
      if (std::isnan(ref)) {  // a NaN scale must reach the output
        nan_mismatch += !std::isnan(got);
        continue;
      }
      if (std::isnan(got)) ++unwritten;
      num += (got - ref) * (got - ref);
      den += ref * ref;
      // Each output on its own, so that a few wrong tiles (a race, a stale partial sum)
      // cannot hide in the aggregate: the bf16 output rounding plus float32 summation
      // and (add + norm) activation rounding, both far below 2e-4 of sum |x w|; a
      // missing warp's share of a row is ~1 / sqrt(K W) of it, 2e-3 at K = 25600.
      const double bound = 0x1p-7 * std::fabs(ref) + 2e-4 * absum;
      const double off = std::fabs(got - ref);
      if (!(off <= bound)) ++off_outputs;
      if (bound > 0) worst_out = std::max(worst_out, off / bound);
    }
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  *err_out = err;
  if (unwritten) {
    std::printf("  %zu outputs not written (NaN poison left)\n", unwritten);
    ok = false;
  }
  if (nan_mismatch) {
    std::printf("  %zu outputs finite where a NaN scale should poison them\n", nan_mismatch);
    ok = false;
  }
  if (off_outputs) {
    std::printf("  %zu outputs past 2^-7 |ref| + 2e-4 sum|x w| (worst %.2f of the bound)\n",
                off_outputs, worst_out);
    ok = false;
  }
  if (!(err <= 5e-3)) ok = false;
  CK(cudaFree(d_codes_raw));
  CK(cudaFree(d_scales));
  CK(cudaFree(d_x));
  CK(cudaFree(d_xhat));
  CK(cudaFree(d_y));
  CK(cudaFree(d_ws));
  CK(cudaFree(d_is));
  CK(cudaFree(d_gx));
  return ok;
}

// The residual add + RMSNorm prologue against a host reference: r must match
// exactly; xn within one bf16 rounding step (the device sums squares in another
// order and uses rsqrtf), and 99% of xn bit-identical.
bool CheckAddNorm(int M, int K, uint64_t seed) {
  Lcg rng(seed);
  std::vector<uint16_t> x(size_t(M) * K), h(size_t(M) * K), w(K);
  for (auto& v : x) v = Bf16FromFloat(static_cast<float>(rng.Normal() * 3.0));
  for (auto& v : h) v = Bf16FromFloat(static_cast<float>(rng.Normal() * 0.5));
  for (auto& v : w) v = Bf16FromFloat(static_cast<float>(0.5 + rng.Normal() * 0.2));
  const float eps = 1e-6f;
  void *dx, *dh, *dw, *dr, *dn;
  const size_t bytes = size_t(M) * K * 2;
  CK(cudaMalloc(&dx, bytes));
  CK(cudaMalloc(&dh, bytes));
  CK(cudaMalloc(&dw, size_t(K) * 2));
  CK(cudaMalloc(&dr, bytes));
  CK(cudaMalloc(&dn, bytes));
  CK(cudaMemcpy(dx, x.data(), bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dh, h.data(), bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dw, w.data(), size_t(K) * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(dr, 0xFF, bytes));  // NaN poison: every element must be written
  CK(cudaMemset(dn, 0xFF, bytes));
  CK(nvfp4::LaunchAddRmsNorm(dx, dh, dw, eps, dr, dn, M, K, 0));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> r(size_t(M) * K), xn(size_t(M) * K);
  CK(cudaMemcpy(r.data(), dr, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(xn.data(), dn, bytes, cudaMemcpyDeviceToHost));
  size_t r_bad = 0, n_diff = 0;
  double worst = 0;
  for (int m = 0; m < M; ++m) {
    double ss = 0;
    std::vector<uint16_t> rr(K);
    for (int k = 0; k < K; ++k) {
      const size_t i = size_t(m) * K + k;
      rr[k] = Bf16FromFloat(FloatFromBf16(x[i]) + FloatFromBf16(h[i]));
      const double v = FloatFromBf16(rr[k]);
      ss += v * v;
      r_bad += r[i] != rr[k];
    }
    const double inv = 1.0 / std::sqrt(ss / K + eps);
    for (int k = 0; k < K; ++k) {
      const size_t i = size_t(m) * K + k;
      const float nrm = FloatFromBf16(Bf16FromFloat(static_cast<float>(FloatFromBf16(rr[k]) * inv)));
      const float want = FloatFromBf16(Bf16FromFloat(FloatFromBf16(w[k]) * nrm));
      const float got = FloatFromBf16(xn[i]);
      n_diff += xn[i] != Bf16FromFloat(want);
      const double rel = std::fabs(double(got) - want) / std::max(1e-30, std::fabs(double(want)));
      worst = std::isfinite(got) ? std::max(worst, rel) : 1e30;
    }
  }
  CK(cudaFree(dx));
  CK(cudaFree(dh));
  CK(cudaFree(dw));
  CK(cudaFree(dr));
  CK(cudaFree(dn));
  const bool ok = r_bad == 0 && worst <= 1.6e-2 && n_diff * 100 <= size_t(M) * K;
  std::printf("%s add+rmsnorm M=%d K=%d: r mismatches %zu, xn differing %zu of %zu, worst rel %.2e\n",
              ok ? "ok  " : "FAIL", M, K, r_bad, n_diff, size_t(M) * K, worst);
  return ok;
}

// GemvPackedSms (DefaultPdlEdges' down edge at 2 < M <= 8) on the two Qwen3 down shapes at M = 8,
// where the values were worked out on a 132-SM Hopper GPU (RESULTS.md W2): 8B, 256 tiles on
// 16-warp CTAs two an SM -> 128 SMs; 32B, 320 tiles on 12-warp CTAs three an SM -> 107. Zero
// where the general kernel does not serve: M = 1 and 9, and gate+up (the wide path).
bool CheckPackedSms() {
  int device = 0;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&device));
  CK(cudaGetDeviceProperties(&prop, device));
  void *x, *y, *codes, *scales;
  float* ws;
  CK(cudaMalloc(&x, 16 * 25600 * 2));
  CK(cudaMalloc(&y, 16 * 51200 * 2));
  CK(cudaMalloc(&codes, 256));
  CK(cudaMalloc(&scales, 256));
  CK(cudaMalloc(&ws, 4));
  auto packed = [&](int M, int N, int K) {  // shapes only: no launch reads the buffers
    nvfp4::GemvArgs a;
    a.x = x;
    a.codes = static_cast<uint8_t*>(codes);
    a.scales = static_cast<uint8_t*>(scales);
    a.wscale = ws;
    a.y = y;
    a.M = M;
    a.N = N;
    a.K = K;
    return nvfp4::GemvPackedSms(a);
  };
  struct Want {
    int M, N, K, sms;  // sms < 0: only on a 132-SM sm_90 GPU
  };
  const Want wants[] = {{8, 4096, 12288, -128}, {8, 5120, 25600, -107}, {1, 4096, 12288, 0},
                        {9, 4096, 12288, 0},    {8, 24576, 4096, 0}};
  const bool h132 = prop.major == 9 && prop.multiProcessorCount == 132;
  bool ok = true;
  for (const Want& w : wants) {
    if (w.sms < 0 && !h132) continue;
    const int got = packed(w.M, w.N, w.K);
    const int want = w.sms < 0 ? -w.sms : w.sms;
    std::printf("%s packed SMs M=%d N=%d K=%d: %d (want %d)\n", got == want ? "ok  " : "FAIL", w.M,
                w.N, w.K, got, want);
    ok = ok && got == want;
  }
  for (void* p : {x, y, codes, scales}) CK(cudaFree(p));
  CK(cudaFree(ws));
  return ok;
}

int Check(bool quick) {
  std::vector<Case> cases;
  const int ms[] = {1, 2, 3, 5, 8, 9, 12, 16};
  const int ns[] = {1, 7, 16, 17, 33, 100};
  const int ks[] = {16, 32, 48, 144, 256, 576, 768, 1056, 2560, 4096, 4352};
  int i = 0;
  for (int m : ms)
    for (int n : ns)
      for (int k : ks) {
        ++i;
        if (i % 3 != 0 && !(n == 17 && (k == 576 || k == 144))) continue;
        cases.push_back({m, n, k, (i / 3) % 2 == 1, (i / 6) % 2 == 1, 0});
      }
  if (!quick) {
    cases.push_back({8, 4096, 4096, false, false, 0});
    cases.push_back({16, 1000, 4096, true, true, 0});
    cases.push_back({1, 257, 12288, false, false, 0});
  }
  // One row over many more tiles than resident CTAs: the S1 form's ring of reduction slots
  // (kS1Ring) wraps round several times a CTA, with padded warps (K = 256 and 512: fewer
  // items a row than warps) and a whole K of 4096.
  cases.push_back({1, 100003, 256, false, false, 0});
  if (!quick) {
    cases.push_back({1, 100003, 512, false, false, 0});
    cases.push_back({1, 60001, 4096, false, false, 0});
  }
  // Negative and NaN scales, on the wide path (K % 256 == 0) and the general one.
  cases.push_back({1, 37, 2560, false, false, 0, true});
  cases.push_back({9, 37, 4096, true, false, 0, true});
  cases.push_back({3, 21, 1056, false, false, 0, true});
  // Tiles for 4-warp CTAs but not for 8 (LaunchWideFit, on a 132-SM H100): Qwen3-8B qkv's
  // shape, 32B o at M = 2, and at M = 1 K = 22,272 (K / 256 odd, so no K pairs; 50 KB of
  // staged activations: past the 48 KB opt-in). Qwen3-32B down at M = 1 (K = 25,600) takes
  // K pairs (8-row tiles) by default.
  cases.push_back({1, 6144, 4096, false, false, 0});
  cases.push_back({2, 5120, 8192, true, true, 0});
  cases.push_back({1, 4500, 22272, false, false, 0});
  cases.push_back({1, 5120, 25600, false, false, 0});
  // The general kernel's CTA shapes at 2 < M <= 8 (GemvShapeFor, on a 132-SM Hopper GPU):
  // 4 warps, U = 4 (Qwen3-32B qkv at M = 8, 640 tiles; 750 tiles of 8-byte loads, K % 32 ==
  // 16), 12 warps (8B qkv at M = 8, 32B down at M = 7, 313 tiles of 8-byte loads) and 16
  // (8B down at M = 5).
  cases.push_back({8, 10240, 5120, false, false, 0});
  cases.push_back({6, 12000, 1040, true, true, 0});
  cases.push_back({8, 6144, 4096, false, false, 0});
  cases.push_back({7, 5120, 25600, true, false, 0});
  cases.push_back({5, 5000, 2064, false, false, 0});
  cases.push_back({5, 4096, 12288, false, false, 0});
  // The wide kernel on one 16-warp CTA an SM (WideXsOneCta: more than 80 KB of staged
  // activations at 2 < M <= 8): K = 5120 at M = 8 (90 KB), and at M = 7 (78.75 KB, two CTAs).
  // 1000 tiles take the wide path at M = 8 on up to 140 SMs (UseWideFor).
  cases.push_back({8, 16000, 5120, false, false, 0});
  cases.push_back({7, 16000, 5120, true, true, 0});
  cases.push_back({4, 300, 1024, false, false, 8});  // 8-byte aligned codes: 8-byte path
  cases.push_back({11, 45, 576, true, false, 8});
  int failed = 0;
  double worst = 0;
  for (size_t j = 0; j < cases.size(); ++j) {
    const Case& c = cases[j];
    double err = 0;
    const bool ok = RunCase(c, 1234 + j, &err);
    worst = std::max(worst, err);
    if (!ok || j % 16 == 0)
      std::printf("%s M=%d N=%d K=%d %s%s%s%s rel_err=%.2e\n", ok ? "ok  " : "FAIL", c.M, c.N,
                  c.K, c.w4a4 ? "w4a4" : "w4a16", c.w4a4 ? (c.per_row ? "/row" : "/scalar") : "",
                  c.code_misalign ? " misaligned" : "", c.odd_scales ? " odd-scales" : "", err);
    failed += !ok;
  }
  // The K-pair form (8-row tiles, M = 1, K % 512 == 0) forced: partial last tiles (N % 8),
  // one partial tile (N < 8), staged activations and from global memory (K = 65536 does
  // not fit the staging), padded warps (K / 512 not a multiple of 8), many tiles per CTA,
  // negative and NaN scales, a per-row activation scale (W4A4).
  const std::vector<Case> kpair_cases = {
      {1, 6144, 4096, false, false, 0}, {1, 5, 1024, false, false, 0},
      {1, 30001, 1024, false, false, 0}, {1, 37, 2560, false, false, 0, true},
      {1, 5120, 25600, false, false, 0}, {1, 100, 65536, false, false, 0},
      {1, 1003, 5120, true, true, 0},    {1, 24576, 4096, true, false, 0}};
  for (size_t j = 0; j < kpair_cases.size(); ++j) {
    const Case& c = kpair_cases[j];
    double err = 0;
    const bool ok = RunCase(c, 777 + j, &err, [](const nvfp4::GemvArgs& a, cudaStream_t st) {
      return nvfp4::LaunchGemv(a, st, 2);
    });
    worst = std::max(worst, err);
    std::printf("%s kpair M=%d N=%d K=%d %s%s rel_err=%.2e\n", ok ? "ok  " : "FAIL", c.M, c.N, c.K,
                c.w4a4 ? "w4a4" : "w4a16", c.odd_scales ? " odd-scales" : "", err);
    failed += !ok;
  }
  // Every benchmark variant on multi-tile (persistent) shapes.
  const std::vector<Case> multi_full = {{1, 30001, 1024, false, false, 0}, {9, 12003, 576, true, true, 0},
                             {16, 5001, 2080, false, false, 0},  {1, 30001, 2560, false, false, 0},
                             {8, 12003, 4096, true, true, 0},    {16, 3001, 5120, false, false, 0},
                             {4, 2003, 25600, false, false, 0}};
  // More tiles than CTA slots even for the 4-warp variants, at small K.
  const std::vector<Case> multi_quick = {{1, 20001, 64, false, false, 0}, {9, 20001, 48, true, true, 0},
                              {16, 20001, 96, false, false, 0}, {1, 20001, 256, false, false, 0},
                              {8, 20001, 768, true, true, 0},   {16, 9001, 512, false, false, 0}};
  for (const Variant& v : kVariants) {
    for (const Case& c : quick ? multi_quick : multi_full) {
      double err = 0;
      const bool ok = RunCase(c, 99, &err, v.fn);
      std::printf("%s variant %-7s M=%d N=%d K=%d rel_err=%.2e\n", ok ? "ok  " : "FAIL", v.name, c.M,
                  c.N, c.K, err);
      failed += !ok;
      worst = std::max(worst, err);
    }
  }
  const int norm_shapes[][2] = {{1, 4096}, {2, 5120}, {8, 12288}, {16, 576}, {3, 8}};
  for (const auto& ms : norm_shapes) failed += !CheckAddNorm(ms[0], ms[1], 7 + ms[0]);
  // The fused add + norm + GEMV: wide path (staged norm) and the unfused route.
  const std::vector<Case> norm_cases = {
      {1, 300, 4096, false, false, 0, false, 1}, {2, 6144, 4096, false, false, 0, false, 1},
      {1, 33, 512, false, false, 0, false, 1},   {8, 15040, 256, false, false, 0, false, 1},
      {4, 100, 4096, false, false, 0, false, 1}, {16, 513, 1536, false, false, 0, false, 1},
      {1, 300, 4096, false, false, 0, false, 2}, {9, 47, 592, false, false, 0, false, 2},
      // the wide kernel with the norm forced, both n-tile widths (NT = 2 for M > 8)
      {12, 24576, 2048, false, false, 0, false, 3}, {16, 513, 1536, false, false, 0, false, 3},
      {4, 100, 4096, false, false, 0, false, 3},
      // the staged norm from registers (M * ceil(K / 2048) <= 4 units a thread) and the
      // shared-memory route past it: K = 5120 (3 units a row, the last partial) at M = 1 and 2
      {1, 200, 5120, false, false, 0, false, 1}, {2, 200, 5120, false, false, 0, false, 1},
      {4, 64, 2048, false, false, 0, false, 3}, {3, 64, 4096, false, false, 0, false, 3},
      // Qwen3-8B qkv: 384 tiles, two rounds of 8-warp CTAs with the staged norm (16-row
      // tiles: the fused-norm launch takes K pairs only when forced, below)
      {1, 6144, 4096, false, false, 0, false, 1},
      // the K-pair form forced: 8-row tiles, a partial one, the shared-memory norm route (K = 12288)
      {1, 6144, 4096, false, false, 0, false, 4}, {1, 300, 4096, false, false, 0, false, 4},
      {1, 13, 1024, false, false, 0, false, 4},   {1, 4000, 12288, false, false, 0, false, 4},
      // the fold at any M where the GEMV is wide (staged r, sums and norm in shared memory):
      // Qwen3-8B gate+up at M = 8 and qkv at M = 3, 32B qkv at M = 2 (the default route,
      // K = 5120: 2.5 units a thread), a partial round of units with the wide kernel
      // forced (M * K / 8 not a multiple of 1024), and a shape the wide path does not take
      // at M = 8 (the unfused route)
      {8, 24576, 4096, false, false, 0, false, 5}, {3, 6144, 4096, false, false, 0, false, 5},
      {2, 10240, 5120, false, false, 0, false, 1}, {5, 2000, 2304, false, false, 0, false, 3},
      {8, 300, 4096, false, false, 0, false, 5},
      // the fold with the wide kernel on 16-warp CTAs (WideXsOneCta: 90 KB staged), SwiGLU
      // checked in the layer checker
      {8, 16000, 5120, false, false, 0, false, 5}};
  for (size_t j = 0; j < norm_cases.size(); ++j) {
    const Case& c = norm_cases[j];
    double err = 0;
    const bool ok = RunCase(c, 4321 + j, &err);
    worst = std::max(worst, err);
    std::printf("%s add+norm+gemv (%s) M=%d N=%d K=%d wide=%d rel_err=%.2e\n", ok ? "ok  " : "FAIL",
                c.add_norm == 1   ? "auto"
                : c.add_norm == 2 ? "unfused"
                : c.add_norm == 3 ? "wide forced"
                : c.add_norm == 4 ? "kpair forced"
                                  : "wide any M",
                c.M, c.N, c.K,
                c.add_norm == 3 || c.add_norm == 4 ||
                    (((c.add_norm == 1 && c.M <= 2) || c.add_norm == 5) &&
                                    nvfp4::UseWide(nvfp4::GemvArgs{nullptr, nullptr, nullptr, nullptr,
                                                                   nullptr, false, nullptr, c.M, c.N, c.K})),
                err);
    failed += !ok;
  }
  // Codes in the MMA word order (GemvArgs::codes_order 1), on every kernel path: the wide
  // kernel (4-warp fit, K pairs by default at 32B down, NT = 2, W4A4, odd scales), the
  // general kernel (16- and 8-byte loads; 4-warp CTAs at U = 4 for 32B qkv at M = 8), the add +
  // norm routes, and K pairs forced.
  const std::vector<Case> mma_cases = {
      {1, 6144, 4096, false, false, 0, false, 0, true},  {2, 5120, 8192, true, true, 0, false, 0, true},
      {8, 4096, 4096, false, false, 0, false, 0, true},  {16, 1000, 4096, true, true, 0, false, 0, true},
      {3, 100, 576, false, false, 0, false, 0, true},    {11, 45, 576, true, false, 8, false, 0, true},
      {9, 37, 4096, true, false, 0, true, 0, true},      {1, 5120, 25600, false, false, 0, false, 0, true},
      {5, 77, 1056, false, false, 0, true, 0, true},     {1, 6144, 4096, false, false, 0, false, 1, true},
      {8, 24576, 4096, false, false, 0, false, 5, true}, {2, 10240, 5120, false, false, 0, false, 1, true},
      {1, 4000, 12288, false, false, 0, false, 4, true}, {4, 100, 4096, false, false, 0, false, 2, true},
      {12, 2048, 2048, false, false, 0, false, 3, true}, {8, 10240, 5120, false, false, 0, false, 0, true}};
  for (size_t j = 0; j < mma_cases.size() + 1; ++j) {
    const bool kpair = j == mma_cases.size();  // the K-pair form forced (LaunchGemv variant 2)
    const Case c = kpair ? Case{1, 6144, 4096, false, false, 0, false, 0, true} : mma_cases[j];
    double err = 0;
    const bool ok = kpair ? RunCase(c, 999, &err, [](const nvfp4::GemvArgs& a, cudaStream_t st) {
                              return nvfp4::LaunchGemv(a, st, 2);
                            })
                          : RunCase(c, 888 + j, &err);
    worst = std::max(worst, err);
    std::printf("%s mma order M=%d N=%d K=%d %s%s%s norm=%d%s rel_err=%.2e\n", ok ? "ok  " : "FAIL",
                c.M, c.N, c.K, c.w4a4 ? "w4a4" : "w4a16", c.code_misalign ? " misaligned" : "",
                c.odd_scales ? " odd-scales" : "", c.add_norm, kpair ? " kpair forced" : "", err);
    failed += !ok;
  }
  failed += !CheckPackedSms();
  std::printf("check: %zu cases + variants, %d failed, worst rel_err %.2e\n", cases.size(), failed,
              worst);
  return failed ? 1 : 0;
}

// ---------------------------------------------------------------- benchmark --

__global__ void ReadKernel(const uint4* p, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *out = acc;
}

int Bench(int reps) {
  Scratch();  // allocated before any stream capture
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // Ceilings: device-to-device copy (bytes read + written) and a pure read.
  {
    const size_t bytes = size_t{1} << 30;
    void *a, *b;
    uint32_t* o;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMalloc(&o, 4));
    CK(cudaMemset(a, 1, bytes));
    std::vector<float> tc, tr;
    for (int i = 0; i < 12; ++i) {
      CK(cudaEventRecord(e0, st));
      CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 2) tc.push_back(ms);
      CK(cudaEventRecord(e0, st));
      ReadKernel<<<prop.multiProcessorCount * 8, 512, 0, st>>>(static_cast<const uint4*>(a),
                                                               bytes / 16, o);
      CK(cudaGetLastError());
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 2) tr.push_back(ms);
    }
    std::printf("copy bandwidth (read+write): %.0f GB/s; read-only kernel: %.0f GB/s\n",
                2.0 * bytes / (Median(tc) * 1e-3) / 1e9, bytes / (Median(tr) * 1e-3) / 1e9);
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(o));
  }
  struct Shape {
    const char* name;
    int N, K;
  };
  const Shape shapes[] = {
      {"8B.qkv", 6144, 4096},   {"8B.o", 4096, 4096},      {"8B.gate_up", 24576, 4096},
      {"8B.down", 4096, 12288}, {"32B.qkv", 10240, 5120},  {"32B.o", 5120, 8192},
      {"32B.gate_up", 51200, 5120}, {"32B.down", 5120, 25600},
  };
  // RJ_BENCH_G=1: the library against the general kernel's pipeline depths and warp counts, at
  // M = 4, 8 (where the Qwen3 qkv, o and down GEMVs take the general kernel).
  const bool g_only = std::getenv("RJ_BENCH_G") && std::string(std::getenv("RJ_BENCH_G")) == "1";
  const std::vector<int> msz = g_only ? std::vector<int>{4, 8} : std::vector<int>{1, 4, 8};
  std::printf("%-13s %3s %-6s %9s %8s\n", "shape", "M", "var", "us", "GB/s");
  for (const Shape& sh : shapes) {
    const size_t wbytes = static_cast<size_t>(sh.N) * sh.K / 2 + static_cast<size_t>(sh.N) * sh.K / 16;
    const int L = static_cast<int>(std::min<size_t>(64, std::max<size_t>(4, (size_t{400} << 20) / wbytes)));
    std::vector<uint8_t*> cw(L), sw(L);
    for (int l = 0; l < L; ++l) {
      CK(cudaMalloc(&cw[l], static_cast<size_t>(sh.N) * sh.K / 2));
      CK(cudaMalloc(&sw[l], static_cast<size_t>(sh.N) * sh.K / 16));
      CK(cudaMemset(cw[l], 0x5A + l, static_cast<size_t>(sh.N) * sh.K / 2));
      CK(cudaMemset(sw[l], 0x38, static_cast<size_t>(sh.N) * sh.K / 16));
    }
    void *x, *y;
    float* ws;
    CK(cudaMalloc(&x, 16 * static_cast<size_t>(sh.K) * 2));
    CK(cudaMalloc(&y, 16 * static_cast<size_t>(sh.N) * 2));
    CK(cudaMalloc(&ws, 4));
    CK(cudaMemset(x, 0x3C, 16 * static_cast<size_t>(sh.K) * 2));
    const float one = 1.f;
    CK(cudaMemcpy(ws, &one, 4, cudaMemcpyHostToDevice));
    for (int M : msz) {
      nvfp4::GemvArgs args;  // layer 0's weights; the timed loop swaps in layer l's
      args.x = x;
      args.codes = cw[0];
      args.scales = sw[0];
      args.wscale = ws;
      args.y = y;
      args.M = M;
      args.N = sh.N;
      args.K = sh.K;
      if (g_only && !nvfp4::UseWide(args)) {  // the library's CTA shape for the general kernel
        constexpr int U = nvfp4::kGemvPipeline, W = nvfp4::kGemvWarps;
        const nvfp4::KParams kp = nvfp4::ToKParams(args);
        const int i = nvfp4::UseVec16(args) ? nvfp4::GemvShapeFor<16, U, W>(kp)
                                            : nvfp4::GemvShapeFor<8, U, W>(kp);
        std::printf("%-13s %3d lib: general kernel, %d warps, U = %d\n", sh.name, M,
                    nvfp4::kGemvShapes<U, W>[i].w, nvfp4::kGemvShapes<U, W>[i].u);
      }
      std::vector<Variant> vs(std::begin(kVariants), std::end(kVariants));
      vs.insert(vs.end(), std::begin(kBenchNormVariants), std::end(kBenchNormVariants));
      if (g_only) vs.assign(std::begin(kGeneralVariants), std::end(kGeneralVariants));
      for (const Variant& v : vs) {
        const double us = GraphMedianMs(st, reps, [&](cudaStream_t s) {
                            for (int l = 0; l < L; ++l) {
                              nvfp4::GemvArgs a = args;
                              a.codes = cw[l];
                              a.scales = sw[l];
                              CK(v.fn(a, s));
                            }
                          }) * 1e3 / L;
        const double bytes = wbytes + 2.0 * M * (sh.K + sh.N);
        std::printf("%-13s %3d %-6s %9.2f %8.0f\n", sh.name, M, v.name, us, bytes / us / 1e3);
      }
    }
    for (int l = 0; l < L; ++l) {
      CK(cudaFree(cw[l]));
      CK(cudaFree(sw[l]));
    }
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(ws));
  }
  return 0;
}

}  // namespace

// A few plain launches of the library kernel on one shape, for ncu.
int Profile(int M, int N, int K) {
  const size_t cb = static_cast<size_t>(N) * K / 2, sb = static_cast<size_t>(N) * K / 16;
  const int L = 4;
  std::vector<uint8_t*> cw(L), sw(L);
  for (int l = 0; l < L; ++l) {
    CK(cudaMalloc(&cw[l], cb));
    CK(cudaMalloc(&sw[l], sb));
    CK(cudaMemset(cw[l], 0x5A + l, cb));
    CK(cudaMemset(sw[l], 0x38, sb));
  }
  void *x, *y;
  float* ws;
  CK(cudaMalloc(&x, static_cast<size_t>(M) * K * 2));
  CK(cudaMalloc(&y, static_cast<size_t>(M) * N * 2));
  CK(cudaMalloc(&ws, 4));
  CK(cudaMemset(x, 0x3C, static_cast<size_t>(M) * K * 2));
  const float one = 1.f;
  CK(cudaMemcpy(ws, &one, 4, cudaMemcpyHostToDevice));
  for (int i = 0; i < 3 * L; ++i) {
    nvfp4::GemvArgs a;
    a.x = x;
    a.codes = cw[i % L];
    a.scales = sw[i % L];
    a.wscale = ws;
    a.y = y;
    a.M = M;
    a.N = N;
    a.K = K;
    CK(nvfp4::LaunchGemv(a, 0));
  }
  CK(cudaDeviceSynchronize());
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "check") return Check(argc > 2 && std::string(argv[2]) == "quick");
  if (mode == "bench") return Bench(argc > 2 ? std::atoi(argv[2]) : 20);
  if (mode == "profile" && argc > 4) return Profile(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]));
  std::fprintf(stderr, "usage: %s check | bench [reps] | profile M N K\n", argv[0]);
  return 2;
}
