// Small-M NVFP4 GEMV kernels (device code; included by nvfp4_kernels.cu and the checker).
//
// Design (see benchmarks/KERNEL_NOTES.md for the budget and the measurements):
//  * One CTA = 16 weight rows x all of K; its W warps split K round-robin in
//    sub-steps of 4 lanes x VEC bytes per row, and reduce through shared memory.
//  * The weight tile is the A operand of mma.sync m16n8k16 (bf16 in, f32 acc);
//    the activations (up to 8 rows per n-tile, 2 n-tiles for M <= 16) are B.
//    Lane (g = lane/4, t = lane%4) loads VEC contiguous code bytes of rows g and
//    g+8; since a dot product may permute K freely as long as A and B agree, each
//    32-bit word of codes (elements e0..e7) feeds two k16 "tiles" whose slot
//    pairs are (e0,e4),(e1,e5) and (e2,e6),(e3,e7); B is permuted the same way
//    with two PRMTs per pair of registers.
//  * E2M1 decode without tables: ((q & 0x000F000F) * 0x1040) & 0x81C081C0 puts
//    sign at bit 15/31 and the exponent/mantissa bits at 8:6 / 24:22, i.e. the
//    bf16 value e2m1 * 2^-126 (subnormal for +-0.5).  One bf16x2 FMA by the block
//    scale s * 2^118 (exact: at most 6 significant bits) gives e2m1 * s * 2^-8;
//    the 2^8 and the global scales are applied to the f32 sum.
//  * Weights are streamed with ld.global.nc.L1::no_allocate and an L2
//    evict_first policy, U sub-steps in flight per warp (a rolling register
//    pipeline: after consuming buffer u, refill it with sub-step i+U).
#ifndef RESET_JAX_FFI_NVFP4_KERNELS_CUH_
#define RESET_JAX_FFI_NVFP4_KERNELS_CUH_

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "nvfp4_kernels.h"
#include "pdl.cuh"

namespace nvfp4 {

struct KParams {
  const __nv_bfloat16* x;  // [M, K]
  const uint8_t* codes;    // [N, K/2]
  const uint8_t* scales;   // [N, K/16]
  const float* wscale;     // []
  const float* xscale;     // [] or [M] or nullptr
  int xscale_stride;       // 0: scalar, 1: per row
  __nv_bfloat16* y;        // [M, N]
  int M, N, K;
  // NORM kernels only: x is the residual stream, the GEMV reads
  // rmsnorm(x + h) * nw, and r_out (written by CTA 0) receives x + h.
  const __nv_bfloat16* h = nullptr;   // [M, K]
  const __nv_bfloat16* nw = nullptr;  // [K]
  float eps = 0.f;
  __nv_bfloat16* r_out = nullptr;     // [M, K]
  bool pdl = false;  // launched as a programmatic dependent (pdl.cuh)
  // Wide kernel only: SwiGLU in the epilogue (GemvArgs::swiglu): y is [M, N / 2].
  bool swiglu = false;
  // The codes are in the MMA word order (GemvArgs::codes_order == 1, DecodeMmaOrderx8).
  bool mma_order = false;
};

// Kernel parameters from the host API's arguments.
inline KParams ToKParams(const GemvArgs& a) {
  KParams kp;
  kp.x = static_cast<const __nv_bfloat16*>(a.x);
  kp.codes = a.codes;
  kp.scales = a.scales;
  kp.wscale = a.wscale;
  kp.xscale = a.xscale;
  kp.xscale_stride = a.xscale_per_row ? 1 : 0;
  kp.y = static_cast<__nv_bfloat16*>(a.y);
  kp.M = static_cast<int>(a.M);
  kp.N = static_cast<int>(a.N);
  kp.K = static_cast<int>(a.K);
  kp.pdl = a.pdl;
  kp.swiglu = a.swiglu;
  kp.mma_order = a.codes_order == 1;
  return kp;
}

// jax.nn.silu(g) * u in float32 (the SwiGLU of the decoder's MLP; g and u hold bf16 values).
__device__ __forceinline__ float SiluMul(float g, float u) { return g / (1.f + expf(-g)) * u; }

__device__ __forceinline__ float RoundToBf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// The factor an output row m's f32 sum is scaled by: the weight's global scale (times
// whatever constant the caller folded into `wscale`) and, in W4A4, row m's activation scale.
__device__ __forceinline__ float OutputScale(const KParams& p, float wscale, int m) {
  return p.xscale != nullptr ? wscale * __ldg(p.xscale + m * p.xscale_stride) : wscale;
}

// ---------------------------------------------------------------- loads ----

__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}

// Predicated loads: registers are zero where `pred` is false.  Weights stream
// past L1 (no_allocate) with an L2 evict_first policy.
template <int VEC>
struct CodeLoad;

template <>
struct CodeLoad<16> {
  static __device__ __forceinline__ void Load(uint32_t (&r)[4], const uint8_t* p, bool pred,
                                              uint64_t pol) {
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @q ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %6;\n}"
        : "=&r"(r[0]), "=&r"(r[1]), "=&r"(r[2]), "=&r"(r[3])
        : "l"(p), "r"(static_cast<int>(pred)), "l"(pol));
  }
};

template <>
struct CodeLoad<8> {
  static __device__ __forceinline__ void Load(uint32_t (&r)[2], const uint8_t* p, bool pred,
                                              uint64_t pol) {
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
        " @q ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0,%1}, [%2], %4;\n}"
        : "=&r"(r[0]), "=&r"(r[1])
        : "l"(p), "r"(static_cast<int>(pred)), "l"(pol));
  }
};

// Block scales: BPL (1 or 2) consecutive bytes, through L1 (the four lanes of a
// row group and the neighbouring sub-steps share a sector).
template <int BPL>
__device__ __forceinline__ uint32_t LoadScales(const uint8_t* p, bool pred, uint64_t pol) {
  uint32_t v;
  if constexpr (BPL == 2) {
    asm volatile(
        "{\n .reg .pred q;\n .reg .b16 h;\n setp.ne.b32 q, %2, 0;\n mov.b16 h, 0;\n"
        " @q ld.global.nc.L2::cache_hint.b16 h, [%1], %3;\n cvt.u32.u16 %0, h;\n}"
        : "=r"(v)
        : "l"(p), "r"(static_cast<int>(pred)), "l"(pol));
  } else {
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n"
        " @q ld.global.nc.L2::cache_hint.u8 %0, [%1], %3;\n}"
        : "=&r"(v)
        : "l"(p), "r"(static_cast<int>(pred)), "l"(pol));
  }
  return v;
}

// Activations (tiny, read by every CTA; cached in L1 and L2).  A plain (coherent) load,
// not ld.global.nc: under PDL the previous kernel writes them while this grid runs.
__device__ __forceinline__ uint4 LoadAct(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// ------------------------------------------------------------ arithmetic ----

// Eight E2M1 codes (element e in bits 4e..4e+3) -> four bf16x2 registers holding
// e2m1 * 2^-126: o[0] = (e0, e4), o[1] = (e1, e5), o[2] = (e2, e6), o[3] = (e3, e7)
// (first element in the low half).  n * 0x1040 = (n << 12) + (n << 6) puts the
// sign at bit 15 and exponent/mantissa at bits 8:6 (the two copies do not
// overlap, so no carries); the mask drops the other bits of each copy.
__device__ __forceinline__ void DecodeE2M1x8(uint32_t q, uint32_t (&o)[4]) {
  const uint32_t q8 = q >> 8;
  o[0] = ((q & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
  o[1] = ((q & 0x00F000F0u) * 0x0104u) & 0x81C081C0u;
  o[2] = ((q8 & 0x000F000Fu) * 0x1040u) & 0x81C081C0u;
  o[3] = ((q8 & 0x00F000F0u) * 0x0104u) & 0x81C081C0u;
}

// The same four registers from a code word in the MMA word order (GemvArgs::codes_order
// == 1): a fixed permutation of the 32 bits of each natural word, made once when the
// weights are prepared (reset_jax.nvfp4.format.to_code_order; MmaOrderWord in
// tests/host_util.h), that puts each pair's sign and magnitude bits where a mask (o[0]),
// one rotate and a mask (o[1], o[2]) or a mask, a multiply and a mask (o[3]) lands them:
// 8 instructions for 8 codes instead of 13. (Masks and rotates alone, 7 instructions, would
// need the mask's bit pattern to tile the word by rotations, which it does not:
// ffi/tests/mma_order_search.py.) The multiply by 2^2 + 2^7 + 2^12 makes three copies of
// the 8 masked bits; each bit has exactly one copy on the mask and no two copies share a
// bit position, so there are no carries. (Natural bit 4e + b of element e -> bit
// kMmaOrderBit[e][b], the table in the tests.)
__device__ __forceinline__ void DecodeMmaOrderx8(uint32_t q, uint32_t (&o)[4]) {
  o[0] = q & 0x81C081C0u;
  o[1] = __funnelshift_l(q, q, 10) & 0x81C081C0u;
  o[2] = __funnelshift_l(q, q, 13) & 0x81C081C0u;
  o[3] = ((q & 0x001B001Bu) * 4228u) & 0x81C081C0u;
}

// DecodeE2M1x8 (MMA_ORDER false) or DecodeMmaOrderx8 (true).
template <bool MMA_ORDER>
__device__ __forceinline__ void DecodeCodes(uint32_t q, uint32_t (&o)[4]) {
  if constexpr (MMA_ORDER) {
    DecodeMmaOrderx8(q, o);
  } else {
    DecodeE2M1x8(q, o);
  }
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ float Bf16Lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }

// ---- the decoder's residual add and RMSNorm, 8 bf16 values (16 bytes) at a time.

// r = bf16(a + b), each value rounded once after a float32 add.
__device__ __forceinline__ uint4 ResidualUnit(uint4 a, uint4 b) {
  return make_uint4(PackBf16x2(Bf16Lo(a.x) + Bf16Lo(b.x), Bf16Hi(a.x) + Bf16Hi(b.x)),
                    PackBf16x2(Bf16Lo(a.y) + Bf16Lo(b.y), Bf16Hi(a.y) + Bf16Hi(b.y)),
                    PackBf16x2(Bf16Lo(a.z) + Bf16Lo(b.z), Bf16Hi(a.z) + Bf16Hi(b.z)),
                    PackBf16x2(Bf16Lo(a.w) + Bf16Lo(b.w), Bf16Hi(a.w) + Bf16Hi(b.w)));
}

// ss + the squares of the 8 values of r, in float32.
__device__ __forceinline__ float SumSquaresUnit(uint4 r, float ss) {
  const uint32_t v[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    ss = fmaf(Bf16Lo(v[j]), Bf16Lo(v[j]), ss);
    ss = fmaf(Bf16Hi(v[j]), Bf16Hi(v[j]), ss);
  }
  return ss;
}

// bf16(w * bf16(r * inv)): the normalized value rounded to bf16, then scaled.
__device__ __forceinline__ uint32_t NormPair(uint32_t r, float inv, uint32_t w) {
  const uint32_t n = PackBf16x2(Bf16Lo(r) * inv, Bf16Hi(r) * inv);
  return PackBf16x2(Bf16Lo(w) * Bf16Lo(n), Bf16Hi(w) * Bf16Hi(n));
}
__device__ __forceinline__ uint4 NormUnit(uint4 r, float inv, uint4 w) {
  return make_uint4(NormPair(r.x, inv, w.x), NormPair(r.y, inv, w.y), NormPair(r.z, inv, w.z),
                    NormPair(r.w, inv, w.w));
}

// Two E4M3 bytes (low byte first) -> bf16x2 pairs (s0*2^118, s0*2^118) and
// (s1*2^118, s1*2^118).  Exact: e4m3 has 4 significant bits, 2^-9 <= s <= 448,
// so s*2^118 <= 2^127 is a normal bf16; a zero scale gives 0.
// Two E4M3 bytes (low byte first) -> two floats, exactly (NaN and sign kept).
__device__ __forceinline__ float2 E4m3x2ToFloat2(uint32_t two_e4m3) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_e4m3 & 0xFFFFu), __NV_E4M3);
  __half_raw lo, hi;
  lo.x = h.x;
  hi.x = h.y;
  return make_float2(__half2float(__half(lo)), __half2float(__half(hi)));
}

