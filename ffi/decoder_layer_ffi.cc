// XLA FFI handler for decode steps of consecutive decoder layers in one custom call (see
// decoder_layer.h and reset_jax/decoder_layers.py).
//
// Exported symbol (registered from Python with jax.ffi.register_ffi_target):
//   ResetJaxDecoderLayers(x, h, cos, sin, positions, layers, k_cache, v_cache,
//                         then per layer: ln1, qkv codes/scales/global, q_norm, k_norm,
//                         o codes/scales/global, ln2, gate_up codes/scales/global,
//                         down codes/scales/global;
//                         eps, attn_eps, scale, qk_norm, pdl, pdl_edges, pdl_across,
//                         gate_up_interleaved, codes_order)
//       -> (x_out, h_out, k_cache', v_cache', scratch)
// Shapes: x, h, x_out, h_out [M, D] bf16 (h: the previous layer's MLP output, not yet
// added to x; zeros before the first layer); cos / sin [M, Dh/2] f32; positions [M] s32;
// layers [n] s32 (each layer's index into the stacked caches); caches [L, M, T, Hkv, Dh]
// bf16, aliased to results 2 and 3; ln1 / ln2 [D] bf16; q_norm / k_norm [Dh] bf16 (read
// only when qk_norm); NVFP4 weights as in nvfp4_ffi.cc: qkv [(Hq + 2 Hkv) Dh, D], o
// [D, Hq Dh], gate_up [2F, D] (gate rows then up rows, or with `gate_up_interleaved` in
// alternating groups of 8: DecoderLayerArgs::gate_up_interleaved), down [D, F], every
// weight's code words in codes_order (nvfp4::GemvArgs::codes_order); scratch
// u8 of ResetJaxDecoderLayersScratch bytes.  The layers' kernels run back to back on the stream; with `pdl`, on sm_90+,
// kernels are launched as programmatic dependents (decoder_layer.h), and with
// `pdl_across` also each layer's first kernel after the previous layer's last.
// No synchronisation, no allocation: command-buffer (CUDA graph) compatible.
#include <cstdint>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "decoder_layer.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reset_jax_ffi::Dims;
using reset_jax_ffi::Shaped;
using T = ffi::DataType;

constexpr int kPerLayer = 16;  // operands per layer

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("reset_jax decoder layers: " + msg);
}

// The scratch: four [M, D] buffers (the activations between layers), then one layer's.
size_t ScratchBytes(int64_t M, int64_t D, int64_t F, int64_t Hq, int64_t Hkv, int64_t Dh,
                    int64_t S) {
  return 4 * rjlayer::ScratchRoundUp(size_t(M) * D * 2) + rjlayer::DecoderLayerScratchBytes(M, D, F, Hq, Hkv, Dh, S);
}

// Checks one layer's NVFP4 weight [N, K] (operands i, i+1, i+2) and returns it.
ffi::Error GetWeight(const ffi::RemainingArgs& rest, size_t i, int64_t N, int64_t K,
                     const char* name, int layer, rjlayer::Weight& w) {
  auto c = rest.get<ffi::AnyBuffer>(i), s = rest.get<ffi::AnyBuffer>(i + 1),
       g = rest.get<ffi::AnyBuffer>(i + 2);
  if (c.has_error() || s.has_error() || g.has_error())
    return Invalid(std::string("missing ") + name + " operands");
  const std::string where = std::string(name) + " of layer " + std::to_string(layer);
  if (!Shaped(c.value(), T::U8, {N, K / 2}))
    return Invalid(where + ": codes " + Dims(c.value().dimensions()) + " must be uint8 [" +
                   std::to_string(N) + ", " + std::to_string(K / 2) + "]");
  if (!Shaped(s.value(), T::F8E4M3FN, {N, K / 16}))
    return Invalid(where + ": scales " + Dims(s.value().dimensions()) +
                   " must be float8_e4m3fn [" + std::to_string(N) + ", " +
                   std::to_string(K / 16) + "]");
  if (g.value().element_type() != T::F32 || g.value().element_count() != 1)
    return Invalid(where + ": the global scale must be a float32 scalar");
  w.codes = static_cast<const uint8_t*>(c.value().untyped_data());
  w.scales = static_cast<const uint8_t*>(s.value().untyped_data());
  w.gscale = static_cast<const float*>(g.value().untyped_data());
  return ffi::Error::Success();
}

