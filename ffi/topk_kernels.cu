// Exact top-k of float32 rows (see topk_kernels.h for the contract and the method).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "order_key.cuh"
#include "pdl.cuh"
#include "topk_kernels.h"

namespace rjtopk {

namespace {

constexpr int kThreads = 256;        // every kernel but the sort past C = 384 (512 or 1024)
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == kSlicesPerCta, "TopkScratchWords counts the collect's CTAs by kSlicesPerCta");

using rjkeys::FromOrderKey;
using rjkeys::OrderKey;

// The scratch: maxima [B, ns], rows [B, kRowWords], candidates [B, TopkRowCap(V)] u64, then the
// collect CTAs' sums of exp [B, ceil(ns / kWarps)] f64 (TopkScratchWords).
struct Scratch {
  uint32_t* maxima;
  uint32_t* rows;
  unsigned long long* cand;
  double* sums;
};

Scratch Split(uint32_t* s, int B, int V, int ns) {
  unsigned long long* cand = reinterpret_cast<unsigned long long*>(s + TopkCandidateOffset(B, ns));
  return {s, s + size_t(B) * ns, cand,
          reinterpret_cast<double*>(cand + size_t(B) * TopkRowCap(V))};
}

// Row b's count: counts[b] clamped to [1, C], or C where there are no per-row counts.
__device__ __forceinline__ int RowCount(const int32_t* counts, int b, int C) {
  return counts != nullptr ? min(max(int(counts[b]), 1), C) : C;
}

// z = x / scale[b] (as XLA's GPU code divides), or x where there is no scale.
__device__ __forceinline__ float Scaled(float x, const float* scale, int b) {
  return scale != nullptr ? rjkeys::XlaDivide(x, scale[b]) : x;
}

// Kernel 1: the largest key of each slice of S elements (a warp a slice, 8 slices a CTA).
template <int S>
__global__ void __launch_bounds__(kThreads) SliceMaxKernel(const float* __restrict__ z,
                                                           const float* __restrict__ scale,
                                                           int B, int V, int ns,
                                                           uint32_t* __restrict__ maxima) {
  rjpdl::PdlLaunchDependents();  // kernel 2 may start; it waits for this grid (pdl.cuh)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s = blockIdx.x * kWarps + warp;
  if (s >= ns) return;
  const int base = s * S;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {  // rows beyond the grid's 65535
    const float* row = z + size_t(b) * V;
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < S / 32; ++j) {
      const int i = base + j * 32 + lane;
      if (i < V) m = max(m, OrderKey(Scaled(__ldg(row + i), scale, b)));
    }
    m = __reduce_max_sync(0xffffffffu, m);
    if (lane == 0) maxima[size_t(b) * ns + s] = m;
  }
}

