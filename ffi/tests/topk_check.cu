// Standalone checker for the sampler's top-k kernels and its full row sort (no JAX), against a
// host reference: a stable sort of each row by value (descending, NaNs last; +0.0 above -0.0 for
// the top-k, the two equal for the sort), index order for ties.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/topk_check.cu ffi/topk_kernels.cu \
//     ffi/sort_kernels.cu -o topk_check
//   ./topk_check          # every case, then timings; exit code 0 only if all passed
//   ./topk_check quick    # fewer cases, no timings (for the sanitizers)
//
// Each case: fresh random rows (never zeros unless the case is about zeros); outputs poisoned
// before the call and fully written; rows the kernels call exact must equal the reference bit
// for bit (indices and values), and a case says which rows must be exact (NaN rows, rows with
// zeros of both signs among the candidates and rows with too many candidates may not be).
// The full sort (SortCases) must equal the reference in every row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tests/host_util.h"
#include "order_key.cuh"
#include "sort_kernels.h"
#include "topk_kernels.h"

namespace {

uint32_t HostKey(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

enum class Expect { kAllExact, kNanRowsInexact, kAllInexact, kAnyExactness };

struct Case {
  std::string name;
  int B, V, C;
  Expect expect;
  std::vector<float> z;  // [B, V]
  // [B] or empty. Given: the kernels divide the rows by t (TopkArgs::scale) and write each
  // row's logsumexp (log_norm), checked against the host's in f64; the reference is z / t.
  std::vector<float> t = {};
  // [B] or empty. Given: row b's own count (TopkArgs::counts, clamped to [1, C]); its first
  // counts[b] results must be the reference's, the rest -inf with index 0.
  std::vector<int32_t> counts = {};
};

// Counts 256 and 512 in turn, with the edges (1, C - 1) and values outside [1, C] (clamped).
std::vector<int32_t> Counts(int B, int C) {
  std::vector<int32_t> n(B);
  const int32_t pattern[] = {C, C / 2, 1, C - 1, 0, C + 7, -3, C / 2};
  for (int b = 0; b < B; ++b) n[b] = pattern[b % 8];
  return n;
}

std::vector<float> Temperatures(int B, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(0.05f, 1.5f);
  std::vector<float> t(B);
  for (auto& x : t) x = d(g);
  t[0] = 1.f;  // a greedy row's divisor
  return t;
}

std::vector<float> Normal(int B, int V, float std, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.f, std);
  std::vector<float> z(size_t(B) * V);
  for (auto& x : z) x = d(g);
  return z;
}

float RoundBf16(float x) { return FloatFromBf16(Bf16FromFloat(x)); }

std::vector<Case> Cases(bool quick) {
  std::vector<Case> cs;
  const int V = 151936;
  for (int B : {1, 3, 8}) cs.push_back({"random", B, V, 256, Expect::kAllExact, Normal(B, V, 7.f, 11 + B)});
  // The 1024-thread sort (C > 256), in the quick cases too (racecheck).
  cs.push_back({"random 1024", 3, V, 1024, Expect::kAllExact, Normal(3, V, 3.f, 31)});
  // Rows divided by temperatures inside the kernels, with their logsumexp.
  cs.push_back({"scaled", 8, V, 256, Expect::kAllExact, Normal(8, V, 7.f, 41), Temperatures(8, 1)});
  cs.push_back({"scaled 1024", 3, V, 1024, Expect::kAllExact, Normal(3, V, 3.f, 42),
                Temperatures(3, 2)});
  // Per-row counts (the sampler's hot rows: C = 512, 512 sort threads), scaled as it calls them.
  cs.push_back({"scaled counts", 8, V, 512, Expect::kAllExact, Normal(8, V, 7.f, 44),
                Temperatures(8, 6), Counts(8, 512)});
  cs.push_back({"scaled counts 384", 8, V, 384, Expect::kAllExact, Normal(8, V, 7.f, 48),
                Temperatures(8, 11), Counts(8, 384)});
  if (!quick) {
    for (int C : {1, 20, 255, 512, 1024})
      cs.push_back({"random C", 2, V, C, Expect::kAllExact, Normal(2, V, 7.f, 100 + C)});
    cs.push_back({"counts 1024", 8, V, 1024, Expect::kAllExact, Normal(8, V, 3.f, 45), {},
                  Counts(8, 1024)});
    cs.push_back({"counts V 300", 8, 300, 256, Expect::kAllExact, Normal(8, 300, 3.f, 46),
                  Temperatures(8, 8), Counts(8, 256)});
    {
      auto z = Normal(4, V, 7.f, 21);
      for (auto& x : z) x = RoundBf16(x);
      cs.push_back({"bf16 ties", 4, V, 256, Expect::kAllExact, z});
    }
    {
      auto z = Normal(4, V, 7.f, 22);
      for (auto& x : z) x = std::round(x / 4.f);
      cs.push_back({"integer ties", 4, V, 256, Expect::kAnyExactness, z});
    }
    {
      auto z = Normal(2, V, 7.f, 23);
      for (int b = 0; b < 2; ++b)
        for (int i = 0; i < 100; ++i) z[size_t(b) * V + 1000 + i] = 100.f + i;
      cs.push_back({"clustered", 2, V, 256, Expect::kAllExact, z});
    }
    for (bool both : {true, false}) {
      // 300 zeros above negative values: of both signs (inexact: XLA's order of signed zeros
      // is not one rule) or all -0.0 (exact: the top 256 in index order).
      auto z = Normal(2, V, 1.f, 24);
      for (auto& x : z) x = -1.f - std::fabs(x);
      std::mt19937 g(5);
      for (int b = 0; b < 2; ++b)
        for (int n = 0; n < 300; ++n) z[size_t(b) * V + g() % V] = (both && (g() & 1)) ? 0.f : -0.f;
      cs.push_back({both ? "signed zeros" : "-0.0 on top", 2, V, 256,
                    both ? Expect::kAllInexact : Expect::kAllExact, z});
    }
    for (int C : {5, 256}) {
      // +0.0 at 256j + 200, -0.0 at 256j + 10: L = +0.0 leaves every -0.0 out, which XLA may
      // take as equal to +0.0 (B = 1): inexact.
      auto z = Normal(1, V, 1.f, 26);
      for (auto& x : z) x = -1.f - std::fabs(x);
      for (int j = 0; j < 300; ++j) z[256 * j + 200] = 0.f, z[256 * j + 10] = -0.f;
      cs.push_back({"+0.0 at L", 1, V, C, Expect::kAllInexact, z});
    }
    {
      auto z = Normal(3, V, 7.f, 25);
      z[size_t(1) * V + 77] = NAN;
      cs.push_back({"NaN row 1", 3, V, 256, Expect::kNanRowsInexact, z});
    }
    {
      // -inf everywhere but 400 values: exact (the 256th is finite).
      std::vector<float> z(size_t(2) * V, -INFINITY);
      std::mt19937 g(6);
      for (int b = 0; b < 2; ++b)
        for (int n = 0; n < 400; ++n) z[size_t(b) * V + g() % V] = float(int(g() % 1000)) / 8.f;
      cs.push_back({"masked", 2, V, 256, Expect::kAllExact, z});
      cs.push_back({"scaled masked", 2, V, 256, Expect::kAllExact, z, Temperatures(2, 3)});
    }
    {
      std::vector<float> z(size_t(2) * V, 0.5f);  // every value equal: more than kCap candidates
      cs.push_back({"all equal", 2, V, 256, Expect::kAnyExactness, z});
    }
    for (int v : {32000, 49152, 5000, 300, 256, 1000003})
      cs.push_back({"V " + std::to_string(v), 2, v, 256,
                    v == 5000 ? Expect::kAnyExactness : Expect::kAllExact, Normal(2, v, 3.f, v)});
    cs.push_back({"V 17 C 5", 3, 17, 5, Expect::kAllExact, Normal(3, 17, 1.f, 17)});
    cs.push_back({"70000 rows", 70000, 40, 5, Expect::kAllExact, Normal(70000, 40, 1.f, 40)});
    cs.push_back({"scaled 70000 rows", 70000, 40, 5, Expect::kAllExact,
                  Normal(70000, 40, 1.f, 41), Temperatures(70000, 4)});
    cs.push_back({"counts 70000 rows", 70000, 40, 5, Expect::kAllExact,
                  Normal(70000, 40, 1.f, 47), Temperatures(70000, 9), Counts(70000, 5)});
    {
      // logsumexp where the row's maximum is not finite (jax takes it as 0): a +inf (the sum
      // is +inf), every value -inf (the sum is 0: -inf), a NaN (NaN); then a plain row.
      auto z = Normal(4, V, 7.f, 43);
      z[size_t(0) * V + 5] = INFINITY;
      std::fill(z.begin() + V, z.begin() + 2 * V, -INFINITY);
      z[size_t(2) * V + 9] = NAN;
      cs.push_back({"scaled non-finite", 4, V, 256, Expect::kAnyExactness, z, Temperatures(4, 5)});
    }
  }
  return cs;
}

// Reference top-C of one row (indices): descending, ties in index order, NaNs last, and +0.0
// above -0.0 (the top-k, which never reports a NaN row exact) or the two equal (the sort, as
// lax.sort has them).
void Reference(const float* row, int V, int C, std::vector<int32_t>& idx,
               bool zeros_equal = false) {
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  auto rank = [&](int32_t i) {
    const float f = zeros_equal && row[i] == 0.f ? 0.f : row[i];
    return std::isnan(f) ? int64_t(-1) : int64_t(HostKey(f));
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return rank(a) > rank(b); });
  idx.assign(order.begin(), order.begin() + C);
}