ffi::Error DecoderLayersImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h,
                             ffi::AnyBuffer cos, ffi::AnyBuffer sin, ffi::AnyBuffer positions,
                             ffi::AnyBuffer layers, ffi::AnyBuffer k_cache,
                             ffi::AnyBuffer v_cache, ffi::RemainingArgs rest,
                             ffi::Result<ffi::AnyBuffer> x_out, ffi::Result<ffi::AnyBuffer> h_out,
                             ffi::Result<ffi::AnyBuffer> k_cache_out,
                             ffi::Result<ffi::AnyBuffer> v_cache_out,
                             ffi::Result<ffi::AnyBuffer> scratch, float eps, float attn_eps,
                             float scale, bool qk_norm, bool pdl, int32_t pdl_edges,
                             bool pdl_across, bool gate_up_interleaved, int32_t codes_order) {
  const auto xd = x.dimensions(), cd = k_cache.dimensions();
  if (xd.size() != 2) return Invalid("x must be [M, D], got " + Dims(xd));
  if (cd.size() != 5) return Invalid("k_cache must be [L, M, T, Hkv, Dh], got " + Dims(cd));
  const int64_t M = xd[0], D = xd[1];
  const int64_t L = cd[0], S = cd[2], Hkv = cd[3], Dh = cd[4];
  if (!Shaped(x, T::BF16, {M, D}) || !Shaped(h, T::BF16, {M, D}))
    return Invalid("x and h must be bfloat16 [M, D]");
  if (cd[1] != M) return Invalid("k_cache " + Dims(cd) + " does not hold M = " + std::to_string(M) + " rows");
  if (!Shaped(k_cache, T::BF16, {L, M, S, Hkv, Dh}) || !Shaped(v_cache, T::BF16, {L, M, S, Hkv, Dh}))
    return Invalid("k_cache and v_cache must be bfloat16 of one shape");
  if (!Shaped(cos, T::F32, {M, Dh / 2}) || !Shaped(sin, T::F32, {M, Dh / 2}))
    return Invalid("cos and sin must be float32 [M, Dh/2]");
  if (!Shaped(positions, T::S32, {M})) return Invalid("positions must be int32 [M]");
  if (layers.element_type() != T::S32 || layers.dimensions().size() != 1)
    return Invalid("layers must be int32 [n]");
  const int64_t n = layers.dimensions()[0];
  if (n < 1) return Invalid("no layers");
  if (rest.size() != size_t(n) * kPerLayer)
    return Invalid(std::to_string(rest.size()) + " weight operands for " + std::to_string(n) +
                   " layers (need " + std::to_string(kPerLayer) + " per layer)");
  // Widths from the first layer's weights: qkv [(Hq + 2 Hkv) Dh, D], gate_up [2F, D].
  auto qkv0 = rest.get<ffi::AnyBuffer>(1), gu0 = rest.get<ffi::AnyBuffer>(10);  // codes
  if (qkv0.has_error() || gu0.has_error()) return Invalid("missing weight operands");
  const auto qd = qkv0.value().dimensions(), gd = gu0.value().dimensions();
  if (qd.size() != 2 || gd.size() != 2 || Dh < 1 || qd[0] % Dh != 0 || gd[0] % 2 != 0)
    return Invalid("qkv codes " + Dims(qd) + " / gate_up codes " + Dims(gd) +
                   " are not [(Hq + 2 Hkv) Dh, D/2] / [2F, D/2]");
  const int64_t Hq = qd[0] / Dh - 2 * Hkv, F = gd[0] / 2;
  if (Hq < 1) return Invalid("qkv codes " + Dims(qd) + " leave no query heads");
  if (!Shaped(*x_out, T::BF16, {M, D}) || !Shaped(*h_out, T::BF16, {M, D}))
    return Invalid("x_out and h_out must be bfloat16 [M, D]");
  if (!Shaped(*k_cache_out, T::BF16, {L, M, S, Hkv, Dh}) ||
      !Shaped(*v_cache_out, T::BF16, {L, M, S, Hkv, Dh}))
    return Invalid("the cache results must match the caches");
  const size_t need = ScratchBytes(M, D, F, Hq, Hkv, Dh, S);
  if (scratch->element_type() != T::U8 || scratch->size_bytes() < need)
    return Invalid("scratch must be uint8 with at least " + std::to_string(need) + " bytes");
  if (M > INT32_MAX || S > INT32_MAX || L > INT32_MAX) return Invalid("shape too large");

  if (cudaError_t err = reset_jax_ffi::CopyUnaliasedCaches(
          k_cache, v_cache, k_cache_out->untyped_data(), v_cache_out->untyped_data(), stream);
      err != cudaSuccess)
    return ffi::Error::Internal(std::string("reset_jax decoder layers: cache copy: ") +
                                cudaGetErrorString(err));
  char* s = static_cast<char*>(scratch->untyped_data());
  const size_t act = rjlayer::ScratchRoundUp(size_t(M) * D * 2);
  void* ping[2][2] = {{s, s + act}, {s + 2 * act, s + 3 * act}};  // [buffer][x or h]
  const int32_t* layer_ids = static_cast<const int32_t*>(layers.untyped_data());
  for (int64_t i = 0; i < n; ++i) {
    const size_t o = size_t(i) * kPerLayer;
    rjlayer::DecoderLayerArgs a;
    auto ln1 = rest.get<ffi::AnyBuffer>(o + 0), qn = rest.get<ffi::AnyBuffer>(o + 4),
         kn = rest.get<ffi::AnyBuffer>(o + 5), ln2 = rest.get<ffi::AnyBuffer>(o + 9);
    if (ln1.has_error() || qn.has_error() || kn.has_error() || ln2.has_error())
      return Invalid("missing norm operands");
    const std::string where = " of layer " + std::to_string(i);
    if (!Shaped(ln1.value(), T::BF16, {D}) || !Shaped(ln2.value(), T::BF16, {D}))
      return Invalid("the norm weights" + where + " must be bfloat16 [D]");
    if (qk_norm && (!Shaped(qn.value(), T::BF16, {Dh}) || !Shaped(kn.value(), T::BF16, {Dh})))
      return Invalid("q_norm and k_norm" + where + " must be bfloat16 [Dh]");
    if (ffi::Error e = GetWeight(rest, o + 1, (Hq + 2 * Hkv) * Dh, D, "qkv", int(i), a.qkv); e.failure()) return e;
    if (ffi::Error e = GetWeight(rest, o + 6, D, Hq * Dh, "o_proj", int(i), a.o); e.failure()) return e;
    if (ffi::Error e = GetWeight(rest, o + 10, 2 * F, D, "gate_up", int(i), a.gate_up); e.failure()) return e;
    if (ffi::Error e = GetWeight(rest, o + 13, D, F, "down_proj", int(i), a.down); e.failure()) return e;
    a.x = i == 0 ? x.untyped_data() : ping[i % 2][0];
    a.h = i == 0 ? h.untyped_data() : ping[i % 2][1];
    a.x_out = i == n - 1 ? x_out->untyped_data() : ping[(i + 1) % 2][0];
    a.h_out = i == n - 1 ? h_out->untyped_data() : ping[(i + 1) % 2][1];
    a.ln1 = ln1.value().untyped_data();
    a.ln2 = ln2.value().untyped_data();
    a.eps = eps;
    rjattn::DecodeAttentionArgs& t = a.attn;
    t.q_norm = qk_norm ? qn.value().untyped_data() : nullptr;
    t.k_norm = qk_norm ? kn.value().untyped_data() : nullptr;
    t.cos = static_cast<const float*>(cos.untyped_data());
    t.sin = static_cast<const float*>(sin.untyped_data());
    t.positions = static_cast<const int32_t*>(positions.untyped_data());
    t.layer = layer_ids + i;
    t.k_cache = k_cache_out->untyped_data();
    t.v_cache = v_cache_out->untyped_data();
    t.B = int(M), t.Hq = int(Hq), t.Hkv = int(Hkv), t.D = int(Dh), t.L = int(L), t.T = int(S);
    t.scale = scale;
    t.eps = attn_eps;
    a.M = M;
    a.D = D;
    a.F = F;
    a.scratch = s + 4 * act;
    a.scratch_bytes = need - 4 * act;
    a.pdl = pdl;
    a.pdl_edges = pdl_edges;
    a.pdl_first = pdl && pdl_across && i > 0;
    a.gate_up_interleaved = gate_up_interleaved;
    a.qkv.codes_order = a.o.codes_order = a.gate_up.codes_order = a.down.codes_order = codes_order;
    if (const char* why = rjlayer::DecoderLayerUnsupportedReason(a)) return Invalid(why + where);
    if (cudaError_t err = rjlayer::LaunchDecoderLayer(a, stream); err != cudaSuccess)
      return reset_jax_ffi::CudaFailure("reset_jax decoder layers: launch" + where, err);
  }
  return ffi::Error::Success();
}

}  // namespace