// Kernel 2: L = the c_b-th largest slice maximum of each row (a CTA a row, radix select over
// 8-bit digits from the top; c_b = RowCount); L = 0 where the row has fewer than c_b slices. Also the row's
// largest key (for the sums of exp in kernel 3), and clears the row's candidate count and
// flags for kernel 3.
// maxima: kernel 1's output, read after PdlWait with plain (coherent) loads: no __restrict__,
// which makes nvcc emit ld.global.nc, wrong while kernel 1 may still run (pdl.cuh).
// counts is the chain's input (written before kernel 1 ran): read any time.
__global__ void __launch_bounds__(kThreads) ThresholdKernel(const uint32_t* maxima, int ns, int C,
                                                            const int32_t* __restrict__ counts,
                                                            uint32_t* __restrict__ rows) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t sh_prefix, sh_need, warp_top[kWarps];
  rjpdl::PdlLaunchDependents();  // kernel 3 may start and load its slices of z
  rjpdl::PdlWait();              // the maxima come from kernel 1
  const int b = blockIdx.x;
  const int cb = RowCount(counts, b, C);
  const uint32_t* mk = maxima + size_t(b) * ns;
  uint32_t top = 0;
  for (int i = threadIdx.x; i < ns; i += kThreads) top = max(top, mk[i]);
  top = __reduce_max_sync(0xffffffffu, top);
  if ((threadIdx.x & 31) == 0) warp_top[threadIdx.x >> 5] = top;
  __syncthreads();
  uint32_t prefix = 0, mask = 0, need = uint32_t(cb);
  if (ns >= cb) {
    // Invariant: `need` (>= 1) of the keys under `prefix` / `mask` are the rank-cb key or
    // above it among them, so the cb-th largest is the need-th largest key matching the prefix.
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[threadIdx.x] = 0;
      __syncthreads();
      for (int i = threadIdx.x; i < ns; i += kThreads) {
        const uint32_t k = mk[i];
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        // Lane l holds digits 255 - 8l down to 248 - 8l; an inclusive scan from the top digit.
        const int lane = threadIdx.x;
        uint32_t h[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          h[j] = hist[255 - 8 * lane - j];
          sum += h[j];
        }
        uint32_t incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += t;
        }
        uint32_t acc = incl - sum;
        if (acc < need && need <= incl) {  // exactly one lane
          int d = 255 - 8 * lane - 7;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (need <= acc + h[j]) {
              d = 255 - 8 * lane - j;
              break;
            }
            acc += h[j];
          }
          sh_prefix = prefix | (uint32_t(d) << shift);
          sh_need = need - acc;
        }
      }
      __syncthreads();
      prefix = sh_prefix;
      need = sh_need;
      mask |= 0xFFu << shift;
    }
  }
  if (threadIdx.x == 0) {
    uint32_t* r = rows + size_t(b) * kRowWords;
    r[0] = ns >= cb ? prefix : 0u;
    r[1] = 0u;
    r[2] = 0u;
#pragma unroll
    for (int w = 1; w < kWarps; ++w) top = max(top, warp_top[w]);  // top: warp 0's already
    r[3] = top;
  }
}

// Kernel 3: appends every element with key >= L to its row's candidates as (key << 32) |
// (0xFFFFFFFF - index), so that a larger word is a larger value or, for equal values, a
// smaller index. Counts past the row's capacity are kept (the row is then inexact); NaN and
// zeros of either sign anywhere in the row set the row's flags. A CTA reserves its slots with
// one atomic a row (all the row's CTAs add to one counter: an atomic a warp and a chunk of 32
// took 9.9 us at k = 1024, B = 8, H200, against 5.0 at k = 256; RESULTS.md AE1); the words'
// order in the list does not matter (kernel 4 sorts them). Where `sums` is given, each CTA
// also writes the sum of exp(z - m) over its slices (m: the row's largest value, 0 if that is
// not finite, as jax.nn.logsumexp), in f64, in a fixed order: sums[b, blockIdx.x].
template <int S>
__global__ void __launch_bounds__(kThreads) CollectKernel(const float* __restrict__ z,
                                                          const float* __restrict__ scale,
                                                          int B, int V, int ns,
                                                          uint32_t* __restrict__ rows,
                                                          unsigned long long* __restrict__ cand,
                                                          double* __restrict__ sums) {
  constexpr int J = S / 32;
  __shared__ uint32_t warp_first[kWarps];
  __shared__ double warp_sum[kWarps];
  __shared__ uint32_t cta_first;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s = blockIdx.x * kWarps + warp;
  const bool live = s < ns;  // warps past the last slice take part in the barriers only
  const int cap = TopkRowCap(V);
  const int base = s * S;
  const uint32_t below = (1u << lane) - 1u;
  rjpdl::PdlLaunchDependents();  // kernel 4 may start; it waits for this grid
  for (int b = blockIdx.y; b < B; b += gridDim.y) {  // the same trip count in the whole CTA
    const float* row = z + size_t(b) * V;
    uint32_t* r = rows + size_t(b) * kRowWords;
    unsigned long long* out = cand + size_t(b) * cap;
    // The slice's values first: z is the chain's input, so these loads may overlap kernel 2.
    float vals[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int i = base + j * 32 + lane;
      vals[j] = (live && i < V) ? Scaled(__ldg(row + i), scale, b) : 0.f;
    }
    rjpdl::PdlWait();  // L, and the count and flags kernel 2 cleared (a no-op after the first)
    const uint32_t L = r[0];
    if (sums != nullptr) {
      float m = FromOrderKey(r[3]);
      if (!isfinite(m)) m = 0.f;
      float lane_sum = 0.f;  // J <= 8 terms in f32, then f64 across lanes and CTAs
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int i = base + j * 32 + lane;
        if (live && i < V) lane_sum += expf(vals[j] - m);
      }
      double acc = lane_sum;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
      if (lane == 0) warp_sum[warp] = acc;  // summed by thread 0 after the barrier below
    }
    unsigned flags = 0;
    unsigned long long word[J];
    uint32_t ballot[J], count = 0;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int i = base + j * 32 + lane;
      bool take = false;
      word[j] = 0;
      if (live && i < V) {
        const float f = vals[j];
        if (f != f) flags |= kNanSeen;
        const uint32_t k = OrderKey(f);
        take = k >= L;
        if (f == 0.f) flags |= (k == 0x7FFFFFFFu) ? kNegZero : kPosZero;
        word[j] = (static_cast<unsigned long long>(k) << 32) | (0xFFFFFFFFu - uint32_t(i));
      }
      ballot[j] = __ballot_sync(0xffffffffu, take);
      count += __popc(ballot[j]);
    }
    if (lane == 0) warp_first[warp] = count;
    __syncthreads();
    if (threadIdx.x == 0) {  // the warps' offsets, and the CTA's slots in the row's list
      uint32_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const uint32_t c = warp_first[w];
        warp_first[w] = total;
        total += c;
      }
      cta_first = total ? atomicAdd(r + 1, total) : 0u;
      if (sums != nullptr) {
        double sum = 0.0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += warp_sum[w];
        sums[size_t(b) * gridDim.x + blockIdx.x] = sum;
      }
    }
    __syncthreads();
    uint32_t p = cta_first + warp_first[warp];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      if ((ballot[j] >> lane) & 1u) {
        const uint32_t q = p + __popc(ballot[j] & below);
        if (q < uint32_t(cap)) out[q] = word[j];
      }
      p += __popc(ballot[j]);
    }
    flags = __reduce_or_sync(0xffffffffu, flags);
    if (flags && lane == 0) atomicOr(r + 2, flags);
    if (b + int(gridDim.y) < B) __syncthreads();  // warp_first is refilled for the next row
  }
}

