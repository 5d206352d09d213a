// XLA FFI handlers for the small-M NVFP4 matmul (see reset_jax/nvfp4/cuda.py).
//
// Exported symbols (registered from Python with jax.ffi.register_ffi_target):
//   ResetJaxNvfp4W4A16(x, codes, scales, global_scale) -> y
//   ResetJaxNvfp4AddNormW4A16(x, h, norm_weight, codes, scales, global_scale; eps)
//       -> (y = GEMV(rmsnorm(x + h)), r = x + h, xn scratch [M, K] bf16)
//   ResetJaxNvfp4W4A4(x, codes, scales, global_scale, input_scale; per_row_scale)
//       -> (y, xhat scratch [M, K] bf16, gx scratch [M] f32)
// Shapes: x [M, K] bf16 (M <= 16), codes [N, K/2] u8, scales [N, K/16] f8e4m3fn,
// global_scale / input_scale f32 scalars, y [M, N] bf16; every handler also takes the int32
// attribute codes_order (nvfp4::GemvArgs::codes_order: 0 natural, 1 MMA word order).  No synchronisation, no
// allocation (scratch comes from XLA as extra results), so every handler is
// command-buffer (CUDA graph) compatible.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "nvfp4_kernels.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reset_jax_ffi::Dims;

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("reset_jax NVFP4 matmul: " + msg);
}

ffi::Error CudaError(cudaError_t err, const char* what) {
  return reset_jax_ffi::CudaFailure(std::string("reset_jax NVFP4 matmul: ") + what, err);
}

bool IsScalarF32(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::F32 && b.element_count() == 1;
}

// Checks the operands shared by both modes and fills `a` (pointers and sizes).
ffi::Error CheckCommon(const ffi::AnyBuffer& x, const ffi::AnyBuffer& codes,
                       const ffi::AnyBuffer& scales, const ffi::AnyBuffer& gscale,
                       const ffi::AnyBuffer& y, nvfp4::GemvArgs& a) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  const auto sd = scales.dimensions();
  const auto yd = y.dimensions();
  if (x.element_type() != ffi::DataType::BF16)
    return Invalid("x must be bfloat16");
  if (codes.element_type() != ffi::DataType::U8) return Invalid("codes must be uint8");
  if (scales.element_type() != ffi::DataType::F8E4M3FN)
    return Invalid("scales must be float8_e4m3fn");
  if (!IsScalarF32(gscale)) return Invalid("global_scale must be a float32 scalar");
  if (y.element_type() != ffi::DataType::BF16) return Invalid("y must be bfloat16");
  if (xd.size() != 2) return Invalid("x must have rank 2 [M, K], got " + Dims(xd));
  if (cd.size() != 2) return Invalid("codes must have rank 2 [N, K/2], got " + Dims(cd));
  if (sd.size() != 2) return Invalid("scales must have rank 2 [N, K/16], got " + Dims(sd));
  if (yd.size() != 2) return Invalid("y must have rank 2 [M, N], got " + Dims(yd));
  const int64_t M = xd[0], K = xd[1], N = cd[0];
  if (M < 1 || M > nvfp4::kMaxM)
    return Invalid("M = " + std::to_string(M) + " rows; this kernel serves 1..16");
  if (K < 16 || K % 16 != 0)
    return Invalid("K = " + std::to_string(K) + " must be a positive multiple of 16");
  if (N < 1) return Invalid("N must be >= 1");
  if (cd[1] * 2 != K)
    return Invalid("codes " + Dims(cd) + " do not match x " + Dims(xd) + " (need [N, K/2])");
  if (sd[0] != N || sd[1] * 16 != K)
    return Invalid("scales " + Dims(sd) + " do not match codes " + Dims(cd) + " (need [N, K/16])");
  if (yd[0] != M || yd[1] != N)
    return Invalid("y " + Dims(yd) + " must be [M, N] = [" + std::to_string(M) + ", " +
                   std::to_string(N) + "]");
  a.x = x.untyped_data();
  a.codes = static_cast<const uint8_t*>(codes.untyped_data());
  a.scales = static_cast<const uint8_t*>(scales.untyped_data());
  a.wscale = static_cast<const float*>(gscale.untyped_data());
  a.y = y.untyped_data();
  a.M = M;
  a.N = N;
  a.K = K;
  if (const char* why = nvfp4::GemvUnsupportedReason(a)) return Invalid(why);
  return ffi::Error::Success();
}

ffi::Error W4A16Impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer codes,
                     ffi::AnyBuffer scales, ffi::AnyBuffer gscale,
                     ffi::Result<ffi::AnyBuffer> y, int32_t codes_order) {
  nvfp4::GemvArgs a;
  a.codes_order = codes_order;
  if (ffi::Error e = CheckCommon(x, codes, scales, gscale, *y, a); e.failure()) return e;
  if (cudaError_t err = nvfp4::LaunchGemv(a, stream); err != cudaSuccess)
    return CudaError(err, "GEMV launch");
  return ffi::Error::Success();
}

