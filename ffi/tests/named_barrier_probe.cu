// Does compute-sanitizer racecheck understand bar.arrive / bar.sync hand-offs?
//
// The S1 tile sums (WideGemvKernel's finish_s1) hand shared memory from the warps that
// write it to one warp that reads it through a named barrier: the writers `bar.arrive`,
// the reader `bar.sync`s. PTX orders the writes before the reads (an arrive synchronizes
// with the sync that completes the barrier). This probe runs the same hand-off in
// isolation, in three forms, so that racecheck's verdict on each can be read against a
// known answer:
//   arrive   - writers bar.arrive, reader bar.sync (the kernel's pattern; race-free);
//   sync     - every warp bar.sync on the named barrier (race-free, the textbook form);
//   none     - no barrier between the writes and the reads (a real race).
// Each form also checks its sums (the race-free forms must be exact on every run).
//
// Usage (GPU machine): compute-sanitizer --tool racecheck ./named_barrier_probe arrive|sync|none
// Build: nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/named_barrier_probe.cu -o named_barrier_probe
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace {

constexpr int kWarps = 8;
constexpr int kRing = 8;
constexpr int kTiles = 64;  // tiles a CTA: the ring wraps 8 times

#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

__device__ __forceinline__ void Arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void Sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Tile i: every warp w writes value (i * 131 + w * 7 + lane) for lanes 0..15 to its ring
// slot; warp i % kWarps sums the slot over warps and stores out[block][i][lane].
template <int kMode>  // 0 arrive, 1 sync, 2 none
__global__ void __launch_bounds__(kWarps * 32) HandOff(float* out) {
  __shared__ float slots[kRing][kWarps][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = 0; i < kTiles; ++i) {
    const int slot = i % kRing;
    if (lane < 16) slots[slot][warp][lane] = static_cast<float>(i * 131 + warp * 7 + lane);
    const bool finisher = warp == i % kWarps;
    if (kMode == 0) {
      if (finisher) {
        Sync(1 + slot, kWarps * 32);
      } else {
        Arrive(1 + slot, kWarps * 32);
      }
    } else if (kMode == 1) {
      Sync(1 + slot, kWarps * 32);
    }
    if (finisher && lane < 16) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += slots[slot][w][lane];
      out[(blockIdx.x * kTiles + i) * 16 + lane] = s;
    }
    if ((i + 1) % kRing == 0) __syncthreads();  // slot reuse, as in finish_s1
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "arrive";
  const int blocks = 4;
  const size_t n = static_cast<size_t>(blocks) * kTiles * 16;
  float* d = nullptr;
  CHECK(cudaMalloc(&d, n * sizeof(float)));
  CHECK(cudaMemset(d, 0xFF, n * sizeof(float)));  // poison: NaN
  if (mode == "arrive") {
    HandOff<0><<<blocks, kWarps * 32>>>(d);
  } else if (mode == "sync") {
    HandOff<1><<<blocks, kWarps * 32>>>(d);
  } else if (mode == "none") {
    HandOff<2><<<blocks, kWarps * 32>>>(d);
  } else {
    std::fprintf(stderr, "usage: %s arrive|sync|none\n", argv[0]);
    return 2;
  }
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(d));
  int wrong = 0;
  for (int b = 0; b < blocks; ++b)
    for (int i = 0; i < kTiles; ++i)
      for (int l = 0; l < 16; ++l) {
        float want = 0.f;
        for (int w = 0; w < kWarps; ++w) want += static_cast<float>(i * 131 + w * 7 + l);
        if (h[(static_cast<size_t>(b) * kTiles + i) * 16 + l] != want) ++wrong;
      }
  std::printf("named_barrier_probe %s: %d of %zu sums wrong\n", mode.c_str(), wrong, n);
  // The race-free forms must be exact; "none" may or may not show its race in the values.
  return (mode != "none" && wrong != 0) ? 1 : 0;
}
