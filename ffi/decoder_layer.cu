// The decoder layer's decode step as one chain of kernels (host API in decoder_layer.h).
#include "decoder_layer.h"

#include <cuda_bf16.h>

#include "nvfp4_kernels.h"
#include "nvfp4_kernels.cuh"  // SiluMul
#include "pdl.cuh"

namespace rjlayer {
namespace {

// Offsets of the intermediates inside the scratch buffer.
struct Layout {
  size_t r1, xn, qkv, partial, att, o, gu, act, total;
};

Layout MakeLayout(int64_t M, int64_t D, int64_t F, int64_t Hq, int64_t Hkv, int64_t Dh,
                  int64_t T) {
  Layout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t off = at;
    at += ScratchRoundUp(bytes);
    return off;
  };
  const size_t bf = 2;
  l.r1 = take(M * D * bf);
  l.xn = take(M * (D > F ? D : F) * bf);
  l.qkv = take(M * (Hq + 2 * Hkv) * Dh * bf);
  l.partial = take(size_t(M) * Hkv * rjattn::NumChunks(static_cast<int>(T)) * (Hq / Hkv) *
                   (Dh + 2) * sizeof(float));
  l.att = take(M * Hq * Dh * bf);
  l.o = take(M * D * bf);
  l.gu = take(M * 2 * F * bf);
  l.act = take(M * F * bf);
  l.total = at;
  return l;
}

// act[m, f] = bf16(silu(gate[m, f]) * up[m, f]), 8 values per thread; gate and up side by
// side in gu ([M, 2F]: gate at f, up at F + f) or, `interleaved`, in alternating groups of
// 8 (gate at 16 (f / 8) + f % 8, up 8 further).
__global__ void __launch_bounds__(256) SwiGluKernel(const __nv_bfloat16* gu,
                                                    __nv_bfloat16* act, int M, int F,
                                                    bool interleaved) {
  RJ_TIMELINE_SCOPE(7);
  rjpdl::PdlLaunchDependents();
  rjpdl::PdlWait();  // gate+up come from the previous kernel
  RJ_TIMELINE_WAITED();
  const int per_row = F / 8;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M * per_row) return;
  const int m = i / per_row, f = (i - m * per_row) * 8;
  const __nv_bfloat16* row = gu + size_t(m) * 2 * F;
  const int gate_at = interleaved ? 2 * f : f, up_at = interleaved ? 2 * f + 8 : F + f;
  const uint4 g = *reinterpret_cast<const uint4*>(row + gate_at);
  const uint4 u = *reinterpret_cast<const uint4*>(row + up_at);
  const uint32_t gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float lo =
        nvfp4::SiluMul(__uint_as_float(gw[j] << 16), __uint_as_float(uw[j] << 16));
    const float hi = nvfp4::SiluMul(__uint_as_float(gw[j] & 0xFFFF0000u),
                                    __uint_as_float(uw[j] & 0xFFFF0000u));
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    o[j] = *reinterpret_cast<const uint32_t*>(&p);
  }
  *reinterpret_cast<uint4*>(act + size_t(m) * F + f) = make_uint4(o[0], o[1], o[2], o[3]);
}