ffi::Error W4A4Impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer codes,
                    ffi::AnyBuffer scales, ffi::AnyBuffer gscale, ffi::AnyBuffer input_scale,
                    ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> xhat,
                    ffi::Result<ffi::AnyBuffer> gx, bool per_row_scale, int32_t codes_order) {
  nvfp4::GemvArgs a;
  a.codes_order = codes_order;
  if (ffi::Error e = CheckCommon(x, codes, scales, gscale, *y, a); e.failure()) return e;
  if (!IsScalarF32(input_scale)) return Invalid("input_scale must be a float32 scalar");
  if (xhat->element_type() != ffi::DataType::BF16 ||
      xhat->element_count() != static_cast<size_t>(a.M * a.K))
    return Invalid("xhat scratch must be bfloat16 [M, K]");
  if (gx->element_type() != ffi::DataType::F32 ||
      gx->element_count() != static_cast<size_t>(a.M))
    return Invalid("gx scratch must be float32 [M]");
  if (cudaError_t err = nvfp4::LaunchQuantizeActivations(
          a.x, static_cast<const float*>(input_scale.untyped_data()), per_row_scale,
          xhat->untyped_data(), static_cast<float*>(gx->untyped_data()), a.M, a.K, stream);
      err != cudaSuccess)
    return CudaError(err, "activation quantizer launch");
  a.x = xhat->untyped_data();
  a.xscale = static_cast<const float*>(gx->untyped_data());
  a.xscale_per_row = true;
  if (const char* why = nvfp4::GemvUnsupportedReason(a)) return Invalid(why);
  if (cudaError_t err = nvfp4::LaunchGemv(a, stream); err != cudaSuccess)
    return CudaError(err, "GEMV launch");
  return ffi::Error::Success();
}

// y = GEMV(rmsnorm(x + h) * w); r = x + h (the new residual stream); xn scratch.
ffi::Error AddNormW4A16Impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h,
                            ffi::AnyBuffer w, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                            ffi::AnyBuffer gscale, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::AnyBuffer> r, ffi::Result<ffi::AnyBuffer> xn,
                            float eps, int32_t codes_order) {
  nvfp4::GemvArgs a;
  a.codes_order = codes_order;
  if (ffi::Error e = CheckCommon(x, codes, scales, gscale, *y, a); e.failure()) return e;
  const auto bf16_mk = [&](const ffi::AnyBuffer& b) {
    return b.element_type() == ffi::DataType::BF16 &&
           b.element_count() == static_cast<size_t>(a.M * a.K);
  };
  if (!bf16_mk(h))
    return Invalid("h (the residual delta) must be bfloat16 shaped like x " + Dims(x.dimensions()));
  if (w.element_type() != ffi::DataType::BF16 || w.element_count() != static_cast<size_t>(a.K))
    return Invalid("the norm weight must be bfloat16 [K] = [" + std::to_string(a.K) + "]");
  if (!bf16_mk(*r) || !bf16_mk(*xn)) return Invalid("r and xn results must be bfloat16 [M, K]");
  if (!(eps >= 0.f)) return Invalid("eps must be >= 0");
  if (cudaError_t err = nvfp4::LaunchGemvAddNorm(a, h.untyped_data(), w.untyped_data(), eps,
                                                 r->untyped_data(), xn->untyped_data(), stream);
      err != cudaSuccess)
    return CudaError(err, "residual add + RMSNorm + GEMV launch");
  return ffi::Error::Success();
}

}  // namespace

// The library is built with hidden visibility; export the handlers.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxNvfp4W4A16(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxNvfp4W4A4(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxNvfp4AddNormW4A16(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxNvfp4W4A16, W4A16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // codes
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // global_scale
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int32_t>("codes_order"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxNvfp4W4A4, W4A4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // codes
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // global_scale
                                  .Arg<ffi::AnyBuffer>()  // input_scale
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // xhat scratch
                                  .Ret<ffi::AnyBuffer>()  // gx scratch
                                  .Attr<bool>("per_row_scale")
                                  .Attr<int32_t>("codes_order"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxNvfp4AddNormW4A16, AddNormW4A16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // h
                                  .Arg<ffi::AnyBuffer>()  // norm weight
                                  .Arg<ffi::AnyBuffer>()  // codes
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // global_scale
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // r = x + h
                                  .Ret<ffi::AnyBuffer>()  // xn scratch
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("codes_order"),
                              {ffi::Traits::kCmdBufferCompatible});
