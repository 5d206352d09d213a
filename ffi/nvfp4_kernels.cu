// Instantiations and launchers of the NVFP4 kernels (host API in nvfp4_kernels.h).
#include "nvfp4_kernels.h"

#include <cstdint>

#include "nvfp4_kernels.cuh"

namespace nvfp4 {
namespace {

// Library defaults (benchmarks/KERNEL_NOTES.md says how they were chosen); the general
// kernel's, kGemvPipeline and kGemvWarps, are in nvfp4_kernels.cuh.
constexpr int kWidePipeline = 2;  // sub-steps in flight per warp, wide path (K % 256 == 0)
constexpr int kWideWarps = 8;

bool Aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

}  // namespace

const char* GemvUnsupportedReason(const GemvArgs& a) {
  if (a.M < 1 || a.M > kMaxM) return "M (rows of x) must be in 1..16";
  if (const char* why = CodesOrderUnsupportedReason(a.codes_order)) return why;
  if (a.N < 1) return "N must be >= 1";
  if (a.K < 16 || a.K % 16 != 0) return "K must be a positive multiple of 16";
  if (a.N > (int64_t{1} << 30) || a.K > (int64_t{1} << 30)) return "N and K must be < 2^30";
  if (a.M * a.K > (int64_t{1} << 31) || a.M * a.N > (int64_t{1} << 31))
    return "M*K and M*N must be < 2^31";
  if (!a.x || !a.codes || !a.scales || !a.wscale || !a.y) return "null buffer";
  if (!Aligned(a.x, 16)) return "x must be 16-byte aligned";
  if (!Aligned(a.codes, 8)) return "codes must be 8-byte aligned";
  if (!Aligned(a.y, 2)) return "y must be 2-byte aligned";
  return nullptr;
}

bool UseVec16(const GemvArgs& a) {
  // 16-byte code loads need 16-byte aligned rows (K % 32 == 0) and 2-byte aligned
  // scale pairs; otherwise 8-byte loads and one scale byte per lane.
  return a.K % 32 == 0 && Aligned(a.codes, 16) && Aligned(a.scales, 2);
}

int SmCount() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  static int sm_count[64] = {};
  int sms = device >= 0 && device < 64 ? sm_count[device] : 0;
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return 0;
    if (device >= 0 && device < 64) sm_count[device] = sms;
  }
  return sms;
}

namespace {

// The wide path stages the activations (M * K * 2 bytes) once per CTA, so it pays
// off when a CTA streams much more weight than that: measured on an H100
// (benchmarks/KERNEL_NOTES.md, v4) it wins at M <= 2 on every Qwen3 shape and at
// M = 4 / 8 once each CTA gets >= 4M/9 tiles (gate+up, 32B qkv at M = 4), and
// loses to the general kernel on the 1-wave layers at M >= 4 (8B qkv / o, 32B o)
// and whenever the activations do not fit in shared memory.
bool UseWideFor(const KParams& kp) {
  if (!WideOk(kp) || !WideXs(kp)) return false;
  if (kp.M <= 2) return true;
  const int sms = SmCount();
  if (sms < 1) return false;
  const int64_t tiles = WideTiles(kp.N, false);  // 16-row tiles
  // Resident wide CTAs: two of 8 warps an SM (registers). Where WideXsOneCta runs one of 16
  // warps instead, each takes twice the tiles, so there the rule leans to the general kernel.
  const int64_t slots = 2 * static_cast<int64_t>(sms);
  return 4 * static_cast<int64_t>(kp.M) * slots <= 9 * tiles;
}

}  // namespace

bool UseWide(const GemvArgs& a) { return UseWideFor(ToKParams(a)); }

int GemvPackedSms(const GemvArgs& a) {
  if (a.M <= 2 || a.M > 8 || GemvUnsupportedReason(a) != nullptr) return 0;
  const KParams kp = ToKParams(a);
  if (UseWideFor(kp)) return 0;
  const int sms = SmCount();
  if (sms < 1) return 0;
  constexpr int U = kGemvPipeline, W = kGemvWarps;
  int slots = 0;
  if (UseVec16(a)) {
    GemvShapeFor<16, U, W>(kp, &slots);
  } else {
    GemvShapeFor<8, U, W>(kp, &slots);
  }
  const int per_sm = slots / sms;
  if (per_sm < 1) return 0;
  const int ctas = SpreadGrid((kp.N + 15) / 16, slots);  // LaunchOne's grid (PersistentGrid)
  return (ctas + per_sm - 1) / per_sm;
}

bool GemvSwiGluSupported(const GemvArgs& a) {
  return a.N % 16 == 0 && GemvUnsupportedReason(a) == nullptr && UseWideFor(ToKParams(a));
}

