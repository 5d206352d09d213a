// What a persistent decoder-layer kernel could gain on the memory side: one CTA per SM
// streams a layer's NVFP4 weight bytes (Qwen3-8B: qkv, o, gate+up, down; codes and block
// scales, 108.5 MB a layer) through a ring of shared-memory slots with bulk copies (TMA,
// cp.async.bulk + mbarriers), while its consumer warps read each slot and meet the other
// CTAs at a grid barrier between phases, as a layer's activations require.  An
// "attention" phase between qkv and o holds the consumers for a fixed time and reads no
// weights.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/stream_probe.cu -o stream_probe
//   ./stream_probe [layers [attention_ns [trace_file]]]
//
// The ring has 12 slots of 16 KB; the producer keeps at most `inflight` copies in flight
// (12, 6, 4, 2): the rest of the ring holds landed slots, which is what lets the stream
// run on while the consumers wait.
//
// Modes (us per layer over `layers` layers of distinct weights, median of 7 launches):
//   stream   no barriers: the access pattern's floor;
//   ahead    grid barriers, the producer runs ahead through them (it waits only for free
//            slots: weights do not depend on activations), so the DRAM stream continues
//            while the consumers wait at a barrier or in the attention phase;
//   stop     grid barriers, the producer waits at each one too: every phase starts its
//            weight stream cold, as each kernel of a chain does (PDL only overlaps a
//            kernel's launch and its first loads with the previous kernel's tail).
// The consumers do no arithmetic (they XOR the slot's words), so this bounds the memory
// side only: a real kernel must also dequantize and multiply at the stream's rate.
// Every CUDA call is checked; the consumers' XOR of all bytes is compared with the host's.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#include "tests/host_util.h"

namespace {

constexpr int kConsumerWarps = 4;
constexpr int kThreads = 32 * (1 + kConsumerWarps);  // warp 0: the producer
constexpr int kPhases = 5;                           // qkv, attention, o, gate+up, down

struct Plan {
  long long bytes[kPhases];   // weight bytes of each phase (0: attention)
  long long offset[kPhases];  // their offsets inside a layer
  long long layer_bytes;
  int layers;
  int chunk;   // bytes per bulk copy (multiple of 16)
  int slots;   // ring slots
  int inflight;  // copies the producer keeps in flight at most (<= slots)
  int mode;    // 0 stream, 1 ahead, 2 stop
  long long attention_ns;
};

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(Smem(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(Smem(b)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(Smem(b)) : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* b, unsigned parity) {
  asm volatile(
      "{\n\t.reg .pred p;\n"
      "WAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "\t@!p bra WAIT;\n}" ::"r"(Smem(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          Smem(dst)),
      "l"(src), "r"(bytes), "r"(Smem(bar))
      : "memory");
}
__device__ __forceinline__ unsigned LoadAcquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long Now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// The consumer warps only (named barrier 1; the producer runs on).
__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerWarps * 32) : "memory");
}

// All consumers of all CTAs: arrive, then wait until `target` arrivals are counted.
__device__ void GridBarrier(unsigned* count, unsigned target) {
  ConsumerSync();
  if (threadIdx.x == 32) {
    __threadfence();
    atomicAdd(count, 1u);
    while (LoadAcquire(count) < target) {
    }
  }
  ConsumerSync();
}

// Events of CTA 0 in the traced layer (`trace` non-null): what happened when. Kept in
// shared memory during the run (a global atomic per event slowed CTA 0, the busiest CTA,
// enough to set the pace of the whole grid) and copied out at the end.
struct Event {
  unsigned kind;   // 0 copy issued, 1 ring slot free (the producer's wait returned), 2 slot
                   // landed (seen by the consumers), 3 grid barrier passed, 4 attention over
  unsigned phase;  // 0..4
  unsigned long long t;  // %globaltimer ns
};
constexpr int kMaxEvents = 256;
__device__ unsigned g_events;

__device__ __forceinline__ void Record(Event* ev, unsigned* count, unsigned kind, int phase) {
  const unsigned i = atomicAdd(count, 1u);
  if (i < kMaxEvents) ev[i] = Event{kind, static_cast<unsigned>(phase), Now()};
}