nvfp4::GemvArgs Gemv(const Weight& w, const void* x, void* y, int64_t M, int64_t N, int64_t K,
                     bool pdl) {
  nvfp4::GemvArgs g;
  g.x = x;
  g.codes = w.codes;
  g.scales = w.scales;
  g.wscale = w.gscale;
  g.codes_order = w.codes_order;
  g.y = y;
  g.M = M;
  g.N = N;
  g.K = K;
  g.pdl = pdl;
  return g;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t ScratchRoundUp(size_t bytes) {
  constexpr size_t kAlign = 256;  // offsets inside the scratch (the base needs only 16)
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

int DefaultPdlEdges(const DecoderLayerArgs& a) {
  // kPdlAttention makes both attention kernels dependents (kPdlAttnCombine is then redundant).
  int edges = kPdlAttention | kPdlO | kPdlGateUp;
  if (a.M <= 2) return edges | kPdlSwiGlu | kPdlDown;
  // The down GEMV's operands as LaunchDecoderLayer passes them (act is in the scratch); 0 SMs
  // packed where a query fails, so the edge stays off.
  const int packed = nvfp4::GemvPackedSms(Gemv(a.down, a.scratch, a.h_out, a.M, a.D, a.F, true));
  if (packed > 0 && 10 * packed >= 9 * nvfp4::SmCount()) edges |= kPdlDown;
  return edges;
}

size_t DecoderLayerScratchBytes(int64_t M, int64_t D, int64_t F, int64_t Hq, int64_t Hkv,
                                int64_t Dh, int64_t T) {
  return MakeLayout(M, D, F, Hq, Hkv, Dh, T).total;
}

const char* DecoderLayerUnsupportedReason(const DecoderLayerArgs& a) {
  const rjattn::DecodeAttentionArgs& t = a.attn;
  if (a.M < 1 || a.M > nvfp4::kMaxM) return "rows (batch) must be in 1..16";
  if (t.B != a.M) return "the attention batch must equal the rows";
  if (a.D < 16 || a.D % 16 != 0 || a.F < 16 || a.F % 16 != 0)
    return "hidden and MLP widths must be positive multiples of 16";
  if ((int64_t(t.Hq) * t.D) % 16 != 0) return "Hq * head_dim must be a multiple of 16";
  if (!a.x || !a.h || !a.ln1 || !a.ln2 || !a.x_out || !a.h_out || !a.scratch) return "null buffer";
  if (!Aligned16(a.x) || !Aligned16(a.h) || !Aligned16(a.ln1) || !Aligned16(a.ln2) ||
      !Aligned16(a.x_out) || !Aligned16(a.h_out) || !Aligned16(a.scratch))
    return "buffers must be 16-byte aligned";
  for (const Weight* w : {&a.qkv, &a.o, &a.gate_up, &a.down}) {
    if (!w->codes || !w->scales || !w->gscale) return "null weight buffer";
    if (const char* why = nvfp4::CodesOrderUnsupportedReason(w->codes_order)) return why;
  }
  for (int v : {a.qkv_norm_variant, a.gate_up_norm_variant})
    if (v < 0 || v > 4) return "add + norm variants must be in 0..4";
  if (a.scratch_bytes < DecoderLayerScratchBytes(a.M, a.D, a.F, t.Hq, t.Hkv, t.D, t.T))
    return "scratch too small";
  rjattn::DecodeAttentionArgs probe = t;
  probe.qkv_stride = (t.Hq + 2 * t.Hkv) * t.D;
  if (const char* why = rjattn::DecodeAttentionUnsupportedReason(probe)) return why;
  return nullptr;
}

cudaError_t LaunchDecoderLayer(const DecoderLayerArgs& a, cudaStream_t stream) {
  if (DecoderLayerUnsupportedReason(a) != nullptr) return cudaErrorInvalidValue;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const bool pdl_on = a.pdl && rjpdl::DeviceSupportsPdl(device);
  const int edges = a.pdl_edges < 0 ? DefaultPdlEdges(a) : a.pdl_edges;
  auto pdlb = [&](int bit) { return pdl_on && ((edges >> bit) & 1); };
  const int64_t M = a.M, D = a.D, F = a.F, Hq = a.attn.Hq, Hkv = a.attn.Hkv, Dh = a.attn.D;
  const Layout l = MakeLayout(M, D, F, Hq, Hkv, Dh, a.attn.T);
  char* s = static_cast<char*>(a.scratch);
  void *r1 = s + l.r1, *xn = s + l.xn, *qkv = s + l.qkv, *att = s + l.att, *o = s + l.o,
       *gu = s + l.gu, *act = s + l.act;
  const int64_t wq = (Hq + 2 * Hkv) * Dh;

  // r1 = x + h; qkv = rmsnorm(r1) * ln1 @ Wqkv^T
  nvfp4::GemvArgs g = Gemv(a.qkv, a.x, qkv, M, wq, D, pdl_on && a.pdl_first);
  if (cudaError_t e = nvfp4::LaunchGemvAddNorm(g, a.h, a.ln1, a.eps, r1, xn, stream,
                                               a.qkv_norm_variant);
      e != cudaSuccess)
    return e;
  // attention (writes the new key and value into the cache)
  rjattn::DecodeAttentionArgs t = a.attn;
  const auto* qb = static_cast<const __nv_bfloat16*>(qkv);
  t.q = qb;
  t.k = qb + Hq * Dh;
  t.v = qb + (Hq + Hkv) * Dh;
  t.qkv_stride = static_cast<int>(wq);
  t.out = att;
  t.partial = reinterpret_cast<float*>(s + l.partial);
  t.pdl = pdlb(0);
  t.pdl_combine = pdlb(5);
  if (cudaError_t e = rjattn::LaunchDecodeAttention(t, stream); e != cudaSuccess) return e;
  // o = att @ Wo^T
  if (cudaError_t e = nvfp4::LaunchGemv(Gemv(a.o, att, o, M, D, Hq * Dh, pdlb(1)), stream);
      e != cudaSuccess)
    return e;
  // x' = r1 + o; gu = rmsnorm(x') * ln2 @ Wgu^T, with SwiGLU in its epilogue where the
  // rows are interleaved and the wide kernel serves (act written directly)
  g = Gemv(a.gate_up, r1, gu, M, 2 * F, D, pdlb(2));
  g.swiglu =
      a.gate_up_interleaved && nvfp4::GemvAddNormSwiGluSupported(g, a.gate_up_norm_variant);
  if (g.swiglu) g.y = act;
  if (cudaError_t e = nvfp4::LaunchGemvAddNorm(g, o, a.ln2, a.eps, a.x_out, xn, stream,
                                               a.gate_up_norm_variant);
      e != cudaSuccess)
    return e;
  // act = silu(gate) * up
  if (!g.swiglu) {
    const int64_t threads = M * (F / 8);
    if (cudaError_t e = rjpdl::Launch(SwiGluKernel, dim3(static_cast<unsigned>((threads + 255) / 256)),
                                      dim3(256), 0, stream, pdlb(3),
                                      static_cast<const __nv_bfloat16*>(gu),
                                      static_cast<__nv_bfloat16*>(act), static_cast<int>(M),
                                      static_cast<int>(F), a.gate_up_interleaved);
        e != cudaSuccess)
      return e;
  }
  // h' = act @ Wdown^T
  return nvfp4::LaunchGemv(Gemv(a.down, act, a.h_out, M, D, F, pdlb(4)), stream);
}

}  // namespace rjlayer

#ifdef RJ_TIMELINE
namespace rjpdl {
__device__ TimelineEvent g_timeline[kTimelineMax];
__device__ unsigned g_timeline_count;
cudaError_t TimelineClear(cudaStream_t stream) {
  void* count = nullptr;
  if (cudaError_t e = cudaGetSymbolAddress(&count, g_timeline_count); e != cudaSuccess) return e;
  return cudaMemsetAsync(count, 0, sizeof(unsigned), stream);
}
cudaError_t TimelineRead(TimelineEvent* host, unsigned* count) {
  if (cudaError_t e = cudaMemcpyFromSymbol(count, g_timeline_count, sizeof(unsigned)); e != cudaSuccess)
    return e;
  const unsigned n = *count < kTimelineMax ? *count : kTimelineMax;
  return n ? cudaMemcpyFromSymbol(host, g_timeline, sizeof(TimelineEvent) * n) : cudaSuccess;
}
}  // namespace rjpdl
#endif