namespace {
// SwiGLU in the epilogue runs only on the library's default (variant 0) wide path.
bool SwiGluRefused(const GemvArgs& a, int variant) {
  return a.swiglu && (variant != 0 || !GemvSwiGluSupported(a));
}
}  // namespace

cudaError_t LaunchGemv(const GemvArgs& a, cudaStream_t stream, int variant) {
  if (variant < 0 || variant > 2) return cudaErrorInvalidValue;
  if (GemvUnsupportedReason(a) != nullptr) return cudaErrorInvalidValue;
  if (SwiGluRefused(a, variant)) return cudaErrorInvalidValue;
  const KParams kp = ToKParams(a);
  if (variant == 2 && KPairOk(kp)) {  // the K-pair form wherever it can serve (checks)
    return WideXs(kp) ? LaunchWideOne<1, kWidePipeline, kWideWarps, true, false, true>(kp, stream)
                      : LaunchWideOne<1, kWidePipeline, kWideWarps, false, false, true>(kp, stream);
  }
  if ((variant == 0 || variant == 2) && UseWideFor(kp))
    return LaunchWideDefault<kWidePipeline, kWideWarps>(kp, stream);
  return LaunchGemvFit<kGemvPipeline, kGemvWarps>(kp, UseVec16(a), stream);
}

cudaError_t LaunchQuantizeActivations(const void* x, const float* input_scale, bool per_row,
                                      void* xhat, float* gx, int64_t M, int64_t K,
                                      cudaStream_t stream) {
  if (M < 1 || M > 65535 || K < 16 || K % 16 != 0 || K > (int64_t{1} << 30))
    return cudaErrorInvalidValue;
  if (!Aligned(x, 16) || !Aligned(xhat, 16)) return cudaErrorMisalignedAddress;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* ob = static_cast<__nv_bfloat16*>(xhat);
  const dim3 grid(static_cast<unsigned>(M));
  if (per_row) {
    QuantizeActivationsKernel<true><<<grid, 256, 0, stream>>>(xb, input_scale, ob, gx,
                                                              static_cast<int>(K));
  } else {
    QuantizeActivationsKernel<false><<<grid, 256, 0, stream>>>(xb, input_scale, ob, gx,
                                                               static_cast<int>(K));
  }
  return cudaGetLastError();
}

namespace {

// The decoder's pre-norm, one row per CTA (the host API's LaunchAddRmsNorm):
//   r  = bf16(x + h);  xn = bf16(w * bf16(r * rsqrt(sum(r^2) / K + eps)))
// with the sum of squares in float32; K % 8 == 0, rows 16-byte aligned.
// x and h are not __restrict__: nvcc would turn their loads into ld.global.nc, which a
// programmatic dependent launch rules out (pdl.cuh: an earlier kernel writes them).
// A thread's first kRegUnits units of r stay in registers between the two passes and their
// norm weights are read before the PDL wait (weights: no kernel of the chain writes them),
// so up to K = 8 * 256 * kRegUnits (8192) the chain after the wait is one L2 round trip;
// units past that read x and h again (r is recomputed, not read back from r_out: no
// read-after-write through global memory).  The sum runs over the units in the same order either way.
constexpr int kAddNormThreads = 256;
constexpr int kRegUnits = 4;

__global__ void __launch_bounds__(kAddNormThreads) AddRmsNormKernel(
    const uint4* x, const uint4* h, const uint4* __restrict__ w,
    float eps, uint4* __restrict__ r_out, uint4* __restrict__ xn, int K) {
  __shared__ float part[kAddNormThreads / 32];
  RJ_TIMELINE_SCOPE(4);
  rjpdl::PdlLaunchDependents();
  const int units = K >> 3;  // 16-byte units of 8 values
  const size_t row = static_cast<size_t>(blockIdx.x) * units;
  uint4 rr[kRegUnits], ww[kRegUnits];
#pragma unroll
  for (int i = 0; i < kRegUnits; ++i) {
    const int u = threadIdx.x + i * kAddNormThreads;
    ww[i] = u < units ? __ldg(w + u) : make_uint4(0, 0, 0, 0);
  }
  rjpdl::PdlWait();  // x and h come from earlier kernels (pdl.cuh)
  RJ_TIMELINE_WAITED();
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kRegUnits; ++i) {
    const int u = threadIdx.x + i * kAddNormThreads;
    if (u < units) {
      rr[i] = ResidualUnit(LoadAct(x + row + u), LoadAct(h + row + u));
      r_out[row + u] = rr[i];
      ss = SumSquaresUnit(rr[i], ss);
    }
  }
  for (int u = threadIdx.x + kRegUnits * kAddNormThreads; u < units; u += kAddNormThreads) {
    const uint4 r = ResidualUnit(LoadAct(x + row + u), LoadAct(h + row + u));
    r_out[row + u] = r;
    ss = SumSquaresUnit(r, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kAddNormThreads / 32; ++i) total += part[i];
  const float inv = rsqrtf(total / static_cast<float>(K) + eps);
#pragma unroll
  for (int i = 0; i < kRegUnits; ++i) {
    const int u = threadIdx.x + i * kAddNormThreads;
    if (u < units) xn[row + u] = NormUnit(rr[i], inv, ww[i]);
  }
  for (int u = threadIdx.x + kRegUnits * kAddNormThreads; u < units; u += kAddNormThreads) {
    const uint4 r = ResidualUnit(LoadAct(x + row + u), LoadAct(h + row + u));
    xn[row + u] = NormUnit(r, inv, __ldg(w + u));
  }
}

}  // namespace

