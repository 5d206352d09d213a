// Standalone checker and benchmark for the decoder-layer chain (ffi/decoder_layer.h).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/layer_check.cu ffi/decoder_layer.cu \
//        ffi/nvfp4_kernels.cu ffi/attention_kernels.cu -o layer_check
//   ./layer_check check     # PDL chain == plain launches, bit for bit (poisoned outputs), and
//                           # interleaved gate/up rows (SwiGLU in the GEMV) == stacked ones,
//                           # and codes in the MMA word order (codes_order 1) == natural ones
//   ./layer_check placement  # (built as for timeline) where the attention CTAs run
//   ./layer_check timeline [pos]  # (built with -DRJ_TIMELINE -rdc=true) what each kernel adds
//                                 # to a layer, cache at position ~pos (default 640), and
//                                 # where its median CTA is after its wait (the kernels'
//                                 # RJ_TIMELINE_MARK points: pdl.cuh)
//   ./layer_check bench [reps [edges [pos]]]  # us per layer over L layers in one CUDA graph: PDL off / in
//                           # the layer / across layers too (Qwen3-8B and -32B shapes)
//   RJ_GU_INTERLEAVED=0 ./layer_check bench|timeline ...  # stacked gate/up rows (SwiGLU kernel)
//   RJ_NORM_VARIANTS="q,g;q,g" ./layer_check bench ...  # LaunchGemvAddNorm variants of the
//                           # qkv and gate+up GEMVs, side by side (DecoderLayerArgs; default
//                           # 0,0; timeline takes one pair)
//   RJ_BENCH_M=1,2,8 ./layer_check bench|timeline ...  # the rows benchmarked (default 1,8)
//   RJ_BENCH_T=8192 ./layer_check bench|timeline ...  # cache slots (default 1024, at least
//                           # the position + 41): a long cache with short rows
//   RJ_BENCH_LONG_ROW=32767 ./layer_check bench|timeline ...  # row 0 at that position, the
//                           # others near pos (rows of different lengths; the cache grows to hold it)
//   RJ_CHUNK_GRID=49 ./layer_check bench|timeline ...  # chunk indices of the attention's
//                           # partial-kernel grid (default: the library's choice)
//   RJ_ATTN_WARPS=4|8 ./layer_check bench|timeline ...  # warps a CTA of the attention's
//                           # partial kernel (default: the library's choice, PartialWarps)
//   RJ_CODES_ORDER=1 ./layer_check bench|timeline ...  # codes_order 1 (MMA word order; the
//                           # pattern weights' values are not checked there)
//
// The kernels themselves are checked against float64 references by nvfp4_check and
// attention_check; this checks the chain: that launching them as programmatic dependents
// changes no bit of any output (a missing wait would read stale or poisoned inputs).
// Exit code 0 only if every check passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "decoder_layer.h"
#include "pdl.cuh"
#include "tests/host_util.h"

namespace {

int g_edges = -1;  // DecoderLayerArgs::pdl_edges for every layer (bench argument)
int g_pos = 640;   // cache position of the bench / timeline chains (rows within +-40)

struct Shape {
  const char* name;
  int D, F, Hq, Hkv, Dh, L, T;
};

// DecoderLayerArgs::gate_up_interleaved of the bench / timeline chains: environment
// RJ_GU_INTERLEAVED (default 1, as the models build them; their pattern weights read the
// same either way).
bool GuInterleaved() {
  const char* v = std::getenv("RJ_GU_INTERLEAVED");
  return v ? std::atoi(v) != 0 : true;
}
bool g_interleaved = false;  // Args(): the layer's interleaved gate_up copy and flag
// Args(): the layer's MMA-order copies (check), or codes_order 1 on the benchmark's pattern
// weights (RJ_CODES_ORDER=1: timing only, their values are not checked).
bool g_mma_order = false;
// rjattn::DecodeAttentionArgs::partial_warps of every layer Args() builds (bench / timeline:
// environment RJ_ATTN_WARPS, 0 / 4 / 8, default 0: the library's choice).
int g_attn_warps = 0;
// rjattn::DecodeAttentionArgs::chunk_grid of every layer Args() builds (environment
// RJ_CHUNK_GRID, default 0: the library's choice).
int g_chunk_grid = 0;

// DecoderLayerArgs::{qkv,gate_up}_norm_variant of every layer Args() builds.
int g_norm_q = 0, g_norm_g = 0;

// Comma-separated integers in [lo, hi] (`text`, part of environment variable `name`);
// anything else ends the program with a message (exit code 2).
std::vector<int> ParseInts(const char* name, const std::string& text, int lo, int hi) {
  std::vector<int> out;
  for (const char* p = text.c_str(); *p;) {
    char* end = nullptr;
    const long x = std::strtol(p, &end, 10);
    if (end == p || x < lo || x > hi || (*end != ',' && *end != '\0')) {
      std::fprintf(stderr, "%s: \"%s\": want comma-separated integers in %d..%d\n", name,
                   text.c_str(), lo, hi);
      std::exit(2);
    }
    out.push_back(static_cast<int>(x));
    p = *end == ',' ? end + 1 : end;
  }
  if (out.empty()) {
    std::fprintf(stderr, "%s: empty\n", name);
    std::exit(2);
  }
  return out;
}

// ParseInts of environment variable `name`, or `fallback` when it is unset.
std::vector<int> EnvInts(const char* name, std::vector<int> fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  return v ? ParseInts(name, v, lo, hi) : fallback;
}

// RJ_NORM_VARIANTS: (qkv, gate+up) LaunchGemvAddNorm variant pairs "q,g[;q,g...]" (default
// the library's "0,0").
std::vector<std::vector<int>> NormVariantPairs() {
  const char* env = std::getenv("RJ_NORM_VARIANTS");
  std::vector<std::vector<int>> pairs;
  for (std::string rest = env ? env : "0,0"; !rest.empty();) {
    const size_t cut = rest.find(';');
    pairs.push_back(ParseInts("RJ_NORM_VARIANTS", rest.substr(0, cut), 0, 4));
    if (pairs.back().size() != 2) {
      std::fprintf(stderr, "RJ_NORM_VARIANTS: want pairs \"q,g\" separated by ';'\n");
      std::exit(2);
    }
    rest = cut == std::string::npos ? "" : rest.substr(cut + 1);
  }
  if (pairs.empty()) {
    std::fprintf(stderr, "RJ_NORM_VARIANTS: empty\n");
    std::exit(2);
  }
  return pairs;
}

// Device buffers of one layer's weights, norms and the shared cache / rope inputs.
struct LayerBufs {
  rjlayer::Weight qkv, o, gu, down;
  rjlayer::Weight gu_i;  // gu with its rows in alternating groups of 8 (gate, up); check only
  // The same weights with their codes in the MMA word order (codes_order 1); check only.
  rjlayer::Weight qkv_m, o_m, gu_m, gu_i_m, down_m;
  void *ln1, *ln2, *qn, *kn;
};

template <typename T>
T* DevAlloc(size_t bytes) {
  void* p;
  CK(cudaMalloc(&p, bytes));
  return static_cast<T*>(p);
}

std::vector<uint8_t> Download(const void* p, size_t n) {
  std::vector<uint8_t> v(n);
  CK(cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost));
  return v;
}

