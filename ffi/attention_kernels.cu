// Decode attention kernels (see attention_kernels.h for the contract).
#include <cuda_bf16.h>

#include <cfloat>
#include <type_traits>

#include "attention_kernels.h"
#include "pdl.cuh"

namespace rjattn {


namespace {


__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float RoundBf16(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

__device__ __forceinline__ int ClampPos(int p, int T) { return min(max(p, 0), T - 1); }

// The running softmax merge of one output element over chunk partials (max, sum,
// unnormalized P.V): m the running max, l the running sum e^(m_c - m) l_c, o the same of
// acc_c.
struct Merge {
  float m = -FLT_MAX, l = 0.f, o = 0.f;

  // Raises the running max to mb (>= m), rescaling the running sums by e^(m - mb) when they
  // hold anything.
  __device__ __forceinline__ void RaiseMax(float mb) {
    if (l != 0.f && mb != m) {
      const float f = expf(m - mb);
      l *= f;
      o *= f;
    }
    m = mb;
  }

  // Adds a partial with max mc (<= m), sum lc and value oc at the running max.
  __device__ __forceinline__ void Add(float mc, float lc, float oc) {
    const float w = expf(mc - m);
    l = fmaf(w, lc, l);
    o = fmaf(w, oc, o);
  }
};

// Merges into r the partials c0, c0 + 1, ... < nc of batches c0 = first, first + step, ...
// (kCombineBatch partials each: chunks, or looping CTAs' merged chunks) for element d of one
// query head (partial c at base + c * kStride).  Reads through L2 (the partials were written
// by the previous grid), a batch's kCombineBatch maxima, sums and values in one round trip,
// and merges each batch online: the running sums are rescaled by e^(m_old - m_new) where a
// batch raises the max. Within one batch this is the arithmetic of one partial at a time
// against the running max (the max of the earlier batches' and this batch's maxima), in
// order.  (Before: 8
// chunks a batch and two round trips for each batch after the first, a pass for the maxima
// and one for the values: three round trips from position 512. Layer chain on an H200,
// RESULTS.md run W2: -0.4 us an 8B layer at M = 1, position 640; -0.7 and -1.4 us an 8B and
// a 32B layer at position 2000.)
constexpr int kCombineBatch = 16;

template <int D, int kStride>
__device__ __forceinline__ void CombineBatches(const float* base, int nc, int d, int first,
                                               int step, Merge& r) {
  for (int c0 = first; c0 < nc; c0 += step) {
    float mv[kCombineBatch], lv[kCombineBatch], av[kCombineBatch];
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) {
      const float* pc = base + (c0 + j) * kStride;
      const bool in = c0 + j < nc;
      mv[j] = in ? __ldcg(pc + D) : -FLT_MAX;
      lv[j] = in ? __ldcg(pc + D + 1) : 0.f;
      av[j] = in ? __ldcg(pc + d) : 0.f;
    }
    float mb = r.m;
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) mb = fmaxf(mb, mv[j]);
    r.RaiseMax(mb);
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j)
      if (c0 + j < nc) r.Add(mv[j], lv[j], av[j]);
  }
}

// One m16n8k16 bf16 tensor-core product with float32 accumulation: c += A B, A's rows 8..15
// zero (a1 = a3 = 0: at most kMaxGroup = 8 query rows).  Fragment layouts (PTX ISA,
// "mma.m16n8k16"): lane = 4 i + j holds a0 = A[i][2j, 2j + 1], a2 = A[i][2j + 8, 2j + 9],
// b0 = B[2j, 2j + 1][i], b1 = B[2j + 8, 2j + 9][i], c0 / c1 = C[i][2j] / C[i][2j + 1].
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// N consecutive bf16 of one lane (8, 4 or 2 bytes), and the bf16 pair {x[t], y[t]} of two
// such vectors (x in the low half): a B fragment register of two cache slots.
template <int N>
using BfVec = std::conditional_t<N == 4, uint2, std::conditional_t<N == 2, uint32_t, uint16_t>>;

