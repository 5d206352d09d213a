// Decode attention for one new token per row: q/k RMSNorm (optional), RoPE, the KV-cache
// write of the new key and value, and grouped-query attention over cache slots 0..pos.
//
// Two kernels per call ("split-KV" / flash decoding):
//   1. AttnPartialKernel, one CTA per (kv head, row, chunk index z; the chunk is the slowest
//      grid index, so the live chunks launch first): normalizes and rotates the row's new
//      query heads and key (recomputed by every CTA: ~1 KB), the CTA whose chunk holds slot
//      pos writes the new key and value into the cache (and uses them from shared memory),
//      and the chunk's softmax partial (max, sum, unnormalized P.V) goes to a scratch at
//      index z. Where the cache has more chunks than whole rounds of resident CTAs hold
//      (PartialChunkIndices), AttnPartialLoopKernel instead: CTA z takes the chunks z, z + Z,
//      ... at or before the row's position (Z the grid's chunk indices, at most 16 chunks a
//      CTA) and merges them online into one partial at index z.
//   2. AttnCombineKernel, one CTA per (query head, row): merges the row's partials (one a
//      chunk up to its position, or one a looping CTA), in batches of 16 an L2 round trip,
//      spread over up to 4 (head width 128) or 8 (64) thread groups where there are more
//      than 16.
// Arithmetic follows the XLA composition of reset_jax.attention (rms_norm rounds to the
// model dtype, then scales; RoPE in float32 rounded to bf16; scores and P.V with float32
// accumulation, here on tensor cores); the probabilities keep near-float32 accuracy here
// (they enter P.V as a bf16 hi + lo pair, ~2^-17 relative; XLA rounds them to bf16).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace rjattn {

constexpr int kChunk = 64;     // cache slots per pass of a partial-kernel CTA
constexpr int kMaxGroup = 8;   // query heads per kv head

struct DecodeAttentionArgs {
  // The projections before norm and RoPE: row b of q / k / v starts at q / k / v +
  // b * qkv_stride elements and holds Hq / Hkv / Hkv heads of D bf16 (one packed
  // [B, (Hq + 2 Hkv) D] buffer has q = base, k = base + Hq D, v = base + (Hq + Hkv) D).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int qkv_stride = 0;
  const void* q_norm = nullptr;     // [D] bf16, or nullptr: no q/k RMSNorm
  const void* k_norm = nullptr;     // [D] bf16 (with q_norm)
  const float* cos = nullptr;       // [B, D/2]
  const float* sin = nullptr;       // [B, D/2]
  const int32_t* positions = nullptr;  // [B]: the new token's slot
  const int32_t* layer = nullptr;      // scalar: the layer of the stacked cache
  void* k_cache = nullptr;          // [L, B, T, Hkv, D] bf16, slot pos written in place
  void* v_cache = nullptr;          // [L, B, T, Hkv, D] bf16
  void* out = nullptr;              // [B, Hq, D] bf16
  float* partial = nullptr;         // [B, Hkv, C, G, D + 2] float32 scratch, C = NumChunks(T)
                                    // (index z: chunk z's partial, or looping CTA z's)
  int B = 0, Hq = 0, Hkv = 0, D = 0, L = 0, T = 0;
  float scale = 0.f, eps = 0.f;
  // Launch both kernels as programmatic dependents (ffi/pdl.cuh; sm_90+ only, the caller
  // checks the device): the partial kernel's cache loads overlap the previous kernel.
  bool pdl = false;
  // Launch only the combine kernel as a programmatic dependent (of the partial kernel; sm_90+
  // only, the caller checks the device): its small grid is resident and waiting when the
  // partial kernel ends.
  bool pdl_combine = false;
  // Warps a partial-kernel CTA: 0 the library's choice (PartialWarps), or 4 or 8 (A/B
  // benchmarks).
  int partial_warps = 0;
  // Chunk indices of the partial kernel's grid (CTAs loop over the chunks z, z + Z, ...): 0 the
  // library's choice (every chunk, or whole rounds of resident CTAs where the cache has more:
  // PartialChunkIndices), else at most this many (tests: attention_check runs every case at
  // 3, and at 65535, the one-chunk kernel, too).
  int chunk_grid = 0;
};

