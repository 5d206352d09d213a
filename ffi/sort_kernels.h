// A full descending sort of float32 rows for the sampler's exact fallback (reset_jax/sampling.py,
// `_sorted_descending`).
//
// (vals, idx) = (z[b, idx], idx) with idx the row's indices ordered by value, largest first,
// equal values in index order, where -0.0 equals +0.0 and every NaN is equal and last: what
// `lax.sort((-z, iota), num_keys=1, is_stable=True)` gives, negated back, for every row (jax's
// sort comparator canonicalises signed zeros and NaNs). vals are z's own bits (XLA's GPU sort
// writes any NaN back as 0x7fffffff).
//
// The method: one radix sort of all B * V elements at once (cub::DeviceRadixSort, onesweep), on
// 64-bit keys (row << 32 | ~order key of the value, -0.0 keyed as +0.0; NaN: all ones) with the
// column as the value.
// The sort is stable, so equal keys keep index order; the row in the high bits keeps the rows
// apart, and only 32 + ceil(log2 B) key bits are sorted. A last kernel writes idx and gathers
// vals from z. XLA's own sort of [8, 151936] on an H200 is a bitonic network of 28 kernels
// (~370 us); one row goes to cub, but in launches outside the CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace rjsort {

struct SortArgs {
  const float* z = nullptr;  // [B, V]
  float* vals = nullptr;     // [B, V]
  int32_t* idx = nullptr;    // [B, V]
  void* scratch = nullptr;   // SortScratchBytes(B, V) bytes, any alignment
  size_t scratch_bytes = 0;
  int B = 0, V = 0;
};

// Scratch bytes the launch needs for [B, V] (keys twice, one set of values, cub's temporary
// storage), or 0 where the shape cannot be served or cub's size query failed. Queries the
// current CUDA device (cub's tuning depends on its architecture).
size_t SortScratchBytes(int B, int V);
// Why these arguments cannot be served (a message), or nullptr.
const char* SortUnsupportedReason(const SortArgs& a);
// Enqueues the sort on `stream` (no synchronisation, no allocation). Returns the first CUDA error.
cudaError_t LaunchSortRows(const SortArgs& a, cudaStream_t stream);

}  // namespace rjsort