// Kernel 4: sorts each row's candidates (bitonic, descending) and writes the first c_b
// (RowCount): indices, the values read back from z (their own sign bits), and exactness; then
// -inf and index 0 up to C.
//
// The words are padded to P (a power of two, at least 64) with zeros (below every word) and
// cut into blocks of 64: warp w holds blocks w, w + W, ... in registers (lane l: words 64q + l
// and 64q + 32 + l). A bitonic stage that pairs words j apart with j <= 32 stays inside a
// block: j = 32 pairs a lane's own two words, j <= 16 pairs lanes l and l ^ j (a shuffle). So
// the sort of each block (k <= 64) and the last six stages of every later k run in registers,
// and only the stages with j >= 64 go through shared memory, with a block barrier each: at P =
// 512, 6 of 45 stages (the shared-memory form with a barrier a stage took 8.9 us at C = 256,
// B = 8, H200; RESULTS.md AE1).
template <int kT, int kMaxBlocks>
__device__ __forceinline__ void RegisterStage(unsigned long long (&x)[kMaxBlocks][2], int nb,
                                              int warp, int lane, int k, int j) {
  constexpr int W = kT / 32;
#pragma unroll
  for (int m = 0; m < kMaxBlocks; ++m) {
    const int q = warp + m * W;
    if (q >= nb) break;  // uniform in the warp
    if (j == 32) {
      const bool desc = ((64 * q + lane) & k) == 0;  // descending where bit k is clear
      const unsigned long long a = x[m][0], c = x[m][1];
      const unsigned long long hi = a > c ? a : c, lo = a > c ? c : a;
      x[m][0] = desc ? hi : lo;
      x[m][1] = desc ? lo : hi;
    } else {
      const bool lower = (lane & j) == 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool desc = ((64 * q + 32 * h + lane) & k) == 0;
        const unsigned long long a = x[m][h], c = __shfl_xor_sync(0xffffffffu, a, j);
        // The lower word of a pair keeps the larger in a descending run, the smaller else.
        x[m][h] = (desc == lower) ? (a > c ? a : c) : (a > c ? c : a);
      }
    }
  }
}