cudaError_t LaunchAddRmsNorm(const void* x, const void* h, const void* w, float eps, void* r,
                             void* xn, int64_t M, int64_t K, cudaStream_t stream, bool pdl) {
  if (M < 1 || M > 65535 || K < 8 || K % 8 != 0 || K > (int64_t{1} << 30))
    return cudaErrorInvalidValue;
  if (!Aligned(x, 16) || !Aligned(h, 16) || !Aligned(w, 16) || !Aligned(r, 16) || !Aligned(xn, 16))
    return cudaErrorMisalignedAddress;
  return rjpdl::Launch(AddRmsNormKernel, dim3(static_cast<unsigned>(M)), dim3(kAddNormThreads), 0, stream, pdl,
                       static_cast<const uint4*>(x), static_cast<const uint4*>(h),
                       static_cast<const uint4*>(w), eps, static_cast<uint4*>(r),
                       static_cast<uint4*>(xn), static_cast<int>(K));
}

bool GemvAddNormSwiGluSupported(const GemvArgs& a, int variant) {
  return (variant == 0 || variant == 4) && GemvSwiGluSupported(a);
}

cudaError_t LaunchGemvAddNorm(const GemvArgs& a, const void* h, const void* w, float eps,
                              void* r, void* xn, cudaStream_t stream, int variant) {
  if (variant < 0 || variant > 4) return cudaErrorInvalidValue;
  if (GemvUnsupportedReason(a) != nullptr) return cudaErrorInvalidValue;
  if (!Aligned(h, 16) || !Aligned(w, 16) || !Aligned(r, 16) || !Aligned(xn, 16))
    return cudaErrorMisalignedAddress;
  if (a.swiglu && !GemvAddNormSwiGluSupported(a, variant)) return cudaErrorInvalidValue;
  KParams kp = ToKParams(a);
  // The wide path stages x, so the norm goes there. At M <= 2 only by default:
  // the staging sums each row's squares before any MMA starts. variant 4 folds it
  // wherever the GEMV alone would take the wide path, at any M; variant 2 forces it
  // wherever the wide kernel can run (checker coverage of NT = 2), variant 3 too, in K
  // pairs where M = 1 and K % 512 == 0.
  bool wide = false;
  if (variant == 2 || variant == 3) wide = WideOk(kp) && WideXs(kp);
  if (variant == 0) wide = kp.M <= 2 && UseWideFor(kp);
  if (variant == 4) wide = UseWideFor(kp);
  if (wide) {
    kp.h = static_cast<const __nv_bfloat16*>(h);
    kp.nw = static_cast<const __nv_bfloat16*>(w);
    kp.eps = eps;
    kp.r_out = static_cast<__nv_bfloat16*>(r);
    if (kp.M > 8) return LaunchWideOne<2, kWidePipeline, kWideWarps, true, true>(kp, stream);
    // variant 3 (checks): 8-row tiles in K pairs wherever they serve. Not by default: the
    // fused-norm shapes (Qwen3 qkv and gate+up) have K <= 5120, where they do not pay
    // (KPairUnits; Qwen3-8B qkv +1.2 us a layer, RESULTS.md run M6).
    if (variant == 3 && KPairOk(kp))
      return LaunchWideOne<1, kWidePipeline, kWideWarps, true, true, true>(kp, stream);
    // 2W warps a CTA where two W-warp CTAs' staged activations would crowd out L1
    // (WideXsOneCta, kWideXsOneCtaBytes), as LaunchWideFit does for the plain launch.
    if constexpr (2 * kWideWarps * 32 <= kWideThreadsPerSm) {
      if (WideXsOneCta(kp)) return LaunchWideOne<1, kWidePipeline, 2 * kWideWarps, true, true>(kp, stream);
    }
    return LaunchWideOne<1, kWidePipeline, kWideWarps, true, true>(kp, stream);
  }
  if (cudaError_t e = LaunchAddRmsNorm(a.x, h, w, eps, r, xn, a.M, a.K, stream, a.pdl);
      e != cudaSuccess)
    return e;
  GemvArgs b = a;
  b.x = xn;
  return LaunchGemv(b, stream);
}

}  // namespace nvfp4