// Whether a row's results are the reference's: indices want[i] and their values' bits, one
// entry per element of want (reports the first difference).
bool RowMatches(const std::string& name, int b, const float* row, const int32_t* idx,
                const float* vals, const std::vector<int32_t>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (idx[i] != want[i] || std::memcmp(&vals[i], &row[want[i]], 4) != 0) {
      std::printf("FAIL %s row %d rank %zu: got (%d, %a), want (%d, %a)\n", name.c_str(), b, i,
                  idx[i], vals[i], want[i], row[want[i]]);
      return false;
    }
  }
  return true;
}

struct Buffers {
  float *z = nullptr, *vals = nullptr;
  int32_t *idx = nullptr, *exact = nullptr;
  uint32_t* scratch = nullptr;
  void Free() {
    CK(cudaFree(z));
    CK(cudaFree(vals));
    CK(cudaFree(idx));
    CK(cudaFree(exact));
    CK(cudaFree(scratch));
  }
};

Buffers Alloc(int B, int V, int C) {
  Buffers d;
  CK(cudaMalloc(&d.z, size_t(B) * V * 4));
  CK(cudaMalloc(&d.vals, size_t(B) * C * 4));
  CK(cudaMalloc(&d.idx, size_t(B) * C * 4));
  CK(cudaMalloc(&d.exact, size_t(B) * 4));
  CK(cudaMalloc(&d.scratch, rjtopk::TopkScratchWords(B, V, C) * 4));
  return d;
}

