// Exact top-k of float32 rows for the sampler (reset_jax/sampling.py), in four small kernels.
//
// y = lax.top_k(z, C) for z [B, V]: the C largest values of each row in descending order, equal
// values in index order, +0.0 above -0.0. XLA's GPU top-k does not order signed zeros by one
// rule (measured: equal, in index order, at B = 1 or C <= 16; +0.0 first at B > 1 with larger
// C), so a row with zeros of both signs is reported inexact where zeros can reach its top C
// (L <= +0.0, below), as is a row holding a NaN; the caller falls back to lax.top_k for those.
//
// The method: a threshold that provably keeps every top-C element, then an exact sort of what
// passes it.
//   1. SliceMax: the row is cut into slices of S elements (S = 32..256, one warp each); each
//      slice's largest key is written.
//   2. Threshold: one CTA a row selects L, the C-th largest of the slice maxima (radix select).
//      At least C slices hold an element >= L, so the row's C-th largest value is >= L and every
//      top-C element passes "key >= L". With fewer than C slices, L = 0 (every element passes).
//   3. Collect: the slices are read again; elements with key >= L are appended to the row's
//      candidate list (TopkRowCap(V) entries; more are counted, not stored). Random rows of
//      V = 151,936 give ~330 candidates for C = 256. Where log_norm is asked for, each CTA
//      also sums exp(z - max) over its slices (the row's max from kernel 2's pass over the
//      slice maxima); kernel 4 adds the CTAs' sums and writes logsumexp of the row.
//   4. Sort: one CTA a row sorts its candidates as 64-bit (key, ~index) words, bitonic (the
//      stages within 64-word blocks in registers, the others in shared memory), and writes the
//      first C. A row is exact unless it overflowed its capacity, held a NaN, or held zeros of
//      both signs with L <= +0.0.
// A shape with fewer than 2C slices of 32 and V > 4096 passes most of each row: the caller
// should not send it (reset_jax/sampling.py's _cuda_top_k_reason).
// With scale, every pass reads z and divides by the row's scale (the sampler's logits and
// temperatures: z = logits / t is never written out).
// Keys: the float's bits mapped to an unsigned total order (negative: all bits flipped;
// positive: the sign bit set).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

// The header also compiles without nvcc (tests/test_topk.py builds its launch arithmetic).
#ifdef __CUDACC__
#define RJTOPK_HOST_DEVICE __host__ __device__
#else
#define RJTOPK_HOST_DEVICE
#endif

namespace rjtopk {

constexpr int kCap = 4096;   // most candidates a row can hold (the sort's shared memory: 32 KiB)
constexpr int kMaxC = 1024;  // largest C served
constexpr int kSlicesPerCta = 8;  // slices (warps) a CTA of kernels 1 and 3 takes

struct TopkArgs {
  const float* z = nullptr;  // [B, V]
  // Optional [B]: the rows are z[b] / scale[b] (divided as XLA's GPU code divides f32: PTX
  // div.full.f32, order_key.cuh): the values ordered, returned and summed are those quotients;
  // z is read, never written.
  const float* scale = nullptr;
  float* vals = nullptr;     // [B, C]
  int32_t* idx = nullptr;    // [B, C]
  int32_t* exact = nullptr;  // [B]: 1 where the row's result is lax.top_k's, else 0
  // Optional [B]: logsumexp of each row (of the quotients where scale is given), as
  // jax.nn.logsumexp (its maximum taken as 0 where not finite); exp summed in f32 over a lane's
  // (at most 8) values, then in f64 across lanes and CTAs, in a fixed order.
  float* log_norm = nullptr;
  // Optional [B]: row b's own count c_b (clamped to [1, C]): its first c_b outputs are
  // lax.top_k(z, C)'s first c_b, and outputs c_b..C-1 are -inf with index 0 (so a row that
  // needs fewer candidates selects and sorts fewer: the sampler's rows below its hot
  // temperature). Exactness is about the first c_b. nullptr: c_b = C for every row.
  const int32_t* counts = nullptr;
  uint32_t* scratch = nullptr;  // TopkScratchWords(B, V, C) words, 8-byte aligned
  int B = 0, V = 0, C = 0;
  // Launch kernels 2-4 as programmatic dependents of the kernel before them (ffi/pdl.cuh;
  // sm_90+ only, the caller checks): each starts while the one before it finishes, and the
  // collect loads its slices of z before it waits.
  bool pdl = false;
};

// Per-row words of the scratch after the slice maxima: threshold key, candidate count, flags
// (kNanSeen, kNegZero, kPosZero: seen anywhere in the row), the row's largest key.
constexpr int kRowWords = 4;
constexpr unsigned kNanSeen = 1u, kNegZero = 2u, kPosZero = 4u;

// Elements a slice (a warp of the first and third kernels): the largest power of two in
// [32, 256] that leaves at least 2C slices, else 32.
inline int TopkSliceSize(int V, int C) {
  for (int S = 256; S > 32; S >>= 1)
    if ((int64_t(V) + S - 1) / S >= 2 * int64_t(C)) return S;
  return 32;
}

// Number of slices of a row.
inline int TopkSlices(int V, int C) {
  const int S = TopkSliceSize(V, C);
  return int((int64_t(V) + S - 1) / S);
}

// Candidates a row of V values can hold: min(kCap, V) (never more than the row has).
RJTOPK_HOST_DEVICE inline int TopkRowCap(int V) { return V < kCap ? V : kCap; }

// Where the candidates start in the scratch (uint32 words, 8-byte aligned): after the slice
// maxima [B, slices] and the row words [B, kRowWords].
inline size_t TopkCandidateOffset(int B, int slices) {
  const size_t w = size_t(B) * slices + size_t(B) * kRowWords;
  return (w + 1) & ~size_t(1);
}

// Scratch words (uint32) the launch needs: slice maxima, row words, candidates
// [B, TopkRowCap(V)] u64, the collect CTAs' sums of exp [B, ceil(slices / 8)] f64.
inline size_t TopkScratchWords(int B, int V, int C) {
  const int ns = TopkSlices(V, C);
  const size_t ctas = size_t(ns + kSlicesPerCta - 1) / kSlicesPerCta;
  return TopkCandidateOffset(B, ns) + size_t(B) * TopkRowCap(V) * 2 + size_t(B) * ctas * 2;
}

// Why these arguments cannot be served (a message), or nullptr.
const char* TopkUnsupportedReason(const TopkArgs& a);
// TopkArgs::pdl for the current device: true on sm_90+ unless the environment variable
// RESET_JAX_TOPK_PDL is "0" (for comparisons). Measured in a CUDA graph on H200s (RESULTS.md
// AF3, AF5): -0.8 to -1.8 us a call at k = 1024; at k = 256 -0.9 / -2.6 (B = 1), 0.0 / -1.4
// (B = 2), +0.56 / -2.4 (B = 8) in the two runs.
bool TopkPdlDefault();
// Enqueues the four kernels on `stream` (kernels 2-4 as programmatic dependents where a.pdl).
// Returns the first CUDA error.
cudaError_t LaunchTopk(const TopkArgs& a, cudaStream_t stream);

}  // namespace rjtopk