template <int N>
__device__ __forceinline__ uint32_t Pair(const BfVec<N>& x, const BfVec<N>& y, int t) {
  if constexpr (N == 1) {
    return uint32_t(x) | (uint32_t(y) << 16);
  } else {
    const uint32_t* xw = reinterpret_cast<const uint32_t*>(&x);
    const uint32_t* yw = reinterpret_cast<const uint32_t*>(&y);
    return __byte_perm(xw[t / 2], yw[t / 2], t % 2 ? 0x7632 : 0x5410);
  }
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// All global loads are issued first (cache rows of this chunk, the new rows, cos / sin),
// so a CTA waits for memory about once a chunk.  Both products run on tensor cores (mma.sync
// m16n8k16, float32 accumulation; the G query rows padded to 16):
// * scores S = Q K^T: warp w takes slots [w SPW, (w + 1) SPW) of the chunk, all D dims.  The
//   dot product does not depend on the order of its terms' dims, so lane 4 i + j loads 16
//   contiguous bytes of key slot i (dims 32 kb + 8 j .. + 8) and uses them as the B
//   fragments of two k-steps, and the query fragments take the same dims (one 16-byte
//   shared load each);
// * P.V: warp w takes dims [w DW, (w + 1) DW) over all kChunk slots (no reduction across
//   warps).  Lane 4 i + j loads DW / 8 contiguous dims of slots 2j, 2j + 1, 2j + 8, 2j + 9
//   of each 16-slot k-step and pairs them per dim with a byte permute.  The float32
//   probabilities enter as bf16 hi + lo (two products, ~2^-17 relative): near-float32
//   accuracy, close to the FFMA kernel's float32.
//
// kWarps warps per CTA: 8 where the grid is small (shorter chains per CTA), 4 where the live
// CTAs outnumber the SMs' slots (PartialWarps in attention_kernels.h says when).
//
// kLoop: the grid has fewer chunk indices than the cache has chunks (PartialGrid), and CTAs
// loop over their chunks, merging them online into one partial a CTA (the combine then
// reads one a CTA instead of one a chunk: at 30000 positions an 8B layer's M = 1 / 8 time
// 99.7 / 346.5 -> 86.3 / 317.4 us, 32B M = 8 475.5 -> 389.5; RESULTS.md AA4). Without it
// (every chunk its own CTA) the kernel is the one-chunk code of before the cap: the same SASS
// for the Qwen3-8B shapes (up to one operand order), a few address instructions placed
// differently elsewhere (cuobjdump -sass). The looping code, used everywhere, had moved
// ptxas's placement of loads around the PDL wait and cost 0.3-0.4 us a layer at M = 1 with
// short caches (RESULTS.md run Z7).
template <int D, int G, int kWarps, bool kLoop>
__device__ __forceinline__ void AttnPartial(const DecodeAttentionArgs& a) {
  constexpr int E = D / 32;                       // elements per lane, warp-per-row prologue
  constexpr int SPW = kChunk / kWarps;            // score slots per warp
  constexpr int NTS = SPW / 8;                    // score n-tiles per warp
  constexpr int KB = D / 32;                      // 32-dim blocks (two k-steps each)
  constexpr int DW = D / kWarps;                  // P.V dims per warp
  constexpr int NT = DW / 8;                      // P.V n-tiles per warp = dims per lane
  constexpr int KS = kChunk / 16;                 // P.V k-steps
  constexpr int RPW = (G + 1 + kWarps - 1) / kWarps;  // new rows (G queries + key) per warp
  static_assert(NTS >= 1 && NT >= 1 && NT <= 4 && G <= 8, "tile shape");
  using VVec = BfVec<NT>;
  // The chunk is the slowest grid index: the live CTAs (chunks at or before pos) come first
  // in launch order, the empty ones after them (they only read the position and leave).
  // The grid has whole rounds of resident CTAs' worth of chunk indices where the cache has
  // more chunks (PartialGrid), so a long cache with short rows does not launch thousands of
  // empty CTAs; CTA z takes chunks z, z + gridDim.z, ... (one where the grid holds every
  // chunk).
  const int h = blockIdx.x, b = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gi = lane / 4, tj = lane % 4;  // fragment row / column group
  RJ_TIMELINE_SCOPE(5);
  rjpdl::PdlLaunchDependents();
  const int T = a.T;
  const int raw_pos = a.positions[b];
  const int pos = ClampPos(raw_pos, T);
  int c = blockIdx.z;
  if (c * kChunk > pos) return;  // nothing visible in this chunk; the combine kernel skips it
  // A negative layer counts from the end (as XLA indexes); out of range is clamped.
  const int layer_raw = *a.layer;
  const int layer = min(max(layer_raw < 0 ? layer_raw + a.L : layer_raw, 0), a.L - 1);

  __shared__ __align__(16) __nv_bfloat16 qs[G][D];  // rotated queries
  __shared__ __align__(16) __nv_bfloat16 kn[D];     // the new key (rotated) and value
  __shared__ __align__(16) __nv_bfloat16 vn[D];
  __shared__ float row[kWarps][D];                  // RoPE staging, one row per warp
  __shared__ __align__(16) float sc[G][kChunk];     // scores, then probabilities
  __shared__ float mx[G], sm[G];

  const size_t slot_stride = size_t(a.Hkv) * D;
  const size_t cache_off = (size_t(layer) * a.B + b) * size_t(T) * slot_stride + size_t(h) * D;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + cache_off;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + cache_off;
  // Slot pos is written by this call: the CTA holding it takes the new rows from shared
  // memory instead of reading the cache (no other CTA reads that slot).  Slots past n load
  // as zeros (their probabilities are zero; the cache there may hold anything).
  const int kslot0 = warp * SPW + gi;  // key slot of n-tile nt: kslot0 + 8 nt
  const int vdim = warp * DW + gi * NT;  // this lane's first P.V dim
  auto vslot = [&](int ks, int q) { return 16 * ks + 2 * tj + (q & 1) + (q & 2) * 4; };

  // ---- loads ----
  uint4 kr[NTS][KB];
  VVec vr[KS][4];
  // The new token's slot, if it lies in the chunk that starts at t0 (else -1).
  auto new_slot_in = [&](int t0) {
    return (raw_pos == pos && raw_pos >= t0 && raw_pos < t0 + kChunk) ? raw_pos : -1;
  };
  // The cache rows of chunk c: its slots t0 = 64 c .. up to pos (the new slot, if in the
  // chunk, is not read: it comes from shared memory).
  auto load_chunk = [&](int c) {
    const int t0 = c * kChunk, n = min(kChunk, pos + 1 - t0), new_slot = new_slot_in(t0);
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const int j = kslot0 + 8 * nt, t = t0 + j;
      const uint4* src = reinterpret_cast<const uint4*>(kc + t * slot_stride + 8 * tj);
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
        kr[nt][kb] = (j < n && t != new_slot) ? __ldg(src + 4 * kb) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = vslot(ks, q), t = t0 + j;
        vr[ks][q] = (j < n && t != new_slot)
                        ? __ldg(reinterpret_cast<const VVec*>(vc + t * slot_stride + vdim))
                        : VVec{};
      }
  };
  load_chunk(c);
  // Inputs of the whole call, not written by any kernel of the chain: read before the wait.
  const bool has_norm = a.q_norm != nullptr;
  float qw[E], kw[E], cs[E], sn[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane * E + e, f = d % (D / 2);
    qw[e] = has_norm ? __bfloat162float(static_cast<const __nv_bfloat16*>(a.q_norm)[d]) : 1.f;
    kw[e] = has_norm ? __bfloat162float(static_cast<const __nv_bfloat16*>(a.k_norm)[d]) : 1.f;
    cs[e] = a.cos[size_t(b) * (D / 2) + f];
    sn[e] = a.sin[size_t(b) * (D / 2) + f];
  }
  // The cache loads are on their way; q / k / v come from the previous kernel (pdl.cuh).
  rjpdl::PdlWait();
  RJ_TIMELINE_WAITED();
  const __nv_bfloat16* qsrc =
      static_cast<const __nv_bfloat16*>(a.q) + size_t(b) * a.qkv_stride + size_t(h) * G * D;
  const __nv_bfloat16* ksrc =
      static_cast<const __nv_bfloat16*>(a.k) + size_t(b) * a.qkv_stride + size_t(h) * D;
  const __nv_bfloat16* vsrc =
      static_cast<const __nv_bfloat16*>(a.v) + size_t(b) * a.qkv_stride + size_t(h) * D;
  float x[RPW][E];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp + i * kWarps;
    const __nv_bfloat16* src = r < G ? qsrc + size_t(r) * D : ksrc;
#pragma unroll
    for (int e = 0; e < E; ++e) x[i][e] = r <= G ? __bfloat162float(src[lane * E + e]) : 0.f;
  }
  for (int d = threadIdx.x; d < D; d += kWarps * 32) vn[d] = vsrc[d];

  // ---- new queries (rows 0..G-1) and key (row G): RMSNorm, then RoPE, each to bf16 ----
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp + i * kWarps;
    if (r > G) break;  // warp-uniform
    if (has_norm) {
      float ss = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) ss += x[i][e] * x[i][e];
      const float inv = rsqrtf(WarpSum(ss) / D + a.eps);
