// XLA FFI handlers for the sampler's exact top-k and full row sort (see reset_jax/sampling.py,
// topk_kernels.h and sort_kernels.h).
//
// Exported symbols (registered from Python with jax.ffi.register_ffi_target):
//   ResetJaxTopK(z; k) -> (vals, idx, exact, scratch)
// Shapes: z [B, V] f32; vals [B, k] f32 and idx [B, k] s32, lax.top_k(z, k) for every row whose
// exact [B] s32 is 1 (0: the row holds a NaN, or its values tie too widely; the caller falls
// back); scratch u32 [rjtopk::TopkScratchWords(B, V, k)], contents undefined on entry and exit.
//   ResetJaxTopKScaled(x, t; k) -> (vals, idx, exact, log_norm, scratch)
// The same for z = x / t[:, None] (x [B, V] f32, t [B] f32), computed in the kernels, never
// written out; also log_norm [B] f32 = jax.nn.logsumexp(z, axis=-1) (exp summed in f32 a lane,
// then in f64 across lanes and CTAs).
//   ResetJaxTopKScaledCounts(x, t, counts; k) -> (vals, idx, exact, log_norm, scratch)
// The same with counts [B] s32: row b's first counts[b] (clamped to [1, k]) results as above, the
// rest -inf with index 0; exact says whether those first counts[b] are lax.top_k's.
//   ResetJaxSortRows(z) -> (vals, idx, scratch)
// Shapes: z [B, V] f32; vals [B, V] f32 and idx [B, V] s32, every row sorted descending (ties
// in index order, NaNs last); scratch u8 [rjsort::SortScratchBytes(B, V)].
// No synchronisation, no allocation: command-buffer (CUDA graph) compatible.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "ffi_common.h"
#include "sort_kernels.h"
#include "topk_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reset_jax_ffi::Dims;
using reset_jax_ffi::Shaped;

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("reset_jax top-k: " + msg);
}

ffi::Error InvalidSort(const std::string& msg) {
  return ffi::Error::InvalidArgument("reset_jax sort: " + msg);
}

// The shared checks and launch of the top-k handlers; `scale`, `counts` and `log_norm` may be
// null.
ffi::Error LaunchTopK(cudaStream_t stream, const ffi::AnyBuffer& z, const ffi::AnyBuffer* scale,
                      const ffi::AnyBuffer* counts, ffi::AnyBuffer& vals, ffi::AnyBuffer& idx,
                      ffi::AnyBuffer& exact, ffi::AnyBuffer* log_norm, ffi::AnyBuffer& scratch,
                      int64_t k) {
  using T = ffi::DataType;
  const auto zd = z.dimensions();
  if (zd.size() != 2 || z.element_type() != T::F32)
    return Invalid("z must be float32 [B, V], got " + Dims(zd));
  const int64_t B = zd[0], V = zd[1];
  if (B > INT32_MAX || V > INT32_MAX || k > INT32_MAX || k < 0)
    return Invalid("shape too large for 32-bit indexing");
  rjtopk::TopkArgs a;
  a.B = int(B), a.V = int(V), a.C = int(k);
  if (!Shaped(vals, T::F32, {B, k})) return Invalid("vals must be float32 [B, k]");
  if (!Shaped(idx, T::S32, {B, k})) return Invalid("idx must be int32 [B, k]");
  if (!Shaped(exact, T::S32, {B})) return Invalid("exact must be int32 [B]");
  if (scale != nullptr && !Shaped(*scale, T::F32, {B})) return Invalid("t must be float32 [B]");
  if (counts != nullptr && !Shaped(*counts, T::S32, {B}))
    return Invalid("counts must be int32 [B]");
  if (log_norm != nullptr && !Shaped(*log_norm, T::F32, {B}))
    return Invalid("log_norm must be float32 [B]");
  a.z = static_cast<const float*>(z.untyped_data());
  a.scale = scale != nullptr ? static_cast<const float*>(scale->untyped_data()) : nullptr;
  a.counts = counts != nullptr ? static_cast<const int32_t*>(counts->untyped_data()) : nullptr;
  a.vals = static_cast<float*>(vals.untyped_data());
  a.idx = static_cast<int32_t*>(idx.untyped_data());
  a.exact = static_cast<int32_t*>(exact.untyped_data());
  a.log_norm = log_norm != nullptr ? static_cast<float*>(log_norm->untyped_data()) : nullptr;
  a.scratch = static_cast<uint32_t*>(scratch.untyped_data());
  a.pdl = rjtopk::TopkPdlDefault();
  if (const char* why = rjtopk::TopkUnsupportedReason(a)) return Invalid(why);
  const size_t want = rjtopk::TopkScratchWords(a.B, a.V, a.C);
  if (scratch.element_type() != T::U32 || scratch.element_count() != want)
    return Invalid("scratch must be uint32 with " + std::to_string(want) + " elements");
  if (cudaError_t err = rjtopk::LaunchTopk(a, stream); err != cudaSuccess)
    return reset_jax_ffi::CudaFailure("reset_jax top-k: launch", err);
  return ffi::Error::Success();
}

ffi::Error TopKImpl(cudaStream_t stream, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> vals,
                    ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> exact,
                    ffi::Result<ffi::AnyBuffer> scratch, int64_t k) {
  return LaunchTopK(stream, z, nullptr, nullptr, *vals, *idx, *exact, nullptr, *scratch, k);
}

