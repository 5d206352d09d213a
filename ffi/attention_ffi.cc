// XLA FFI handler for decode attention (see reset_jax/attention.py and attention_kernels.h).
//
// Exported symbol (registered from Python with jax.ffi.register_ffi_target):
//   ResetJaxDecodeAttention(qkv, q_norm, k_norm, cos, sin, positions, layer,
//                           k_cache, v_cache; scale, eps, qk_norm)
//       -> (out, k_cache', v_cache', partial scratch)
// Shapes: qkv [B, (Hq + 2 Hkv) D] (the packed q/k/v projections: one operand, so XLA
// never wraps slices of the projection into a dynamic-slice fusion that its command
// buffers leave out), q_norm / k_norm [D] (read only when qk_norm),
// all bf16; cos / sin [B, D/2] f32; positions [B] s32; layer s32 scalar; caches
// [L, B, T, Hkv, D] bf16, aliased to results 1 and 2 (written in place: one slot per row);
// out [B, Hq, D] bf16; partial f32 [B, Hkv, C, G, D + 2], C = ceil(T / 64), G = Hq / Hkv.
// No synchronisation, no allocation: command-buffer (CUDA graph) compatible (yet XLA
// currently runs this call outside its graphs: benchmarks/KERNEL_NOTES.md).
#include <cstdint>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "attention_kernels.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reset_jax_ffi::Dims;
using reset_jax_ffi::Shaped;

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("reset_jax decode attention: " + msg);
}

ffi::Error DecodeAttentionImpl(cudaStream_t stream, ffi::AnyBuffer qkv,
                               ffi::AnyBuffer q_norm, ffi::AnyBuffer k_norm,
                               ffi::AnyBuffer cos, ffi::AnyBuffer sin, ffi::AnyBuffer positions,
                               ffi::AnyBuffer layer, ffi::AnyBuffer k_cache,
                               ffi::AnyBuffer v_cache, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::AnyBuffer> k_cache_out,
                               ffi::Result<ffi::AnyBuffer> v_cache_out,
                               ffi::Result<ffi::AnyBuffer> partial, float scale, float eps,
                               bool qk_norm) {
  using T = ffi::DataType;
  const auto qd = qkv.dimensions(), cd = k_cache.dimensions();
  if (qd.size() != 2) return Invalid("qkv must be [B, (Hq + 2 Hkv) D], got " + Dims(qd));
  if (cd.size() != 5) return Invalid("k_cache must be [L, B, T, Hkv, D], got " + Dims(cd));
  const int64_t B = qd[0], W = qd[1];
  const int64_t L = cd[0], S = cd[2], Hkv = cd[3], D = cd[4];
  if (cd[1] != B) return Invalid("k_cache " + Dims(cd) + " does not match qkv " + Dims(qd));
  if (D < 2 || Hkv < 1 || W % D != 0 || W / D <= 2 * Hkv)
    return Invalid("qkv " + Dims(qd) + " is not [B, (Hq + 2 Hkv) D] for Hkv, D of k_cache " +
                   Dims(cd));
  const int64_t Hq = W / D - 2 * Hkv;
  if (!Shaped(qkv, T::BF16, {B, W})) return Invalid("qkv must be bfloat16");
  if (!Shaped(k_cache, T::BF16, {L, B, S, Hkv, D}))
    return Invalid("k_cache must be bfloat16");
  if (!Shaped(v_cache, T::BF16, {L, B, S, Hkv, D}))
    return Invalid("v_cache " + Dims(v_cache.dimensions()) + " must match k_cache " + Dims(cd));
  if (qk_norm && (!Shaped(q_norm, T::BF16, {D}) || !Shaped(k_norm, T::BF16, {D})))
    return Invalid("q_norm and k_norm must be bfloat16 [D]");
  if (!Shaped(cos, T::F32, {B, D / 2}) || !Shaped(sin, T::F32, {B, D / 2}))
    return Invalid("cos and sin must be float32 [B, D/2]");
  if (!Shaped(positions, T::S32, {B})) return Invalid("positions must be int32 [B]");
  if (layer.element_type() != T::S32 || layer.element_count() != 1)
    return Invalid("layer must be an int32 scalar");
  if (!Shaped(*out, T::BF16, {B, Hq, D})) return Invalid("out must be bfloat16 [B, Hq, D]");
  if (!Shaped(*k_cache_out, T::BF16, {L, B, S, Hkv, D}) ||
      !Shaped(*v_cache_out, T::BF16, {L, B, S, Hkv, D}))
    return Invalid("the cache results must match the caches");
  if (Hkv < 1 || Hq % Hkv != 0)
    return Invalid("Hq = " + std::to_string(Hq) + " is not a multiple of Hkv = " +
                   std::to_string(Hkv));
  if (B > INT32_MAX || S > INT32_MAX || L > INT32_MAX || W > INT32_MAX)
    return Invalid("shape too large for 32-bit indexing");

  rjattn::DecodeAttentionArgs a;
  const auto* base = static_cast<const uint16_t*>(qkv.untyped_data());  // bf16 elements
  a.q = base;
  a.k = base + Hq * D;
  a.v = base + (Hq + Hkv) * D;
  a.qkv_stride = int(W);
  a.q_norm = qk_norm ? q_norm.untyped_data() : nullptr;
  a.k_norm = qk_norm ? k_norm.untyped_data() : nullptr;
  a.cos = static_cast<const float*>(cos.untyped_data());
  a.sin = static_cast<const float*>(sin.untyped_data());
  a.positions = static_cast<const int32_t*>(positions.untyped_data());
  a.layer = static_cast<const int32_t*>(layer.untyped_data());
  a.k_cache = k_cache_out->untyped_data();
  a.v_cache = v_cache_out->untyped_data();
  a.out = out->untyped_data();
  a.partial = static_cast<float*>(partial->untyped_data());
  a.B = int(B), a.Hq = int(Hq), a.Hkv = int(Hkv), a.D = int(D), a.L = int(L), a.T = int(S);
  a.scale = scale;
  a.eps = eps;
  if (const char* why = rjattn::DecodeAttentionUnsupportedReason(a)) return Invalid(why);
  const size_t want_partial =
      size_t(B) * Hkv * rjattn::NumChunks(a.T) * (Hq / Hkv) * (D + 2);
  if (partial->element_type() != T::F32 || partial->element_count() != want_partial)
    return Invalid("partial scratch must be float32 with " + std::to_string(want_partial) +
                   " elements");
  if (cudaError_t err = reset_jax_ffi::CopyUnaliasedCaches(
          k_cache, v_cache, k_cache_out->untyped_data(), v_cache_out->untyped_data(), stream);
      err != cudaSuccess)
    return ffi::Error::Internal(std::string("reset_jax decode attention: cache copy: ") +
                                cudaGetErrorString(err));
  if (cudaError_t err = rjattn::LaunchDecodeAttention(a, stream); err != cudaSuccess)
    return reset_jax_ffi::CudaFailure("reset_jax decode attention: launch", err);
  return ffi::Error::Success();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxDecodeAttention(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // qkv
                                  .Arg<ffi::AnyBuffer>()  // q_norm
                                  .Arg<ffi::AnyBuffer>()  // k_norm
                                  .Arg<ffi::AnyBuffer>()  // cos
                                  .Arg<ffi::AnyBuffer>()  // sin
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Arg<ffi::AnyBuffer>()  // layer
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // k_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()  // v_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()  // partial scratch
                                  .Attr<float>("scale")
                                  .Attr<float>("eps")
                                  .Attr<bool>("qk_norm"),
                              {ffi::Traits::kCmdBufferCompatible});
