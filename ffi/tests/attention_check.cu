// Standalone checker for the decode-attention kernels (no JAX): the target for
// compute-sanitizer (memcheck, racecheck) and a float64 reference of the whole op.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/attention_check.cu ffi/attention_kernels.cu \
//        -o attention_check
//   ./attention_check           # every case (each with the library's grid, the partial
//                               # kernel's grid capped at 3 chunk indices and uncapped: the
//                               # same cache bits, outputs within one bf16 step of each
//                               # other); exit code 0 only if all passed
//   ./attention_check quick     # fewer cases (for the sanitizers)
//
// Each case: random bf16 q/k/v, norm weights, caches and float32 cos/sin (never zeros),
// positions including 0 and T - 1; the output is poisoned (NaN) before the call and must
// be fully written; the cache must change at exactly one slot per row (the new key after
// norm + RoPE, the new value) and stay bit-identical elsewhere.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "tests/host_util.h"

namespace {

// float64 values through float, as the model's arrays hold them.
uint16_t ToBf16(double x) { return Bf16FromFloat(static_cast<float>(x)); }

double FromBf16(uint16_t b) { return FloatFromBf16(b); }

double RoundBf16(double x) { return FromBf16(ToBf16(x)); }

struct Case {
  int B, Hq, Hkv, D, L, T, layer;
  bool qk_norm;
  uint32_t seed = 0;     // 0: 77 + the case's index
  // Require a later batch of 16 chunks to raise some head's running max (counted on the
  // reference: the combine's batches where every chunk is a partial, the one-chunk runs).
  bool rescale = false;
  int warps = 0;  // DecodeAttentionArgs::partial_warps (0: the library's choice)
};

// Whether two bf16 outputs are at most one bf16 step (of the larger magnitude) plus 1e-4
// apart: float32 sums in another order differ by ~1e-6 absolute (outputs are O(1) averages
// of the values), which is many steps of an output near zero. A chunk missed or counted
// twice moves an output by about its chunk's mean value over the chunks: caught here where
// the chunks are few, and by the float64 reference's error bound (rel_err) either way.
bool WithinOneStep(uint16_t a, uint16_t b) {
  if (a == b) return true;
  const double x = FromBf16(a), y = FromBf16(b);
  if (!std::isfinite(x) || !std::isfinite(y)) return false;
  int e = 0;
  std::frexp(std::max(std::fabs(x), std::fabs(y)), &e);  // |v| < 2^e
  return std::fabs(x - y) <= std::ldexp(1.0, e - 8) + 1e-4;  // 8 significant bits
}

// Runs case c with the partial kernel's grid capped at chunk_grid chunk indices (0: the
// library's choice). `bits` holds the output and cache of an earlier run of the same case,
// or is empty and receives them. The cache must match it bit for bit. The looping kernel
// merges a CTA's chunks before the combine merges the CTAs, so the float32 sums differ in
// order from the one-chunk kernel's: each output element within one bf16 step of the earlier
// run's (WithinOneStep).
bool Run(const Case& c, uint32_t seed, int chunk_grid, std::vector<uint16_t>* bits, double* worst) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const int G = c.Hq / c.Hkv, D = c.D, C = rjattn::NumChunks(c.T);
  const size_t nq = size_t(c.B) * c.Hq * D, nkv = size_t(c.B) * c.Hkv * D;
  const size_t ncache = size_t(c.L) * c.B * c.T * c.Hkv * D;
  std::vector<uint16_t> q(nq), k(nkv), v(nkv), qn(D), kn(D), kc(ncache), vc(ncache);
  for (auto& x : q) x = ToBf16(2.0 * normal(rng));
  for (auto& x : k) x = ToBf16(2.0 * normal(rng));
  for (auto& x : v) x = ToBf16(normal(rng));
  for (auto& x : qn) x = ToBf16(1.0 + 0.3 * normal(rng));
  for (auto& x : kn) x = ToBf16(1.0 + 0.3 * normal(rng));
  for (auto& x : kc) x = ToBf16(normal(rng));
  for (auto& x : vc) x = ToBf16(normal(rng));
  std::vector<int32_t> pos(c.B);
  for (int b = 0; b < c.B; ++b) pos[b] = int32_t(rng() % uint32_t(c.T));
  pos[0] = c.T - 1;
  if (c.B > 1) pos[1] = 0;
  std::vector<float> cs(size_t(c.B) * D / 2), sn(cs.size());
  for (int b = 0; b < c.B; ++b)
    for (int i = 0; i < D / 2; ++i) {
      const double a = pos[b] * std::pow(10000.0, -2.0 * i / D);
      cs[size_t(b) * D / 2 + i] = float(std::cos(a));
      sn[size_t(b) * D / 2 + i] = float(std::sin(a));
    }
  const float eps = 1e-6f, scale = float(1.0 / std::sqrt(double(D)));

