// Host API of the small-M NVFP4 kernels (no XLA dependency: the FFI handlers in
// nvfp4_ffi.cc and the standalone checker in ffi/tests/ both call these).
#ifndef RESET_JAX_FFI_NVFP4_KERNELS_H_
#define RESET_JAX_FFI_NVFP4_KERNELS_H_

#include <cstdint>

#include <cuda_runtime_api.h>

namespace nvfp4 {

// y[M, N] (bf16) = x[M, K] (bf16) . dequant(W)[N, K]^T, float32 accumulation.
//   codes  [N, K/2] uint8: element 2i in the low nibble, 2i+1 in the high one.
//   scales [N, K/16] float8_e4m3fn block scales.
//   wscale float32 scalar (device pointer): the weight's global scale.
//   xscale optional float32 (device pointer): activation global scale applied
//          to the float32 sum, one per row (xscale_per_row) or one for all.
//   Range: at M = 1 on the wide path on sm_90 (the S1 form) activations must stay below
//   2^64 in magnitude (they are staged times 2^64); elsewhere any finite bf16.
struct GemvArgs {
  const void* x = nullptr;  // bf16 [M, K]
  const uint8_t* codes = nullptr;
  const uint8_t* scales = nullptr;
  const float* wscale = nullptr;
  const float* xscale = nullptr;
  bool xscale_per_row = false;
  void* y = nullptr;  // bf16 [M, N]
  int64_t M = 0, N = 0, K = 0;
  // Launch as a programmatic dependent of the previous kernel on the stream (ffi/pdl.cuh;
  // sm_90+ only: the caller checks the device).  The kernels wait for it before reading x.
  bool pdl = false;
  // SwiGLU in the epilogue (the decoder MLP's gate+up projection; wide path only, N % 16
  // == 0): the weight's rows alternate in groups of 8, gate rows 8i..8i+7 at rows
  // 16i..16i+7 and the matching up rows at 16i+8..16i+15, and
  //   y[M, N/2] (bf16) = bf16(silu(bf16(gate)) * bf16(up))   (silu in float32),
  // the same bits as the GEMV followed by a SwiGLU kernel.
  bool swiglu = false;
  // Bit order of each 32-bit code word (8 codes of a row): 0 the natural order (element e
  // of the word in bits 4e..4e+3), 1 the MMA word order that the kernels decode in fewer
  // instructions (DecodeMmaOrderx8 in nvfp4_kernels.cuh; reset_jax.nvfp4.format.
  // to_code_order makes it once, when the weights are prepared).
  int codes_order = 0;
};

// nullptr for a known GemvArgs::codes_order, else why not (the GEMV's and the decoder
// layer's argument checks both use it).
inline const char* CodesOrderUnsupportedReason(int codes_order) {
  return codes_order == 0 || codes_order == 1
             ? nullptr
             : "codes_order must be 0 (natural) or 1 (MMA word order)";
}

// Largest M one launch serves (two m16n8k16 column tiles).
constexpr int64_t kMaxM = 16;

// Returns nullptr when the kernel can serve these arguments, else a static
// message saying why (shape limits, pointer alignment).
const char* GemvUnsupportedReason(const GemvArgs& a);

// Whether a.swiglu can be served (the call would take the wide path and N % 16 == 0).
bool GemvSwiGluSupported(const GemvArgs& a);

// Launches the GEMV on `stream`; returns cudaGetLastError() after the launch.
// variant 0 (the default) takes the wide path when UseWide(a), else the general
// kernel; variant 1 always takes the general kernel (for A/B benchmarks); variant 2 the
// wide kernel's K-pair form (8-row tiles) wherever it can serve (M = 1, K % 512 == 0),
// else as variant 0 (checks).
cudaError_t LaunchGemv(const GemvArgs& a, cudaStream_t stream, int variant = 0);

// Whether the general kernel takes its 16-byte-load path for these arguments.
bool UseVec16(const GemvArgs& a);

// Whether LaunchGemv (variant 0) takes the wide path: K % 256 == 0, 16-byte
// aligned codes, 4-byte aligned scales, N * K / 2 < 2^31, the activations fit
// the wide kernel's shared memory, and M is small for the number of 16-row
// tiles (see nvfp4_kernels.cu).
bool UseWide(const GemvArgs& a);

// The current device's SM count (0 if a query fails), cached per device; a race only repeats
// the query.
int SmCount();

// The general kernel's launch at 2 < M <= 8 (LaunchGemv, variant 0, in GemvShapeFor's CTA
// shape), packed: its CTAs on as few SMs as hold them, ceil(CTAs / CTAs an SM). A
// programmatic dependent launch can leave it so, its CTAs landing on the SMs the kernel
// before frees first (rjlayer::DefaultPdlEdges). 0 where GemvUnsupportedReason rejects the
// arguments, the call takes the wide path, M is outside 3..8, or an occupancy query fails.
int GemvPackedSms(const GemvArgs& a);

// W4A4 activation quantizer (the format's quantize_activations, bit for bit):
// per 16-element block along K, s = e4m3_rne(clip(amax / (6 g), 0, 448)) (0 -> 1),
// code = e2m1_rne(x / (s g)).  Writes xhat = e2m1(code) * s as bf16 (exact) and
// gx[m] = g, so that x_quantized = xhat * gx[m].
//   g = input_scale[0] when per_row is false, else per row
//   g = max|x_row| / (6 * 448) (1 for an all-zero row).
cudaError_t LaunchQuantizeActivations(const void* x, const float* input_scale, bool per_row,
                                      void* xhat, float* gx, int64_t M, int64_t K,
                                      cudaStream_t stream);

// The decoder's residual add and RMSNorm ahead of a GEMV, per row m < M:
//   r[m]  = bf16(x[m] + h[m])
//   xn[m] = bf16(w * bf16(r[m] * rsqrt(sum(r[m]^2) / K + eps)))
// x, h, r, xn: bf16 [M, K]; w: bf16 [K]; all 16-byte aligned, K % 8 == 0.
cudaError_t LaunchAddRmsNorm(const void* x, const void* h, const void* w, float eps, void* r,
                             void* xn, int64_t M, int64_t K, cudaStream_t stream,
                             bool pdl = false);

// The same ahead of the GEMV, with a.x as the residual stream x:
//   r = bf16(x + h);  y = GEMV(xn = rmsnorm(r) * w).
// Where the wide path serves (UseWide) and M <= 2, the add and the norm run while
// each CTA stages its activations (CTA 0 writes r; xn is not written); otherwise
// LaunchAddRmsNorm writes r and xn, then LaunchGemv reads xn.  variant 1 always
// takes the second route, variant 2 the first wherever the wide kernel can run
// (A/B checks), variant 3 as 2 but in K pairs where M = 1 and K % 512 == 0, variant 4
// the first wherever LaunchGemv alone would take the wide path (UseWide), at any M.
// a.swiglu only where GemvAddNormSwiGluSupported; another variant number is an invalid
// value.  h, w, r, xn 16-byte aligned.  a.pdl applies to every kernel it launches.
cudaError_t LaunchGemvAddNorm(const GemvArgs& a, const void* h, const void* w, float eps,
                              void* r, void* xn, cudaStream_t stream, int variant = 0);

// Whether LaunchGemvAddNorm(a, ..., variant) can apply a.swiglu: variants 0 and 4, where
// GemvSwiGluSupported(a).
bool GemvAddNormSwiGluSupported(const GemvArgs& a, int variant);

}  // namespace nvfp4

#endif  // RESET_JAX_FFI_NVFP4_KERNELS_H_