__device__ __forceinline__ void ScalePairs(uint32_t two_e4m3, uint32_t& p0, uint32_t& p1) {
  const float2 s = E4m3x2ToFloat2(two_e4m3);
  const float f0 = s.x * 0x1p118f;
  const float f1 = s.y * 0x1p118f;
  p0 = PackBf16x2(f0, f0);
  p1 = PackBf16x2(f1, f1);
}

// a * b in bf16x2 (an fma with -0, one HFMA2/HMUL2 on sm_80 and sm_90).  bf16
// fma keeps subnormal inputs (the +-0.5 codes above are subnormal).
__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

__device__ __forceinline__ uint32_t Prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------- the GEMV ----

template <int VEC>
struct StepBuf {
  static constexpr int kWords = VEC / 4;
  uint32_t r0[kWords];  // codes, row g
  uint32_t r1[kWords];  // codes, row g + 8
  uint32_t s0, s1;      // block scale bytes, rows g and g + 8
};

// VEC: bytes of codes per lane per row per sub-step (16 needs K % 32 == 0).
// NT: n-tiles of 8 activation rows (M <= 8 * NT).  U: sub-steps in flight per
// warp.  W: warps per CTA (they split K).
//
// Persistent CTAs: CTA b handles the 16-row tiles b, b + gridDim.x, ...  Every
// warp walks the same number of sub-steps per tile (padded to a multiple of U;
// padding steps load and compute nothing), so the rolling buffer index restarts
// at 0 on every tile and the loads for the next tile are issued while the
// current one finishes.  One __syncthreads per tile (double-buffered reduction).
template <int VEC, int NT, int U, int W, bool MO = false>
__global__ void __launch_bounds__(W * 32) GemvKernel(const KParams p) {
  constexpr int kWords = VEC / 4;  // code words per lane per row per sub-step
  constexpr int kBpl = VEC / 8;    // 16-element blocks per lane per sub-step
  constexpr int kSubK = 8 * VEC;   // K covered by one sub-step (4 lanes)
  RJ_TIMELINE_SCOPE(1);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int K = p.K;
  const int N = p.N;
  const int M = p.M;
  const int kb = K >> 4;
  const int tiles = (N + 15) >> 4;
  const size_t row_bytes = static_cast<size_t>(K) >> 1;

  // Activation rows of this lane's B columns (m = g and g + 8).  Rows past M read
  // row 0: B columns are independent in the MMA and those outputs are not stored.
  const int m0 = g < M ? g : 0;
  const int m1 = (g + 8) < M ? g + 8 : 0;
  const __nv_bfloat16* xrow0 = p.x + static_cast<size_t>(m0) * K;
  const __nv_bfloat16* xrow1 = p.x + static_cast<size_t>(m1) * K;
  const int lane_k = t * 2 * VEC;  // this lane's first K within a sub-step

  const int steps_total = (K + kSubK - 1) / kSubK;
  const int steps_warp = (steps_total + W - 1) / W;
  const int steps_pad = (steps_warp + U - 1) / U * U;  // same for every warp
  // Only the last sub-step of K can be partial; this lane's part of it is valid
  // when its first block is inside the row.
  const int s_last = steps_total - 1;
  const bool tail_ok = (s_last * 4 + t) * kBpl < kb;
  const uint64_t pol = EvictFirstPolicy();

  StepBuf<VEC> buf[U];

  // Sub-step j of this warp is s = warp + j * W of the row (none if s >= steps_total).
  auto real = [&](int j) { return warp + j * W < steps_total; };
  auto load = [&](StepBuf<VEC>& b, int tile, int j) {
    const int s = warp + j * W;
    const bool ok = tail_ok || s != s_last;
    // Rows past N read row N-1: A rows are independent and never stored.
    const int r0 = min(tile * 16 + g, N - 1);
    const int r1 = min(tile * 16 + g + 8, N - 1);
    const size_t coff = static_cast<size_t>(s * 4 + t) * VEC;
    const int soff = (s * 4 + t) * kBpl;
    CodeLoad<VEC>::Load(b.r0, p.codes + r0 * row_bytes + coff, ok, pol);
    CodeLoad<VEC>::Load(b.r1, p.codes + r1 * row_bytes + coff, ok, pol);
    b.s0 = LoadScales<kBpl>(p.scales + static_cast<size_t>(r0) * kb + soff, ok, pol);
    b.s1 = LoadScales<kBpl>(p.scales + static_cast<size_t>(r1) * kb + soff, ok, pol);
  };

  // Two accumulator sets (h = 0, 1) halve the MMA dependency chain.
  float acc[2][NT][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[h][n][r] = 0.f;
  };
  zero_acc();

  auto compute = [&](const StepBuf<VEC>& b, int j) {
    const int s = warp + j * W;
    // A lane outside K (tail sub-step) has zero codes and scales, so A = 0; its B
    // only has to be finite, so it reads the start of its activation row.
    const bool ok = tail_ok || s != s_last;
    const int xoff = ok ? s * kSubK + lane_k : 0;
    uint4 xa[kWords], xb[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      xa[w] = LoadAct(xrow0 + xoff + 8 * w);
      if constexpr (NT == 2) xb[w] = LoadAct(xrow1 + xoff + 8 * w);
    }
    // Word w of this lane's codes lies in the lane's block w / 2.
    uint32_t sp0[2], sp1[2];
    ScalePairs(b.s0, sp0[0], sp0[1]);
    ScalePairs(b.s1, sp1[0], sp1[1]);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint32_t d0[4], d1[4];
      DecodeCodes<MO>(b.r0[w], d0);
      DecodeCodes<MO>(b.r1[w], d1);
      const uint32_t sa = sp0[w >> 1];
      const uint32_t sb = sp1[w >> 1];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // A: rows g / g+8; slots (2t,2t+1) <- (e_{2h}, e_{2h+4}), (2t+8,2t+9) <- (e_{2h+1}, e_{2h+5}).
        const uint32_t a[4] = {MulBf16x2(d0[2 * h], sa), MulBf16x2(d1[2 * h], sb),
                               MulBf16x2(d0[2 * h + 1], sa), MulBf16x2(d1[2 * h + 1], sb)};
        // B: the same permutation of the activations x[8w .. 8w+8) of this lane.
        const uint32_t lo = h == 0 ? xa[w].x : xa[w].y;
        const uint32_t hi = h == 0 ? xa[w].z : xa[w].w;
        Mma16816(acc[h][0], a, Prmt(lo, hi, 0x5410), Prmt(lo, hi, 0x7632));
        if constexpr (NT == 2) {
          const uint32_t lo1 = h == 0 ? xb[w].x : xb[w].y;
          const uint32_t hi1 = h == 0 ? xb[w].z : xb[w].w;
          Mma16816(acc[h][1], a, Prmt(lo1, hi1, 0x5410), Prmt(lo1, hi1, 0x7632));
        }
      }
    }
  };

  __shared__ float red[2][W][NT * 4][32];
  const float wscale = __ldg(p.wscale) * 256.f;  // 2^8 undoes the 2^-8 folded into A

  // Rolling register pipeline: U sub-steps in flight; buffer u is refilled with
  // the item U steps ahead (possibly in the next tile) once it has been consumed.
  if (blockIdx.x < tiles) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (real(u)) load(buf[u], blockIdx.x, u);
  }
  // The weights are on their way; x comes from the previous kernel (pdl.cuh).
  rjpdl::PdlLaunchDependents();
  rjpdl::PdlWait();
  RJ_TIMELINE_WAITED();
  int parity = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    for (int j0 = 0; j0 < steps_pad; j0 += U) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u;
        if (real(j)) compute(buf[u], j);
        int jn = j + U;
        int tn = tile;
        if (jn >= steps_pad) {
          jn -= steps_pad;
          tn += gridDim.x;
        }
        if (tn < tiles && real(jn)) load(buf[u], tn, jn);
      }
    }

    // Split-K reduction across the W warps, then scale and store.
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[parity][warp][n * 4 + r][lane] = acc[0][n][r] + acc[1][n][r];
    zero_acc();
    __syncthreads();
#ifdef RJ_TIMELINE
    if (tile == static_cast<int>(blockIdx.x)) RJ_TIMELINE_MARK(0);  // the first tile's items, all warps