#ifdef __CUDACC__
#define RJATTN_HD __host__ __device__
#else
#define RJATTN_HD
#endif
RJATTN_HD inline int NumChunks(int T) { return (T + kChunk - 1) / kChunk; }

// Chunk indices (z) of the partial kernel's grid over (kv head, row, chunk index): every chunk
// of the cache, or, where one round of resident CTAs (`slots`) holds fewer, whole rounds'
// worth: z = k * z1 with z1 = slots / (Hkv B) (at least 1) and k the fewest rounds that keep
// a CTA's passes at or below kMaxChunkPasses. Each CTA loops over the chunks z, z + gridDim.z,
// ... at or before its row's position, and merges them into one partial.
// - The cap: the launch knows the cache length T, not the positions, and a CTA whose chunk
//   lies past its row's position only reads the position and leaves; without the cap a long
//   cache with short rows launched a CTA for every chunk of T: 32768 slots at position ~640
//   cost +37 us an 8B layer at M = 8 and +0.8 at M = 1 on an H200 (RESULTS.md run Z6).
// - The passes' bound: every row gets the same chunk indices, so with one round's worth a
//   single long row among short ones walks its chunks on a few CTAs (B = 8, T = 32768, row 0
//   at the end: 254 us an 8B layer with 8 indices, 140 with 32, 130 uncapped; RESULTS.md
//   AA1). Whole rounds: z1 < z < 2 z1 leaves a second round partly empty, and uniform long
//   rows then wait for it (M = 2, T = 32768, position 30000, 8 warps: 32 indices, 512 CTAs on
//   396 slots; RESULTS.md AA3).
// `per_chunk` = Hkv B CTAs a chunk index; `slots` = resident CTAs (< 1: unknown, every chunk);
// chunk_grid > 0 (DecodeAttentionArgs::chunk_grid) caps the chunk indices instead. Host-side
// arithmetic only (tests/test_attention_grid.py checks it on the CPU).
constexpr int kMaxChunkPasses = 16;
inline int PartialChunkIndices(int T, int per_chunk, int slots, int chunk_grid) {
  const int chunks = NumChunks(T);
  if (chunk_grid > 0) return chunks < chunk_grid ? chunks : chunk_grid;
  if (slots < 1 || per_chunk < 1) return chunks;
  const int z1 = slots / per_chunk > 0 ? slots / per_chunk : 1;       // a round's worth
  const int per_round = z1 * kMaxChunkPasses;                          // chunks a round covers
  const int z = (chunks + per_round - 1) / per_round * z1;             // whole rounds
  return z < chunks ? z : chunks;
}

// Warps a partial-kernel CTA: `partial_warps` where set (4 or 8), else 8 at B <= 2 with a cache
// of at most 128 chunks (T <= 8192), 4 otherwise. Eight warps a CTA shorten each CTA's chain
// where the live CTAs are fewer than the SMs' slots (B <= 2 at short positions: RESULTS.md
// J8, positions 384 and 640); four fit 528 CTAs on a 132-SM card instead of 396, which wins
// once a row's chunks outnumber those (M = 1: -2.2 / -7.0 us an 8B layer at positions 4000 /
// 30000, +0.7 at 640; M = 2 -8.5 at 16000; RESULTS.md AA4). The launch knows T, not the
// positions: a cache over 8192 slots is read as a long generation (generate() sizes T as
// the prompt plus max_new_tokens, rounded up to a power of two).
inline int PartialWarps(int B, int T, int partial_warps) {
  if (partial_warps == 4 || partial_warps == 8) return partial_warps;
  return B <= 2 && NumChunks(T) <= 128 ? 8 : 4;
}

// Why these shapes cannot run (a message), or nullptr.
const char* DecodeAttentionUnsupportedReason(const DecodeAttentionArgs& a);

// Enqueues both kernels on `stream`; no synchronisation, no allocation.
cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream);

}  // namespace rjattn