#pragma unroll
      for (int e = 0; e < E; ++e)
        x[i][e] = RoundBf16((r < G ? qw[e] : kw[e]) * RoundBf16(x[i][e] * inv));
    }
#pragma unroll
    for (int e = 0; e < E; ++e) row[warp][lane * E + e] = x[i][e];
    __syncwarp();
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane * E + e;
      const float o = d < D / 2 ? __fmul_rn(x[i][e], cs[e]) - __fmul_rn(row[warp][d + D / 2], sn[e])
                                : __fmul_rn(x[i][e], cs[e]) + __fmul_rn(row[warp][d - D / 2], sn[e]);
      if (r < G) qs[r][d] = __float2bfloat16_rn(o);
      else kn[d] = __float2bfloat16_rn(o);
    }
    __syncwarp();
  }
  __syncthreads();
  RJ_TIMELINE_MARK(0);  // queries and key normalized and rotated
  const int C = NumChunks(T);
  // The scratch's partial at index z: G rows of D values, then each row's max and sum.
  auto PartialAt = [&](int z) { return a.partial + ((size_t(b) * a.Hkv + h) * C + z) * size_t(G) * (D + 2); };
  // The unnormalized P.V fragments o ([t][e], e < 2 row gi's) into partial `part`.
  auto StoreValues = [&](float* part, const auto& o) {
    if (gi < G) {
      float* dst = part + gi * (D + 2) + warp * DW + 2 * tj * NT;
      float v[2 * NT];
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int t = 0; t < NT; ++t) v[e * NT + t] = o[t][e];
#pragma unroll
      for (int u = 0; u < NT; ++u) reinterpret_cast<float2*>(dst)[u] = make_float2(v[2 * u], v[2 * u + 1]);
    }
  };
  // The looping kernel merges its chunks (z, z + Z, ...) online into one partial a CTA, at
  // index z: the combine reads Z partials instead of one a chunk. A CTA with one chunk
  // stores that chunk's values bit for bit (the first merge multiplies by 0 and 1).
  float acc[NT][2] = {}, run_m = -FLT_MAX, run_l = 0.f;
  for (;;) {
    const int t0 = c * kChunk;
    const int n = min(kChunk, pos + 1 - t0);
    const int new_slot = new_slot_in(t0);
    if (new_slot >= 0) {  // one CTA per (row, kv head) writes the new key and value
      __nv_bfloat16* kw_ = static_cast<__nv_bfloat16*>(a.k_cache) + cache_off + new_slot * slot_stride;
      __nv_bfloat16* vw_ = static_cast<__nv_bfloat16*>(a.v_cache) + cache_off + new_slot * slot_stride;
      for (int d = threadIdx.x; d < D; d += kWarps * 32) {
        kw_[d] = kn[d];
        vw_[d] = vn[d];
      }
      // The new slot's registers come from shared memory.
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
        if (t0 + kslot0 + 8 * nt == new_slot)
#pragma unroll
          for (int kb = 0; kb < KB; ++kb)
            kr[nt][kb] = reinterpret_cast<const uint4*>(kn + 32 * kb + 8 * tj)[0];
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (t0 + vslot(ks, q) == new_slot) vr[ks][q] = *reinterpret_cast<const VVec*>(vn + vdim);
    }

    // ---- scores: S[g][slot] for this warp's slots (rows g >= G are zero padding) ----
    // (The query fragments are read from shared memory for each chunk: held across the loop
    // they would add 16 registers to the P.V phase.)
    uint4 qa[KB];
#pragma unroll
    for (int kb = 0; kb < KB; ++kb)
      qa[kb] = gi < G ? reinterpret_cast<const uint4*>(&qs[gi][32 * kb + 8 * tj])[0] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
        Mma(s, qa[kb].x, qa[kb].y, kr[nt][kb].x, kr[nt][kb].y);
        Mma(s, qa[kb].z, qa[kb].w, kr[nt][kb].z, kr[nt][kb].w);
      }
      if (gi < G)
        *reinterpret_cast<float2*>(&sc[gi][warp * SPW + 8 * nt + 2 * tj]) =
            make_float2(s[0] * a.scale, s[1] * a.scale);
    }
    __syncthreads();
    RJ_TIMELINE_MARK(1);  // scores

    // ---- chunk softmax: max and sum per query head; sc becomes exp(s - max), 0 past n ----
    for (int g = warp; g < G; g += kWarps) {
      const float s0 = lane < n ? sc[g][lane] : -FLT_MAX;
      const float s1 = lane + 32 < n ? sc[g][lane + 32] : -FLT_MAX;
      const float m = WarpMax(fmaxf(s0, s1));
      const float p0 = lane < n ? expf(s0 - m) : 0.f;
      const float p1 = lane + 32 < n ? expf(s1 - m) : 0.f;
      sc[g][lane] = p0;
      sc[g][lane + 32] = p1;
      const float l = WarpSum(p0 + p1);
      if (lane == 0) {
        mx[g] = m;
        sm[g] = l;
      }
    }
    __syncthreads();
    RJ_TIMELINE_MARK(2);  // softmax

    // ---- unnormalized P.V for this warp's dims over the chunk (zeros past n) ----
    float o[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t ph0 = 0, ph2 = 0, pl0 = 0, pl2 = 0;
      if (gi < G) {
        const float2 p0 = *reinterpret_cast<const float2*>(&sc[gi][16 * ks + 2 * tj]);
        const float2 p2 = *reinterpret_cast<const float2*>(&sc[gi][16 * ks + 2 * tj + 8]);
        const __nv_bfloat162 h0 = __floats2bfloat162_rn(p0.x, p0.y);
        const __nv_bfloat162 h2 = __floats2bfloat162_rn(p2.x, p2.y);
        ph0 = *reinterpret_cast<const uint32_t*>(&h0);
        ph2 = *reinterpret_cast<const uint32_t*>(&h2);
        pl0 = PackBf16(p0.x - __low2float(h0), p0.y - __high2float(h0));
        pl2 = PackBf16(p2.x - __low2float(h2), p2.y - __high2float(h2));
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint32_t b0 = Pair<NT>(vr[ks][0], vr[ks][1], t);
        const uint32_t b1 = Pair<NT>(vr[ks][2], vr[ks][3], t);
        Mma(o[t], ph0, ph2, b0, b1);
        Mma(o[t], pl0, pl2, b0, b1);
      }
    }
    RJ_TIMELINE_MARK(3);  // P.V (thread 0's warp)
    // Lane 4 i + j holds row i's dims w DW + 2 j NT + (e NT + t) in o[t][e], e = 0, 1.
    if constexpr (!kLoop) {
      float* part = PartialAt(c);  // chunk c's values, then each row's max and sum
      StoreValues(part, o);
      if (threadIdx.x < G) {
        part[threadIdx.x * (D + 2) + D] = mx[threadIdx.x];
        part[threadIdx.x * (D + 2) + D + 1] = sm[threadIdx.x];
      }
      break;
    } else if (gi < G) {  // merged into this CTA's running partial (copied at the first pass)
      const float mc = mx[gi], lc = sm[gi], mn = fmaxf(run_m, mc);
      const float fr = expf(run_m - mn), fc = expf(mc - mn);  // 0 and 1 at the first pass
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 2; ++e) acc[t][e] = acc[t][e] * fr + o[t][e] * fc;
      run_l = run_l * fr + lc * fc;
      run_m = mn;
    }
    c += gridDim.z;
    if (c * kChunk > pos) break;
    // The next chunk: its cache rows (after the wait now), then sc, mx and sm are rewritten
    // once every warp is past this chunk's reads of them.
    load_chunk(c);
    __syncthreads();
  }
  if constexpr (kLoop) {
    float* part = PartialAt(blockIdx.z);
    StoreValues(part, acc);
    // Every warp holds the same running max and sum of row gi (the same merges of the same
    // mx / sm): warp 0's lanes 4 gi store them from registers, with no barrier.
    if (warp == 0 && tj == 0 && gi < G) {
      part[gi * (D + 2) + D] = run_m;
      part[gi * (D + 2) + D + 1] = run_l;
    }
  }
}