#endif
    for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += W * 32) {
      const int r = idx >> 5;
      const int ln = idx & 31;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) sum += red[parity][w][r][ln];
      const int row = tile * 16 + (ln >> 2) + ((r & 2) << 2);
      const int m = (r >> 2) * 8 + (ln & 3) * 2 + (r & 1);
      if (row < N && m < M) {
        p.y[static_cast<size_t>(m) * N + row] = __float2bfloat16_rn(sum * OutputScale(p, wscale, m));
      }
    }
    parity ^= 1;
  }
  RJ_TIMELINE_MARK(1);  // every tile's items and sums
}

// Resident CTAs of a kernel on the current device (pdl.cuh; cached per kernel and device).
using rjpdl::PersistentSlots;

// Grid size for a persistent launch: enough CTAs to fill the GPU once, spread so
// that every CTA gets the same number of tiles (to within one).
// A persistent grid over `tiles` with `slots` resident CTAs: a tile a CTA where they fit in
// one round (or slots is unknown, < 1), else the fewest rounds with the tiles spread evenly.
inline int SpreadGrid(int tiles, int slots) {
  if (slots < 1 || tiles <= slots) return tiles;
  const int rounds = (tiles + slots - 1) / slots;
  return (tiles + rounds - 1) / rounds;
}

template <typename Kernel>
int PersistentGrid(Kernel kernel, int threads, int tiles) {
  return SpreadGrid(tiles, PersistentSlots(kernel, threads));
}

// Host-side launch of one configuration (U sub-steps in flight, W warps per CTA).
// persistent = false launches one CTA per tile.
template <int VEC, int NT, int U, int W>
cudaError_t LaunchOne(const KParams& kp, bool persistent, cudaStream_t stream) {
  const int tiles = (kp.N + 15) / 16;
  // One kernel per code order (kp.mma_order): the decode is chosen at compile time.
  auto kernel = kp.mma_order ? GemvKernel<VEC, NT, U, W, true> : GemvKernel<VEC, NT, U, W, false>;
  const int grid = persistent ? PersistentGrid(kernel, W * 32, tiles) : tiles;
  return rjpdl::Launch(kernel, dim3(grid), dim3(W * 32), 0, stream, kp.pdl, kp);
}

template <int U, int W>
cudaError_t LaunchGemvConfig(const KParams& kp, bool vec16, cudaStream_t stream,
                             bool persistent = true) {
  if (vec16) {
    return kp.M > 8 ? LaunchOne<16, 2, U, W>(kp, persistent, stream)
                    : LaunchOne<16, 1, U, W>(kp, persistent, stream);
  }
  return kp.M > 8 ? LaunchOne<8, 2, U, W>(kp, persistent, stream)
                  : LaunchOne<8, 1, U, W>(kp, persistent, stream);
}

// Work units on a warp's critical path in a persistent launch (the general and the wide
// kernel): rounds of the evenly spread grid (slots resident CTAs; 0: unknown, one tile a CTA)
// times the units a warp takes per tile. A unit is one sub-step (GemvKernel), one item
// (16-row wide tiles) or one item pair (KP): the same loads and MMAs a lane.
inline int64_t CriticalUnits(int64_t tiles, int64_t slots, int64_t units_per_row, int W) {
  const int64_t rounds = slots > 0 ? (tiles + slots - 1) / slots : 1;
  return rounds * ((units_per_row + W - 1) / W);
}

// Resident CTAs of the one-n-tile GemvKernel<VEC, 1, U, W> for this launch's code order
// (PersistentSlots; 0 if the occupancy query fails).
template <int VEC, int U, int W>
int GemvSlots(const KParams& kp) {
  auto kernel = kp.mma_order ? GemvKernel<VEC, 1, U, W, true> : GemvKernel<VEC, 1, U, W, false>;
  return PersistentSlots(kernel, W * 32);
}

// The general kernel's library defaults: sub-steps in flight per warp, warps per CTA (split K).
constexpr int kGemvPipeline = 2;
constexpr int kGemvWarps = 8;

// The general kernel's CTA shapes at 2 < M <= 8 (LaunchGemvFit), for the library's U and W:
// W / 2 warps with 2U sub-steps in flight (the same loads in flight a CTA), W, 3W / 2 and 2W
// warps with U.
struct GemvDims {
  int u, w;  // sub-steps in flight per warp, warps per CTA
};
template <int U, int W>
constexpr GemvDims kGemvShapes[4] = {{2 * U, W / 2}, {U, W}, {U, 3 * W / 2}, {U, 2 * W}};

template <int VEC, int U, int W, int I>
int GemvShapeSlots(const KParams& kp) {
  return GemvSlots<VEC, kGemvShapes<U, W>[I].u, kGemvShapes<U, W>[I].w>(kp);
}

template <int VEC, int U, int W, int I>
cudaError_t LaunchGemvShapeAt(const KParams& kp, cudaStream_t stream) {
  return LaunchOne<VEC, 1, kGemvShapes<U, W>[I].u, kGemvShapes<U, W>[I].w>(kp, true, stream);
}

// GemvShapeFor's rule on the four shapes' resident CTAs (slots, in kGemvShapes order).
template <int VEC, int U, int W>
int GemvShapePick(const KParams& kp, const int (&slots)[4]) {
  const int64_t tiles = (kp.N + 15) / 16;
  const int64_t steps = (kp.K + 8 * VEC - 1) / (8 * VEC);
  for (const int s : slots)
    if (s < 1) return 1;
  int best = -1;
  int64_t best_steps = 0;
  for (int i = 0; i < 4; ++i) {
    const int w = kGemvShapes<U, W>[i].w;
    const int64_t st = (steps + w - 1) / w;
    if (tiles <= slots[i] && (best < 0 || st < best_steps)) {
      best = i;
      best_steps = st;
    }
  }
  if (best >= 0) return best;
  for (int i = 0; i < 4; ++i) {
    const int64_t cu = CriticalUnits(tiles, slots[i], steps, kGemvShapes<U, W>[i].w);
    if (best < 0 || cu < best_steps) {
      best = i;
      best_steps = cu;
    }
  }
  return best;
}

// GemvShapeFor returns the index (0..3) in kGemvShapes<U, W> of the shape to launch:
//  * of the shapes whose resident CTAs hold every tile at once (one round), the one with the
//    fewest sub-steps a warp (ties: fewer warps);
//  * if none does, the shortest critical path, rounds of the persistent grid times sub-steps a
//    warp (CriticalUnits; ties: fewer warps);
//  * W (index 1) if an occupancy query fails.
// shape_slots, if given, receives the chosen shape's resident CTAs (0 if its query failed).
// Measured in isolation on an H200 at M = 4 and 8 (RESULTS.md runs U6, V3), us at M = 8, the
// choice first (slots of 4 / 8 / 12 / 16 warps: 660 / 528 / 396 / 264 with 16-byte loads):
//  * Qwen3-8B qkv (384 tiles): 12 warps 9.6; 8 warps 10.4, 16 warps 11.6 (two rounds);
//  * 8B o (256 tiles): 16 warps 7.6; 12 warps 7.7, 8 warps 8.3;
//  * 8B down (256 tiles, 96 sub-steps a row): 16 warps 16.9; 12 warps 17.7, 8 warps 20.6;
//  * 32B qkv (640 tiles: only 4 warps hold them all): 4 warps 17.6; 12 warps 19.1 (two
//    rounds, the shortest critical path), 16 warps 19.7 (three), 8 warps 20.3 (two). One
//    round beats the critical path here: the tail of a second round goes away;
//  * 32B o (320 tiles): 12 warps 15.2; 8 warps 17.0, 16 warps 19.3 (two rounds);
//  * 32B down (320 tiles, 200 sub-steps a row): 12 warps 41.3; 8 warps 45.1, 16 warps 54.0.
// M = 3, 5, 6 and 7 take the rule unmeasured, as do shapes no shape holds in one round.
template <int VEC, int U, int W>
int GemvShapeFor(const KParams& kp, int* shape_slots = nullptr) {
  const int slots[4] = {GemvShapeSlots<VEC, U, W, 0>(kp), GemvShapeSlots<VEC, U, W, 1>(kp),
                        GemvShapeSlots<VEC, U, W, 2>(kp), GemvShapeSlots<VEC, U, W, 3>(kp)};
  const int best = GemvShapePick<VEC, U, W>(kp, slots);
  if (shape_slots) *shape_slots = slots[best];
  return best;
}

template <int VEC, int U, int W>
cudaError_t LaunchGemvShape(const KParams& kp, int shape, cudaStream_t stream) {
  switch (shape) {
    case 0:
      return LaunchGemvShapeAt<VEC, U, W, 0>(kp, stream);
    case 2:
      return LaunchGemvShapeAt<VEC, U, W, 2>(kp, stream);
    case 3:
      return LaunchGemvShapeAt<VEC, U, W, 3>(kp, stream);
    default:
      return LaunchGemvShapeAt<VEC, U, W, 1>(kp, stream);
  }
}

// The library's general-kernel launch: at 2 < M <= 8 (one n-tile) the CTA shape GemvShapeFor
// picks, else U sub-steps in flight and W warps a CTA.
template <int U, int W>
cudaError_t LaunchGemvFit(const KParams& kp, bool vec16, cudaStream_t stream) {
  static_assert(2 * W * 32 <= 1024 && W % 2 == 0, "W / 2, 3W / 2 and 2W warps must make CTAs");
  if (kp.M > 2 && kp.M <= 8) {
    return vec16 ? LaunchGemvShape<16, U, W>(kp, GemvShapeFor<16, U, W>(kp), stream)
                 : LaunchGemvShape<8, U, W>(kp, GemvShapeFor<8, U, W>(kp), stream);
  }
  return LaunchGemvConfig<U, W>(kp, vec16, stream);
}