ffi::Error TopKScaledImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer t,
                          ffi::Result<ffi::AnyBuffer> vals, ffi::Result<ffi::AnyBuffer> idx,
                          ffi::Result<ffi::AnyBuffer> exact, ffi::Result<ffi::AnyBuffer> log_norm,
                          ffi::Result<ffi::AnyBuffer> scratch, int64_t k) {
  return LaunchTopK(stream, x, &t, nullptr, *vals, *idx, *exact, &*log_norm, *scratch, k);
}

ffi::Error TopKScaledCountsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer t,
                                ffi::AnyBuffer counts, ffi::Result<ffi::AnyBuffer> vals,
                                ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> exact,
                                ffi::Result<ffi::AnyBuffer> log_norm,
                                ffi::Result<ffi::AnyBuffer> scratch, int64_t k) {
  return LaunchTopK(stream, x, &t, &counts, *vals, *idx, *exact, &*log_norm, *scratch, k);
}

ffi::Error SortRowsImpl(cudaStream_t stream, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> vals,
                        ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> scratch) {
  using T = ffi::DataType;
  const auto zd = z.dimensions();
  if (zd.size() != 2 || z.element_type() != T::F32)
    return InvalidSort("z must be float32 [B, V], got " + Dims(zd));
  const int64_t B = zd[0], V = zd[1];
  if (B < 1 || V < 1 || B * V > INT32_MAX)
    return InvalidSort("z " + Dims(zd) + ": expected 1 to 2^31 - 1 elements");
  if (!Shaped(*vals, T::F32, {B, V})) return InvalidSort("vals must be float32 [B, V]");
  if (!Shaped(*idx, T::S32, {B, V})) return InvalidSort("idx must be int32 [B, V]");
  rjsort::SortArgs a;
  a.B = int(B), a.V = int(V);
  a.z = static_cast<const float*>(z.untyped_data());
  a.vals = static_cast<float*>(vals->untyped_data());
  a.idx = static_cast<int32_t*>(idx->untyped_data());
  a.scratch = scratch->untyped_data();
  a.scratch_bytes = scratch->size_bytes();
  if (const char* why = rjsort::SortUnsupportedReason(a)) return InvalidSort(why);
  const size_t want = rjsort::SortScratchBytes(a.B, a.V);
  if (want == 0) return InvalidSort("cub's scratch size query failed");
  if (scratch->element_type() != T::U8 || scratch->size_bytes() != want)
    return InvalidSort("scratch must be uint8 with " + std::to_string(want) + " elements");
  if (cudaError_t err = rjsort::LaunchSortRows(a, stream); err != cudaSuccess)
    return reset_jax_ffi::CudaFailure("reset_jax sort: launch", err);
  return ffi::Error::Success();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxTopK(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // z
                                  .Ret<ffi::AnyBuffer>()  // vals
                                  .Ret<ffi::AnyBuffer>()  // idx
                                  .Ret<ffi::AnyBuffer>()  // exact
                                  .Ret<ffi::AnyBuffer>()  // scratch
                                  .Attr<int64_t>("k"),
                              {ffi::Traits::kCmdBufferCompatible});

// The scratch result's element count for z [B, V] and k (for reset_jax/sampling.py, through
// ctypes: the one definition of the layout).
extern "C" __attribute__((visibility("default"))) size_t ResetJaxTopKScratchWords(int B, int V,
                                                                                  int k) {
  return rjtopk::TopkScratchWords(B, V, k);
}

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxTopKScaled(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxTopKScaled, TopKScaledImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // t
                                  .Ret<ffi::AnyBuffer>()  // vals
                                  .Ret<ffi::AnyBuffer>()  // idx
                                  .Ret<ffi::AnyBuffer>()  // exact
                                  .Ret<ffi::AnyBuffer>()  // log_norm
                                  .Ret<ffi::AnyBuffer>()  // scratch
                                  .Attr<int64_t>("k"),
                              {ffi::Traits::kCmdBufferCompatible});

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxTopKScaledCounts(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxTopKScaledCounts, TopKScaledCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // t
                                  .Arg<ffi::AnyBuffer>()  // counts
                                  .Ret<ffi::AnyBuffer>()  // vals
                                  .Ret<ffi::AnyBuffer>()  // idx
                                  .Ret<ffi::AnyBuffer>()  // exact
                                  .Ret<ffi::AnyBuffer>()  // log_norm
                                  .Ret<ffi::AnyBuffer>()  // scratch
                                  .Attr<int64_t>("k"),
                              {ffi::Traits::kCmdBufferCompatible});

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxSortRows(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxSortRows, SortRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // z
                                  .Ret<ffi::AnyBuffer>()  // vals
                                  .Ret<ffi::AnyBuffer>()  // idx
                                  .Ret<ffi::AnyBuffer>(),  // scratch
                              {ffi::Traits::kCmdBufferCompatible});

// The sort's scratch bytes for z [B, V], or 0 where the shape cannot be served or cub's size query
// failed (for reset_jax/sampling.py, through ctypes). Touches the current CUDA device.
extern "C" __attribute__((visibility("default"))) size_t ResetJaxSortScratchBytes(int B, int V) {
  return rjsort::SortScratchBytes(B, V);
}