// The one-chunk kernel keeps launch bounds without a CTA count: ptxas's choice there (80
// registers at 8 warps, 128 at 4, D = 128) is the measured code, and a minimum of one CTA an
// SM would let it take up to 156. The looping kernel names its CTAs an SM (3 at 8 warps: at
// most 80 registers; 4 at 4 warps: 128), the occupancy its grid's rounds are counted in; left
// to itself ptxas took 104 registers at D = 128, G = 8 with 8 warps (two CTAs an SM).
template <int D, int G, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) AttnPartialKernel(DecodeAttentionArgs a) {
  AttnPartial<D, G, kWarps, false>(a);
}
template <int D, int G, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, kWarps == 8 ? 3 : 4) AttnPartialLoopKernel(DecodeAttentionArgs a) {
  AttnPartial<D, G, kWarps, true>(a);
}

// One CTA of kGroups x D threads per (query head, row): out = sum_c e^(m_c - M) acc_c /
// sum_c e^(m_c - M) l_c over the row's partials c (one a chunk, or one a looping partial
// CTA: `parts` of them, the partial grid's chunk indices).  Thread group j (D threads, one a
// dim) merges batches j, j + kGroups, ... of kCombineBatch partials (CombineBatches), so many
// partials cost ceil(batches / kGroups) serial L2 round trips instead of one a batch; then
// group 0 merges the groups' results in group order through shared memory.  With one batch
// (up to 16 partials, position 1023) the groups past the first hold nothing and are
// skipped: the arithmetic is the single group's, bit for bit.  The launch takes kGroups = 1
// while there are at most 16 partials (T <= 1024, or a looping partial grid of at most 16
// chunk indices), so short caches pay no barrier.  (Layer chain on an H200, M = 1, RESULTS.md
// run X3: -2.2 / -2.7 us an 8B / 32B layer at position 4000, -5.0 / -5.1 at 8000, unchanged
// at 640.)
//
// G (query heads a kv head) is a template argument, as in the partial kernel, so the chunk
// stride G (D + 2) is a constant and h, g take no integer division. With G a runtime value
// ptxas placed two divisions and the batch's 64-bit address arithmetic after
// griddepcontrol.wait (it sinks index math past the wait; an empty asm pinning the values
// before it does not stop that): ~375 instructions between the wait and the first load with
// one or two thread groups (137 with four or eight), then 80-108 (cuobjdump -sass; 50-73 with
// the L2 prefetch below), on the critical path of CTAs that are alone on their SMs'
// schedulers. Layer chain on an H200 (RESULTS.md run Y2, position 640): -0.2 / -1.2 us an 8B
// layer at M = 1 / 8, -1.3 / -2.7 a 32B layer.
template <int D, int G, int kGroups>
__global__ void __launch_bounds__(D * kGroups) AttnCombineKernel(DecodeAttentionArgs a, int parts) {
  RJ_TIMELINE_SCOPE(6);
  rjpdl::PdlLaunchDependents();
  const int qh = blockIdx.x, b = blockIdx.y, d = threadIdx.x % D, grp = threadIdx.x / D;
  const int h = qh / G, g = qh % G;
  const int C = NumChunks(a.T);
  // The partials: one a chunk up to the row's position, or one a CTA of the looping partial
  // kernel (its grid's `parts` chunk indices, fewer than the chunks). An input of the call.
  const int nc = min(ClampPos(a.positions[b], a.T) / kChunk + 1, parts);
  constexpr int kStride = G * (D + 2);
  const float* base = a.partial + (size_t(b) * a.Hkv + h) * C * kStride + g * (D + 2);
  // An L2 prefetch of this thread's first value (its group's first partial, clamped into the
  // buffer) consumes the batch's address before the wait, so ptxas computes it here, while
  // the partial kernel still runs, instead of sinking it past the wait: 80-108 -> 50-73
  // instructions between the wait and the first load (cuobjdump -sass). Safe before the
  // wait: a prefetch returns nothing, and the partial kernel's stores land in L2, where they
  // overwrite any copy fetched early. (RESULTS.md run Z1: -0.13 / -0.09 us an 8B layer at
  // M = 1 / 8, -0.3 a 32B layer at M = 8.)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(base + min(grp * kCombineBatch, C - 1) * kStride + d));
  rjpdl::PdlWait();  // the partials come from the previous kernel
  RJ_TIMELINE_WAITED();
  Merge r;
  CombineBatches<D, kStride>(base, nc, d, grp * kCombineBatch, kGroups * kCombineBatch, r);
  RJ_TIMELINE_MARK(0);  // thread 0's batches merged
  if constexpr (kGroups > 1) {
    __shared__ float sm[kGroups - 1][D], sl[kGroups - 1][D], so[kGroups - 1][D];
    if (grp > 0) {
      sm[grp - 1][d] = r.m;
      sl[grp - 1][d] = r.l;
      so[grp - 1][d] = r.o;
    }
    __syncthreads();
    if (grp > 0) return;
    // Group 0 holds partial 0 (its sum is >= 1), so RaiseMax always rescales where the max
    // rises.
    float mt = r.m;
#pragma unroll
    for (int j = 0; j < kGroups - 1; ++j) mt = fmaxf(mt, sm[j][d]);
    r.RaiseMax(mt);
#pragma unroll
    for (int j = 0; j < kGroups - 1; ++j)
      if (sl[j][d] != 0.f) r.Add(sm[j][d], sl[j][d], so[j][d]);  // a group with partials
  }
  static_cast<__nv_bfloat16*>(a.out)[(size_t(b) * a.Hq + qh) * D + d] = __float2bfloat16_rn(r.o / r.l);
}