template <int kT>
// rows, cand and sums come from kernels 2-3 (programmatic dependents): plain loads, no
// __restrict__ (see ThresholdKernel).
__global__ void __launch_bounds__(kT, 1) SortKernel(const float* __restrict__ z,
                                                    const float* __restrict__ scale, int V, int C,
                                                    const int32_t* __restrict__ counts,
                                                    const uint32_t* rows,
                                                    const unsigned long long* cand,
                                                    float* __restrict__ vals,
                                                    int32_t* __restrict__ idx,
                                                    int32_t* __restrict__ exact,
                                                    const double* sums, int nsums,
                                                    float* __restrict__ log_norm) {
  constexpr int W = kT / 32;
  constexpr int kMaxBlocks = (kCap / 64 + W - 1) / W;  // 64-word blocks a warp holds, at most
  __shared__ unsigned long long s[kCap];
  rjpdl::PdlWait();  // the candidates come from kernel 3
  const int b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t* r = rows + size_t(b) * kRowWords;
  const uint32_t count = r[1], cap = uint32_t(TopkRowCap(V));
  const int n = int(min(count, cap));
  const int cb = RowCount(counts, b, C);
  int P = 64;
  while (P < max(n, cb)) P <<= 1;  // <= kCap: n <= cap and cb <= C <= kMaxC
  const int nb = P / 64;
  const unsigned long long* in = cand + size_t(b) * cap;
  unsigned long long x[kMaxBlocks][2];
#pragma unroll
  for (int m = 0; m < kMaxBlocks; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = warp + m * W, i = 64 * q + 32 * h + lane;
      x[m][h] = (q < nb && i < n) ? in[i] : 0ull;  // 0: below all
    }
  }
  auto store = [&] {
#pragma unroll
    for (int m = 0; m < kMaxBlocks; ++m) {
      const int q = warp + m * W;
      if (q >= nb) break;
      s[64 * q + lane] = x[m][0];
      s[64 * q + 32 + lane] = x[m][1];
    }
  };
  for (int k = 2; k <= 64; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) RegisterStage<kT>(x, nb, warp, lane, k, j);
  for (int k = 128; k <= P; k <<= 1) {
    store();
    __syncthreads();
    for (int j = k >> 1; j >= 64; j >>= 1) {
      for (int t = threadIdx.x; t < P / 2; t += kT) {
        const int i = 2 * t - (t & (j - 1));  // the pair (i, i + j), bit j of i clear
        const unsigned long long a = s[i], c = s[i + j];
        if ((a < c) == ((i & k) == 0)) {  // descending blocks where bit k of i is clear
          s[i] = c;
          s[i + j] = a;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < kMaxBlocks; ++m) {
      const int q = warp + m * W;
      if (q >= nb) break;
      x[m][0] = s[64 * q + lane];
      x[m][1] = s[64 * q + 32 + lane];
    }
    for (int j = 32; j > 0; j >>= 1) RegisterStage<kT>(x, nb, warp, lane, k, j);
  }
  store();  // a warp rewrites only its own blocks: no barrier before, one after
  __syncthreads();
  // Zeros of both signs matter where L does not exceed +0.0: XLA may take a -0.0 as equal to
  // a +0.0 (at B = 1, or k <= 16) or as below it, and L = +0.0 would leave every -0.0 out.
  const uint32_t flags = r[2];
  const bool signed_zeros = (flags & (kNegZero | kPosZero)) == (kNegZero | kPosZero) &&
                            r[0] <= 0x80000000u;
  bool ok = count <= cap && !(flags & kNanSeen) && !signed_zeros;
  // n >= cb always (kernel 2's bound), so the first cb words are elements; the check keeps a
  // broken bound from reading outside the row.
  for (int i = threadIdx.x; i < C; i += kT) {
    if (i >= cb) {  // past the row's own count
      idx[size_t(b) * C + i] = 0;
      vals[size_t(b) * C + i] = -INFINITY;
      continue;
    }
    const uint32_t id = 0xFFFFFFFFu - uint32_t(s[i] & 0xFFFFFFFFull);
    const bool in_row = id < uint32_t(V);
    idx[size_t(b) * C + i] = in_row ? int32_t(id) : 0;
    vals[size_t(b) * C + i] =
        in_row ? Scaled(z[size_t(b) * V + id], scale, b) : __int_as_float(0x7fc00000);
    if (!in_row) ok = false;
  }
  ok = __syncthreads_and(ok);
  if (threadIdx.x == 0) exact[b] = ok ? 1 : 0;
  if (log_norm != nullptr && warp == 0) {
    // log(sum of exp(z - m)) + m, the collect CTAs' sums added in a fixed order.
    double sum = 0.0;
    for (int i = lane; i < nsums; i += 32) sum += sums[size_t(b) * nsums + i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    float m = FromOrderKey(r[3]);
    if (!isfinite(m)) m = 0.f;
    if (lane == 0) log_norm[b] = float(log(sum) + double(m));
  }
}

template <int S>
cudaError_t LaunchWith(const TopkArgs& a, cudaStream_t stream) {
  const int ns = TopkSlices(a.V, a.C);
  const Scratch sc = Split(a.scratch, a.B, a.V, ns);
  const dim3 slices((ns + kWarps - 1) / kWarps, a.B < 65535 ? a.B : 65535);
  double* sums = a.log_norm != nullptr ? sc.sums : nullptr;
  // The first kernel waits for everything before it on the stream; the other three are
  // programmatic dependents of the one before them where a.pdl (pdl.cuh).
  SliceMaxKernel<S><<<slices, kThreads, 0, stream>>>(a.z, a.scale, a.B, a.V, ns, sc.maxima);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (cudaError_t e = rjpdl::Launch(ThresholdKernel, dim3(a.B), dim3(kThreads), 0, stream, a.pdl,
                                    sc.maxima, ns, a.C, a.counts, sc.rows);
      e != cudaSuccess)
    return e;
  if (cudaError_t e = rjpdl::Launch(CollectKernel<S>, slices, dim3(kThreads), 0, stream, a.pdl,
                                    a.z, a.scale, a.B, a.V, ns, sc.rows, sc.cand, sums);
      e != cudaSuccess)
    return e;
  // A warp a block of 64 words at the usual candidate counts: past C = 512 a row sorts
  // 2048-4096 words (1024 threads, two blocks a warp); at C = 512, 1024 (512 threads); up to
  // C = 384, 512 (256 threads: random rows of V = 151,936 give ~290 candidates at C = 256 and
  // ~460 at 384 with slices of 128).
  const int sort_threads = a.C > 512 ? 1024 : a.C > 384 ? 512 : kThreads;
  auto* sort = a.C > 512 ? SortKernel<1024> : a.C > 384 ? SortKernel<512> : SortKernel<kThreads>;
  return rjpdl::Launch(sort, dim3(a.B), dim3(sort_threads), 0, stream, a.pdl, a.z, a.scale, a.V,
                       a.C, a.counts, sc.rows, sc.cand, a.vals, a.idx, a.exact,
                       static_cast<const double*>(sums), int(slices.x), a.log_norm);
}

}  // namespace

bool TopkPdlDefault() {
  const char* env = std::getenv("RESET_JAX_TOPK_PDL");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && rjpdl::DeviceSupportsPdl(device);
}

const char* TopkUnsupportedReason(const TopkArgs& a) {
  if (a.B < 1 || a.V < 1) return "empty logits";
  if (a.C < 1) return "k must be at least 1";
  if (a.C > a.V) return "k is larger than the vocabulary";
  if (a.C > kMaxC) return "k is larger than 1024, the most the kernel serves";
  if (a.V > INT32_MAX - 256) return "rows too long for 32-bit indexing";
  if (!a.z || !a.vals || !a.idx || !a.exact || !a.scratch) return "null buffer";
  if (reinterpret_cast<uintptr_t>(a.scratch) % 8 != 0) return "scratch is not 8-byte aligned";
  return nullptr;
}

cudaError_t LaunchTopk(const TopkArgs& a, cudaStream_t stream) {
  if (TopkUnsupportedReason(a)) return cudaErrorInvalidValue;
  switch (TopkSliceSize(a.V, a.C)) {
    case 256: return LaunchWith<256>(a, stream);
    case 128: return LaunchWith<128>(a, stream);
    case 64: return LaunchWith<64>(a, stream);
    default: return LaunchWith<32>(a, stream);
  }
}

}  // namespace rjtopk