// pdl: kernels 2-4 as programmatic dependents (by default as the library launches them,
// rjtopk::TopkPdlDefault: on sm_90+ unless RESET_JAX_TOPK_PDL=0).
rjtopk::TopkArgs Args(const Buffers& d, int B, int V, int C, int pdl = -1) {
  rjtopk::TopkArgs a;
  a.z = d.z, a.vals = d.vals, a.idx = d.idx, a.exact = d.exact, a.scratch = d.scratch;
  a.B = B, a.V = V, a.C = C;
  a.pdl = pdl < 0 ? rjtopk::TopkPdlDefault() : pdl == 1;
  return a;
}

__global__ void DivideKernel(const float* x, const float* t, int V, size_t n, float* z) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    z[i] = rjkeys::XlaDivide(x[i], t[i / V]);
}

// x[b, :] / t[b] for [B, V] rows, as XLA's GPU code divides (rjkeys::XlaDivide).
std::vector<float> DivideOnDevice(const std::vector<float>& x, const std::vector<float>& t, int V) {
  float *dx, *dt, *dz;
  CK(cudaMalloc(&dx, x.size() * 4));
  CK(cudaMalloc(&dt, t.size() * 4));
  CK(cudaMalloc(&dz, x.size() * 4));
  CK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dt, t.data(), t.size() * 4, cudaMemcpyHostToDevice));
  DivideKernel<<<1024, 256>>>(dx, dt, V, x.size(), dz);
  CK(cudaGetLastError());
  std::vector<float> z(x.size());
  CK(cudaMemcpy(z.data(), dz, z.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaFree(dx));
  CK(cudaFree(dt));
  CK(cudaFree(dz));
  return z;
}