// ------------------------------------------------------- the wide path ----
//
// The fast path for K % 256 == 0 (every Qwen/Llama projection), v4 in
// benchmarks/KERNEL_NOTES.md.  Same mapping onto mma.sync as GemvKernel, but
// written for fewer instructions per weight:
//  * one work item = 32 code bytes per lane per row (two 16-byte loads, 64 K),
//    4 lanes x 64 = 256 K per item, and the four block scales of those 64 K in
//    one 32-bit load: half the per-item overhead of the 16-byte path;
//  * per-tile pointers advanced by a constant per item (no per-item 64-bit
//    address arithmetic, no tail predicates: K % 256 == 0);
//  * block scales by integer moves instead of conversions: (byte & 0x7F) << 4 is
//    the bf16 bit pattern of s * 2^-120 (E4M3 and bf16 line up, subnormals
//    included), and two exact multiplications by 2^127 and 2^111 give s * 2^118.
//    NaN (0x7F) and negative scales, which never come out of the quantizer except
//    as poison, take a rare exact branch through cvt.rn.f16x2.e4m3x2;
//  * XS: the activations are staged once per CTA in shared memory, already in the
//    B-fragment order (one LDS.128 feeds two MMAs; no permutes in the loop) when
//    2.25 * M * K bytes fit (kWideXsMaxBytes); otherwise B is loaded from global
//    memory and permuted as in GemvKernel;
//  * one flat loop over (tile, item) per warp with a U-deep rolling register
//    pipeline that runs across tiles; every warp has the same number of items
//    per tile (padded when K / 256 is not a multiple of W), so the per-tile
//    __syncthreads (S1: the tile's named barrier, and a __syncthreads every kS1Ring
//    tiles) is reached by all warps at the same iteration;
//  * KP (M = 1): 8-row tiles whose MMA holds two items of the same rows (see
//    WideGemvKernel), chosen by LaunchWideFit where that shortens the critical path.
//  * S1 (M = 1, staged activations; 16-row tiles or KP; sm_90): the block scales move from the
//    weights to the f32 accumulator. The B columns an activation row leaves unused each
//    take one block of the MMA's K, so one MMA yields per-(row, block) partial sums and
//    one FFMA a lane per (row, block) applies the scale: no per-pair scale multiply, no
//    splats, no scale branch (see WideGemvKernel).
constexpr int kWideSubK = 256;
constexpr int kWideXsMaxBytes = 96 * 1024;
#ifndef RESET_JAX_WIDE_THREADS_PER_SM
#define RESET_JAX_WIDE_THREADS_PER_SM 512
#endif
// Register budget: launch bounds ask for this many resident threads per SM.
constexpr int kWideThreadsPerSm = RESET_JAX_WIDE_THREADS_PER_SM;
// 0 turns the S1 form off (the library then runs every M = 1 launch in the form that
// scales the weights: run_gpu_checks.sh builds nvfp4_check so to keep that path checked,
// and layer_check so to compare the two).
#ifndef RESET_JAX_WIDE_S1
#define RESET_JAX_WIDE_S1 1
#endif

// S1's ring of per-tile reduction slots (finish_s1 in WideGemvKernel); slot i uses named
// barrier 1 + i (0 is __syncthreads').
constexpr int kS1Ring = 8;
// 0: the warps that do not finish a tile bar.sync on its barrier instead of bar.arrive (the
// same ordering, plus a wait). For compute-sanitizer racecheck builds only: racecheck does not
// model an arrive's ordering and reports every arrive -> sync hand-off as a race, correct or
// not (ffi/tests/named_barrier_probe.cu shows it on a minimal kernel). With 0 racecheck checks
// the kernel's other shared memory (staging, the zero chunks). It cannot check the ring's
// reuse: every tile is then a whole-CTA barrier, which makes the block barrier every kS1Ring
// tiles redundant. That reuse rests on the argument in finish_s1 and on layer_check's bitwise
// PDL reruns.
#ifndef RESET_JAX_S1_ARRIVE
#define RESET_JAX_S1_ARRIVE 1
#endif
constexpr bool kS1Arrive = RESET_JAX_S1_ARRIVE != 0;

// Named barriers (bar.sync / bar.arrive with a thread count, a multiple of 32): an arrive
// does not wait, and synchronizes with the sync that completes the barrier, so the
// arriving threads' earlier shared-memory writes are visible to the syncing ones after it.
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

struct WideBuf {
  uint32_t r0[8];  // 32 code bytes of row g
  uint32_t r1[8];  // 32 code bytes of row g + 8
  uint32_t s0, s1;  // 4 block scales of rows g and g + 8
  uint32_t s0h, s1h;  // S1: s0, s1 and these are 8 scale bytes of rows g and g + 8
};

__device__ __forceinline__ void Ld128Stream(uint32_t* r, const uint8_t* p, uint64_t pol) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "l"(p), "l"(pol));
}

__device__ __forceinline__ uint32_t Ld32Scales(const uint8_t* p, uint64_t pol) {
  uint32_t v;
  asm volatile("ld.global.nc.L2::cache_hint.u32 %0, [%1], %2;" : "=r"(v) : "l"(p), "l"(pol));
  return v;
}

__device__ __forceinline__ void Ld64Scales(uint32_t& lo, uint32_t& hi, const uint8_t* p, uint64_t pol) {
  asm volatile("ld.global.nc.L2::cache_hint.v2.u32 {%0,%1}, [%2], %3;"
               : "=r"(lo), "=r"(hi)
               : "l"(p), "l"(pol));
}

// S1 stages every activation times 2^64 (exact: a power of two; finite for |x| < 2^64),
// so that its products with the unscaled decoded weights (e2m1 * 2^-126) are normal f32
// numbers wherever |x| >= 2^-63 (smaller ones underflow inside the MMA and are lost, as
// they would be against any x of ordinary size): D = sum(w * x) * 2^-62, undone in the
// output scale. The two bounds are symmetric; neither comes near a decoder's activations.
constexpr uint32_t kS1XScale = 0x5F805F80u;  // bf16x2 (2^64, 2^64)
constexpr float kS1OutScale = 0x1p62f;
__device__ __forceinline__ uint4 S1ScaleUnit(uint4 v) {
  return make_uint4(MulBf16x2(v.x, kS1XScale), MulBf16x2(v.y, kS1XScale), MulBf16x2(v.z, kS1XScale),
                    MulBf16x2(v.w, kS1XScale));
}

__device__ __forceinline__ uint32_t SplatLo(uint32_t v) { return Prmt(v, v, 0x1010u); }
__device__ __forceinline__ uint32_t SplatHi(uint32_t v) { return Prmt(v, v, 0x3232u); }

// Four E4M3 block scales (bytes of v) -> bf16x2 pairs (s0, s1) * 2^118 and
// (s2, s3) * 2^118, exactly (see ScalePairs for the range argument).
__device__ __forceinline__ void WideScales(uint32_t v, uint32_t& p01, uint32_t& p23) {
  const uint32_t m = v & 0x7F7F7F7Fu;
  // A byte equal to 0x7F (NaN) or with its sign bit set makes `odd` non-zero.
  const uint32_t odd = ((m + 0x01010101u) | v) & 0x80808080u;
  if (odd == 0u) {
    const uint32_t a = Prmt(m, 0u, 0x4140u) << 4;  // bf16x2 (s0, s1) * 2^-120
    const uint32_t b = Prmt(m, 0u, 0x4342u) << 4;  // bf16x2 (s2, s3) * 2^-120
    p01 = MulBf16x2(MulBf16x2(a, 0x7F007F00u), 0x77007700u);  // * 2^127 * 2^111
    p23 = MulBf16x2(MulBf16x2(b, 0x7F007F00u), 0x77007700u);
  } else {
    uint32_t q0, q1, q2, q3;
    ScalePairs(v & 0xFFFFu, q0, q1);
    ScalePairs(v >> 16, q2, q3);
    p01 = Prmt(q0, q1, 0x5410u);
    p23 = Prmt(q2, q3, 0x5410u);
  }
}

// B fragments of one 8-element chunk of activations (x0..x7 in .x .. .w): for
// h = 0 the pairs (x0, x4), (x1, x5); for h = 1 (x2, x6), (x3, x7) -- the order
// DecodeE2M1x8 gives the weights.
__device__ __forceinline__ uint4 PermuteChunk(uint4 c) {
  return make_uint4(Prmt(c.x, c.z, 0x5410u), Prmt(c.x, c.z, 0x7632u), Prmt(c.y, c.w, 0x5410u),
                    Prmt(c.y, c.w, 0x7632u));
}

// Index (in 16-byte units) of activation unit u (values 8u..8u+7) of row m in the staged
// activations (XS): item s = u / 32, lane t = u / 8 % 4, chunk w = u % 8 of that lane.
__device__ __forceinline__ int XsUnit(int u, int m, int M) {
  return (((u >> 5) * M + m) * 4 + ((u >> 3) & 3)) * 9 + (u & 7);
}

// Shared-memory bytes of the staged activations (XS): 9 16-byte units per
// (item, row, lane) of which 8 are used; the ninth spreads the lanes over banks.
__host__ __device__ constexpr int64_t WideXsBytes(int64_t M, int64_t K) {
  return (K / kWideSubK) * M * 4 * 9 * 16;
}

// Weight tiles of N rows in the wide kernel: 16 rows each, 8 in K pairs (KP, below).
__host__ __device__ constexpr int WideTiles(int N, bool kp) { return kp ? (N + 7) >> 3 : (N + 15) >> 4; }

// KP (K pairs, M = 1 only): 8-row tiles. The MMA's A rows 0..7 hold item 2q of the tile's
// 8 weight rows and A rows 8..15 item 2q + 1 of the same rows; B column 0 holds the
// activations of item 2q and column 1 those of item 2q + 1 (columns 2..7 are unused at
// M = 1 anyway). D[g][0] + D[g + 8][1] is then row g's sum over both items: every load and
// every MMA is as full as in the 16-row tiling, and a tile is half as long. Where a
// 16-row tiling leaves CTAs with an uneven number of tiles, the 8-row tiles can balance
// better (Qwen3-32B o: 320 16-row tiles on 264 slots of 8 warps, or 320 of 4 warps at 8
// items a warp; 640 8-row tiles give 3 rounds of 2 pairs, 6). K % 512 == 0. When the
// library takes it: KPairUnits.
//
// S1 (M = 1 only, staged activations): at M = 1 the MMA's B columns 1..7 carry
// nothing. In an MMA, lane t's A registers hold K positions {2t, 2t + 1, 2t + 8, 2t + 9}
// of the MMA's 16, all from lane t's own code word, i.e. from one 16-element block
// (block 4t + w / 2 of the item, w the word). S1 gives B column n the activations of
// block lane n & 3 only (zeros elsewhere), for the even word pairs (w / 2 = 0, 2) in
// columns 0..3 and the odd ones (1, 3) in columns 4..7: then D[row][n] is the row's
// partial sum over one block, unscaled, and the block scale multiplies it once in f32
// (acc += D * s) instead of multiplying every decoded weight pair (one HMUL2 a pair,
// the splats, WideScales' branch). Lane (g, t) holds columns 2t and 2t + 1 of rows g and
// g + 8, so it needs 8 of the item's 256 scale bytes: one 8-byte load a row and a PRMT.
// The weights enter the MMA unscaled (e2m1 * 2^-126; the +-0.5 codes are bf16
// subnormals, which the tensor cores keep: checked on Hopper only), the activations
// staged times 2^64 (kS1XScale), the output times 2^62.
// With KP, columns 0..3 take item 2q's blocks and 4..7 item 2q + 1's (A rows 0..7 hold
// item 2q, rows 8..15 item 2q + 1 of the same weight rows), one word pair an MMA chain:
// D[g][0..3] and D[g + 8][4..7] are wanted, the other half is discarded; lane t's 8
// scale bytes (item 2q + (t >> 1), offset 8 (t & 1)) are one load.
template <int NT, int U, int W, bool XS, bool NORM = false, bool KP = false, bool MO = false,
          bool S1 = false>
