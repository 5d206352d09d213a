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

// E consecutive bf16 of one lane: 8 bytes (D = 128) or 4 bytes (D = 64).
template <int E>
using LaneVec = std::conditional_t<E == 8, uint4, std::conditional_t<E == 4, uint2, uint32_t>>;

template <int E>
__device__ __forceinline__ void Unpack(const LaneVec<E>& v, float (&f)[E]) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
  for (int i = 0; i < E / 2; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ int ClampPos(int p, int T) { return min(max(p, 0), T - 1); }

// Output element d of one query head from its nc chunk partials (max, sum, unnormalized
// P.V at base + c * stride): sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, in chunk
// order.  Reads through L2 (the partials were written by the previous grid), eight chunks' loads at a time (one L2 round trip per chunk made the
// combine kernel take ~4.7 us at 11 chunks on an H100).  The same arithmetic, in the same
// order, as one chunk at a time.
template <int D>
__device__ __forceinline__ void CombineOne(const float* base, size_t stride, int nc, int d,
                                           __nv_bfloat16* out) {
  constexpr int kBatch = 8;
  float m = -FLT_MAX;
  for (int c0 = 0; c0 < nc; c0 += kBatch) {
    float mv[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      mv[j] = c0 + j < nc ? __ldcg(base + (c0 + j) * stride + D) : -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) m = fmaxf(m, mv[j]);
  }
  float l = 0.f, o = 0.f;
  for (int c0 = 0; c0 < nc; c0 += kBatch) {
    float mv[kBatch], lv[kBatch], av[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const float* pc = base + (c0 + j) * stride;
      const bool in = c0 + j < nc;
      mv[j] = in ? __ldcg(pc + D) : 0.f;
      lv[j] = in ? __ldcg(pc + D + 1) : 0.f;
      av[j] = in ? __ldcg(pc + d) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (c0 + j < nc) {
        const float w = expf(mv[j] - m);
        l = fmaf(w, lv[j], l);
        o = fmaf(w, av[j], o);
      }
    }
  }
  *out = __float2bfloat16_rn(o / l);
}

// All global loads are issued first (cache rows of this chunk, the new rows, cos / sin),
// so a CTA waits for memory about once. Scores: 8 lanes per slot (4 slots per warp
// instruction, a 3-step shuffle sum); P.V: one warp per slot, lanes over D.
//
// kWarps warps per CTA: 8 where the grid is small (B <= 2: fewer slots per warp shorten each
// CTA's chain of dependent steps, 1 CTA per SM either way), 4 above (at B = 8 the live
// CTAs outnumber the SMs' slots and 4-warp CTAs fit twice as many per SM).
template <int D, int G, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) AttnPartialKernel(DecodeAttentionArgs a) {
  constexpr int E = D / 32;                       // elements per lane, warp-per-slot layout
  constexpr int EK = D / 8;                       // elements per lane, 8-lanes-per-slot layout
  constexpr int NK = EK / 8;                      // 16-byte loads per lane per key row
  constexpr int SPW = kChunk / kWarps;            // slots per warp (contiguous)
  constexpr int KG = SPW / 4;                     // key slot groups per warp
  constexpr int RPW = (G + 1 + kWarps - 1) / kWarps;  // new rows (G queries + key) per warp
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  RJ_TIMELINE_SCOPE(5);
  rjpdl::PdlLaunchDependents();
  const int T = a.T;
  const int raw_pos = a.positions[b];
  const int pos = ClampPos(raw_pos, T);
  const int t0 = c * kChunk;
  if (t0 > pos) return;  // nothing visible in this chunk; the combine kernel skips it
  const int n = min(kChunk, pos + 1 - t0);
  // A negative layer counts from the end (as XLA indexes); out of range is clamped.
  const int layer_raw = *a.layer;
  const int layer = min(max(layer_raw < 0 ? layer_raw + a.L : layer_raw, 0), a.L - 1);
  // The new token's slot, if it lies in this chunk (else -1).
  const int new_slot = (raw_pos == pos && raw_pos >= t0 && raw_pos < t0 + kChunk) ? raw_pos : -1;

  __shared__ __align__(16) float qs[G][D];         // rotated queries (bf16 values)
  __shared__ __align__(16) __nv_bfloat16 kn[D];    // the new key (rotated) and value
  __shared__ __align__(16) __nv_bfloat16 vn[D];
  __shared__ float row[kWarps][D];                 // RoPE staging, one row per warp
  __shared__ float sc[G][kChunk];                  // scores, then probabilities
  __shared__ float mx[G], sm[G];
  __shared__ float red[kWarps][G][D];

  const size_t slot_stride = size_t(a.Hkv) * D;
  const size_t cache_off = (size_t(layer) * a.B + b) * size_t(T) * slot_stride + size_t(h) * D;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + cache_off;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + cache_off;
  // Slot pos is written by this call: the CTA holding it takes the new rows from shared
  // memory instead of reading the cache (no other CTA reads that slot).
  const int slot0 = warp * SPW;  // this warp's first slot in the chunk

  // ---- loads ----
  uint4 kr[KG][NK];
#pragma unroll
  for (int kg = 0; kg < KG; ++kg) {
    const int j = slot0 + kg * 4 + lane / 8, t = t0 + j;
    const uint4* src = reinterpret_cast<const uint4*>(kc + t * slot_stride + (lane % 8) * EK);
#pragma unroll
    for (int u = 0; u < NK; ++u)
      kr[kg][u] = (j < n && t != new_slot) ? __ldg(src + u) : make_uint4(0, 0, 0, 0);
  }
  LaneVec<E> vr[SPW];
#pragma unroll
  for (int i = 0; i < SPW; ++i) {
    const int j = slot0 + i, t = t0 + j;
    vr[i] = (j < n && t != new_slot)
                ? __ldg(reinterpret_cast<const LaneVec<E>*>(vc + t * slot_stride) + lane)
                : LaneVec<E>{};
  }
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
      if (r < G) qs[r][d] = RoundBf16(o);
      else kn[d] = __float2bfloat16_rn(o);
    }
    __syncwarp();
  }
  __syncthreads();
  if (new_slot >= 0) {  // one CTA per (row, kv head) writes the new key and value
    __nv_bfloat16* kw_ = static_cast<__nv_bfloat16*>(a.k_cache) + cache_off + new_slot * slot_stride;
    __nv_bfloat16* vw_ = static_cast<__nv_bfloat16*>(a.v_cache) + cache_off + new_slot * slot_stride;
    for (int d = threadIdx.x; d < D; d += kWarps * 32) {
      kw_[d] = kn[d];
      vw_[d] = vn[d];
    }
    // The new slot's registers come from shared memory.
#pragma unroll
    for (int kg = 0; kg < KG; ++kg)
      if (t0 + slot0 + kg * 4 + lane / 8 == new_slot)
#pragma unroll
        for (int u = 0; u < NK; ++u) kr[kg][u] = reinterpret_cast<const uint4*>(kn + (lane % 8) * EK)[u];
#pragma unroll
    for (int i = 0; i < SPW; ++i)
      if (t0 + slot0 + i == new_slot) vr[i] = reinterpret_cast<const LaneVec<E>*>(vn)[lane];
  }

  // ---- scores: 8 lanes per slot, 4 slots per instruction ----
