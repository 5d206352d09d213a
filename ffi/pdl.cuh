// Programmatic dependent launch (PDL, sm_90+): lets a kernel start while the one before
// it on the stream is still running, so that its launch, its CTAs' start-up and its
// weight loads (inputs no earlier kernel writes) overlap the previous kernel's tail.
//
// Rules every kernel launched with `pdl = true` (and every kernel before it in such a
// chain) follows:
//  * PdlLaunchDependents() early: from then on the next kernel may be scheduled (it
//    starts only once every CTA of this grid has passed that point or exited);
//  * PdlWait() before the first read of anything an earlier kernel of the chain writes,
//    and before the first global write: it returns once the previous grid has finished
//    and its memory is visible.  A grid finishes only after one of its CTAs waited, so
//    the dependency is transitive along the chain;
//  * reads before PdlWait() touch only inputs of the whole chain (weights, scales,
//    positions, cache slots no kernel of the chain writes). An L2 prefetch, which returns
//    nothing to the thread, may name any address inside an allocation: the earlier
//    kernel's stores land in L2 and overwrite what it fetched.
// Without the launch attribute (or before sm_90) both instructions are no-ops, so the
// kernels run unchanged in ordinary launches.
// Also the launch helpers the chain's kernels share: Launch, the device queries, and
// PersistentSlots (resident CTAs, for grids sized to a round of them).
#ifndef RESET_JAX_FFI_PDL_CUH_
#define RESET_JAX_FFI_PDL_CUH_

#include <utility>

#include <cuda_runtime.h>

namespace rjpdl {

__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches `kernel<<<grid, block, smem, stream>>>(args...)`, as a programmatic dependent
// of the previous work on `stream` when `pdl` (callers set it only on sm_90+ devices).
// Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// The compute capability's major number of `device` (0 if the query fails); cached for
// devices 0..63, queried each time past them.
inline int DeviceCcMajor(int device) {
  static int cc_major[64] = {};  // 0: not queried (a race only repeats the query)
  const bool cached = device >= 0 && device < 64;
  if (cached && cc_major[device] != 0) return cc_major[device];
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return 0;
  if (cached) cc_major[device] = major;
  return major;
}

// Whether `device` supports PDL (compute capability 9.0 or newer); cached per device.
inline bool DeviceSupportsPdl(int device) {
  if (device < 0 || device >= 64) return false;
  return DeviceCcMajor(device) >= 9;
}

// Resident CTAs of a kernel launched with `threads` threads and no dynamic shared memory on
// the current device (0 if the query fails), cached per (kernel, device) in a table of 128
// entries for each kernel signature: the GEMVs' table sees up to 20 GemvKernel
// instantiations a device (GemvShapeFor's 4 shapes and the M > 8 one, for each load width and
// code order; a model uses ~5), the attention's a looping partial kernel for each warp count
// of a head shape, so the tables hold several devices before a query repeats (and a repeat
// only costs the query).
template <typename Kernel>
int PersistentSlots(Kernel kernel, int threads) {
  struct Entry {
    const void* fn;
    int device;
    int slots;
  };
  static thread_local Entry cache[128] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  int slots = 0;
  for (const Entry& e : cache) {
    if (e.fn == nullptr) break;  // filled from the front: no entry past the first empty one
    if (e.fn == reinterpret_cast<const void*>(kernel) && e.device == device) {
      slots = e.slots;
      break;
    }
  }
  if (slots == 0) {
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        per_sm < 1) {
      return 0;
    }
    slots = per_sm * sms;
    for (Entry& e : cache) {
      if (e.fn == nullptr) {
        e = {reinterpret_cast<const void*>(kernel), device, slots};
        break;
      }
    }
  }
  return slots;
}

}  // namespace rjpdl

// ---- Timeline of a chain (checker builds only: -DRJ_TIMELINE -rdc=true; the library
// never defines it, so the macros below expand to nothing there).  Thread 0 of every CTA
// of every chain kernel records when the CTA started, when its PdlWait() returned (0 if
// it never waited) and when it ended, and up to kTimelineMarks points inside the kernel
// (RJ_TIMELINE_MARK(i): when thread 0 passed mark i, 0 if it did not); `layer_check
// timeline` turns that into the time each kernel adds to the layer and where its CTAs are
// after the wait.  The buffer lives in decoder_layer.cu.
#ifdef RJ_TIMELINE
namespace rjpdl {
constexpr int kTimelineMarks = 4;  // (TimelineScope's record lists them one by one)
struct TimelineEvent {
  unsigned kind, smid, block, grid;
  unsigned long long t0, t1, t2;  // %globaltimer ns: start, past PdlWait, end
  unsigned long long tm[kTimelineMarks];  // the marks (ns), 0 where not passed
};
constexpr unsigned kTimelineMax = 1u << 20;
extern __device__ TimelineEvent g_timeline[kTimelineMax];
extern __device__ unsigned g_timeline_count;
cudaError_t TimelineClear(cudaStream_t stream);  // ordered on `stream`
// Copies min(count, kTimelineMax) events; *count is the number recorded (more: overflow).
cudaError_t TimelineRead(TimelineEvent* host, unsigned* count);  // host: kTimelineMax

__device__ __forceinline__ unsigned long long GlobalNs() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

static_assert(kTimelineMarks == 4, "TimelineScope's record copies four marks");
struct TimelineScope {
  unsigned kind;
  unsigned long long t0, t1 = 0, tm[kTimelineMarks] = {};
  __device__ explicit TimelineScope(unsigned k) : kind(k), t0(GlobalNs()) {}
  __device__ void Waited() { t1 = GlobalNs(); }
  __device__ void Mark(int i) { tm[i] = GlobalNs(); }
  __device__ ~TimelineScope() {
    if (threadIdx.x | threadIdx.y | threadIdx.z) return;
    const unsigned i = atomicAdd(&g_timeline_count, 1u);
    if (i >= kTimelineMax) return;
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    g_timeline[i] = {kind, smid, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z),
                     gridDim.x * gridDim.y * gridDim.z, t0, t1, GlobalNs(),
                     {tm[0], tm[1], tm[2], tm[3]}};
  }
};
}  // namespace rjpdl
// Kinds: 1 GemvKernel, 2 WideGemvKernel, 3 WideGemvKernel with the norm, 4 AddRmsNormKernel,
// 5 AttnPartialKernel, 6 AttnCombineKernel, 7 SwiGluKernel.
#define RJ_TIMELINE_SCOPE(kind) rjpdl::TimelineScope rj_timeline_scope_(kind)
#define RJ_TIMELINE_WAITED() rj_timeline_scope_.Waited()
// Thread 0's pass through point i (0 .. kTimelineMarks - 1) of the kernel; where the point
// follows a CTA barrier, that is the CTA's.
#define RJ_TIMELINE_MARK(i) rj_timeline_scope_.Mark(i)
#else
#define RJ_TIMELINE_SCOPE(kind) \
  do {                          \
  } while (0)
#define RJ_TIMELINE_WAITED() \
  do {                       \
  } while (0)
#define RJ_TIMELINE_MARK(i) \
  do {                      \
  } while (0)
#endif

#endif  // RESET_JAX_FFI_PDL_CUH_