// The partial kernel's grid (PartialChunkIndices in attention_kernels.h chooses its z).
inline dim3 PartialGrid(const DecodeAttentionArgs& a, int slots) {
  return dim3(a.Hkv, a.B, PartialChunkIndices(a.T, a.Hkv * a.B, slots, a.chunk_grid));
}

// Launches the partial kernel; *parts receives its grid's chunk indices (the partials a row
// and kv head holds for the combine: one a chunk, or one a looping CTA).
template <int D, int G, int kWarps>
cudaError_t LaunchPartial(const DecodeAttentionArgs& a, cudaStream_t stream, int* parts) {
  // The looping kernel's slots size the grid (its registers can differ from the other's).
  const auto loop = AttnPartialLoopKernel<D, G, kWarps>;
  const dim3 grid = PartialGrid(a, rjpdl::PersistentSlots(loop, kWarps * 32));
  *parts = int(grid.z);
  if (int(grid.z) < NumChunks(a.T)) return rjpdl::Launch(loop, grid, dim3(kWarps * 32), 0, stream, a.pdl, a);
  return rjpdl::Launch(AttnPartialKernel<D, G, kWarps>, grid, dim3(kWarps * 32), 0, stream,
                       a.pdl, a);
}

template <int D, int G>
cudaError_t Launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const bool eight = PartialWarps(a.B, a.T, a.partial_warps) == 8;
  int parts = 0;
  const cudaError_t err =
      eight ? LaunchPartial<D, G, 8>(a, stream, &parts) : LaunchPartial<D, G, 4>(a, stream, &parts);
  if (err != cudaSuccess) return err;
  // Thread groups of the combine: one while there is at most one batch of partials, then
  // up to 512 threads (4 groups at D = 128, 8 at D = 64; 1024 threads would cap the kernel at
  // 64 registers, which spills its batch of loads): ceil(batches / groups) round trips at
  // B = 1 on a 132-SM card: one for a looping 8-warp grid's 49 partials (T <= 8192), two for
  // a 4-warp grid's 66.
  const int batches = (parts + kCombineBatch - 1) / kCombineBatch;
  const bool pdl = a.pdl || a.pdl_combine;
  const dim3 cgrid(a.Hq, a.B);
  if (batches <= 1) return rjpdl::Launch(AttnCombineKernel<D, G, 1>, cgrid, dim3(D), 0, stream, pdl, a, parts);
  if (batches <= 2) return rjpdl::Launch(AttnCombineKernel<D, G, 2>, cgrid, dim3(2 * D), 0, stream, pdl, a, parts);
  if constexpr (D == 64) {
    if (batches > 4) return rjpdl::Launch(AttnCombineKernel<D, G, 8>, cgrid, dim3(8 * D), 0, stream, pdl, a, parts);
  }
  return rjpdl::Launch(AttnCombineKernel<D, G, 4>, cgrid, dim3(4 * D), 0, stream, pdl, a, parts);
}

}  // namespace