void Upload(void* dst, const std::vector<uint8_t>& v) {
  CK(cudaMemcpy(dst, v.data(), v.size(), cudaMemcpyHostToDevice));
}

std::vector<uint8_t> RandomBytes(size_t n, std::mt19937_64& rng, int lo = 0, int hi = 255) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(d(rng));
  return v;
}

std::vector<uint8_t> RandomBf16(size_t n, std::mt19937_64& rng, float mean, float sd) {
  std::normal_distribution<float> d(mean, sd);
  std::vector<uint8_t> v(2 * n);
  for (size_t i = 0; i < n; ++i) {
    const uint16_t b = Bf16FromFloat(d(rng));
    std::memcpy(&v[2 * i], &b, 2);
  }
  return v;
}

// n bf16 values near normal(mean, sd), made on the device from a counter hash (splitmix64 of
// seed + i; the sum of four 16-bit uniforms, scaled to unit variance: never all zeros, the
// tails cut at +-2 sqrt(3) = +-3.46 sd). For the caches: at the bench's long positions they
// hold billions of values, which the host's generator took minutes to make (RESULTS.md run
// X3). The host generator is drawn from less than before, so the rows' positions that
// MakeIo draws after the caches differ from those of binaries built before this change.
__global__ void FillBf16Kernel(__nv_bfloat16* p, size_t n, uint64_t seed, float mean, float sd) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) u += static_cast<float>((z >> (16 * k)) & 0xFFFFu) * (1.f / 65536.f);
    p[i] = __float2bfloat16_rn(mean + sd * (u - 2.f) * 1.7320508f);
  }
}

void FillRandomBf16(void* p, size_t n, std::mt19937_64& rng, float mean, float sd) {
  FillBf16Kernel<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, rng(), mean, sd);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
}

// One NVFP4 weight [N, K] with random codes, scales in [2^-4, 2^1) and global scale
// 1/sqrt(K) (outputs stay O(1)); `random` false fills patterns (benchmarks).
rjlayer::Weight MakeWeight(int64_t N, int64_t K, std::mt19937_64& rng, bool random) {
  rjlayer::Weight w;
  auto* c = DevAlloc<uint8_t>(N * K / 2);
  auto* s = DevAlloc<uint8_t>(N * K / 16);
  auto* g = DevAlloc<float>(4);
  if (random) {
    Upload(c, RandomBytes(N * K / 2, rng));
    Upload(s, RandomBytes(N * K / 16, rng, 0x18, 0x3F));
  } else {
    CK(cudaMemset(c, 0x5A, N * K / 2));
    CK(cudaMemset(s, 0x30, N * K / 16));
  }
  const float gs = 1.f / std::sqrt(static_cast<float>(K));
  CK(cudaMemcpy(g, &gs, 4, cudaMemcpyHostToDevice));
  w.codes = c;
  w.scales = s;
  w.gscale = g;
  return w;
}

// A copy of w [2F, K] (gate rows, then up rows) with the rows in alternating groups of 8:
// gate rows 8i..8i+7 at 16i.., up rows 8i..8i+7 at 16i+8.. (the models' layout).
rjlayer::Weight InterleaveGateUp(const rjlayer::Weight& w, int64_t F, int64_t K) {
  rjlayer::Weight o;
  const std::vector<uint8_t> c = Download(w.codes, 2 * F * K / 2), s = Download(w.scales, 2 * F * K / 16);
  std::vector<uint8_t> ci(c.size()), si(s.size());
  for (int64_t r = 0; r < 2 * F; ++r) {  // r: the row in the stacked layout
    const int64_t part = r / F, f = r % F, to = (f / 8) * 16 + part * 8 + f % 8;
    std::memcpy(&ci[to * K / 2], &c[r * K / 2], K / 2);
    std::memcpy(&si[to * K / 16], &s[r * K / 16], K / 16);
  }
  auto* cd = DevAlloc<uint8_t>(ci.size());
  auto* sd = DevAlloc<uint8_t>(si.size());
  auto* g = DevAlloc<float>(4);
  Upload(cd, ci);
  Upload(sd, si);
  CK(cudaMemcpy(g, w.gscale, 4, cudaMemcpyDeviceToDevice));
  o.codes = cd;
  o.scales = sd;
  o.gscale = g;
  return o;
}