__global__ void __launch_bounds__(kThreads, 1)
    ProbeKernel(const uint8_t* w, Plan plan, unsigned* barrier, unsigned* sink, Event* trace,
                int trace_layer) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ uint64_t full[32], empty[32];
  __shared__ Event sev[kMaxEvents];
  __shared__ unsigned sn;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < plan.slots; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    sn = 0;
  }
  __syncthreads();
  const int G = gridDim.x, cta = blockIdx.x;
  if (warp == 0) {  // producer: one lane issues every copy of this CTA, in consumption order
    if (lane != 0) return;
    long long issued = 0;
    for (int l = 0; l < plan.layers; ++l)
      for (int p = 0; p < kPhases; ++p) {
        const long long bytes = plan.bytes[p];
        if (bytes == 0) continue;
        const unsigned k = static_cast<unsigned>(l * kPhases + p);  // barriers before it
        if (plan.mode == 2 && k > 0)
          while (LoadAcquire(barrier) < k * static_cast<unsigned>(G)) {
          }
        const long long chunks = (bytes + plan.chunk - 1) / plan.chunk;
        const uint8_t* base = w + l * plan.layer_bytes + plan.offset[p];
        for (long long c = cta; c < chunks; c += G) {
          const int slot = static_cast<int>(issued % plan.slots);
          const bool traced = trace && cta == 0 && l == trace_layer;
          if (issued >= plan.slots) MbarWait(&empty[slot], ((issued / plan.slots) - 1) & 1);
          if (issued >= plan.inflight) {  // the copy `inflight` back has landed
            const long long j = issued - plan.inflight;
            MbarWait(&full[j % plan.slots], (j / plan.slots) & 1);
          }
          if (traced) Record(sev, &sn, 1, p);
          const unsigned size =
              static_cast<unsigned>(bytes - c * plan.chunk < plan.chunk ? bytes - c * plan.chunk : plan.chunk);
          MbarExpectTx(&full[slot], size);
          BulkCopy(ring + static_cast<size_t>(slot) * plan.chunk, base + c * plan.chunk, size, &full[slot]);
          if (traced) Record(sev, &sn, 0, p);
          ++issued;
        }
      }
    return;
  }
  // consumers
  const int ct = threadIdx.x - 32;
  long long consumed = 0;
  unsigned acc = 0;
  for (int l = 0; l < plan.layers; ++l)
    for (int p = 0; p < kPhases; ++p) {
      const unsigned k = static_cast<unsigned>(l * kPhases + p);
      const bool traced = trace && cta == 0 && l == trace_layer && ct == 0;
      if (plan.mode != 0 && k > 0) GridBarrier(barrier, k * static_cast<unsigned>(G));
      if (traced) Record(sev, &sn, 3, p);
      const long long bytes = plan.bytes[p];
      if (bytes == 0) {  // attention: hold the consumers
        if (plan.mode != 0 && ct == 0) {
          const unsigned long long t0 = Now();
          while (Now() - t0 < static_cast<unsigned long long>(plan.attention_ns)) {
          }
          if (traced) Record(sev, &sn, 4, p);
        }
        continue;
      }
      const long long chunks = (bytes + plan.chunk - 1) / plan.chunk;
      for (long long c = cta; c < chunks; c += G) {
        const int slot = static_cast<int>(consumed % plan.slots);
        MbarWait(&full[slot], (consumed / plan.slots) & 1);
        if (traced) Record(sev, &sn, 2, p);
        const int size =
            static_cast<int>(bytes - c * plan.chunk < plan.chunk ? bytes - c * plan.chunk : plan.chunk);
        const uint4* q = reinterpret_cast<const uint4*>(ring + static_cast<size_t>(slot) * plan.chunk);
        for (int i = ct; i < size / 16; i += kConsumerWarps * 32) {
          const uint4 v = q[i];
          acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
        __syncwarp();
        if (lane == 0) MbarArrive(&empty[slot]);
        ++consumed;
      }
    }
  atomicXor(sink, acc);
  if (trace && cta == 0 && ct == 0) {  // the producer recorded its last event long before
    __threadfence_block();
    const unsigned n = sn < kMaxEvents ? sn : kMaxEvents;
    for (unsigned i = 0; i < n; ++i) trace[i] = sev[i];
    g_events = sn;
  }
}