  // ---- device ----
  void *dq, *dk, *dv, *dqn, *dkn, *dkc, *dvc, *dout;
  float *dcs, *dsn, *dpart;
  int32_t *dpos, *dlayer;
  CK(cudaMalloc(&dq, nq * 2));
  CK(cudaMalloc(&dk, nkv * 2));
  CK(cudaMalloc(&dv, nkv * 2));
  CK(cudaMalloc(&dqn, D * 2));
  CK(cudaMalloc(&dkn, D * 2));
  CK(cudaMalloc(&dkc, ncache * 2));
  CK(cudaMalloc(&dvc, ncache * 2));
  CK(cudaMalloc(&dout, nq * 2));
  CK(cudaMalloc(&dcs, cs.size() * 4));
  CK(cudaMalloc(&dsn, sn.size() * 4));
  const size_t npart = size_t(c.B) * c.Hkv * C * G * (D + 2);
  CK(cudaMalloc(&dpart, npart * 4));
  CK(cudaMalloc(&dpos, c.B * 4));
  CK(cudaMalloc(&dlayer, 4));
  // The kernel reads the packed projections [B, (Hq + 2 Hkv) D] (as the fused q/k/v
  // matmul writes them).
  const int W = (c.Hq + 2 * c.Hkv) * D;
  std::vector<uint16_t> packed(size_t(c.B) * W);
  for (int b = 0; b < c.B; ++b) {
    std::memcpy(&packed[size_t(b) * W], &q[size_t(b) * c.Hq * D], size_t(c.Hq) * D * 2);
    std::memcpy(&packed[size_t(b) * W + c.Hq * D], &k[size_t(b) * c.Hkv * D], size_t(c.Hkv) * D * 2);
    std::memcpy(&packed[size_t(b) * W + (c.Hq + c.Hkv) * D], &v[size_t(b) * c.Hkv * D],
                size_t(c.Hkv) * D * 2);
  }
  CK(cudaFree(dk));
  CK(cudaFree(dv));
  CK(cudaFree(dq));
  CK(cudaMalloc(&dq, packed.size() * 2));
  CK(cudaMemcpy(dq, packed.data(), packed.size() * 2, cudaMemcpyHostToDevice));
  dk = static_cast<uint16_t*>(dq) + c.Hq * D;
  dv = static_cast<uint16_t*>(dq) + (c.Hq + c.Hkv) * D;
  CK(cudaMemcpy(dqn, qn.data(), D * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkn, kn.data(), D * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkc, kc.data(), ncache * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dvc, vc.data(), ncache * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dcs, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dsn, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpos, pos.data(), c.B * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dlayer, &c.layer, 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xFF, nq * 2));  // NaN poison: every element must be written
  CK(cudaMemset(dpart, 0xFF, npart * 4));
  rjattn::DecodeAttentionArgs a;
  a.q = dq, a.k = dk, a.v = dv, a.qkv_stride = W;
  a.q_norm = c.qk_norm ? dqn : nullptr;
  a.k_norm = c.qk_norm ? dkn : nullptr;
  a.cos = dcs, a.sin = dsn, a.positions = dpos, a.layer = dlayer;
  a.k_cache = dkc, a.v_cache = dvc, a.out = dout, a.partial = dpart;
  a.B = c.B, a.Hq = c.Hq, a.Hkv = c.Hkv, a.D = D, a.L = c.L, a.T = c.T;
  a.scale = scale, a.eps = eps;
  a.chunk_grid = chunk_grid;
  a.partial_warps = c.warps;
  if (const char* why = rjattn::DecodeAttentionUnsupportedReason(a)) {
    std::printf("FAIL unsupported: %s\n", why);
    return false;
  }
  CK(rjattn::LaunchDecodeAttention(a, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(nq), kc2(ncache), vc2(ncache);
  CK(cudaMemcpy(out.data(), dout, nq * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(kc2.data(), dkc, ncache * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(vc2.data(), dvc, ncache * 2, cudaMemcpyDeviceToHost));
  std::vector<uint16_t> got(out);
  got.insert(got.end(), kc2.begin(), kc2.end());
  got.insert(got.end(), vc2.begin(), vc2.end());
  size_t out_steps = 0, out_diff = 0;  // outputs more than a step / any step from the earlier run's
  bool same_cache = true;
  if (!bits->empty()) {  // (a run that failed early leaves it empty)
    for (size_t i = 0; i < nq; ++i) {
      out_steps += !WithinOneStep(got[i], (*bits)[i]);
      out_diff += got[i] != (*bits)[i];
    }
    same_cache = std::equal(got.begin() + nq, got.end(), bits->begin() + nq);
  }
  if (bits->empty()) *bits = std::move(got);
  for (void* p : {dq, dqn, dkn, dkc, dvc, dout}) CK(cudaFree(p));
  for (float* p : {dcs, dsn, dpart}) CK(cudaFree(p));
  CK(cudaFree(dpos));
  CK(cudaFree(dlayer));

  // ---- float64 reference (bf16 roundings where the model rounds) ----
  auto prep = [&](const uint16_t* src, const std::vector<uint16_t>& w, int b) {
    std::vector<double> x(D), y(D);
    for (int d = 0; d < D; ++d) x[d] = FromBf16(src[d]);
    if (c.qk_norm) {
      double ss = 0;
      for (double e : x) ss += e * e;
      const double inv = 1.0 / std::sqrt(ss / D + eps);
      for (int d = 0; d < D; ++d) x[d] = RoundBf16(FromBf16(w[d]) * RoundBf16(x[d] * inv));
    }
    for (int d = 0; d < D; ++d) {
      const int f = d % (D / 2);
      const double cc = cs[size_t(b) * D / 2 + f], ss = sn[size_t(b) * D / 2 + f];
      y[d] = RoundBf16(d < D / 2 ? x[d] * cc - x[d + D / 2] * ss : x[d] * cc + x[d - D / 2] * ss);
    }
    return y;
  };
  bool ok = true;
  int rescaled = 0;  // (row, query head) pairs whose max rises in a later 16-chunk batch
  double num = 0, den = 0;
  size_t slot_bad = 0, other_bad = 0, unwritten = 0;
  const size_t slot = size_t(c.Hkv) * D;
  for (int b = 0; b < c.B; ++b) {
    for (int h = 0; h < c.Hkv; ++h) {
      const size_t base = ((size_t(c.layer) * c.B + b) * c.T) * slot + size_t(h) * D;
      const std::vector<double> knew = prep(&k[(size_t(b) * c.Hkv + h) * D], kn, b);
      for (int d = 0; d < D; ++d) {
        const size_t at = base + size_t(pos[b]) * slot + d;
        // the new key within one bf16 step (rsqrt / summation order), the value exact
        if (std::fabs(FromBf16(kc2[at]) - knew[d]) > std::ldexp(std::fabs(knew[d]), -7) + 1e-30)
          ++slot_bad;
        if (vc2[at] != v[(size_t(b) * c.Hkv + h) * D + d]) ++slot_bad;
        kc[at] = kc2[at];  // for the comparison of everything else below
        vc[at] = vc2[at];
      }
      for (int g = 0; g < G; ++g) {
        const int qh = h * G + g;
        const std::vector<double> qv = prep(&q[(size_t(b) * c.Hq + qh) * D], qn, b);
        std::vector<double> s(pos[b] + 1);
        double m = -1e300;
        for (int t = 0; t <= pos[b]; ++t) {
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += qv[d] * (t == pos[b] ? knew[d] : FromBf16(kc[base + size_t(t) * slot + d]));
          s[t] = dot * scale;
          m = std::max(m, s[t]);
        }
        {  // the combine's batches: 16 chunks of rjattn::kChunk slots
          const int per = 16 * rjattn::kChunk;
          double run = -1e300;
          bool rose = false;
          for (int t0 = 0; t0 <= pos[b]; t0 += per) {
            double bm = -1e300;
            for (int t = t0; t < std::min(t0 + per, pos[b] + 1); ++t) bm = std::max(bm, s[t]);
            rose = rose || (t0 > 0 && bm > run);
            run = std::max(run, bm);
          }
          rescaled += rose;
        }
        double l = 0;
        for (double& e : s) l += (e = std::exp(e - m));
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int t = 0; t <= pos[b]; ++t) o += s[t] * FromBf16(vc[base + size_t(t) * slot + d]);
          o /= l;
          const double got = FromBf16(out[(size_t(b) * c.Hq + qh) * D + d]);
          if (!std::isfinite(got)) ++unwritten;
          num += (got - o) * (got - o);
          den += o * o;
        }
      }
    }
  }
  for (size_t i = 0; i < ncache; ++i) other_bad += (kc2[i] != kc[i]) + (vc2[i] != vc[i]);
  const double err = std::sqrt(num / den);
  *worst = std::max(*worst, err);
  ok = err <= 5e-3 && slot_bad == 0 && other_bad == 0 && unwritten == 0 &&
       (!c.rescale || rescaled > 0) && same_cache && out_steps == 0;
  std::printf("%s B=%d Hq=%d Hkv=%d D=%d T=%d layer=%d norm=%d warps=%d chunk_grid=%d "
              "rel_err=%.2e slot_bad=%zu other_changed=%zu unwritten=%zu rescaled_heads=%d "
              "same_cache=%d out_differ=%zu out_beyond_step=%zu\n",
              ok ? "ok  " : "FAIL", c.B, c.Hq, c.Hkv, D, c.T, c.layer, c.qk_norm, c.warps, chunk_grid,
              err, slot_bad, other_bad, unwritten, rescaled, int(same_cache), out_diff, out_steps);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<Case> cases = {
      {1, 32, 8, 128, 3, 640, 2, true},   {8, 32, 8, 128, 2, 200, 1, true},
      {3, 64, 8, 128, 2, 65, 0, true},    {2, 28, 4, 128, 2, 130, 1, false},
      {5, 15, 5, 64, 2, 64, 1, false},    {1, 4, 4, 64, 1, 1, 0, true},
      {4, 16, 8, 128, 2, 300, 1, true},   {2, 10, 2, 64, 3, 129, 2, true},
      // tensor-core tile shapes: G = 8 with D = 64 at 8 and 4 warps (2- and 4-byte value
      // loads), G = 1 with D = 128 at 8 and 4 warps, G = 2 with D = 64 at 4 warps
      {2, 16, 2, 64, 2, 130, 1, true},    {3, 16, 2, 64, 2, 200, 0, false},
      {2, 8, 8, 128, 2, 190, 1, true},    {5, 8, 8, 128, 1, 70, 0, true},
      {6, 8, 4, 64, 2, 257, 1, true},
  };
  // The combine's batches of 16 chunks: 33 chunks (three batches, the last of one chunk, over
  // four thread groups; row 1 at position 0, one chunk), where the case requires a later batch
  // to raise some head's max above the first batch's (the rescale in the groups' merge; with
  // seed 93, 11 (row, query head) pairs do in a host replay of the reference); 32 chunks
  // (two groups, both batches full, a rescale required); exactly 16 chunks (position 1023:
  // one group) and 17 (two groups, the second holding one slot).
  cases.push_back({3, 16, 4, 64, 2, 2100, 1, true, 93, true});
  // Long caches: 79 chunks (5 batches over the combine's 8 thread groups, three of them
  // empty) and, below, 141 chunks (9 batches over 4 groups: group 0 walks batches 0, 4 and 8,
  // merging online).
  cases.push_back({2, 16, 4, 64, 2, 5000, 1, true});
  cases.push_back({2, 16, 8, 128, 1, 2048, 0, true, 97, true});
  // The partial kernel's capped grid (PartialGrid): at B = 8 with 8 kv heads the 64 chunks
  // outnumber a round of resident CTAs (8 chunk indices a row on a 132-SM card), so
  // CTAs loop over several chunks, most rows' new slot in a later pass than the first.
  cases.push_back({8, 32, 8, 128, 1, 4096, 0, true});
  // A 32768-slot cache, row 0 at the last slot: with the library's 4-warp CTAs (T > 8192)
  // looping CTAs merge up to 16 chunks each into 33 partials a row (one round on a 132-SM
  // card); with 8-warp CTAs into up to 11 chunks each, 48 partials a row (two whole rounds of
  // 24); three of the combine's batches either way.
  cases.push_back({2, 32, 8, 128, 1, 32768, 0, true, 99});
  cases.push_back({2, 32, 8, 128, 1, 32768, 0, true, 99, false, 8});
  if (!quick) {
    // Seeds as run in RESULTS.md X3 (before the 2048-slot cases).
    cases.push_back({1, 32, 8, 128, 1, 9000, 0, true, 92, true});
    cases.push_back({16, 12, 2, 128, 2, 1000, 1, false, 93});
    cases.push_back({1, 32, 8, 128, 1, 1024, 0, true, 94});
    cases.push_back({2, 32, 8, 128, 1, 1025, 0, true, 95});
    cases.push_back({3, 16, 4, 64, 2, 2048, 1, true, 98, true});
  }
  // Every case three times: with a chunk index for every chunk (the one-chunk kernel), with
  // the library's grid, and with the partial kernel's grid capped at 3 chunk indices (CTAs
  // loop over chunks z, z + 3, ...; the new slot in any pass): the same cache bits, outputs
  // within one bf16 step of the first run's (Run).
  int failed = 0, runs = 0;
  double worst = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const uint32_t seed = cases[i].seed ? cases[i].seed : 77 + uint32_t(i);
    std::vector<uint16_t> bits;
    for (int chunk_grid : {65535, 0, 3}) {
      failed += !Run(cases[i], seed, chunk_grid, &bits, &worst);
      ++runs;
    }
  }
  std::printf("attention check: %zu cases, %d runs, %d failed, worst rel_err %.2e\n",
              cases.size(), runs, failed, worst);
  return failed ? 1 : 0;
}