__global__ void __launch_bounds__(W * 32, kWideThreadsPerSm / (W * 32)) WideGemvKernel(const KParams p) {
  static_assert(XS || !NORM, "the fused norm is applied while staging the activations");
  static_assert(!KP || NT == 1, "K pairs are for one activation row");
  static_assert(!S1 || (NT == 1 && XS), "S1 is for one staged activation row");
  RJ_TIMELINE_SCOPE(NORM ? 3 : 2);
  constexpr int kAcc = NT == 1 ? 4 : 2;  // independent accumulator chains per n-tile
  extern __shared__ uint4 xs[];          // XS only
  __shared__ float red[S1 ? 1 : 2][S1 ? 1 : W][8 * NT][16];  // S1: s1red instead

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int K = p.K;
  const int N = p.N;
  const int M = p.M;
  const int steps = K / kWideSubK;              // items per row
  const int wunits = KP ? steps / 2 : steps;    // work units per row (KP: item pairs)
  const int nw = (wunits + W - 1) / W;          // units per warp per tile (all warps)
  const int nreal = (wunits - warp + W - 1) / W;  // of which real for this warp
  const int tiles = WideTiles(N, KP);
  const int my_tiles = blockIdx.x < tiles ? (tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int total = my_tiles * nw;
  const uint32_t row_bytes = static_cast<uint32_t>(K) >> 1;
  const uint32_t row_scales = static_cast<uint32_t>(K) >> 4;
  const uint64_t pol = EvictFirstPolicy();

  // ---- loader state: item (ltile, lj), pointers at that item.
  int ltile = blockIdx.x;
  int lj = 0;
  const uint8_t *c0, *c1, *s0, *s1;
  constexpr uint32_t kUnitBytes = KP ? 256u : 128u;  // code bytes of a unit in one row
  constexpr uint32_t kUnitScales = KP ? 32u : 16u;
  auto point = [&](int tile) {
    const uint32_t cofs = static_cast<uint32_t>(warp) * kUnitBytes + static_cast<uint32_t>(t) * 32u;
    // S1: 8 bytes at 8 (t & 1) of the item's 16 (KP: at 8t of the item pair's 32).
    const uint32_t sofs = static_cast<uint32_t>(warp) * kUnitScales +
                          (S1 ? static_cast<uint32_t>(KP ? t : t & 1) * 8u : static_cast<uint32_t>(t) * 4u);
    if constexpr (KP) {  // one row, items 2q (A rows 0..7) and 2q + 1 (A rows 8..15)
      const uint32_t r = static_cast<uint32_t>(min(tile * 8 + g, N - 1));
      c0 = p.codes + (r * row_bytes + cofs);
      c1 = c0 + 128;
      s0 = p.scales + (r * row_scales + sofs);
      s1 = s0 + 16;
    } else {
      const uint32_t r0 = static_cast<uint32_t>(min(tile * 16 + g, N - 1));
      const uint32_t r1 = static_cast<uint32_t>(min(tile * 16 + g + 8, N - 1));
      c0 = p.codes + (r0 * row_bytes + cofs);
      c1 = p.codes + (r1 * row_bytes + cofs);
      s0 = p.scales + (r0 * row_scales + sofs);
      s1 = p.scales + (r1 * row_scales + sofs);
    }
  };
  auto load_next = [&](WideBuf& b) {
    if (lj < nreal) {
      Ld128Stream(b.r0, c0, pol);
      Ld128Stream(b.r0 + 4, c0 + 16, pol);
      Ld128Stream(b.r1, c1, pol);
      Ld128Stream(b.r1 + 4, c1 + 16, pol);
      if constexpr (S1 && KP) {
        Ld64Scales(b.s0, b.s0h, s0, pol);
      } else if constexpr (S1) {
        Ld64Scales(b.s0, b.s0h, s0, pol);
        Ld64Scales(b.s1, b.s1h, s1, pol);
      } else {
        b.s0 = Ld32Scales(s0, pol);
        b.s1 = Ld32Scales(s1, pol);
      }
    }
    c0 += W * kUnitBytes;
    c1 += W * kUnitBytes;
    s0 += W * kUnitScales;
    s1 += W * kUnitScales;
    if (++lj == nw) {
      lj = 0;
      ltile += gridDim.x;
      if (ltile < tiles) point(ltile);
    }
  };

  WideBuf buf[U];
  if (total > 0) point(ltile);
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < total) load_next(buf[u]);
  // The first weights are on their way; x and h come from the previous kernel (pdl.cuh).
  rjpdl::PdlLaunchDependents();
  rjpdl::PdlWait();
  RJ_TIMELINE_WAITED();

  // ---- activations: staged once (XS) or read per item from global memory.
  const int mb0 = g < M ? g : 0;
  const int mb1 = g + 8 < M ? g + 8 : 0;
  __shared__ uint4 s1zero[S1 ? 8 : 1];  // S1: the B chunks of the lanes whose columns are zero
  // S1: each tile's per-warp row sums, in a ring of kS1Ring slots (finish_s1).
  __shared__ float s1red[S1 ? kS1Ring : 1][W][16];
  auto staged = [](uint4 v) -> uint4 {
    if constexpr (S1) {
      return S1ScaleUnit(v);
    } else {
      return v;
    }
  };
  if constexpr (XS) {
    if constexpr (S1) {
      if (threadIdx.x < 8) s1zero[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
    }
    const int k8 = K >> 3;  // 16-byte units per row
    const int units = M * k8;
    const uint4* xg = reinterpret_cast<const uint4*>(p.x);
    const uint4* hg = reinterpret_cast<const uint4*>(p.h);
    const uint4* wg = reinterpret_cast<const uint4*>(p.nw);
    __shared__ float row_inv[NORM ? 16 : 1];
    if constexpr (NORM) {
      // 1/rms of every row of x + h, in a fixed order (the same in every CTA).
      // Per row m, thread t takes units u = t + j * W * 32 (j < nj).  Where all of a thread's
      // units fit in registers (M * nj <= kNormCache: M <= 2 at K = 4096, M = 1 at K =
      // 5120), x + h and the norm weights are loaded once, in one round trip before the
      // sums (per-warp partial sums, then the warps' partials added in warp order), and
      // staged from registers.
      constexpr int kNormCache = 4;
      const int nj = (k8 + W * 32 - 1) / (W * 32);
      if (M * nj <= kNormCache) {
        __shared__ float part[W][16];
        uint4 xv[kNormCache], hv[kNormCache], wv[kNormCache];
        // Register c holds unit cu[c] of row cm[c] = c / nj, found by comparisons: with the
        // division by the runtime nj, ptxas placed it after the PDL wait and between the
        // loads of c = 0 and c = 1 (cuobjdump -sass), ~150 cycles on the staging's way.
        static_assert(kNormCache == 4, "cm[c] = c / nj below assumes c < 4");
        int cm[kNormCache], cu[kNormCache];
#pragma unroll
        for (int c = 0; c < kNormCache; ++c) {
          cm[c] = (c >= nj) + (c >= 2 * nj) + (c >= 3 * nj);
          cu[c] = threadIdx.x + (c - cm[c] * nj) * W * 32;
        }
#pragma unroll
        for (int c = 0; c < kNormCache; ++c) {
          const int m = cm[c], u = cu[c];
          if (c < M * nj && u < k8) {
            xv[c] = LoadAct(xg + m * k8 + u);
            hv[c] = LoadAct(hg + m * k8 + u);
            wv[c] = __ldg(wg + u);
          }
        }
#pragma unroll
        for (int c = 0; c < kNormCache; ++c) xv[c] = ResidualUnit(xv[c], hv[c]);  // r
        for (int m = 0; m < M; ++m) {
          float ss = 0.f;
#pragma unroll
          for (int c = 0; c < kNormCache; ++c)
            if (cm[c] == m && cu[c] < k8) ss = SumSquaresUnit(xv[c], ss);
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
          if (lane == 0) part[warp][m] = ss;
        }
        __syncthreads();
        if (threadIdx.x < M) {
          float ss = 0.f;
#pragma unroll
          for (int w = 0; w < W; ++w) ss += part[w][threadIdx.x];
          row_inv[threadIdx.x] = rsqrtf(ss / static_cast<float>(K) + p.eps);
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < kNormCache; ++c) {
          const int m = cm[c], u = cu[c];
          if (c < M * nj && u < k8) {
            if (blockIdx.x == 0) reinterpret_cast<uint4*>(p.r_out)[m * k8 + u] = xv[c];
            xs[XsUnit(u, m, M)] = staged(PermuteChunk(NormUnit(xv[c], row_inv[m], wv[c])));
          }
        }
      } else {
        // Larger M * K: r = bf16(x + h) is staged first (kRound units of x and h in flight
        // per thread: one L2 round trip per kRound * W * 32 units), then each row's sum of
        // squares is read back from shared memory by one warp (lanes over the row's units,
        // then a shuffle tree), then every unit is normalised in place.  The norm is
        // elementwise, so it applies to the permuted chunk with the weights permuted alike.
        constexpr int kRound = 4;
        for (int base = threadIdx.x; base < units; base += kRound * W * 32) {
          uint4 xv[kRound], hv[kRound];
#pragma unroll
          for (int e = 0; e < kRound; ++e) {
            const int i = base + e * W * 32;
            if (i < units) {
              xv[e] = LoadAct(xg + i);
              hv[e] = LoadAct(hg + i);
            }
          }
#pragma unroll
          for (int e = 0; e < kRound; ++e) {
            const int i = base + e * W * 32;
            if (i < units) {
              const int m = i / k8;
              const uint4 r = ResidualUnit(xv[e], hv[e]);
              if (blockIdx.x == 0) reinterpret_cast<uint4*>(p.r_out)[i] = r;
              xs[XsUnit(i - m * k8, m, M)] = PermuteChunk(r);
            }
          }
        }
        __syncthreads();
        for (int m = warp; m < M; m += W) {
          float ss = 0.f;
          for (int u = lane; u < k8; u += 32) ss = SumSquaresUnit(xs[XsUnit(u, m, M)], ss);
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
          if (lane == 0) row_inv[m] = rsqrtf(ss / static_cast<float>(K) + p.eps);
        }
        __syncthreads();
#pragma unroll 4
        for (int i = threadIdx.x; i < units; i += W * 32) {
          const int m = i / k8, u = i - m * k8;
          const int at = XsUnit(u, m, M);
          xs[at] = staged(NormUnit(xs[at], row_inv[m], PermuteChunk(__ldg(wg + u))));
        }
      }
    } else {
      // Eight loads in flight per thread before their stores: the staging runs once
      // per CTA, while the first weight loads above are already on their way.
      constexpr int kBatch = 8;
      for (int base = threadIdx.x; base < units; base += kBatch * W * 32) {
        uint4 v[kBatch];
#pragma unroll
        for (int e = 0; e < kBatch; ++e) {
          const int i = base + e * W * 32;
          if (i < units) v[e] = LoadAct(xg + i);
        }
#pragma unroll
        for (int e = 0; e < kBatch; ++e) {
          const int i = base + e * W * 32;
          if (i < units) {
            const int m = i / k8;
            xs[XsUnit(i - m * k8, m, M)] = staged(PermuteChunk(v[e]));
          }
        }
      }
    }
    __syncthreads();
  }
  RJ_TIMELINE_MARK(0);  // activations staged (XS), or right after the wait

  float acc[kAcc][NT][4];
#pragma unroll
  for (int a = 0; a < kAcc; ++a)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[a][n][r] = 0.f;

  // S1: lane (g, t)'s B chunks are the staged ones where its column g is lane t's block
  // column (g == t for the even word pairs, g == t + 4 for the odd ones), zeros otherwise:
  // a base and a stride an item for each (stride 0 on the zeros).
  // With KP: g == t takes item 2q (columns 0..3), g == t + 4 item 2q + 1 (4..7), in s1e.
  const uint4* const s1e = g == t ? xs + t * 9 : (KP && g == t + 4) ? xs + 36 + t * 9 : s1zero;
  const uint4* const s1o = g == t + 4 ? xs + t * 9 : s1zero;
  const int s1es = (g == t || (KP && g == t + 4)) ? (KP ? 72 : 36) : 0;
  const int s1os = g == t + 4 ? 36 : 0;
  auto compute_s1_kp = [&](const WideBuf& b, int j) {
    const uint4* xp = s1e + (warp + j * W) * s1es;
    float d[4][4] = {};  // per word pair (block within the lane's 64 K)
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      uint32_t d0[4], d1[4];
      DecodeCodes<MO>(b.r0[w], d0);  // item 2q of row g
      DecodeCodes<MO>(b.r1[w], d1);  // item 2q + 1 of row g
      const uint4 x = xp[w];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {d0[2 * h], d1[2 * h], d0[2 * h + 1], d1[2 * h + 1]};
        Mma16816(d[w >> 1], a, h == 0 ? x.x : x.z, h == 0 ? x.y : x.w);
      }
    }
    // Lanes t < 2 want D[g][2t, 2t + 1] (item 2q, blocks of lanes 2t, 2t + 1: bytes j and
    // 4 + j of their 8), lanes t >= 2 D[g + 8][2t, 2t + 1] (item 2q + 1, lanes 2t - 4,
    // 2t - 3: the same bytes of theirs).
    const bool top = t < 2;
    const uint32_t q01 = Prmt(b.s0, b.s0h, 0x5140u);  // (j0 e0, j0 e1, j1 e0, j1 e1)
    const uint32_t q23 = Prmt(b.s0, b.s0h, 0x7362u);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float2 f = E4m3x2ToFloat2((c < 2 ? q01 : q23) >> (16 * (c & 1)));
      acc[0][0][0] = fmaf(top ? d[c][0] : d[c][2], f.x, acc[0][0][0]);
      acc[0][0][1] = fmaf(top ? d[c][1] : d[c][3], f.y, acc[0][0][1]);
    }
  };
  auto compute_s1 = [&](const WideBuf& b, int j) {
    if constexpr (KP) {
      compute_s1_kp(b, j);
      return;
    }
    const int s = warp + j * W;
    const uint4* xe = s1e + s * s1es;
    const uint4* xo = s1o + s * s1os;
    float d[2][4] = {};  // per word half P = w / 4: the even and odd word pairs of its 32 K
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      uint32_t d0[4], d1[4];
      DecodeCodes<MO>(b.r0[w], d0);
      DecodeCodes<MO>(b.r1[w], d1);
      const uint4 x = ((w >> 1) & 1 ? xo : xe)[w];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {d0[2 * h], d1[2 * h], d0[2 * h + 1], d1[2 * h + 1]};
        Mma16816(d[w >> 2], a, h == 0 ? x.x : x.z, h == 0 ? x.y : x.w);
      }
    }
    // Column 2t + e of P holds block (lane 2 (t & 1) + e, word pair 2P + (t >> 1)): scale
    // byte 8 (t & 1) + 4e + 2P + (t >> 1) of the row's 16 in this item, i.e. byte
    // 4e + 2P + (t >> 1) of the 8 this lane loaded. One PRMT gathers the four a row.
    const uint32_t sel = (t >> 1) ? 0x7351u : 0x6240u;  // bytes (P0 e0, P0 e1, P1 e0, P1 e1)
    const uint32_t q0 = Prmt(b.s0, b.s0h, sel);
    const uint32_t q1 = Prmt(b.s1, b.s1h, sel);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float2 f0 = E4m3x2ToFloat2(q0 >> (16 * c));  // row g, columns 2t, 2t + 1
      const float2 f1 = E4m3x2ToFloat2(q1 >> (16 * c));  // row g + 8
      acc[0][0][0] = fmaf(d[c][0], f0.x, acc[0][0][0]);
      acc[0][0][1] = fmaf(d[c][1], f0.y, acc[0][0][1]);
      acc[0][0][2] = fmaf(d[c][2], f1.x, acc[0][0][2]);
      acc[0][0][3] = fmaf(d[c][3], f1.y, acc[0][0][3]);
    }
  };

  auto compute = [&](const WideBuf& b, int j) {
    if constexpr (S1) {
      compute_s1(b, j);
      return;
    }
    // The item whose activations this lane's B column holds (KP: column g & 1 of pair q).
    const int s = KP ? 2 * (warp + j * W) + (g & 1) : warp + j * W;
    // B chunk w of n-tile n: staged (XS) or loaded and permuted here.
    const uint4* xp[NT];
    if constexpr (XS) {
      xp[0] = xs + ((s * M + mb0) * 4 + t) * 9;
      if constexpr (NT == 2) xp[NT - 1] = xs + ((s * M + mb1) * 4 + t) * 9;
    } else {
      const int k0 = s * kWideSubK + t * 64;
      xp[0] = reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(mb0) * K + k0);
      if constexpr (NT == 2)
        xp[NT - 1] = reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(mb1) * K + k0);
    }
    auto xchunk = [&](int n, int w) -> uint4 {
      if constexpr (XS) {
        return xp[n][w];
      } else {
        return PermuteChunk(LoadAct(xp[n] + w));
      }
    };
    uint32_t sa[4], sb[4];  // per block: bf16x2 pairs of blocks (0,1) and (2,3)
    WideScales(b.s0, sa[0], sa[2]);
    WideScales(b.s1, sb[0], sb[2]);
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      const int blk = w >> 1;
      const uint32_t pa = sa[blk & 2], pb = sb[blk & 2];
      const uint32_t ka = (blk & 1) ? SplatHi(pa) : SplatLo(pa);
      const uint32_t kb = (blk & 1) ? SplatHi(pb) : SplatLo(pb);
      uint32_t d0[4], d1[4];
      DecodeCodes<MO>(b.r0[w], d0);
      DecodeCodes<MO>(b.r1[w], d1);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {MulBf16x2(d0[2 * h], ka), MulBf16x2(d1[2 * h], kb),
                               MulBf16x2(d0[2 * h + 1], ka), MulBf16x2(d1[2 * h + 1], kb)};
        const int c = (w * 2 + h) % kAcc;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint4 x = xchunk(n, w);
          Mma16816(acc[c][n], a, h == 0 ? x.x : x.z, h == 0 ? x.y : x.w);
        }
      }
    }
  };

  const float wscale = __ldg(p.wscale) * (S1 ? kS1OutScale : 256.f);
  int ctile = blockIdx.x;
  int cj = 0;
  int parity = 0;
  // S1: the tile's sum across warps without a block barrier. Each warp writes its row sums
  // (v0: row g, v1: row g + 8; rows 0..7 only with KP) to the tile's ring slot. One warp,
  // the tile's finisher (local tile index mod W), waits on the slot's named barrier for the
  // others, adds the W partial sums in warp order and writes the tile's outputs; the
  // others only arrive (bar.arrive: no wait) and go straight on to their next tile's
  // items. A slot and its barrier are reused kS1Ring tiles later, behind a block barrier
  // every kS1Ring tiles (none in a CTA of fewer than kS1Ring tiles).
  // The barrier id is a register, so ptxas reserves all 16 of the SM's named barriers for
  // the kernel; that allows 4 CTAs an SM, no fewer than the registers allow today (2 of 8
  // warps, 4 of 4 at kWideThreadsPerSm = 512).
  int s1tile = 0;
  auto finish_s1 = [&](float v0, float v1) {
    constexpr int kRows = KP ? 8 : 16;
    const int slot = s1tile % kS1Ring;
    if (t == 0) {
      s1red[slot][warp][g] = v0;
      if constexpr (!KP) s1red[slot][warp][g + 8] = v1;
    }
    if (warp != s1tile % W) {
      if constexpr (kS1Arrive) {
        NamedBarrierArrive(1 + slot, W * 32);
      } else {
        NamedBarrierSync(1 + slot, W * 32);
      }
    } else {
      NamedBarrierSync(1 + slot, W * 32);
      const float scale = OutputScale(p, wscale, 0);
      if (p.swiglu) {
        if (lane < 8) {
          float gs = 0.f, us = 0.f;
#pragma unroll
          for (int w = 0; w < W; ++w) {
            gs += s1red[slot][w][lane];
            us += s1red[slot][w][lane + 8];
          }
          p.y[ctile * 8 + lane] =
              __float2bfloat16_rn(SiluMul(RoundToBf16(gs * scale), RoundToBf16(us * scale)));
        }
      } else if (lane < kRows) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += s1red[slot][w][lane];
        const int n_out = ctile * kRows + lane;
        if (n_out < N) p.y[n_out] = __float2bfloat16_rn(sum * scale);
      }
    }
    if (++s1tile % kS1Ring == 0) __syncthreads();
  };
  // S1: row g's sum over the tile is its four lanes' columns summed (16-row tiles: lane t's
  // acc[0][0][0..1] for row g, [2..3] for row g + 8; KP: [0..1] for row g).
  auto finish_tile_s1 = [&]() {
    float v0 = acc[0][0][0] + acc[0][0][1];
    float v1 = KP ? 0.f : acc[0][0][2] + acc[0][0][3];
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      v0 += __shfl_xor_sync(0xffffffffu, v0, o);
      if constexpr (!KP) v1 += __shfl_xor_sync(0xffffffffu, v1, o);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[0][0][r] = 0.f;
    finish_s1(v0, v1);
  };
  auto finish_tile16 = [&]() {
    if constexpr (!S1) {  // S1 tiles end in finish_s1 (and red has no slots for them)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float v = 0.f;
#pragma unroll
          for (int a = 0; a < kAcc; ++a) {
            v += acc[a][n][r];
            acc[a][n][r] = 0.f;
          }
          const int m = n * 8 + 2 * t + (r & 1);
          if (m < M) red[parity][warp][m][g + ((r & 2) << 2)] = v;
        }
      __syncthreads();
      if (p.swiglu) {
        // Rows 0..7 of the tile are gate rows 8 * ctile + 0..7, rows 8..15 the up rows of the
        // same outputs: each output is bf16(silu(bf16(gate)) * bf16(up)), exactly what the
        // GEMV followed by the SwiGLU kernel computes.
        const int F = N >> 1;
        for (int idx = threadIdx.x; idx < 8 * M; idx += W * 32) {
          const int row = idx & 7;
          const int m = idx >> 3;
          float gs = 0.f, us = 0.f;
#pragma unroll
          for (int w = 0; w < W; ++w) {
            gs += red[parity][w][m][row];
            us += red[parity][w][m][row + 8];
          }
          const float scale = OutputScale(p, wscale, m);
          p.y[static_cast<size_t>(m) * F + ctile * 8 + row] =
              __float2bfloat16_rn(SiluMul(RoundToBf16(gs * scale), RoundToBf16(us * scale)));
        }
        parity ^= 1;
        return;
      }
      for (int idx = threadIdx.x; idx < 16 * M; idx += W * 32) {
        const int row = idx & 15;
        const int m = idx >> 4;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += red[parity][w][m][row];
        const int n_out = ctile * 16 + row;
        if (n_out < N) {
          p.y[static_cast<size_t>(m) * N + n_out] = __float2bfloat16_rn(sum * OutputScale(p, wscale, m));
        }
      }
      parity ^= 1;
    }
  };

  auto finish_tile = [&]() {
    if constexpr (S1) {
      finish_tile_s1();
    } else if constexpr (KP) {
      // Row g's sum is D[g][0] (r = 0 on lanes t = 0) + D[g + 8][1] (r = 3 on the same lanes).
      float v = 0.f;
#pragma unroll
      for (int a = 0; a < kAcc; ++a) {
        v += acc[a][0][0] + acc[a][0][3];
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[a][0][r] = 0.f;
      }
      if (t == 0) red[parity][warp][0][g] = v;
      __syncthreads();
      for (int row = threadIdx.x; row < 8; row += W * 32) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += red[parity][w][0][row];
        const int n_out = ctile * 8 + row;
        if (n_out < N) p.y[n_out] = __float2bfloat16_rn(sum * OutputScale(p, wscale, 0));
      }
      parity ^= 1;
    } else {
      finish_tile16();
    }
  };

  for (int i0 = 0; i0 < total; i0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      if (i >= total) break;  // the same for every warp of the CTA
      if (cj < nreal) compute(buf[u], cj);
      if (i + U < total) load_next(buf[u]);
      if (++cj == nw) {
        finish_tile();
#ifdef RJ_TIMELINE
        if (ctile == static_cast<int>(blockIdx.x)) RJ_TIMELINE_MARK(1);  // thread 0's first tile
#endif
        cj = 0;
        ctile += gridDim.x;
      }
    }
  }
  RJ_TIMELINE_MARK(2);  // thread 0's items done
