// One decode step of a pre-norm decoder layer (Qwen3 / Llama shape, NVFP4 W4A16 weights)
// as one host call that enqueues its kernels back to back:
//
//   r1  = x + h;                    qkv = rmsnorm(r1) * ln1 @ Wqkv^T     (GEMV, add+norm)
//   att = decode_attention(qkv, cache, ...)                   (partial + combine kernels)
//   o   = att @ Wo^T                                                              (GEMV)
//   x'  = r1 + o;                   gu  = rmsnorm(x') * ln2 @ Wgu^T      (GEMV, add+norm)
//   act = silu(gate) * up                          (SwiGLU kernel, or the gate+up epilogue)
//   h'  = act @ Wdown^T                                                           (GEMV)
//
// x' and h' are the next layer's x and h (h' is not yet added to x', as in
// reset_jax.models.layers.DecoderLayer.fused).  Every kernel after the first is launched
// as a programmatic dependent of the one before it (ffi/pdl.cuh) when `pdl` is set and
// the device is sm_90+: its launch and its weight loads overlap the previous kernel's
// tail.  The kernels and their arithmetic are those of the separate calls, so the
// results are bit-identical to them (the SwiGLU kernel rounds like XLA's fusion up to
// its expf).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "attention_kernels.h"

namespace rjlayer {

struct Weight {  // an NVFP4 weight [N, K]
  const uint8_t* codes = nullptr;   // [N, K/2]
  const uint8_t* scales = nullptr;  // [N, K/16] e4m3
  const float* gscale = nullptr;    // scalar
  int codes_order = 0;              // nvfp4::GemvArgs::codes_order
};

struct DecoderLayerArgs {
  const void* x = nullptr;    // [M, D] bf16: the residual stream
  const void* h = nullptr;    // [M, D] bf16: the previous layer's MLP output (zeros at layer 0)
  const void* ln1 = nullptr;  // [D] bf16 input_layernorm weight
  const void* ln2 = nullptr;  // [D] bf16 post_attention_layernorm weight
  float eps = 0.f;            // both norms' epsilon
  Weight qkv, o, gate_up, down;  // [(Hq+2Hkv)Dh, D], [D, Hq Dh], [2F, D], [D, F]
  // gate_up's row order: false, gate rows then up rows; true, alternating groups of 8
  // (gate rows 8i..8i+7 at 16i.., the matching up rows at 16i+8..; nvfp4::GemvArgs::swiglu).
  // Interleaved rows let the gate+up GEMV apply SwiGLU in its epilogue (one kernel fewer)
  // wherever its wide path serves; the result is the same bits either way.
  bool gate_up_interleaved = false;
  // nvfp4::LaunchGemvAddNorm's variant for the qkv and the gate+up GEMV (0: the library's
  // choice; others for A/B benchmarks; SwiGLU in the gate+up epilogue only with 0 and 4).
  int qkv_norm_variant = 0;
  int gate_up_norm_variant = 0;
  // Attention: cos, sin, positions, layer, k_cache, v_cache, q_norm, k_norm, B (= M),
  // Hq, Hkv, D (head width), L, T, scale, eps as in rjattn::DecodeAttentionArgs;
  // q/k/v/out/partial/pdl are filled in by the launcher.
  rjattn::DecodeAttentionArgs attn;
  int64_t M = 0, D = 0, F = 0;
  void* x_out = nullptr;    // [M, D] bf16: x' = x + h + o
  void* h_out = nullptr;    // [M, D] bf16: h' = the MLP output
  void* scratch = nullptr;  // DecoderLayerScratchBytes(...) bytes, 16-byte aligned
  size_t scratch_bytes = 0;
  bool pdl = false;         // programmatic dependent launches inside the layer (sm_90+)
  int pdl_edges = -1;       // which kernels are launched as dependents (kPdl* bits);
                            // -1: DefaultPdlEdges(*this)
  bool pdl_first = false;   // the layer's first kernel too: only when the kernel before it
                            // on the stream follows the rules of pdl.cuh (a previous layer)
};

// Bits of DecoderLayerArgs::pdl_edges: the kernel launched as a dependent of the one before.
constexpr int kPdlAttention = 1;  // both attention kernels
constexpr int kPdlO = 2;
constexpr int kPdlGateUp = 4;     // (the add + norm kernel too, at M > 2)
constexpr int kPdlSwiGlu = 8;     // (no such kernel where SwiGLU runs in the gate+up epilogue)
constexpr int kPdlDown = 16;
constexpr int kPdlAttnCombine = 32;  // the attention combine kernel alone (after its partial)

// The measured choice (Qwen3-8B / 32B layer chains; benchmarks/KERNEL_NOTES.md):
// * both attention kernels (kPdlAttention) as dependents at every M: at M = 8 since the eighth
//   session (H100, -2.2 / -2.1 us a layer, 8B / 32B); at M = 1 since the twenty-first (H200,
//   position 640: -1.3 / +0.2 us). On the H100 in the eighth session, with the kernels of
//   then, M = 1 had measured +3 us: a dependent's CTAs land on the first SMs that free up and
//   can lose their spread. Not re-measured on an H100;
// * the combine alone (kPdlAttnCombine, the partial launched plainly; redundant where
//   kPdlAttention is set): +2.4 us for 32B at M = 1 in the seventh session, -0.5 / +0.1 in the
//   twenty-first (H200);
// * down at M <= 2; at 2 < M <= 8 only where it runs the general kernel and its CTAs, packed
//   onto the fewest SMs, still cover 9 in 10 of them (nvfp4::GemvPackedSms; H200,
//   twenty-first session, M = 8: Qwen3-8B down, 256 CTAs of 16 warps two an SM, 128 of 132
//   SMs, -1.7 us a layer; 32B down, 320 CTAs of 12 warps three an SM, 107 SMs, +0.6). M = 3..7
//   take the rule unmeasured; never at M > 8.
int DefaultPdlEdges(const DecoderLayerArgs& a);

// Sizes inside the scratch are rounded up to 256 bytes (so each intermediate starts
// aligned); callers laying out more buffers beside it use the same rounding.
size_t ScratchRoundUp(size_t bytes);

// Bytes of scratch one call needs (intermediates: r1, the norm scratch, qkv, the attention
// partials and output, o, gate+up, the SwiGLU output).
size_t DecoderLayerScratchBytes(int64_t M, int64_t D, int64_t F, int64_t Hq, int64_t Hkv,
                                int64_t Dh, int64_t T);

// Why these arguments cannot run (a message), or nullptr.
const char* DecoderLayerUnsupportedReason(const DecoderLayerArgs& a);

// Enqueues the layer's kernels on `stream`; no synchronisation, no allocation.
cudaError_t LaunchDecoderLayer(const DecoderLayerArgs& a, cudaStream_t stream);

}  // namespace rjlayer