#pragma unroll
  for (int kg = 0; kg < KG; ++kg) {
    const int j = slot0 + kg * 4 + lane / 8;
    float kf[EK];
#pragma unroll
    for (int u = 0; u < NK; ++u) Unpack<8>(kr[kg][u], *reinterpret_cast<float(*)[8]>(kf + 8 * u));
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float4* qv = reinterpret_cast<const float4*>(&qs[g][(lane % 8) * EK]);
      float p = 0.f;
#pragma unroll
      for (int u = 0; u < EK / 4; ++u) {
        const float4 q4 = qv[u];
        p = fmaf(q4.x, kf[4 * u], p);
        p = fmaf(q4.y, kf[4 * u + 1], p);
        p = fmaf(q4.z, kf[4 * u + 2], p);
        p = fmaf(q4.w, kf[4 * u + 3], p);
      }
      p += __shfl_xor_sync(0xffffffffu, p, 1);
      p += __shfl_xor_sync(0xffffffffu, p, 2);
      p += __shfl_xor_sync(0xffffffffu, p, 4);
      if (lane % 8 == 0 && j < n) sc[g][j] = p * a.scale;
    }
  }
  __syncthreads();

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

  // ---- unnormalized P.V of this warp's slots (zeros past n), then the warps' sums ----
  float acc[G][E];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