#ifdef RJ_TIMELINE
  // With S1 a warp may finish before the CTA's last tile finisher; thread 0 records the
  // CTA's end when the scope closes, so wait for every warp first (timeline builds only).
  if constexpr (S1) __syncthreads();
#endif
}

// Whether the wide path serves these arguments, and with staged activations.
inline bool WideOk(const KParams& kp) {
  return kp.K % kWideSubK == 0 && reinterpret_cast<uintptr_t>(kp.codes) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(kp.scales) % 4 == 0 &&
         static_cast<int64_t>(kp.N) * (kp.K / 2) < (int64_t{1} << 31);
}
inline bool WideXs(const KParams& kp) { return WideXsBytes(kp.M, kp.K) <= kWideXsMaxBytes; }

// Lets a wide kernel use up to kWideXsMaxBytes of dynamic shared memory on the current
// device (above 48 KB it must opt in, per device and kernel handle). Remembered per (handle,
// device) and thread. Callers pass the handle they launch or query: each translation unit
// that instantiates a kernel template holds its own host handle for it (ffi/tests/
// nvfp4_check compiles this header in two units), so an opt-in made through one unit's
// handle does not cover a launch through the other's ("invalid argument" above 48 KB).
inline cudaError_t WideSmemOptIn(const void* kernel) {
  struct Done {
    const void* kernel;
    int device;
  };
  static thread_local Done done[64] = {};
  static thread_local int next = 0;
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  for (const Done& d : done)
    if (d.kernel == kernel && d.device == dev) return cudaSuccess;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kWideXsMaxBytes);
      e != cudaSuccess)
    return e;
  done[next] = {kernel, dev};
  next = (next + 1) % 64;
  return cudaSuccess;
}