bool RunCase(const Case& c) {
  const int B = c.B, V = c.V, C = c.C;
  const bool scaled = !c.t.empty();
  Buffers d = Alloc(B, V, C);
  float *t = nullptr, *log_norm = nullptr;
  int32_t* counts = nullptr;
  CK(cudaMemcpy(d.z, c.z.data(), c.z.size() * 4, cudaMemcpyHostToDevice));
  // Poison: outputs and scratch (the kernels must not rely on a cleared scratch).
  CK(cudaMemset(d.vals, 0xFF, size_t(B) * C * 4));
  CK(cudaMemset(d.idx, 0xAB, size_t(B) * C * 4));
  CK(cudaMemset(d.exact, 0x7F, size_t(B) * 4));
  CK(cudaMemset(d.scratch, 0x5A, rjtopk::TopkScratchWords(B, V, C) * 4));
  rjtopk::TopkArgs a = Args(d, B, V, C);
  if (scaled) {
    CK(cudaMalloc(&t, size_t(B) * 4));
    CK(cudaMalloc(&log_norm, size_t(B) * 4));
    CK(cudaMemcpy(t, c.t.data(), size_t(B) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(log_norm, 0xFF, size_t(B) * 4));
    a.scale = t, a.log_norm = log_norm;
  }
  if (!c.counts.empty()) {
    CK(cudaMalloc(&counts, size_t(B) * 4));
    CK(cudaMemcpy(counts, c.counts.data(), size_t(B) * 4, cudaMemcpyHostToDevice));
    a.counts = counts;
  }
  if (const char* why = rjtopk::TopkUnsupportedReason(a)) {
    std::printf("FAIL %s: unsupported: %s\n", c.name.c_str(), why);
    d.Free();
    return false;
  }
  CK(rjtopk::LaunchTopk(a, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<float> vals(size_t(B) * C), got_ln(B);
  std::vector<int32_t> idx(size_t(B) * C), exact(B);
  CK(cudaMemcpy(vals.data(), d.vals, vals.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(idx.data(), d.idx, idx.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(exact.data(), d.exact, B * 4, cudaMemcpyDeviceToHost));
  if (scaled) {
    CK(cudaMemcpy(got_ln.data(), log_norm, size_t(B) * 4, cudaMemcpyDeviceToHost));
    CK(cudaFree(t));
    CK(cudaFree(log_norm));
  }
  CK(cudaFree(counts));
  d.Free();
  // The rows the kernels ordered: z, or z / t divided on the device as XLA divides (its own
  // kernel: the host's IEEE quotient can differ in the last bit).
  std::vector<float> rows_z = c.z;
  if (scaled) rows_z = DivideOnDevice(c.z, c.t, V);
  bool ok = true;
  int n_exact = 0, written = 0;
  std::vector<int32_t> want;
  for (int b = 0; b < B; ++b) {
    const float* row = rows_z.data() + size_t(b) * V;
    if (scaled) {  // logsumexp in f64 on the host (max 0 where not finite, as jax's)
      float m = -INFINITY;
      for (int i = 0; i < V; ++i) m = std::max(m, row[i]);
      if (!std::isfinite(m)) m = 0.f;
      double sum = 0.0;
      for (int i = 0; i < V; ++i) sum += std::exp(double(row[i]) - double(m));
      const double ln = std::log(sum) + double(m);
      const double got = got_ln[b];
      const bool same = std::isfinite(ln) ? std::fabs(got - ln) <= 1e-6 * std::max(1.0, std::fabs(ln))
                                          : (std::isnan(ln) ? std::isnan(got) : got == ln);
      if (!same) {
        std::printf("FAIL %s row %d: log_norm %.9g, want %.9g\n", c.name.c_str(), b, got_ln[b], ln);
        ok = false;
      }
    }
    bool has_nan = false;
    for (int i = 0; i < V; ++i) has_nan |= std::isnan(row[i]);
    if (exact[b] != 0 && exact[b] != 1) {
      std::printf("FAIL %s row %d: exact flag %d unwritten\n", c.name.c_str(), b, exact[b]);
      ok = false;
      continue;
    }
    for (int i = 0; i < C; ++i) {
      const int32_t id = idx[size_t(b) * C + i];
      written += id >= 0 && id < V;
    }
    const bool must = c.expect == Expect::kAllExact ||
                      (c.expect == Expect::kNanRowsInexact && !has_nan);
    if (c.expect == Expect::kAllInexact && exact[b]) {
      std::printf("FAIL %s row %d: reported exact\n", c.name.c_str(), b);
      ok = false;
    }
    if (must && !exact[b]) {
      std::printf("FAIL %s row %d: reported inexact\n", c.name.c_str(), b);
      ok = false;
    }
    if (has_nan && exact[b]) {
      std::printf("FAIL %s row %d: a NaN row reported exact\n", c.name.c_str(), b);
      ok = false;
    }
    const int cb = c.counts.empty() ? C : std::min(std::max(int(c.counts[b]), 1), C);
    for (int i = cb; i < C; ++i) {  // past the row's count: -inf and index 0, exact or not
      const float v = vals[size_t(b) * C + i];
      if (idx[size_t(b) * C + i] != 0 || !(std::isinf(v) && v < 0)) {
        std::printf("FAIL %s row %d rank %d past its count %d: (%d, %a)\n", c.name.c_str(), b,
                    i, cb, idx[size_t(b) * C + i], v);
        ok = false;
        break;
      }
    }
    if (!exact[b]) continue;
    ++n_exact;
    Reference(row, V, cb, want);
    ok &= RowMatches(c.name, b, row, idx.data() + size_t(b) * C, vals.data() + size_t(b) * C, want);
  }
  if (written != B * C) {
    std::printf("FAIL %s: %d of %d indices written inside the row\n", c.name.c_str(), written,
                B * C);
    ok = false;
  }
  std::printf("%s %-14s B=%d V=%d C=%d slice=%d exact_rows=%d/%d written=%d/%d\n",
              ok ? "ok  " : "FAIL", c.name.c_str(), B, V, C, rjtopk::TopkSliceSize(V, C),
              n_exact, B, written, B * C);
  return ok;
}

void Time(int B, int V, int C) {
  Buffers d = Alloc(B, V, C);
  const auto z = Normal(B, V, 7.f, 99);
  CK(cudaMemcpy(d.z, z.data(), z.size() * 4, cudaMemcpyHostToDevice));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  // A CUDA graph of 20 calls, as XLA's command buffers run them; with and without PDL inside
  // each call, alternating, twice.
  float ms[2][2];
  for (int rep = 0; rep < 2; ++rep)
    for (int pdl = 0; pdl < 2; ++pdl) {
      const rjtopk::TopkArgs a = Args(d, B, V, C, pdl);
      ms[rep][pdl] = GraphMedianMs(st, 15, [&](cudaStream_t s) {
        for (int r = 0; r < 20; ++r) CK(rjtopk::LaunchTopk(a, s));
      });
    }
  // Rows divided by temperatures, with their logsumexp (the sampler's call), PDL as the library
  // launches it.
  float *t, *log_norm;
  const auto h_t = Temperatures(B, 7);
  CK(cudaMalloc(&t, size_t(B) * 4));
  CK(cudaMalloc(&log_norm, size_t(B) * 4));
  CK(cudaMemcpy(t, h_t.data(), size_t(B) * 4, cudaMemcpyHostToDevice));
  rjtopk::TopkArgs sa = Args(d, B, V, C);
  sa.scale = t, sa.log_norm = log_norm;
  const float scaled_ms = GraphMedianMs(st, 15, [&](cudaStream_t s) {
    for (int r = 0; r < 20; ++r) CK(rjtopk::LaunchTopk(sa, s));
  });
  CK(cudaFree(t));
  CK(cudaFree(log_norm));
  std::printf("time B=%d V=%d C=%d: %.2f / %.2f us a call, PDL %.2f / %.2f, scaled with "
              "log_norm %.2f (median of 15 graphs of 20 calls)\n",
              B, V, C, 1e3 * ms[0][0] / 20, 1e3 * ms[1][0] / 20, 1e3 * ms[0][1] / 20,
              1e3 * ms[1][1] / 20, 1e3 * scaled_ms / 20);
  CK(cudaStreamDestroy(st));
  d.Free();
}

// The sampler's first top-k with hot rows: scaled, with log_norm, C = hot and per-row counts
// (every row 256; row 0 at hot; every row hot), against C = 256 without counts, interleaved.
void TimeCounts(int B, int V, int hot) {
  Buffers d = Alloc(B, V, hot);
  const auto z = Normal(B, V, 7.f, 98);
  CK(cudaMemcpy(d.z, z.data(), z.size() * 4, cudaMemcpyHostToDevice));
  const auto h_t = Temperatures(B, 10);
  float *t, *log_norm;
  int32_t* counts[3];
  CK(cudaMalloc(&t, size_t(B) * 4));
  CK(cudaMalloc(&log_norm, size_t(B) * 4));
  CK(cudaMemcpy(t, h_t.data(), size_t(B) * 4, cudaMemcpyHostToDevice));
  for (int v = 0; v < 3; ++v) {
    std::vector<int32_t> n(B, v == 2 ? hot : 256);
    if (v == 1) n[0] = hot;
    CK(cudaMalloc(&counts[v], size_t(B) * 4));
    CK(cudaMemcpy(counts[v], n.data(), size_t(B) * 4, cudaMemcpyHostToDevice));
  }
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  float ms[2][4];
  for (int rep = 0; rep < 2; ++rep)
    for (int v = 0; v < 4; ++v) {
      rjtopk::TopkArgs a = Args(d, B, V, v == 0 ? 256 : hot);
      a.scale = t, a.log_norm = log_norm;
      a.counts = v == 0 ? nullptr : counts[v - 1];
      ms[rep][v] = GraphMedianMs(st, 15, [&](cudaStream_t s) {
        for (int r = 0; r < 20; ++r) CK(rjtopk::LaunchTopk(a, s));
      });
    }
  std::printf("time counts B=%d V=%d: C=256 %.2f / %.2f us a call; C=%d with counts all 256 "
              "%.2f / %.2f, row 0 at %d %.2f / %.2f, all %d %.2f / %.2f\n",
              B, V, 1e3 * ms[0][0] / 20, 1e3 * ms[1][0] / 20, hot, 1e3 * ms[0][1] / 20,
              1e3 * ms[1][1] / 20, hot, 1e3 * ms[0][2] / 20, 1e3 * ms[1][2] / 20, hot,
              1e3 * ms[0][3] / 20, 1e3 * ms[1][3] / 20);
  CK(cudaStreamDestroy(st));
  CK(cudaFree(t));
  CK(cudaFree(log_norm));
  for (auto* c : counts) CK(cudaFree(c));
  d.Free();
}

// The full sort's cases: (name, B, V, rows).
struct SortCase {
  std::string name;
  int B, V;
  std::vector<float> z;
};

std::vector<SortCase> SortCases(bool quick) {
  std::vector<SortCase> cs;
  const int V = 151936;
  cs.push_back({"sort random", 8, V, Normal(8, V, 3.f, 201)});
  cs.push_back({"sort V 17", 3, 17, Normal(3, 17, 1.f, 202)});
  {
    // Ties, signed zeros, infinities and NaNs (with payloads and both signs) in one batch.
    auto z = Normal(5, V, 2.f, 203);
    for (auto& x : z) x = std::round(x * 4.f) / 4.f;  // many ties, +0.0 among them
    std::mt19937 g(7);
    for (int n = 0; n < 4000; ++n) {
      const size_t i = g() % z.size();
      const uint32_t kind = g() % 5;
      uint32_t nan_bits = 0x7fc00000u | (g() & 0xffffu) | ((g() & 1) << 31);
      float nan;
      std::memcpy(&nan, &nan_bits, 4);
      z[i] = kind == 0 ? -0.f : kind == 1 ? INFINITY : kind == 2 ? -INFINITY : kind == 3 ? 0.f : nan;
    }
    cs.push_back({"sort specials", 5, V, z});
  }
  if (!quick) {
    cs.push_back({"sort B 1", 1, V, Normal(1, V, 7.f, 204)});
    cs.push_back({"sort B 2", 2, V, Normal(2, V, 7.f, 205)});
    {
      auto z = Normal(3, V, 7.f, 206);
      for (auto& x : z) x = RoundBf16(x);
      cs.push_back({"sort bf16 ties", 3, V, z});
    }
    {
      std::vector<float> z(size_t(2) * V, 0.5f);
      cs.push_back({"sort all equal", 2, V, z});
    }
    cs.push_back({"sort 70000 rows", 70000, 40, Normal(70000, 40, 1.f, 207)});
    cs.push_back({"sort V 1", 9, 1, Normal(9, 1, 1.f, 208)});
  }
  return cs;
}

// A sort's device buffers for [B, V] and its arguments.
struct SortBuffers {
  float *z = nullptr, *vals = nullptr;
  int32_t* idx = nullptr;
  void* scratch = nullptr;
  rjsort::SortArgs args;
  SortBuffers(int B, int V, size_t bytes) {
    const size_t n = size_t(B) * V;
    CK(cudaMalloc(&z, n * 4));
    CK(cudaMalloc(&vals, n * 4));
    CK(cudaMalloc(&idx, n * 4));
    CK(cudaMalloc(&scratch, bytes));
    args.z = z, args.vals = vals, args.idx = idx, args.scratch = scratch;
    args.scratch_bytes = bytes, args.B = B, args.V = V;
  }
  ~SortBuffers() {
    CK(cudaFree(z));
    CK(cudaFree(vals));
    CK(cudaFree(idx));
    CK(cudaFree(scratch));
  }
};

bool RunSortCase(const SortCase& c) {
  const int B = c.B, V = c.V;
  const size_t n = size_t(B) * V, bytes = rjsort::SortScratchBytes(B, V);
  if (bytes == 0) {
    std::printf("FAIL %s: no scratch size\n", c.name.c_str());
    return false;
  }
  std::vector<float> got_v(n);
  std::vector<int32_t> got_i(n), want;
  {
    SortBuffers d(B, V, bytes);
    CK(cudaMemcpy(d.z, c.z.data(), n * 4, cudaMemcpyHostToDevice));
    // Poison: outputs and scratch.
    CK(cudaMemset(d.vals, 0xFF, n * 4));
    CK(cudaMemset(d.idx, 0xAB, n * 4));
    CK(cudaMemset(d.scratch, 0x5A, bytes));
    if (const char* why = rjsort::SortUnsupportedReason(d.args)) {
      std::printf("FAIL %s: unsupported: %s\n", c.name.c_str(), why);
      return false;
    }
    CK(rjsort::LaunchSortRows(d.args, nullptr));
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(got_v.data(), d.vals, n * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(got_i.data(), d.idx, n * 4, cudaMemcpyDeviceToHost));
  }
  bool ok = true;
  for (int b = 0; b < B && ok; ++b) {
    const float* row = c.z.data() + size_t(b) * V;
    Reference(row, V, V, want, /*zeros_equal=*/true);
    ok &= RowMatches(c.name, b, row, got_i.data() + size_t(b) * V, got_v.data() + size_t(b) * V,
                     want);
  }
  std::printf("%s %-14s B=%d V=%d scratch=%zu bytes\n", ok ? "ok  " : "FAIL", c.name.c_str(), B,
              V, bytes);
  return ok;
}

void TimeSort(int B, int V) {
  SortBuffers d(B, V, rjsort::SortScratchBytes(B, V));
  const auto h = Normal(B, V, 7.f, 98);
  CK(cudaMemcpy(d.z, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  const float ms = GraphMedianMs(st, 15, [&](cudaStream_t s) {
    for (int r = 0; r < 20; ++r) CK(rjsort::LaunchSortRows(d.args, s));
  });
  std::printf("time sort B=%d V=%d: %.2f us a call (median of 15 graphs of 20 calls)\n", B, V,
              1e3 * ms / 20);
  CK(cudaStreamDestroy(st));
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  int failed = 0, n = 0;
  for (const Case& c : Cases(quick)) {
    ++n;
    failed += !RunCase(c);
  }
  for (const SortCase& c : SortCases(quick)) {
    ++n;
    failed += !RunSortCase(c);
  }
  std::printf("topk check: %d cases, %d failed\n", n, failed);
  if (!quick) {
    for (int C : {256, 1024})
      for (int B : {1, 2, 8}) Time(B, 151936, C);
    for (int hot : {384, 512})
      for (int B : {1, 8}) TimeCounts(B, 151936, hot);
    for (int B : {1, 2, 8}) TimeSort(B, 151936);
  }
  return failed ? 1 : 0;
}