// Bytes of scratch ResetJaxDecoderLayers needs (called from Python through ctypes).
extern "C" __attribute__((visibility("default"))) int64_t ResetJaxDecoderLayersScratch(
    int64_t M, int64_t D, int64_t F, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t T) {
  return static_cast<int64_t>(ScratchBytes(M, D, F, Hq, Hkv, Dh, T));
}

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* ResetJaxDecoderLayers(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResetJaxDecoderLayers, DecoderLayersImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // h
                                  .Arg<ffi::AnyBuffer>()  // cos
                                  .Arg<ffi::AnyBuffer>()  // sin
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Arg<ffi::AnyBuffer>()  // layers
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .RemainingArgs()        // 16 per layer
                                  .Ret<ffi::AnyBuffer>()  // x_out
                                  .Ret<ffi::AnyBuffer>()  // h_out
                                  .Ret<ffi::AnyBuffer>()  // k_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()  // v_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()  // scratch
                                  .Attr<float>("eps")
                                  .Attr<float>("attn_eps")
                                  .Attr<float>("scale")
                                  .Attr<bool>("qk_norm")
                                  .Attr<bool>("pdl")
                                  .Attr<int32_t>("pdl_edges")
                                  .Attr<bool>("pdl_across")
                                  .Attr<bool>("gate_up_interleaved")
                                  .Attr<int32_t>("codes_order"),
                              {ffi::Traits::kCmdBufferCompatible});
