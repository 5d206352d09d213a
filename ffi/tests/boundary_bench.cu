// What a phase boundary costs: a chain of kernels with programmatic dependent launch (the
// decoder layer's chain today) against one persistent kernel whose phases synchronise
// through global memory (the persistent layer kernel that benchmarks/KERNEL_NOTES.md weighs).
//
// Every variant runs P phases of the same synthetic work on the same grid: 2 CTAs an SM of
// 256 threads, each holding 100 KB of shared memory so that, as with the GEMVs (which fill
// the registers), a dependent kernel's CTAs become resident only when the previous kernel's
// leave. A phase reads a value the previous phase wrote (one CTA's output, through global
// memory), spins a fixed number of SM clocks (plus `jitter` clocks times blockIdx % 16, a
// ragged tail), and writes its own value.
//   plain    P kernels, ordinary launches
//   pdl      P kernels, each a programmatic dependent of the one before (pdl.cuh)
//   counter  one kernel; between phases a grid barrier on one atomic counter + generation
//   flags    one kernel; between phases every CTA sets its own flag and polls all of them
//            (thread t polls CTA t's flag: no atomics, no single hot address)
//   acq-rel  one kernel; a counter that grows through the launch: arrive with
//            red.release.gpu, wait with ld.acquire.gpu for (phase + 1) * grid arrivals
//   none     one kernel, no synchronisation between phases: the work alone
// Printed: us per phase, what a boundary costs over `none`, and whether every phase read the
// values of the phase before it (exit status 1 if a synchronised variant did not).
//
// Build and run (repository root, on the GPU machine):
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/boundary_bench.cu -o /tmp/boundary_bench
//   /tmp/boundary_bench [phases=32] [reps=20]
// The persistent variants need every CTA resident at once; the grid is sized from the
// occupancy query so that it is (a cooperative launch would guarantee it in a library).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#include "pdl.cuh"
#include "tests/host_util.h"