// A copy of w [N, K] with its codes in the MMA word order (codes_order 1).
rjlayer::Weight MmaOrderCopy(const rjlayer::Weight& w, int64_t N, int64_t K) {
  rjlayer::Weight o;
  auto* cd = DevAlloc<uint8_t>(N * K / 2);
  auto* sd = DevAlloc<uint8_t>(N * K / 16);
  auto* g = DevAlloc<float>(4);
  Upload(cd, ToMmaOrder(Download(w.codes, N * K / 2)));
  CK(cudaMemcpy(sd, w.scales, N * K / 16, cudaMemcpyDeviceToDevice));
  CK(cudaMemcpy(g, w.gscale, 4, cudaMemcpyDeviceToDevice));
  o.codes = cd;
  o.scales = sd;
  o.gscale = g;
  o.codes_order = 1;
  return o;
}

LayerBufs MakeLayer(const Shape& sh, std::mt19937_64& rng, bool random) {
  LayerBufs l;
  const int64_t wq = int64_t(sh.Hq + 2 * sh.Hkv) * sh.Dh;
  l.qkv = MakeWeight(wq, sh.D, rng, random);
  l.o = MakeWeight(sh.D, int64_t(sh.Hq) * sh.Dh, rng, random);
  l.gu = MakeWeight(2 * int64_t(sh.F), sh.D, rng, random);
  l.gu_i = random ? InterleaveGateUp(l.gu, sh.F, sh.D) : l.gu;
  l.down = MakeWeight(sh.D, sh.F, rng, random);
  if (random) {
    l.qkv_m = MmaOrderCopy(l.qkv, wq, sh.D);
    l.o_m = MmaOrderCopy(l.o, sh.D, int64_t(sh.Hq) * sh.Dh);
    l.gu_m = MmaOrderCopy(l.gu, 2 * int64_t(sh.F), sh.D);
    l.gu_i_m = MmaOrderCopy(l.gu_i, 2 * int64_t(sh.F), sh.D);
    l.down_m = MmaOrderCopy(l.down, sh.D, sh.F);
  }
  l.ln1 = DevAlloc<void>(2 * sh.D);
  l.ln2 = DevAlloc<void>(2 * sh.D);
  l.qn = DevAlloc<void>(2 * sh.Dh);
  l.kn = DevAlloc<void>(2 * sh.Dh);
  Upload(l.ln1, RandomBf16(sh.D, rng, 1.f, 0.2f));
  Upload(l.ln2, RandomBf16(sh.D, rng, 1.f, 0.2f));
  Upload(l.qn, RandomBf16(sh.Dh, rng, 1.f, 0.2f));
  Upload(l.kn, RandomBf16(sh.Dh, rng, 1.f, 0.2f));
  return l;
}

void FreeLayer(LayerBufs& l) {
  if (l.gu_i.codes == l.gu.codes) l.gu_i = {};
  for (rjlayer::Weight* w : {&l.qkv, &l.o, &l.gu, &l.down, &l.gu_i, &l.qkv_m, &l.o_m, &l.gu_m,
                             &l.gu_i_m, &l.down_m}) {
    if (w->codes == nullptr) continue;
    CK(cudaFree(const_cast<uint8_t*>(w->codes)));
    CK(cudaFree(const_cast<uint8_t*>(w->scales)));
    CK(cudaFree(const_cast<float*>(w->gscale)));
  }
  for (void* p : {l.ln1, l.ln2, l.qn, l.kn}) CK(cudaFree(p));
}

// Inputs and outputs shared by the layers of a chain.
struct Io {
  void *x, *h, *x2, *h2, *kc, *vc, *scratch;
  float *cos, *sin;
  int32_t *pos, *layer_ids;
  size_t scratch_bytes, cache_bytes;
};