#pragma unroll
  for (int i = 0; i < SPW; ++i) {
    float vf[E];
    Unpack<E>(vr[i], vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = sc[g][slot0 + i];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < E; ++e) red[warp][g][lane * E + e] = acc[g][e];
  __syncthreads();
  const int C = NumChunks(T);
  float* part = a.partial + ((size_t(b) * a.Hkv + h) * C + c) * size_t(G) * (D + 2);
  for (int idx = threadIdx.x; idx < G * D; idx += kWarps * 32) {
    const int g = idx / D, d = idx % D;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][g][d];
    part[g * (D + 2) + d] = s;
  }
  if (threadIdx.x < G) {
    part[threadIdx.x * (D + 2) + D] = mx[threadIdx.x];
    part[threadIdx.x * (D + 2) + D + 1] = sm[threadIdx.x];
  }
}

// One CTA of D threads per (query head, row): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
template <int D>
__global__ void __launch_bounds__(D) AttnCombineKernel(DecodeAttentionArgs a) {
  RJ_TIMELINE_SCOPE(6);
  rjpdl::PdlLaunchDependents();
  rjpdl::PdlWait();  // the partials come from the previous kernel
  RJ_TIMELINE_WAITED();
  const int qh = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int G = a.Hq / a.Hkv, h = qh / G, g = qh % G;
  const int C = NumChunks(a.T);
  const int nc = ClampPos(a.positions[b], a.T) / kChunk + 1;
  const size_t stride = size_t(G) * (D + 2);
  const float* base = a.partial + (size_t(b) * a.Hkv + h) * C * stride + size_t(g) * (D + 2);
  CombineOne<D>(base, stride, nc, d, static_cast<__nv_bfloat16*>(a.out) + (size_t(b) * a.Hq + qh) * D + d);
}

template <int D, int G>
cudaError_t Launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(NumChunks(a.T), a.Hkv, a.B);
  const cudaError_t err =
      a.B <= 2 ? rjpdl::Launch(AttnPartialKernel<D, G, 8>, grid, dim3(8 * 32), 0, stream, a.pdl, a)
               : rjpdl::Launch(AttnPartialKernel<D, G, 4>, grid, dim3(4 * 32), 0, stream, a.pdl, a);
  if (err != cudaSuccess) return err;
  return rjpdl::Launch(AttnCombineKernel<D>, dim3(a.Hq, a.B), dim3(D), 0, stream,
                       a.pdl || a.pdl_combine, a);
}

}  // namespace

const char* DecodeAttentionUnsupportedReason(const DecodeAttentionArgs& a) {
  if (a.D != 64 && a.D != 128) return "head_dim must be 64 or 128";
  if (a.B < 1 || a.Hq < 1 || a.Hkv < 1 || a.L < 1 || a.T < 1) return "empty shape";
  if (a.Hq % a.Hkv != 0) return "query heads must be a multiple of kv heads";
  if (a.qkv_stride < (a.Hq + 2 * a.Hkv) * a.D) return "q/k/v row stride too small";
  if (a.Hq / a.Hkv > kMaxGroup) return "more than 8 query heads per kv head";
  if (a.B > 65535 || a.Hkv > 65535) return "batch or kv heads above 65535";
  if ((a.q_norm == nullptr) != (a.k_norm == nullptr)) return "q_norm and k_norm go together";
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
