// Full descending sort of float32 rows (see sort_kernels.h for the contract and the method).
#include <cstdint>

#include <cub/device/device_radix_sort.cuh>

#include "order_key.cuh"
#include "sort_kernels.h"

namespace rjsort {

namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) & ~(kAlign - 1); }

// Key bits to sort: the value's 32 and enough above them for the row.
int EndBit(int B) {
  int bits = 0;
  while ((int64_t(1) << bits) < B) ++bits;
  return 32 + bits;
}

// The scratch: keys [N] u64 twice, values [N] s32 (the other half of the values' double buffer
// is the idx result), then cub's temporary storage.
struct Layout {
  size_t keys_bytes, values_bytes, temp_offset;
};

Layout LayoutFor(size_t n) {
  Layout l;
  l.keys_bytes = AlignUp(n * sizeof(uint64_t));
  l.values_bytes = AlignUp(n * sizeof(int32_t));
  l.temp_offset = 2 * l.keys_bytes + l.values_bytes;
  return l;
}

// cub's temporary storage for n pairs and `end_bit` key bits (a host-side size query).
cudaError_t TempBytes(size_t n, int end_bit, size_t* bytes) {
  cub::DoubleBuffer<uint64_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> values(nullptr, nullptr);
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, keys, values, int64_t(n), 0, end_bit);
}

// Keys (row above the value's descending order key; zeros equal; NaN last) and columns.
__global__ void __launch_bounds__(kThreads) MakeKeysKernel(const float* __restrict__ z, int V,
                                                           int64_t n, uint64_t* __restrict__ keys,
                                                           int32_t* __restrict__ cols) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const float f = __ldg(z + i);
    const uint64_t row = uint64_t(i / V);
    // -0.0 == +0.0 here: lax.sort takes them as equal (index order), as it takes every NaN.
    const uint32_t k = isnan(f) ? 0xFFFFFFFFu : ~rjkeys::OrderKey(f == 0.f ? 0.f : f);
    keys[i] = (row << 32) | k;
    cols[i] = int32_t(i - int64_t(row) * V);
  }
}

// The results: each sorted position's column, and the value there gathered from z (its bits,
// NaN payloads too). Position i belongs to row i / V: the rows sort apart, in order.
__global__ void __launch_bounds__(kThreads) WriteKernel(const float* __restrict__ z, int V,
                                                        int64_t n, const int32_t* cols,
                                                        float* __restrict__ vals, int32_t* idx) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const int32_t c = cols[i];  // cols may be idx itself: read before the write
    const int64_t row = i / V;
    vals[i] = __ldg(z + row * V + c);
    idx[i] = c;
  }
}

int GridFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return int(blocks < 4096 ? blocks : 4096);
}

}  // namespace

size_t SortScratchBytes(int B, int V) {
  if (B < 1 || V < 1 || int64_t(B) * V > INT32_MAX) return 0;
  const size_t n = size_t(B) * V;
  size_t temp = 0;
  if (TempBytes(n, EndBit(B), &temp) != cudaSuccess) return 0;
  return kAlign + LayoutFor(n).temp_offset + AlignUp(temp);  // kAlign: room to align the start
}

const char* SortUnsupportedReason(const SortArgs& a) {
  if (a.B < 1 || a.V < 1) return "empty logits";
  if (int64_t(a.B) * a.V > INT32_MAX) return "more than 2^31 - 1 elements";
  if (!a.z || !a.vals || !a.idx || !a.scratch) return "null buffer";
  return nullptr;
}

cudaError_t LaunchSortRows(const SortArgs& a, cudaStream_t stream) {
  if (SortUnsupportedReason(a)) return cudaErrorInvalidValue;
  const int64_t n = int64_t(a.B) * a.V;
  const int end_bit = EndBit(a.B);
  const Layout l = LayoutFor(size_t(n));
  size_t temp = 0;
  if (cudaError_t err = TempBytes(size_t(n), end_bit, &temp); err != cudaSuccess) return err;
  const uintptr_t start = reinterpret_cast<uintptr_t>(a.scratch);
  const size_t skip = AlignUp(start) - start;
  if (a.scratch_bytes < skip + l.temp_offset + temp) return cudaErrorInvalidValue;
  char* s = static_cast<char*>(a.scratch) + skip;
  uint64_t* keys0 = reinterpret_cast<uint64_t*>(s);
  uint64_t* keys1 = reinterpret_cast<uint64_t*>(s + l.keys_bytes);
  int32_t* cols0 = reinterpret_cast<int32_t*>(s + 2 * l.keys_bytes);
  void* tmp = s + l.temp_offset;

  MakeKeysKernel<<<GridFor(n), kThreads, 0, stream>>>(a.z, a.V, n, keys0, cols0);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> cols(cols0, a.idx);
  if (cudaError_t err =
          cub::DeviceRadixSort::SortPairs(tmp, temp, keys, cols, n, 0, end_bit, stream);
      err != cudaSuccess)
    return err;
  WriteKernel<<<GridFor(n), kThreads, 0, stream>>>(a.z, a.V, n, cols.Current(), a.vals, a.idx);
  return cudaGetLastError();
}

}  // namespace rjsort