// Whether the current device is one where the S1 form was checked: Hopper (sm_90). S1
// feeds the +-0.5 codes to the tensor cores as bf16 subnormals; Hopper keeps them
// (nvfp4_check against float64), other generations were not checked, so they keep the
// form that scales the weights first. The query is cached per device (DeviceCcMajor).
inline bool WideS1Device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess && rjpdl::DeviceCcMajor(dev) == 9;
}

// Whether a launch takes the S1 form (WideGemvKernel): one activation row, staged, its
// scales 8-byte aligned (one 8-byte load a row and item), on a Hopper GPU.
inline bool WideS1(const KParams& kp) {
  return RESET_JAX_WIDE_S1 != 0 && kp.M == 1 && reinterpret_cast<uintptr_t>(kp.scales) % 8 == 0 &&
         WideS1Device();
}

using WideKernelFn = void (*)(KParams);

// The instantiation a launch runs: the code order (kp.mma_order) and, for one staged row,
// the S1 form (WideS1).
template <int NT, int U, int W, bool XS, bool NORM = false, bool KP = false>
WideKernelFn WideKernelFor(const KParams& kp) {
  if constexpr (NT == 1 && XS) {
    if (WideS1(kp)) {
      return kp.mma_order ? WideGemvKernel<NT, U, W, XS, NORM, KP, true, true>
                          : WideGemvKernel<NT, U, W, XS, NORM, KP, false, true>;
    }
  }
  return kp.mma_order ? WideGemvKernel<NT, U, W, XS, NORM, KP, true>
                      : WideGemvKernel<NT, U, W, XS, NORM, KP, false>;
}

// Resident CTAs of one wide-kernel instantiation on the current device (0 if the query
// fails). Resident CTAs per SM depend on the dynamic shared memory: cached per
// (kernel, device, smem) so that a call costs no occupancy query on the host.
template <int NT, int U, int W, bool XS, bool NORM = false, bool KP = false>
int WideSlots(const KParams& kp) {
  const WideKernelFn kernel = WideKernelFor<NT, U, W, XS, NORM, KP>(kp);
  const int smem = XS ? static_cast<int>(WideXsBytes(kp.M, kp.K)) : 0;
  struct Entry {
    const void* kernel;
    int device, smem, slots;
  };
  static thread_local Entry cache[16] = {};
  static thread_local int next = 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (XS && WideSmemOptIn(reinterpret_cast<const void*>(kernel)) != cudaSuccess) return 0;
  for (const Entry& e : cache)
    if (e.slots > 0 && e.kernel == reinterpret_cast<const void*>(kernel) && e.device == device &&
        e.smem == smem)
      return e.slots;
  int per_sm = 0, sms = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, W * 32, smem) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      per_sm < 1)
    return 0;
  cache[next] = {reinterpret_cast<const void*>(kernel), device, smem, per_sm * sms};
  next = (next + 1) % 16;
  return per_sm * sms;
}

template <int NT, int U, int W, bool XS, bool NORM = false, bool KP = false>
cudaError_t LaunchWideOne(const KParams& kp, cudaStream_t stream) {
  const WideKernelFn kernel = WideKernelFor<NT, U, W, XS, NORM, KP>(kp);
  const int smem = XS ? static_cast<int>(WideXsBytes(kp.M, kp.K)) : 0;
  if (XS) {
    if (cudaError_t e = WideSmemOptIn(reinterpret_cast<const void*>(kernel)); e != cudaSuccess)
      return e;
  }
  const int grid = SpreadGrid(WideTiles(kp.N, KP), WideSlots<NT, U, W, XS, NORM, KP>(kp));
  return rjpdl::Launch(kernel, dim3(grid), dim3(W * 32), static_cast<size_t>(smem), stream,
                       kp.pdl, kp);
}