const char* DecodeAttentionUnsupportedReason(const DecodeAttentionArgs& a) {
  if (a.D != 64 && a.D != 128) return "head_dim must be 64 or 128";
  if (a.B < 1 || a.Hq < 1 || a.Hkv < 1 || a.L < 1 || a.T < 1) return "empty shape";
  if (a.Hq % a.Hkv != 0) return "query heads must be a multiple of kv heads";
  if (a.qkv_stride < (a.Hq + 2 * a.Hkv) * a.D) return "q/k/v row stride too small";
  if (a.Hq / a.Hkv > kMaxGroup) return "more than 8 query heads per kv head";
  if (a.B > 65535) return "batch above 65535";
  if (a.T > 65535 * kChunk) return "cache longer than 65535 * 64 slots";
  if ((a.q_norm == nullptr) != (a.k_norm == nullptr)) return "q_norm and k_norm go together";
  if (a.partial_warps != 0 && a.partial_warps != 4 && a.partial_warps != 8)
    return "partial_warps must be 0 (the library's choice), 4 or 8";
  if (a.chunk_grid < 0) return "chunk_grid must be 0 (the library's choice) or positive";
  if (size_t(a.L) * a.B * a.T * a.Hkv * a.D >= (size_t(1) << 40)) return "cache too large";
  return nullptr;
}

cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (DecodeAttentionUnsupportedReason(a) != nullptr) return cudaErrorInvalidValue;
  switch ((a.D == 128 ? 100 : 0) + a.Hq / a.Hkv) {
#define RJATTN_CASE(D, G) \
  case (D == 128 ? 100 : 0) + G: return Launch<D, G>(a, stream);
    RJATTN_CASE(64, 1) RJATTN_CASE(64, 2) RJATTN_CASE(64, 3) RJATTN_CASE(64, 4)
    RJATTN_CASE(64, 5) RJATTN_CASE(64, 6) RJATTN_CASE(64, 7) RJATTN_CASE(64, 8)
    RJATTN_CASE(128, 1) RJATTN_CASE(128, 2) RJATTN_CASE(128, 3) RJATTN_CASE(128, 4)
    RJATTN_CASE(128, 5) RJATTN_CASE(128, 6) RJATTN_CASE(128, 7) RJATTN_CASE(128, 8)
#undef RJATTN_CASE
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rjattn