__global__ void ReadKernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  atomicXor(sink, acc);
}

}  // namespace

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 36;
  const long long attention_ns = argc > 2 ? std::atoll(argv[2]) : 5000;
  // Qwen3-8B: D 4096, F 12288, Hq 32, Hkv 8, Dh 128; NVFP4 bytes = N * K * (1/2 + 1/16).
  auto nv = [](long long n, long long k) { return n * k / 2 + n * k / 16; };
  Plan plan{};
  const long long b[kPhases] = {nv(6144, 4096), 0, nv(4096, 4096), nv(24576, 4096), nv(4096, 12288)};
  long long at = 0;
  for (int p = 0; p < kPhases; ++p) {
    plan.bytes[p] = b[p];
    plan.offset[p] = at;
    at += b[p];
  }
  plan.layer_bytes = at;
  plan.layers = layers;
  plan.attention_ns = attention_ns;
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  const size_t total = static_cast<size_t>(plan.layer_bytes) * layers;
  uint8_t* w = nullptr;
  unsigned *barrier = nullptr, *sink = nullptr;
  CK(cudaMalloc(&w, total));
  CK(cudaMalloc(&barrier, 4));
  CK(cudaMalloc(&sink, 4));
  // Pseudo-random words (one LCG stream over all the weights, uploaded 64 MB at a time) and
  // the host's XOR of every word, which the consumers' XOR must reproduce.
  unsigned want = 0;
  {
    std::vector<uint32_t> pat(16 << 20);
    uint32_t s = 12345u;
    for (size_t off = 0; off < total; off += pat.size() * 4) {
      const size_t n = std::min(pat.size() * 4, total - off) / 4;
      for (size_t i = 0; i < n; ++i) want ^= (pat[i] = (s = s * 1664525u + 1013904223u));
      CK(cudaMemcpy(w + off, pat.data(), n * 4, cudaMemcpyHostToDevice));
    }
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto time_ms = [&](auto launch) {
    std::vector<float> ts;
    bool ok = true;
    for (int r = 0; r < 8; ++r) {
      CK(cudaMemset(barrier, 0, 4));
      CK(cudaMemset(sink, 0, 4));
      CK(cudaEventRecord(e0));
      launch();
      CK(cudaGetLastError());
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      unsigned got = 0;
      CK(cudaMemcpy(&got, sink, 4, cudaMemcpyDeviceToHost));
      ok = ok && got == want;
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) ts.push_back(ms);
    }
    return std::make_pair(Median(ts), ok);
  };
  std::printf("%s, %d SMs; %d layers of %.1f MB (Qwen3-8B NVFP4), attention phase %lld ns\n",
              prop.name, sms, layers, plan.layer_bytes / 1e6, attention_ns);
  const auto rd = time_ms([&] { ReadKernel<<<sms * 4, 512>>>(reinterpret_cast<const uint4*>(w), total / 16, sink); });
  const double bw = total / (rd.first * 1e-3) / 1e12;
  std::printf("plain read of all weights: %.3f ms, %.2f TB/s -> %.2f us a layer%s\n", rd.first, bw,
              rd.first * 1e3 / layers, rd.second ? "" : "  XOR MISMATCH");
  std::printf("%-7s %7s %6s %9s %12s %10s %s\n", "mode", "chunk", "slots", "inflight", "us/layer",
              "TB/s", "check");
  int failed = !rd.second;
  const char* names[] = {"stream", "ahead", "stop"};
  const int chunk = 16384, slots = 12;  // a 192 KB ring
  plan.chunk = chunk;
  plan.slots = slots;
  const size_t smem = static_cast<size_t>(chunk) * slots;
  CK(cudaFuncSetAttribute(ProbeKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  for (const int inflight : {12, 6, 4, 2}) {
    plan.inflight = inflight;
    for (int mode = 0; mode < 3; ++mode) {
      plan.mode = mode;
      const auto r = time_ms([&] { ProbeKernel<<<sms, kThreads, smem>>>(w, plan, barrier, sink, nullptr, -1); });
      failed += !r.second;
      std::printf("%-7s %7d %6d %9d %12.2f %10.2f %s\n", names[mode], chunk, slots, inflight,
                  r.first * 1e3 / layers, total / (r.first * 1e-3) / 1e12, r.second ? "ok" : "XOR MISMATCH");
    }
  }
  // One traced launch per mode (ring of 12, 4 in flight): CTA 0's events in the middle
  // layer, written to the file named by argv[3] (default stream_trace.txt): mode, kind,
  // phase, time in ns from the layer's first event.
  {
    Event* trace = nullptr;
    CK(cudaMalloc(&trace, sizeof(Event) * kMaxEvents));
    const char* path = argc > 3 ? argv[3] : "stream_trace.txt";
    FILE* f = std::fopen(path, "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", path);
      return 2;
    }
    plan.inflight = 4;
    for (int mode = 0; mode < 3; ++mode) {
      plan.mode = mode;
      const unsigned zero = 0;
      CK(cudaMemcpyToSymbol(g_events, &zero, 4));
      CK(cudaMemset(barrier, 0, 4));
      ProbeKernel<<<sms, kThreads, smem>>>(w, plan, barrier, sink, trace, layers / 2);
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      unsigned n = 0;
      CK(cudaMemcpyFromSymbol(&n, g_events, 4));
      std::vector<Event> ev(std::min<unsigned>(n, kMaxEvents));
      CK(cudaMemcpy(ev.data(), trace, ev.size() * sizeof(Event), cudaMemcpyDeviceToHost));
      std::sort(ev.begin(), ev.end(), [](const Event& a, const Event& b) { return a.t < b.t; });
      for (const Event& e : ev)
        std::fprintf(f, "%s %u %u %llu\n", names[mode], e.kind, e.phase, e.t - ev.front().t);
      std::printf("traced %s: %u events%s\n", names[mode], n, n > kMaxEvents ? " (truncated)" : "");
    }
    std::fclose(f);
    CK(cudaFree(trace));
  }
  CK(cudaFree(w));
  CK(cudaFree(barrier));
  CK(cudaFree(sink));
  return failed ? 1 : 0;
}