// Staged activations (bytes a CTA) above which the wide kernel at 2 < M <= 8 runs one CTA of
// 2W warps an SM instead of two of W (WideXsOneCta). Two CTAs need the staging twice, plus
// 8-9 KB of static shared memory and 1 KB reserved each, out of the SM's 256 KB that L1
// shares: Qwen3-32B gate+up at M = 8 (90 KB staged a CTA) had the largest carveout, 233 KB
// of shared memory (L1 ~20 KB), against 135 KB at M = 4 (ncu, RESULTS.md run V6), and ran
// at 73.7 us against 56.1 at M = 4; one 16-warp CTA an SM, with the same warps an SM and
// the activations staged once, 59.6 us. Qwen3-8B gate+up at M = 8 (72 KB a CTA, 164 KB
// configured, L1 ~90 KB) stays on two: 24.9 us against 27.4 with one of 16 warps. The
// threshold lies between those two measured points; from 80 to ~89 KB two CTAs would still
// fit the 196 KB carveout (L1 ~60 KB), unmeasured.
constexpr int kWideXsOneCtaBytes = 80 * 1024;

inline bool WideXsOneCta(const KParams& kp) {
  return kp.M > 2 && kp.M <= 8 && WideXs(kp) && WideXsBytes(kp.M, kp.K) > kWideXsOneCtaBytes;
}

// Whether the K-pair form (8-row tiles, WideGemvKernel's KP) can serve: one activation row,
// no SwiGLU epilogue, K % 512 == 0 (whole item pairs), and the wide path itself.
inline bool KPairOk(const KParams& kp) {
  return kp.M == 1 && !kp.swiglu && kp.K % (2 * kWideSubK) == 0 && WideOk(kp);
}

// The K-pair launch's critical units (W warps), or -1 where the library does not take it:
// it cannot serve, or a tile would give a warp fewer than 2 units. Then every unit is
// followed by the tile's reduction across warps and its barrier, and the shorter critical
// path does not pay: the fused-norm Qwen3-8B qkv (K = 4096: one pair a warp a tile; 3
// tiles on the critical path instead of 2 of 16 rows, 4 units down to 3) measured +1.2 us a
// layer with it, Qwen3-32B o (K = 8192, 2 pairs a warp) and down (K = 25600, 7) -6.9 us a
// 32B layer together (RESULTS.md runs M6, M7). Both were measured before S1, whose tile
// ends no longer wait on a block barrier: the threshold may now be lower.
template <int U, int W, bool XS>
int64_t KPairUnits(const KParams& kp) {
  const int64_t pairs = kp.K / (2 * kWideSubK);
  if (!KPairOk(kp) || pairs < 2 * W) return -1;
  return CriticalUnits(WideTiles(kp.N, true), WideSlots<1, U, W, XS, false, true>(kp), pairs, W);
}

// The library's wide launch at M <= 2 (the decode rows): W warps per CTA, or W / 2 where
// halving the CTA gives every 16-row tile a resident CTA of its own and W warps do not.
// Qwen3-32B o and down: 320 tiles on 264 slots of 8 warps; 4-warp CTAs (528 slots for o,
// 396 for down, whose 57.6 KB of staged activations allow 3 CTAs an SM) run one tile
// each, where the persistent grid would otherwise run 160 CTAs of 2 tiles. Measured on an
// H100 (layer_check bench, same run): -2.7 us a 32B layer at M = 1 from o (RESULTS.md run
// K5), another -4.7 us from down (run L1). The same rule sends the Qwen3-8B qkv shape
// (384 tiles) to 4 warps where it runs as a plain GEMV (the unfused model; -0.3 us a layer
// without PDL in K5, -4 % standalone in session 1).
//  * At M = 1, 8-row tiles in K pairs (KP) instead, where KPairUnits says they shorten the
//    critical path further: Qwen3-32B o and down (-6.9 us a 32B layer together, run M7).
//  * Not for the fused-norm launch (LaunchGemvAddNorm): 8B qkv with the staged norm on 4-warp CTAs
//    measured +1.6 us a layer in the PDL chain (every CTA stages and normalises the rows),
//    and on 16-warp CTAs (128 CTAs of 3 tiles, one per SM, instead of 192 of 2) +2.1 us
//    (run L2).
//  * At 2 < M <= 8 with more than kWideXsOneCtaBytes of staged activations: 2W warps a CTA
//    (WideXsOneCta).
template <int NT, int U, int W, bool XS>
cudaError_t LaunchWideFit(const KParams& kp, cudaStream_t stream) {
  static_assert(W % 2 == 0, "W / 2 warps must be a whole number");
  if constexpr (XS && 2 * W * 32 <= kWideThreadsPerSm) {
    if (WideXsOneCta(kp)) return LaunchWideOne<NT, U, 2 * W, XS>(kp, stream);
  }
  const int tiles = WideTiles(kp.N, false);
  if (kp.M <= 2) {
    const int wide = WideSlots<NT, U, W, XS>(kp);
    const int narrow = WideSlots<NT, U, W / 2, XS>(kp);
    const bool fit = wide > 0 && tiles > wide && tiles <= narrow;
    if constexpr (NT == 1) {  // K pairs where they shorten the critical path (KPairUnits)
      const int64_t steps = kp.K / kWideSubK;
      const int64_t units = fit ? CriticalUnits(tiles, narrow, steps, W / 2)
                                : CriticalUnits(tiles, wide, steps, W);
      const int64_t kpair = KPairUnits<U, W, XS>(kp);
      if (kpair >= 0 && kpair < units) return LaunchWideOne<1, U, W, XS, false, true>(kp, stream);
    }
    if (fit) return LaunchWideOne<NT, U, W / 2, XS>(kp, stream);
  }
  return LaunchWideOne<NT, U, W, XS>(kp, stream);
}

// The library's default wide launch (LaunchWideFit); LaunchWideConfig below launches
// exactly the configuration it is given (the checker's variants).
template <int U, int W>
cudaError_t LaunchWideDefault(const KParams& kp, cudaStream_t stream) {
  const bool xs = WideXs(kp);
  if (kp.M > 8) {
    return xs ? LaunchWideOne<2, U, W, true>(kp, stream) : LaunchWideOne<2, U, W, false>(kp, stream);
  }
  return xs ? LaunchWideFit<1, U, W, true>(kp, stream) : LaunchWideFit<1, U, W, false>(kp, stream);
}

template <int U, int W>
cudaError_t LaunchWideConfig(const KParams& kp, cudaStream_t stream, int xs_mode = -1) {
  const bool xs = xs_mode < 0 ? WideXs(kp) : (xs_mode == 1 && WideXs(kp));
  if (kp.M > 8) {
    return xs ? LaunchWideOne<2, U, W, true>(kp, stream) : LaunchWideOne<2, U, W, false>(kp, stream);
  }
  return xs ? LaunchWideOne<1, U, W, true>(kp, stream) : LaunchWideOne<1, U, W, false>(kp, stream);
}

// ------------------------------------------------ activation quantizer ----

// Round to the nearest E2M1 value, ties to even, saturating at +-6.
__device__ __forceinline__ float RoundE2M1(float v) {
  const float a = fabsf(v);
  const float r = a > 5.f     ? 6.f
                  : a >= 3.5f ? 4.f
                  : a > 2.5f  ? 3.f
                  : a >= 1.75f ? 2.f
                  : a > 1.25f ? 1.5f
                  : a >= 0.75f ? 1.f
                  : a > 0.25f ? 0.5f
                              : 0.f;
  return copysignf(r, v);
}

// max that keeps a NaN once seen (fmaxf would drop it): a non-finite block must
// poison its scale, as in the format's quantizer.
__device__ __forceinline__ float MaxNaN(float amax, float a) {
  return (a > amax || a != a) ? a : amax;
}

// One CTA per activation row.  PER_ROW: the global scale is max|x_row| / 2688.
template <bool PER_ROW>
__global__ void __launch_bounds__(256) QuantizeActivationsKernel(
    const __nv_bfloat16* __restrict__ x, const float* __restrict__ input_scale,
    __nv_bfloat16* __restrict__ xhat, float* __restrict__ gx, int K) {
  const int m = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K);
  uint4* outr = reinterpret_cast<uint4*>(xhat + static_cast<size_t>(m) * K);
  const int kb = K >> 4;
  float g;
  if constexpr (PER_ROW) {
    __shared__ float red[8];
    float amax = 0.f;
    for (int i = threadIdx.x; i < (K >> 3); i += blockDim.x) {
      const uint4 v = xr[i];
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        amax = MaxNaN(amax, fabsf(Bf16Lo(w[j])));
        amax = MaxNaN(amax, fabsf(Bf16Hi(w[j])));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = MaxNaN(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = red[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) amax = MaxNaN(amax, red[w]);
    // amax / (6 * 448), 1 for an all-zero row; a non-finite amax stays visible.
    g = !isfinite(amax) ? amax : amax > 0.f ? __fdiv_rn(amax, 2688.f) : 1.f;
  } else {
    g = __ldg(input_scale);
  }
  if (threadIdx.x == 0) gx[m] = g;
  const float six_g = __fmul_rn(6.f, g);
  for (int b = threadIdx.x; b < kb; b += blockDim.x) {
    const uint4 v0 = xr[2 * b];
    const uint4 v1 = xr[2 * b + 1];
    const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    float f[16];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      f[2 * j] = Bf16Lo(w[j]);
      f[2 * j + 1] = Bf16Hi(w[j]);
    }
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) amax = MaxNaN(amax, fabsf(f[j]));
    float s = __fdiv_rn(amax, six_g);
    s = fminf(fmaxf(s, 0.f), 448.f);
    const __nv_fp8_storage_t s8 = __nv_cvt_float_to_fp8(s, __NV_SATFINITE, __NV_E4M3);
    __half_raw hr = __nv_cvt_fp8_to_halfraw(s8, __NV_E4M3);
    float sf = __half2float(__half(hr));
    if (sf == 0.f) sf = 1.f;
    if (!isfinite(amax) || !isfinite(six_g)) sf = __int_as_float(0x7fffffff);  // NaN block
    const float denom = __fmul_rn(sf, g);
    uint32_t o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float lo = RoundE2M1(__fdiv_rn(f[2 * j], denom)) * sf;  // exact in bf16
      const float hi = RoundE2M1(__fdiv_rn(f[2 * j + 1], denom)) * sf;
      o[j] = PackBf16x2(lo, hi);
    }
    outr[2 * b] = make_uint4(o[0], o[1], o[2], o[3]);
    outr[2 * b + 1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

}  // namespace nvfp4

#endif  // RESET_JAX_FFI_NVFP4_KERNELS_CUH_