namespace {

constexpr int kThreads = 256;
constexpr int kSmemBytes = 100 * 1024;

__device__ __forceinline__ void Spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

__device__ __forceinline__ long long Cycles(long long work, long long jitter) {
  return work + jitter * (blockIdx.x % 16);
}

// buf: [2][grid] values, phase p reads half p & 1 and writes half (p + 1) & 1.
__device__ __forceinline__ unsigned ReadPrev(const unsigned* buf, int phase) {
  const volatile unsigned* half = buf + (phase & 1) * gridDim.x;
  return half[(blockIdx.x * 7 + 3) % gridDim.x];
}

__device__ __forceinline__ void WriteMine(unsigned* buf, int phase, unsigned v) {
  buf[((phase + 1) & 1) * gridDim.x + blockIdx.x] = v + 1;
}

// One phase's work: read another CTA's value of the phase before, spin, write this CTA's.
__device__ __forceinline__ void Phase(unsigned* buf, int phase, long long work, long long jitter) {
  unsigned v = 0;
  if (threadIdx.x == 0) v = ReadPrev(buf, phase);
  Spin(Cycles(work, jitter));
  __syncthreads();
  if (threadIdx.x == 0) WriteMine(buf, phase, v);
}

// One phase as a kernel (plain and pdl).
__global__ void __launch_bounds__(kThreads) PhaseKernel(unsigned* buf, int phase, long long work,
                                                        long long jitter) {
  rjpdl::PdlLaunchDependents();
  rjpdl::PdlWait();
  Phase(buf, phase, work, jitter);
}

__device__ __forceinline__ unsigned LdAcquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void RedRelease(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// sync: [0] counter, [1] generation (MODE 0); [0, grid) flags (MODE 1); [0] a counter that
// only grows within the launch (MODE 3). Zero at launch.
template <int MODE>
__device__ __forceinline__ void Boundary(unsigned* sync, int phase) {
  __syncthreads();  // this CTA's writes of the phase are issued
  if constexpr (MODE == 3) {
    // Arrive with a release reduction, wait with acquire loads until every CTA of this phase
    // has arrived: no explicit __threadfence, no reset, one hot address.
    if (threadIdx.x == 0) {
      RedRelease(sync, 1u);
      const unsigned target = (static_cast<unsigned>(phase) + 1) * gridDim.x;
      while (LdAcquire(sync) < target) {
      }
    }
  } else if constexpr (MODE == 0) {
    if (threadIdx.x == 0) {
      volatile unsigned* gen = sync + 1;
      const unsigned g = *gen;  // read before arriving: nobody can bump it before then
      __threadfence();
      if (atomicAdd(sync, 1u) == gridDim.x - 1) {
        atomicExch(sync, 0u);
        __threadfence();
        atomicAdd(sync + 1, 1u);
      } else {
        while (*gen == g) {
        }
      }
      __threadfence();
    }
  } else if constexpr (MODE == 1) {
    if (threadIdx.x == 0) {
      __threadfence();
      reinterpret_cast<volatile unsigned*>(sync)[blockIdx.x] = static_cast<unsigned>(phase) + 1;
    }
    for (unsigned t = threadIdx.x; t < gridDim.x; t += blockDim.x) {
      const volatile unsigned* f = sync + t;
      while (*f < static_cast<unsigned>(phase) + 1) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

template <int MODE>  // 0 counter, 1 flags, 2 none, 3 acquire/release counter
__global__ void __launch_bounds__(kThreads) FusedKernel(unsigned* buf, unsigned* sync, int phases,
                                                        long long work, long long jitter) {
  for (int p = 0; p < phases; ++p) {
    Phase(buf, p, work, jitter);
    if constexpr (MODE != 2) Boundary<MODE>(sync, p);
  }
}

template <typename K>
void AllowSmem(K kernel) {
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
}

}  // namespace

int main(int argc, char** argv) {
  const int phases = argc > 1 ? std::atoi(argv[1]) : 32;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  int dev = 0, sms = 0, khz = 0, per_sm = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
  AllowSmem(PhaseKernel);
  AllowSmem(FusedKernel<0>);
  AllowSmem(FusedKernel<1>);
  AllowSmem(FusedKernel<2>);
  AllowSmem(FusedKernel<3>);
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, FusedKernel<1>, kThreads, kSmemBytes));
  const int grid = per_sm * sms;
  const bool pdl = rjpdl::DeviceSupportsPdl(dev);
  std::printf("%d SMs, %d CTAs an SM, grid %d, clock %.0f MHz, %d phases, PDL %s\n", sms, per_sm,
              grid, khz / 1e3, phases, pdl ? "on" : "off (pre-sm_90: the pdl row is plain)");
  if (per_sm != 2) std::printf("note: expected 2 CTAs an SM\n");
  unsigned *buf = nullptr, *sync = nullptr;
  CK(cudaMalloc(&buf, 2 * grid * sizeof(unsigned)));
  CK(cudaMalloc(&sync, grid * sizeof(unsigned)));
  CK(cudaMemset(buf, 0, 2 * grid * sizeof(unsigned)));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const dim3 g(grid), b(kThreads);
  std::printf("%-8s %-8s %-8s %10s %14s\n", "work us", "ragged", "variant", "us/phase",
              "boundary us");
  int failed = 0;
  for (double work_us : {2.0, 8.0}) {
    for (double jitter_us : {0.0, 0.1}) {
      const long long work = static_cast<long long>(work_us * khz * 1e-3);
      const long long jitter = static_cast<long long>(jitter_us * khz * 1e-3);
      auto zero = [&](cudaStream_t s) {  // every graph starts so (the same shape in all)
        CK(cudaMemsetAsync(buf, 0, 2 * grid * sizeof(unsigned), s));
        CK(cudaMemsetAsync(sync, 0, grid * sizeof(unsigned), s));
      };
      auto fused = [&](auto kernel) {
        return [&, kernel](cudaStream_t s) {
          zero(s);
          CK(rjpdl::Launch(kernel, g, b, kSmemBytes, s, false, buf, sync, phases, work, jitter));
        };
      };
      auto chain = [&](bool with_pdl) {
        return [&, with_pdl](cudaStream_t s) {
          zero(s);
          for (int p = 0; p < phases; ++p)
            CK(rjpdl::Launch(PhaseKernel, g, b, kSmemBytes, s, with_pdl && p > 0, buf, p, work,
                             jitter));
        };
      };
      // After the last replay, every CTA's value in the final half is `phases` if every phase
      // read what the phase before it wrote (a synchronisation that let a CTA run ahead would
      // leave a smaller value somewhere). `none` has no synchronisation: reported, not failed.
      auto stale = [&]() {
        std::vector<unsigned> h(grid);
        CK(cudaMemcpy(h.data(), buf + (phases & 1) * grid, grid * sizeof(unsigned),
                      cudaMemcpyDeviceToHost));
        int n = 0;
        for (unsigned v : h) n += v != static_cast<unsigned>(phases);
        return n;
      };
      const float none = GraphMedianMs(st, reps, fused(FusedKernel<2>)) * 1e3f / phases;
      const int none_stale = stale();
      auto row = [&](const char* name, float us, int n_stale, bool synced) {
        if (synced && n_stale) ++failed;
        std::printf("%-8.1f %-8s %-8s %10.3f %14.3f  %s\n", work_us,
                    jitter_us > 0 ? "1.5 us" : "no", name, us, us - none,
                    n_stale == 0 ? "values ok" : synced ? "STALE VALUES (FAIL)" : "values stale");
      };
      auto run = [&](const char* name, auto enqueue) {
        const float us = GraphMedianMs(st, reps, enqueue) * 1e3f / phases;
        row(name, us, stale(), true);
      };
      run("plain", chain(false));
      run("pdl", chain(pdl));
      run("counter", fused(FusedKernel<0>));
      run("flags", fused(FusedKernel<1>));
      run("acq-rel", fused(FusedKernel<3>));
      row("none", none, none_stale, false);
    }
  }
  CK(cudaFree(buf));
  CK(cudaFree(sync));
  CK(cudaStreamDestroy(st));
  if (failed) std::printf("%d variant runs left stale values\n", failed);
  return failed ? 1 : 0;
}
