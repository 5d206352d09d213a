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
//   ./stream_probe gemv [layers [attention_ns]]   # with the GEMVs' arithmetic (below)
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
// In these modes the consumers do no arithmetic (they XOR the slot's words), so they bound
// the memory side only; every CUDA call is checked and the consumers' XOR of all bytes is
// compared with the host's. `gemv` mode (below) adds the GEMVs' arithmetic, checked against a
// float64 reference, and times the arithmetic alone on a zeroed ring.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "nvfp4_kernels.cuh"  // the wide GEMV's decode, scales, MMA and staging layout
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
// The W consumer warps only (named barrier 1; the producer warp runs on).
template <int W>
__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;" ::"n"(W * 32) : "memory");
}

// All consumers of all CTAs: `arriver` (one consumer thread of the CTA) arrives for the CTA,
// then every consumer waits until `target` arrivals are counted.
template <int W>
__device__ void GridBarrier(unsigned* count, unsigned target, unsigned arriver) {
  ConsumerSync<W>();
  if (threadIdx.x == arriver) {
    __threadfence();
    atomicAdd(count, 1u);
    while (LoadAcquire(count) < target) {
    }
  }
  ConsumerSync<W>();
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
      if (plan.mode != 0 && k > 0)  // consumers are warps 1..: thread 32 arrives
        GridBarrier<kConsumerWarps>(barrier, k * static_cast<unsigned>(G), 32);
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

// SMs of the current device.
int SmCount() {
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// The grid barriers spin until every CTA has arrived, so all `ctas` CTAs must be resident at
// once (one an SM here). Checks that the kernel fits one CTA an SM at `smem` bytes; another
// tenant on the GPU can still hang the run (run it under `timeout`).
template <typename Kernel>
void CheckCoResident(Kernel kernel, int threads, size_t smem, int ctas, int sms) {
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  if (per_sm * sms < ctas) {
    std::fprintf(stderr, "%d CTAs of %d threads and %zu bytes of shared memory cannot all be "
                         "resident (%d an SM, %d SMs)\n", ctas, threads, smem, per_sm, sms);
    std::exit(2);
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


// ---------------------------------------------------------------------------------------
// `gemv` mode: the same stream, with the arithmetic. Each phase is a real NVFP4 GEMV at M = 1
// (y = x . W^T, the wide kernel's E2M1 decode, scale moves and mma.sync), its weights stored
// item-major: item (tile, s) = 16 rows x 256 K, its 16 x 128 code bytes then its 16 x 16
// scale bytes (2304 bytes), the items of a tile in K order, the tiles in row order. A ring
// slot holds IPS items (one bulk copy; 64 items in the ring); consumer warp w computes items
// w, w + W, ... of a slot,
// each lane reading its code words and scales from the slot exactly as the wide kernel's
// lanes read them from global memory. Each phase stages its x once (the wide kernel's
// layout) after the grid barrier; a tile's sums are reduced over the warps and written as
// bf16. Checked against a float64 reference of the last layer.
constexpr int kItemBytes = 16 * 128 + 16 * 16;
constexpr int kRingBytes = 147456;  // 64 items: 8 slots of 8 items or 4 of 16
constexpr int kMaxK = 12288;
constexpr int kXsBytes = kMaxK / 256 * 4 * 9 * 16;       // nvfp4::WideXsBytes(1, kMaxK)

struct GemvPlan {
  int N[kPhases], K[kPhases];  // N = 0: the attention phase
  long long offset[kPhases];   // of each phase's weights inside a layer
  long long layer_bytes;
  int layers;
  long long attention_ns;
  const __nv_bfloat16* x[kPhases];  // [K] inputs
  __nv_bfloat16* y[kPhases];        // [N] outputs (each layer overwrites them)
  float gscale[kPhases];
  // Timing only: no copies; the consumers compute on a zeroed ring without waiting for it
  // (the arithmetic's own rate; the outputs are not checked).
  bool compute_only;
};

// W consumer warps, IPS items a slot (IPS / W items per warp and slot, unrolled). REDUCE
// false (timing only, with compute_only): no per-tile reduction over the warps (no block
// barrier per tile), what the tiles' reductions cost by difference.
template <int W, int IPS, bool REDUCE = true>
__global__ void __launch_bounds__(32 * (W + 1), 1)
    GemvLayerKernel(const uint8_t* w, GemvPlan plan, unsigned* barrier) {
  static_assert(IPS % W == 0, "every warp takes the same number of items of a slot");
  constexpr int kItemsPerSlot = IPS;
  constexpr int kSlotBytes = kItemBytes * IPS;
  constexpr int kGemvSlots = kRingBytes / kSlotBytes;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring = smem;
  uint4* xs = reinterpret_cast<uint4*>(smem + kRingBytes);
  __shared__ uint64_t full[kGemvSlots], empty[kGemvSlots];
  __shared__ float red[2][W][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kGemvSlots; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], W);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (plan.compute_only)
    for (int i = threadIdx.x; i < kRingBytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(ring)[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
  const int G = gridDim.x, cta = blockIdx.x;
  if (warp == W) {  // producer: the last warp's first lane
    if (lane != 0 || plan.compute_only) return;
    long long issued = 0;
    for (int l = 0; l < plan.layers; ++l)
      for (int p = 0; p < kPhases; ++p) {
        if (plan.N[p] == 0) continue;
        const int tiles = plan.N[p] / 16, S = plan.K[p] / 256;
        const uint8_t* base = w + l * plan.layer_bytes + plan.offset[p];
        for (int tile = cta; tile < tiles; tile += G)
          for (int q = 0; q < S / kItemsPerSlot; ++q) {
            const int slot = static_cast<int>(issued % kGemvSlots);
            if (issued >= kGemvSlots) MbarWait(&empty[slot], ((issued / kGemvSlots) - 1) & 1);
            MbarExpectTx(&full[slot], kSlotBytes);
            BulkCopy(ring + static_cast<size_t>(slot) * kSlotBytes,
                     base + (static_cast<long long>(tile) * S + q * kItemsPerSlot) * kItemBytes,
                     kSlotBytes, &full[slot]);
            ++issued;
          }
      }
    return;
  }
  const int g = lane >> 2, t = lane & 3;
  long long consumed = 0;
  int parity = 0;
  for (int l = 0; l < plan.layers; ++l)
    for (int p = 0; p < kPhases; ++p) {
      const unsigned k = static_cast<unsigned>(l * kPhases + p);
      if (k > 0)  // consumers are warps 0..W-1: thread 0 arrives
        GridBarrier<W>(barrier, k * static_cast<unsigned>(G), 0);
      const int N = plan.N[p], K = plan.K[p];
      if (N == 0) {
        if (threadIdx.x == 0) {
          const unsigned long long t0 = Now();
          while (Now() - t0 < static_cast<unsigned long long>(plan.attention_ns)) {
          }
        }
        continue;
      }
      for (int u = threadIdx.x; u < K / 8; u += W * 32)
        xs[nvfp4::XsUnit(u, 0, 1)] = nvfp4::PermuteChunk(nvfp4::LoadAct(plan.x[p] + 8 * u));
      ConsumerSync<W>();
      const int S = K / 256;
      const float ws = plan.gscale[p] * 256.f;
      for (int tile = cta; tile < N / 16; tile += G) {
        float acc[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[a][r] = 0.f;
        for (int q = 0; q < S / kItemsPerSlot; ++q) {
          const int slot = static_cast<int>(consumed % kGemvSlots);
          if (!plan.compute_only) MbarWait(&full[slot], (consumed / kGemvSlots) & 1);
          const uint8_t* sl = ring + static_cast<size_t>(slot) * kSlotBytes;
#pragma unroll
          for (int j = 0; j < IPS / W; ++j) {
            const int it = warp + j * W;
            const uint8_t* item = sl + it * kItemBytes;
            nvfp4::WideBuf b;
            const uint4 c0 = *reinterpret_cast<const uint4*>(item + g * 128 + t * 32);
            const uint4 c1 = *reinterpret_cast<const uint4*>(item + g * 128 + t * 32 + 16);
            const uint4 c2 = *reinterpret_cast<const uint4*>(item + (g + 8) * 128 + t * 32);
            const uint4 c3 = *reinterpret_cast<const uint4*>(item + (g + 8) * 128 + t * 32 + 16);
            b.r0[0] = c0.x; b.r0[1] = c0.y; b.r0[2] = c0.z; b.r0[3] = c0.w;
            b.r0[4] = c1.x; b.r0[5] = c1.y; b.r0[6] = c1.z; b.r0[7] = c1.w;
            b.r1[0] = c2.x; b.r1[1] = c2.y; b.r1[2] = c2.z; b.r1[3] = c2.w;
            b.r1[4] = c3.x; b.r1[5] = c3.y; b.r1[6] = c3.z; b.r1[7] = c3.w;
            b.s0 = *reinterpret_cast<const uint32_t*>(item + 2048 + g * 16 + t * 4);
            b.s1 = *reinterpret_cast<const uint32_t*>(item + 2048 + (g + 8) * 16 + t * 4);
            const uint4* xp = xs + ((q * kItemsPerSlot + it) * 4 + t) * 9;  // XsUnit, M = 1
            uint32_t sa[4], sb[4];
            nvfp4::WideScales(b.s0, sa[0], sa[2]);
            nvfp4::WideScales(b.s1, sb[0], sb[2]);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              const int blk = c >> 1;
              const uint32_t pa = sa[blk & 2], pb = sb[blk & 2];
              const uint32_t ka = (blk & 1) ? nvfp4::SplatHi(pa) : nvfp4::SplatLo(pa);
              const uint32_t kb = (blk & 1) ? nvfp4::SplatHi(pb) : nvfp4::SplatLo(pb);
              uint32_t d0[4], d1[4];
              nvfp4::DecodeE2M1x8(b.r0[c], d0);
              nvfp4::DecodeE2M1x8(b.r1[c], d1);
              const uint4 x = xp[c];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint32_t a[4] = {nvfp4::MulBf16x2(d0[2 * h], ka), nvfp4::MulBf16x2(d1[2 * h], kb),
                                       nvfp4::MulBf16x2(d0[2 * h + 1], ka),
                                       nvfp4::MulBf16x2(d1[2 * h + 1], kb)};
                nvfp4::Mma16816(acc[(c * 2 + h) % 4], a, h == 0 ? x.x : x.z, h == 0 ? x.y : x.w);
              }
            }
          }
          __syncwarp();
          if (lane == 0 && !plan.compute_only) MbarArrive(&empty[slot]);
          ++consumed;
        }
        if constexpr (!REDUCE) {  // keep the sums live without a reduction
          const float v = acc[0][0] + acc[1][0] + acc[2][0] + acc[3][0];
          if (v == -1.2345e-30f) plan.y[p][tile * 16] = __float2bfloat16_rn(v);
          continue;
        }
        // Column 0 of D is the one activation row: rows g (r = 0) and g + 8 (r = 2), t = 0.
        if (t == 0) {
          float v0 = 0.f, v2 = 0.f;
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            v0 += acc[a][0];
            v2 += acc[a][2];
          }
          red[parity][warp][g] = v0;
          red[parity][warp][g + 8] = v2;
        }
        ConsumerSync<W>();
        if (threadIdx.x < 16) {
          float sum = 0.f;
#pragma unroll
          for (int v = 0; v < W; ++v) sum += red[parity][v][threadIdx.x];
          plan.y[p][tile * 16 + threadIdx.x] = __float2bfloat16_rn(sum * ws);
        }
        parity ^= 1;
      }
    }
}

// E2M1 and E4M3 values on the host (the format's definitions).
double HostE2M1(unsigned c) {
  static const double v[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (c & 8 ? -1 : 1) * v[c & 7];
}
double HostE4M3(unsigned b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1 + m / 8.0, e - 7);
  return (b & 0x80) ? -mag : mag;
}

int GemvMain(int layers, long long attention_ns) {
  GemvPlan plan{};
  const int Ns[kPhases] = {6144, 0, 4096, 24576, 4096}, Ks[kPhases] = {4096, 0, 4096, 4096, 12288};
  long long at = 0;
  for (int p = 0; p < kPhases; ++p) {
    plan.N[p] = Ns[p];
    plan.K[p] = Ks[p];
    plan.offset[p] = at;
    at += static_cast<long long>(Ns[p]) / 16 * (Ks[p] / 256) * kItemBytes;
  }
  plan.layer_bytes = at;
  plan.layers = layers;
  plan.attention_ns = attention_ns;
  const int sms = SmCount();
  // One layer's bytes made on the host (codes random, scales in [2^-4, 2^1)), uploaded to
  // every layer's place: the layers read distinct addresses, so nothing stays in L2.
  std::vector<uint8_t> layer(static_cast<size_t>(plan.layer_bytes));
  uint32_t s = 777u;
  for (size_t i = 0; i < layer.size(); ++i) {
    s = s * 1664525u + 1013904223u;
    const uint8_t r = static_cast<uint8_t>(s >> 24);
    layer[i] = i % kItemBytes >= 2048 ? static_cast<uint8_t>(0x18 + r % 40) : r;
  }
  uint8_t* w = nullptr;
  unsigned* barrier = nullptr;
  CK(cudaMalloc(&w, layer.size() * layers));
  CK(cudaMalloc(&barrier, 4));
  for (int l = 0; l < layers; ++l)
    CK(cudaMemcpy(w + static_cast<size_t>(l) * layer.size(), layer.data(), layer.size(), cudaMemcpyHostToDevice));
  std::vector<std::vector<uint16_t>> xh(kPhases);
  std::vector<__nv_bfloat16*> xd(kPhases, nullptr), yd(kPhases, nullptr);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int p = 0; p < kPhases; ++p) {
    if (!Ns[p]) continue;
    xh[p].resize(Ks[p]);
    for (auto& v : xh[p]) v = Bf16FromFloat(nd(rng));
    CK(cudaMalloc(&xd[p], Ks[p] * 2));
    CK(cudaMalloc(&yd[p], Ns[p] * 2));
    CK(cudaMemcpy(xd[p], xh[p].data(), Ks[p] * 2, cudaMemcpyHostToDevice));
    plan.x[p] = xd[p];
    plan.y[p] = yd[p];
    plan.gscale[p] = 1.f / std::sqrt(static_cast<float>(Ks[p]));
  }
  // float64 reference of every phase (the last layer's weights are `layer`).
  double e2m1[16], e4m3[256];
  for (unsigned c = 0; c < 16; ++c) e2m1[c] = HostE2M1(c);
  for (unsigned b = 0; b < 256; ++b) e4m3[b] = HostE4M3(b);
  std::vector<std::vector<double>> ref(kPhases);
  for (int p = 0; p < kPhases; ++p) {
    if (!Ns[p]) continue;
    const int S = Ks[p] / 256;
    ref[p].assign(Ns[p], 0.0);
    for (int n = 0; n < Ns[p]; ++n) {
      const int tile = n / 16, row = n % 16;
      double acc = 0;
      for (int it = 0; it < S; ++it) {
        const uint8_t* item = layer.data() + plan.offset[p] + (static_cast<size_t>(tile) * S + it) * kItemBytes;
        for (int j = 0; j < 256; ++j) {
          const uint8_t byte = item[row * 128 + j / 2];
          const double wv = e2m1[j & 1 ? byte >> 4 : byte & 15] * e4m3[item[2048 + row * 16 + j / 16]];
          acc += wv * FloatFromBf16(xh[p][it * 256 + j]);
        }
      }
      ref[p][n] = acc * plan.gscale[p];
    }
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::printf("gemv mode: %d layers of %.1f MB (Qwen3-8B NVFP4, item-major), attention %lld ns\n", layers,
              plan.layer_bytes / 1e6, attention_ns);
  std::printf("%-8s %-10s %12s %10s %12s\n", "warps", "items/slot", "us/layer", "TB/s", "rel RMS err");
  int failed = 0;
  auto run = [&](auto kernel, int W, int ips, bool compute_only, bool reduce = true) {
    plan.compute_only = compute_only;
    const size_t smem = static_cast<size_t>(kRingBytes) + kXsBytes;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    CheckCoResident(kernel, 32 * (W + 1), smem, sms, sms);
    std::vector<float> ts;
    double worst = 0;
    for (int r = 0; r < 8; ++r) {
      CK(cudaMemset(barrier, 0, 4));
      for (int p = 0; p < kPhases; ++p)
        if (Ns[p]) CK(cudaMemset(yd[p], 0xFF, Ns[p] * 2));  // NaN poison
      CK(cudaEventRecord(e0));
      kernel<<<sms, 32 * (W + 1), smem>>>(w, plan, barrier);
      CK(cudaGetLastError());
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) ts.push_back(ms);
      for (int p = 0; p < kPhases; ++p) {
        if (!Ns[p]) continue;
        std::vector<uint16_t> y(Ns[p]);
        CK(cudaMemcpy(y.data(), yd[p], Ns[p] * 2, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (int n = 0; n < Ns[p]; ++n) {
          const double d = FloatFromBf16(y[n]) - ref[p][n];
          num += d * d;
          den += ref[p][n] * ref[p][n];
        }
        const double err = std::sqrt(num / den);
        worst = err == err ? std::max(worst, err) : 1e30;
      }
    }
    const float ms = Median(ts);
    const bool ok = compute_only || worst <= 5e-3;
    failed += !ok;
    std::printf("%-8d %-10d %12.2f %10.2f %12.2e %s\n", W, ips, ms * 1e3 / layers,
                layer.size() * layers / (ms * 1e-3) / 1e12, worst,
                compute_only ? (reduce ? "arithmetic only (not checked)"
                                       : "arithmetic only, no tile reductions (not checked)")
                             : ok ? "ok" : "FAIL");
  };
  // (items a slot <= items a tile row: 16 at K = 4096)
  for (const bool compute_only : {false, true}) {
    run(GemvLayerKernel<4, 8>, 4, 8, compute_only);
    run(GemvLayerKernel<8, 8>, 8, 8, compute_only);
    run(GemvLayerKernel<8, 16>, 8, 16, compute_only);
    run(GemvLayerKernel<16, 16>, 16, 16, compute_only);
  }
  run(GemvLayerKernel<8, 16, false>, 8, 16, true, false);
  run(GemvLayerKernel<16, 16, false>, 16, 16, true, false);
  for (int p = 0; p < kPhases; ++p) {
    if (xd[p]) CK(cudaFree(xd[p]));
    if (yd[p]) CK(cudaFree(yd[p]));
  }
  CK(cudaFree(w));
  CK(cudaFree(barrier));
  return failed ? 1 : 0;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "gemv")
    return GemvMain(argc > 2 ? std::atoi(argv[2]) : 36, argc > 3 ? std::atoll(argv[3]) : 5000);
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
  const int sms = SmCount();
  int dev = 0;
  CK(cudaGetDevice(&dev));
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
  constexpr int chunk = 16384, slots = 12;  // a 192 KB ring
  plan.chunk = chunk;
  plan.slots = slots;
  static_assert(slots <= 32, "ProbeKernel keeps 32 mbarrier pairs");
  const size_t smem = static_cast<size_t>(chunk) * slots;
  CK(cudaFuncSetAttribute(ProbeKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  CheckCoResident(ProbeKernel, kThreads, smem, sms, sms);
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
  // phase, time in ns from the layer's first event. Needs a layer after the traced one (the
  // consumers copy the events out at the end, after the producer's last record).
  if (layers >= 3) {
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