// Rows' positions drawn in [pos_lo, pos_hi]; long_row > 0 puts row 0 at long_row instead (a
// batch of rows of different lengths). Positions are clamped to the cache.
Io MakeIo(const Shape& sh, int M, std::mt19937_64& rng, int pos_lo, int pos_hi, int long_row = 0) {
  Io io;
  const size_t act = size_t(M) * sh.D * 2;
  io.x = DevAlloc<void>(act);
  io.h = DevAlloc<void>(act);
  io.x2 = DevAlloc<void>(act);
  io.h2 = DevAlloc<void>(act);
  Upload(io.x, RandomBf16(size_t(M) * sh.D, rng, 0.f, 1.f));
  Upload(io.h, RandomBf16(size_t(M) * sh.D, rng, 0.f, 1.f));
  io.cache_bytes = size_t(sh.L) * M * sh.T * sh.Hkv * sh.Dh * 2;
  io.kc = DevAlloc<void>(io.cache_bytes);
  io.vc = DevAlloc<void>(io.cache_bytes);
  FillRandomBf16(io.kc, io.cache_bytes / 2, rng, 0.f, 1.f);
  FillRandomBf16(io.vc, io.cache_bytes / 2, rng, 0.f, 1.f);
  std::vector<float> cs(size_t(M) * sh.Dh / 2), sn(cs.size());
  std::vector<int32_t> pos(M);
  std::uniform_int_distribution<int> dp(pos_lo, pos_hi);
  for (int m = 0; m < M; ++m) pos[m] = std::min(dp(rng), sh.T - 1);
  if (long_row > 0) pos[0] = std::min(long_row, sh.T - 1);
  for (int m = 0; m < M; ++m)
    for (int f = 0; f < sh.Dh / 2; ++f) {
      const double a = pos[m] * std::pow(1e6, -2.0 * f / sh.Dh);
      cs[m * sh.Dh / 2 + f] = static_cast<float>(std::cos(a));
      sn[m * sh.Dh / 2 + f] = static_cast<float>(std::sin(a));
    }
  io.cos = DevAlloc<float>(cs.size() * 4);
  io.sin = DevAlloc<float>(sn.size() * 4);
  CK(cudaMemcpy(io.cos, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(io.sin, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice));
  io.pos = DevAlloc<int32_t>(M * 4);
  CK(cudaMemcpy(io.pos, pos.data(), M * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> ids(sh.L);
  for (int i = 0; i < sh.L; ++i) ids[i] = i;
  io.layer_ids = DevAlloc<int32_t>(sh.L * 4);
  CK(cudaMemcpy(io.layer_ids, ids.data(), sh.L * 4, cudaMemcpyHostToDevice));
  io.scratch_bytes =
      rjlayer::DecoderLayerScratchBytes(M, sh.D, sh.F, sh.Hq, sh.Hkv, sh.Dh, sh.T);
  io.scratch = DevAlloc<void>(io.scratch_bytes);
  return io;
}

void FreeIo(Io& io) {
  for (void* p : {io.x, io.h, io.x2, io.h2, io.kc, io.vc, io.scratch, static_cast<void*>(io.cos),
                  static_cast<void*>(io.sin), static_cast<void*>(io.pos),
                  static_cast<void*>(io.layer_ids)})
    CK(cudaFree(p));
}

rjlayer::DecoderLayerArgs Args(const Shape& sh, int M, const LayerBufs& w, const Io& io, int layer,
                               const void* x, const void* h, void* x_out, void* h_out, bool pdl,
                               bool pdl_first) {
  rjlayer::DecoderLayerArgs a;
  a.x = x;
  a.h = h;
  a.ln1 = w.ln1;
  a.ln2 = w.ln2;
  a.eps = 1e-6f;
  a.qkv = w.qkv;
  a.o = w.o;
  a.gate_up = g_interleaved ? w.gu_i : w.gu;
  a.down = w.down;
  if (g_mma_order && w.qkv_m.codes != nullptr) {
    a.qkv = w.qkv_m;
    a.o = w.o_m;
    a.gate_up = g_interleaved ? w.gu_i_m : w.gu_m;
    a.down = w.down_m;
  } else if (g_mma_order) {  // benchmark pattern weights
    a.qkv.codes_order = a.o.codes_order = a.gate_up.codes_order = a.down.codes_order = 1;
  }
  a.gate_up_interleaved = g_interleaved;
  a.qkv_norm_variant = g_norm_q;
  a.gate_up_norm_variant = g_norm_g;
  rjattn::DecodeAttentionArgs& t = a.attn;
  t.q_norm = w.qn;
  t.k_norm = w.kn;
  t.cos = io.cos;
  t.sin = io.sin;
  t.positions = io.pos;
  t.layer = io.layer_ids + layer;
  t.k_cache = io.kc;
  t.v_cache = io.vc;
  t.B = M;
  t.Hq = sh.Hq;
  t.Hkv = sh.Hkv;
  t.D = sh.Dh;
  t.L = sh.L;
  t.T = sh.T;
  t.scale = 1.f / std::sqrt(static_cast<float>(sh.Dh));
  t.partial_warps = g_attn_warps;
  t.chunk_grid = g_chunk_grid;
  t.eps = 1e-6f;
  a.M = M;
  a.D = sh.D;
  a.F = sh.F;
  a.x_out = x_out;
  a.h_out = h_out;
  a.scratch = io.scratch;
  a.scratch_bytes = io.scratch_bytes;
  a.pdl = pdl;
  a.pdl_edges = g_edges;
  a.pdl_first = pdl_first;
  return a;
}

// Two layers in sequence (layer 1 reads layer 0's outputs), plain launches without PDL
// against PDL chains (plain stream and CUDA graph, pdl_first on the second layer), each
// run from the same inputs with every output and the scratch poisoned first.
bool CheckShape(const Shape& sh, int M, uint64_t seed) {
  std::mt19937_64 rng(seed);
  LayerBufs w[2] = {MakeLayer(sh, rng, true), MakeLayer(sh, rng, true)};
  Io io = MakeIo(sh, M, rng, 0, sh.T - 1);
  const size_t act = size_t(M) * sh.D * 2;
  void* xm = DevAlloc<void>(act);  // layer 0's outputs
  void* hm = DevAlloc<void>(act);
  const std::vector<uint8_t> kc0 = Download(io.kc, io.cache_bytes), vc0 = Download(io.vc, io.cache_bytes);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  auto enqueue = [&](bool pdl) {
    CK(rjlayer::LaunchDecoderLayer(Args(sh, M, w[0], io, 0, io.x, io.h, xm, hm, pdl, false), st));
    CK(rjlayer::LaunchDecoderLayer(Args(sh, M, w[1], io, 1, xm, hm, io.x2, io.h2, pdl, pdl), st));
  };
  auto run = [&](int mode) {  // 0 plain, 1 PDL on the stream, 2 PDL in a graph
    Upload(io.kc, kc0);
    Upload(io.vc, vc0);
    for (void* p : {xm, hm, io.x2, io.h2}) CK(cudaMemsetAsync(p, 0xFF, act, st));
    CK(cudaMemsetAsync(io.scratch, 0xFF, io.scratch_bytes, st));
    if (mode < 2) {
      enqueue(mode == 1);
    } else {
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      enqueue(true);
      CK(cudaStreamEndCapture(st, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, st));
      CK(cudaStreamSynchronize(st));
      CK(cudaGraphExecDestroy(ge));
      CK(cudaGraphDestroy(g));
    }
    CK(cudaStreamSynchronize(st));
    std::vector<uint8_t> out = Download(io.x2, act);
    for (const void* p : {static_cast<const void*>(io.h2), static_cast<const void*>(xm),
                          static_cast<const void*>(hm)}) {
      const std::vector<uint8_t> v = Download(p, act);
      out.insert(out.end(), v.begin(), v.end());
    }
    for (const void* p : {io.kc, io.vc}) {
      const std::vector<uint8_t> v = Download(p, io.cache_bytes);
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  };
  const std::vector<uint8_t> ref = run(0);
  // Other add + norm variants: the same outputs as the library's choice up to the norm's
  // float32 summation order (relative RMS difference over each of the four activation
  // outputs; the caches, mostly untouched slots, would dilute it).
  double vs_default = 0.0;
  if (g_norm_q != 0 || g_norm_g != 0) {
    const int q = g_norm_q, gu = g_norm_g;
    g_norm_q = g_norm_g = 0;
    const std::vector<uint8_t> def = run(0);
    g_norm_q = q;
    g_norm_g = gu;
    for (size_t o = 0; o < 4; ++o) {  // x2, h2, xm, hm (run()'s order)
      double num = 0.0, den = 0.0;
      for (size_t i = o * act; i + 1 < (o + 1) * act; i += 2) {
        uint16_t a, b;
        std::memcpy(&a, &ref[i], 2);
        std::memcpy(&b, &def[i], 2);
        const double d = double(FloatFromBf16(a)) - FloatFromBf16(b);
        num += d * d;
        den += double(FloatFromBf16(b)) * FloatFromBf16(b);
      }
      const double e = std::sqrt(num / std::max(den, 1e-30));
      vs_default = e == e ? std::max(vs_default, e) : 1.0;  // NaN -> fail
    }
  }
  // The plain run itself: every output written and finite (the poison is NaN).
  int nonfinite = 0;
  for (size_t i = 0; i < 4 * act; i += 2) {
    uint16_t b;
    std::memcpy(&b, &ref[i], 2);
    const float f = FloatFromBf16(b);
    nonfinite += !(f == f) || f - f != 0.f;
  }
  int bad = 0;
  for (int rep = 0; rep < 10; ++rep)
    for (int mode : {1, 2}) bad += run(mode) != ref;
  // The same weights with gate/up rows interleaved (SwiGLU in the gate+up epilogue where
  // the wide kernel serves, else the interleaved SwiGLU kernel): the same bits.
  int bad_i = 0;
  g_interleaved = true;
  for (int rep = 0; rep < 2; ++rep)
    for (int mode : {0, 2}) bad_i += run(mode) != ref;
  g_interleaved = false;
  // The same weights with their codes in the MMA word order: the same bits.
  int bad_m = 0;
  g_mma_order = true;
  for (const bool inter : {false, true}) {
    g_interleaved = inter;
    for (int mode : {0, 2}) bad_m += run(mode) != ref;
  }
  g_mma_order = g_interleaved = false;
  const bool ok = bad == 0 && bad_i == 0 && bad_m == 0 && nonfinite == 0 && vs_default <= 1e-2;
  std::printf("%-10s M=%2d norm %d,%d  non-finite outputs %d, PDL runs differing from plain "
              "%d/20, interleaved gate/up differing %d/4, MMA-order codes differing %d/4, "
              "vs norm 0,0 %.1e  %s\n",
              sh.name, M, g_norm_q, g_norm_g, nonfinite, bad, bad_i, bad_m, vs_default,
              ok ? "ok" : "FAIL");
  CK(cudaStreamDestroy(st));
  CK(cudaFree(xm));
  CK(cudaFree(hm));
  FreeIo(io);
  FreeLayer(w[0]);
  FreeLayer(w[1]);
  return ok;
}

int Check(bool quick) {
  const Shape small = {"small", 1024, 3072, 16, 8, 128, 2, 300};
  const Shape gqa4 = {"gqa4-d64", 576, 1536, 16, 4, 64, 2, 200};
  const Shape q8b = {"qwen3-8b", 4096, 12288, 32, 8, 128, 2, 700};
  // o and down with K = 8192 over 320 16-row tiles: at M = 1 both take K pairs (8-row
  // tiles, KPairUnits), as Qwen3-32B's do.
  const Shape q32ish = {"qwen3-32b-ish", 5120, 8192, 64, 8, 128, 2, 300};
  // A wide FFN: gate+up's 61,440 interleaved rows are 3,840 16-row tiles, ~15 a CTA, so at
  // M = 1 the S1 form's ring of reduction slots (kS1Ring) wraps round in the SwiGLU epilogue.
  const Shape wide_ffn = {"wide-ffn", 1024, 30720, 16, 8, 128, 2, 100};
  int failed = 0, total = 0;
  // The default edges, every kernel as a dependent (the benchmarks' "31"), and the attention
  // combine kernel too (63).
  for (int edges : {-1, 31, 63}) {
  g_edges = edges;
  std::printf("pdl_edges %d\n", edges);
  for (int M : quick ? std::vector<int>{1, 3} : std::vector<int>{1, 2, 3, 8, 16}) {
    failed += !CheckShape(small, M, 100 + M);
    ++total;
    if (!quick) {
      failed += !CheckShape(gqa4, M, 200 + M);
      ++total;
    }
  }
  if (!quick) {
    for (int M : {1, 8}) {
      failed += !CheckShape(q8b, M, 300 + M);
      ++total;
    }
    // M = 8: gate+up's 90 KB of staged activations take one 16-warp CTA an SM (WideXsOneCta).
    for (int M : {1, 8}) {
      failed += !CheckShape(q32ish, M, 400 + M);
      ++total;
    }
  }
  }
  g_edges = -1;
  failed += !CheckShape(wide_ffn, 1, 901);
  ++total;
  // The add + norm folded into the wide GEMVs at M > 2 (variant 4; SwiGLU in the gate+up
  // epilogue kept) and the wide kernel forced for qkv too (2), default edges.
  const int variants[][2] = {{0, 4}, {2, 4}, {2, 2}};
  for (const auto& v : variants) {
    g_norm_q = v[0];
    g_norm_g = v[1];
    for (int M : quick ? std::vector<int>{3, 8} : std::vector<int>{2, 3, 8, 16}) {
      failed += !CheckShape(small, M, 500 + M);
      ++total;
    }
    if (!quick) {
      failed += !CheckShape(q8b, 8, 608);
      failed += !CheckShape(q32ish, 8, 708);
      total += 2;
    }
  }
  g_norm_q = g_norm_g = 0;
  std::printf("layer check: %d of %d cases failed\n", failed, total);
  return failed ? 1 : 0;
}

// The benchmarked chains: L layers of distinct weights (cache position ~g_pos; the cache's
// length is raised past 1024 for positions that need it, ForEachChain).
const Shape kChainShapes[] = {{"qwen3-8b", 4096, 12288, 32, 8, 128, 36, 1024},
                              {"qwen3-32b", 5120, 25600, 64, 8, 128, 16, 1024}};

// Enqueues the sh.L layers on s, activations ping-ponging between io's buffers: PDL off
// (mode 0), inside each layer (1), or across layers too (2).
void EnqueueChain(const Shape& sh, int M, const std::vector<LayerBufs>& w, const Io& io,
                  int mode, cudaStream_t s) {
  g_interleaved = GuInterleaved();
  g_mma_order = EnvInts("RJ_CODES_ORDER", {0}, 0, 1)[0] == 1;
  g_attn_warps = EnvInts("RJ_ATTN_WARPS", {0}, 0, 8)[0];
  if (g_attn_warps != 0 && g_attn_warps != 4 && g_attn_warps != 8) {
    std::fprintf(stderr, "RJ_ATTN_WARPS: want 0, 4 or 8\n");
    std::exit(2);
  }
  g_chunk_grid = EnvInts("RJ_CHUNK_GRID", {0}, 0, 65535)[0];
  for (int l = 0; l < sh.L; ++l) {
    const bool even = l % 2 == 0;
    CK(rjlayer::LaunchDecoderLayer(
        Args(sh, M, w[l], io, l, even ? io.x : io.x2, even ? io.h : io.h2, even ? io.x2 : io.x,
             even ? io.h2 : io.h, mode > 0, mode > 1 && l > 0),
        s));
  }
}

// Calls fn(shape, M, weights, io) for each benchmarked chain at M = 1 and 8 (or RJ_BENCH_M;
// weights and buffers made once per shape / per M, freed afterwards).
template <typename Fn>
void ForEachChain(Fn&& fn) {
  for (Shape sh : kChainShapes) {
    // The cache holds 1024 slots (or RJ_BENCH_T), or more where the positions ask (rows up
    // to g_pos + 40; RJ_BENCH_LONG_ROW: row 0 there instead, the others near g_pos).
    const int long_row = EnvInts("RJ_BENCH_LONG_ROW", {0}, 0, 1 << 20)[0];
    sh.T = std::max({sh.T, EnvInts("RJ_BENCH_T", {0}, 0, 1 << 20)[0], (g_pos + 41 + 63) / 64 * 64,
                     (long_row + 1 + 63) / 64 * 64});
    std::mt19937_64 rng(7);
    std::vector<LayerBufs> w;
    for (int l = 0; l < sh.L; ++l) w.push_back(MakeLayer(sh, rng, false));
    for (int M : EnvInts("RJ_BENCH_M", {1, 8}, 1, 16)) {
      const int lo = std::max(g_pos - 40, 0);
      Io io = MakeIo(sh, M, rng, lo, std::max(g_pos + 40, lo), long_row);
      fn(sh, M, w, io);
      FreeIo(io);
    }
    for (LayerBufs& l : w) FreeLayer(l);
  }
}

// L layers of distinct weights in one CUDA graph, the cache at position ~g_pos: PDL off, in
// the layer and across layers, for each pair of add + norm variants (NormVariantPairs), side
// by side on the same buffers.
int Bench(int reps) {
  const std::vector<std::vector<int>> pairs = NormVariantPairs();
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::printf("%-10s %2s %-5s %-10s %10s %10s\n", "shape", "M", "norm", "pdl", "us/layer",
              "vs off");
  ForEachChain([&](const Shape& sh, int M, const std::vector<LayerBufs>& w, const Io& io) {
    for (const std::vector<int>& v : pairs) {
      g_norm_q = v[0];
      g_norm_g = v[1];
      float off_us = 0.f;
      for (int mode = 0; mode < 3; ++mode) {  // off, in the layer, across layers too
        const float us = GraphMedianMs(st, reps, [&](cudaStream_t s) {
                           EnqueueChain(sh, M, w, io, mode, s);
                         }) * 1e3f / sh.L;
        if (mode == 0) off_us = us;
        const char* names[] = {"off", "in-layer", "all"};
        std::printf("%-10s %2d %d,%-3d %-10s %10.2f %10.3f\n", sh.name, M, g_norm_q, g_norm_g,
                    names[mode], us, us / off_us);
      }
    }
  });
  return 0;
}

}  // namespace


#ifdef RJ_TIMELINE
namespace {

// Where a layer's time goes in the chain: one replay of the Bench graph with every CTA of
// every kernel time-stamped (pdl.cuh, RJ_TIMELINE).  A grid's CTAs all start before the
// next grid's first CTA (a dependent launches only once every CTA of its primary has
// started), so the events sorted by start split into launches.  Per kernel of the layer,
// averaged over the inner layers, relative to the previous kernel's last CTA end: when its
// first CTA started, when its median CTA got past PdlWait, and when its last CTA ended
// ("adds": the time this kernel adds to the layer; the column sums to the layer time).
int Timeline() {
  const char* kinds[] = {"?", "gemv", "wide", "wide+norm", "add+norm", "attn-part", "attn-comb",
                         "swiglu"};
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::vector<rjpdl::TimelineEvent> ev(rjpdl::kTimelineMax);
  ForEachChain([&](const Shape& sh, int M, const std::vector<LayerBufs>& w, const Io& io) {
    for (int mode : {0, 2}) {  // PDL off, default edges within and across layers
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      EnqueueChain(sh, M, w, io, mode, st);
      CK(cudaStreamEndCapture(st, &graph));
      CK(cudaGraphInstantiate(&exec, graph, 0));
      for (int r = 0; r < 3; ++r) CK(cudaGraphLaunch(exec, st));
      CK(cudaStreamSynchronize(st));
      CK(rjpdl::TimelineClear(st));
      CK(cudaGraphLaunch(exec, st));
      CK(cudaStreamSynchronize(st));
      unsigned n = 0;
      CK(rjpdl::TimelineRead(ev.data(), &n));
      const bool overflow = n > rjpdl::kTimelineMax;
      n = std::min(n, rjpdl::kTimelineMax);
      CK(cudaGraphExecDestroy(exec));
      CK(cudaGraphDestroy(graph));
      std::sort(ev.begin(), ev.begin() + n,
                [](const rjpdl::TimelineEvent& a, const rjpdl::TimelineEvent& b) { return a.t0 < b.t0; });
      // Times from just before the first start, in integers: %globaltimer counts ns since an
      // epoch (~1.8e18), where a double resolves only 256 ns, so every difference below is taken
      // on small values. The base is 1 ns early so that a recorded time stays nonzero (0 marks
      // "not passed").
      if (n > 0) {
        const unsigned long long base = ev[0].t0 - 1;
        for (unsigned i = 0; i < n; ++i) {
          rjpdl::TimelineEvent& e = ev[i];
          e.t0 -= base;
          e.t2 -= base;
          if (e.t1) e.t1 -= base;
          for (int k = 0; k < rjpdl::kTimelineMarks; ++k)
            if (e.tm[k]) e.tm[k] -= base;
        }
      }
      struct Launch {
        unsigned kind, grid, count = 0;
        unsigned long long first0 = ~0ull, last2 = 0;
        std::vector<unsigned long long> waits;
        // Per CTA past its wait: each mark's and the end's time after the wait (ns).
        std::vector<double> after[rjpdl::kTimelineMarks + 1];
      };
      std::vector<Launch> ls;
      for (unsigned i = 0; i < n; ++i) {
        const rjpdl::TimelineEvent& e = ev[i];
        if (ls.empty() || ls.back().kind != e.kind || ls.back().count == ls.back().grid)
          ls.push_back(Launch{e.kind, e.grid});
        Launch& L = ls.back();
        ++L.count;
        L.first0 = std::min(L.first0, e.t0);
        L.last2 = std::max(L.last2, e.t2);
        if (e.t1) {
          L.waits.push_back(e.t1);
          for (int k = 0; k < rjpdl::kTimelineMarks; ++k)
            if (e.tm[k]) L.after[k].push_back(static_cast<double>(e.tm[k]) - static_cast<double>(e.t1));
          L.after[rjpdl::kTimelineMarks].push_back(static_cast<double>(e.t2) - static_cast<double>(e.t1));
        }
      }
      if (ls.empty()) {
        std::printf("\n%s M=%d: no events recorded\n", sh.name, M);
        continue;
      }
      const int per = static_cast<int>(ls.size()) / sh.L;
      std::printf("\n%s M=%d PDL %s: %u events, %zu launches (%d per layer)%s; %.2f us per layer\n",
                  sh.name, M,
                  mode == 0 ? "off" : "default edges",
                  n, ls.size(), per,
                  per * sh.L == static_cast<int>(ls.size()) ? "" : " -- NOT a multiple of the layers",
                  (ls.back().last2 - ls.front().first0) * 1e-3 / sh.L);
      if (overflow || per * sh.L != static_cast<int>(ls.size())) continue;
      std::printf("%-3s %-10s %6s %9s %9s %9s %9s\n", "#", "kernel", "CTAs", "start", "waited",
                  "adds", "after wait");
      double total = 0;
      for (int p = 0; p < per; ++p) {
        double start = 0, waited = 0, adds = 0, after = 0;
        int nl = 0;
        for (int l = 1; l + 1 < sh.L; ++l) {
          const int i = l * per + p;
          const Launch& L = ls[i];
          const double prev = static_cast<double>(ls[i - 1].last2);
          std::vector<unsigned long long> wv = L.waits;
          double med = static_cast<double>(L.first0);
          if (!wv.empty()) {
            std::nth_element(wv.begin(), wv.begin() + wv.size() / 2, wv.end());
            med = static_cast<double>(wv[wv.size() / 2]);
          }
          start += static_cast<double>(L.first0) - prev;
          waited += med - prev;
          adds += static_cast<double>(L.last2) - prev;
          after += static_cast<double>(L.last2) - med;
          ++nl;
        }
        total += adds / nl;
        std::printf("%-3d %-10s %6u %9.2f %9.2f %9.2f %9.2f\n", p, kinds[ls[p].kind < 8 ? ls[p].kind : 0],
                    ls[p].grid, start / nl * 1e-3, waited / nl * 1e-3, adds / nl * 1e-3,
                    after / nl * 1e-3);
      }
      std::printf("sum of adds %.2f us per layer\n", total * 1e-3);
      // Inside the kernels: the median CTA's marks (RJ_TIMELINE_MARK, thread 0) and end, us
      // after its own wait, averaged over the layers; "-" where no CTA passed the mark.
      std::printf("%-3s %-10s %9s %9s %9s %9s %9s   (us after the CTA's wait, median CTA)\n",
                  "#", "kernel", "mark 0", "mark 1", "mark 2", "mark 3", "end");
      for (int p = 0; p < per; ++p) {
        std::printf("%-3d %-10s", p, kinds[ls[p].kind < 8 ? ls[p].kind : 0]);
        for (int k = 0; k <= rjpdl::kTimelineMarks; ++k) {
          double sum = 0;
          int nl = 0;
          for (int l = 1; l + 1 < sh.L; ++l) {
            std::vector<double> v = ls[l * per + p].after[k];
            if (v.empty()) continue;
            std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
            sum += v[v.size() / 2];
            ++nl;
          }
          if (nl) std::printf(" %9.2f", sum / nl * 1e-3);
          else std::printf(" %9s", "-");
        }
        std::printf("\n");
      }
    }
  });
  return 0;
}


// Where the attention partial kernel's live CTAs run (from the timeline: SM and start of
// each CTA that got past its PDL wait; the chunks past the position leave before it),
// launched plainly and as a dependent of the qkv GEMV (pdl_edges 30 vs 31): distinct SMs,
// the most CTAs on one SM, and the spread of their start times.  Tests the reading in
// KERNEL_NOTES ("Fifth session"): a dependent grid piles onto the first SMs that free up.
int Placement() {
  const Shape shapes[] = {{"qwen3-8b", 4096, 12288, 32, 8, 128, 2, 1024},
                          {"qwen3-32b", 5120, 25600, 64, 8, 128, 2, 1024}};
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::vector<rjpdl::TimelineEvent> ev(rjpdl::kTimelineMax);
  std::printf("%-10s %2s %6s %6s %8s %10s %12s\n", "shape", "M", "edges", "CTAs", "SMs",
              "max/SM", "start span us");
  for (const Shape& sh : shapes) {
    std::mt19937_64 rng(11);
    LayerBufs w = MakeLayer(sh, rng, false);
    for (int M : {1, 8}) {
      Io io = MakeIo(sh, M, rng, 600, 680);
      for (int edges : {30, 31}) {
        g_edges = edges;
        for (int rep = 0; rep < 3; ++rep) {  // the last of 3 launches (warm)
          CK(rjpdl::TimelineClear(st));
          CK(rjlayer::LaunchDecoderLayer(Args(sh, M, w, io, 0, io.x, io.h, io.x2, io.h2, true, false), st));
          CK(cudaStreamSynchronize(st));
        }
        unsigned n = 0;
        CK(rjpdl::TimelineRead(ev.data(), &n));
        n = std::min(n, rjpdl::kTimelineMax);
        std::vector<int> per_sm(1024, 0);
        unsigned long long t_min = ~0ull, t_max = 0;
        int live = 0;
        for (unsigned i = 0; i < n; ++i) {
          const rjpdl::TimelineEvent& e = ev[i];
          if (e.kind != 5 || e.t1 == 0) continue;  // attention partial CTAs that waited
          ++live;
          ++per_sm[e.smid % 1024];
          t_min = std::min(t_min, e.t0);
          t_max = std::max(t_max, e.t0);
        }
        const int sms = static_cast<int>(std::count_if(per_sm.begin(), per_sm.end(), [](int c) { return c > 0; }));
        const int most = *std::max_element(per_sm.begin(), per_sm.end());
        std::printf("%-10s %2d %6d %6d %8d %10d %12.2f\n", sh.name, M, edges, live, sms, most,
                    live ? (t_max - t_min) * 1e-3 : 0.0);
      }
      g_edges = -1;
      FreeIo(io);
    }
    FreeLayer(w);
  }
  return 0;
}

}  // namespace
#endif

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "timeline") {  // the first pair (bench takes every pair)
    const std::vector<int> first = NormVariantPairs().front();
    g_norm_q = first[0];
    g_norm_g = first[1];
  }
  if (mode == "check") return Check(argc > 2 && std::string(argv[2]) == "quick");
#ifdef RJ_TIMELINE
  if (mode == "placement") return Placement();
  if (mode == "timeline") {
    if (argc > 2) g_pos = std::atoi(argv[2]);
    return Timeline();
  }
#endif
  if (mode == "bench") {
    if (argc > 3) g_edges = std::atoi(argv[3]);
    if (argc > 4) g_pos = std::atoi(argv[4]);
    return Bench(argc > 2 ? std::atoi(argv[2]) : 20);
  }
  std::fprintf(stderr,
               "usage: %s check [quick] | bench [reps [pdl_edges [pos]]] | timeline [pos] | placement"
               " (the last two built with -DRJ_TIMELINE -rdc=true)\n",
               argv[0]);
  return 2;
}
