// Host helpers shared by the standalone checkers (nvfp4_check.cu, attention_check.cu).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_runtime_api.h>

// Every CUDA call checked: a failure prints the call and exits with code 2.
#define CK(call)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,               \
                   cudaGetErrorString(e_));                                           \
      std::exit(2);                                                                   \
    }                                                                                 \
  } while (0)

// float -> bf16 bits, round to nearest even; NaN stays NaN.
inline uint16_t Bf16FromFloat(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float FloatFromBf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The median of v (the upper one of the middle two for an even count).
inline float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Captures enqueue(stream) into one CUDA graph, replays it reps + 2 times (the first two
// are warm-up) between CUDA events and returns the median replay time in milliseconds.
template <typename Enqueue>
float GraphMedianMs(cudaStream_t st, int reps, Enqueue&& enqueue) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  enqueue(st);
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<float> ts;
  for (int r = 0; r < reps + 2; ++r) {
    CK(cudaEventRecord(e0, st));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) ts.push_back(ms);
  }
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return Median(ts);
}

// The MMA word order of NVFP4 codes (nvfp4::GemvArgs::codes_order == 1): natural bit
// 4e + b of each little-endian 32-bit word (element e of the word, nibble bit b: 0 the
// mantissa, 1-2 the exponent, 3 the sign) moves to bit kMmaOrderBit[e][b]. The same table
// as reset_jax.nvfp4.format._MMA_ORDER_BIT; DecodeMmaOrderx8 (nvfp4_kernels.cuh) decodes it.
constexpr int kMmaOrderBit[8][4] = {{6, 7, 8, 15},    {28, 29, 30, 5},  {25, 26, 27, 2},
                                    {4, 0, 1, 3},     {22, 23, 24, 31}, {12, 13, 14, 21},
                                    {9, 10, 11, 18},  {20, 16, 17, 19}};

inline uint32_t MmaOrderWord(uint32_t natural) {
  uint32_t w = 0;
  for (int e = 0; e < 8; ++e)
    for (int b = 0; b < 4; ++b) w |= ((natural >> (4 * e + b)) & 1u) << kMmaOrderBit[e][b];
  return w;
}

// Codes (a whole number of 4-byte words per row) rewritten in the MMA word order.
inline std::vector<uint8_t> ToMmaOrder(const std::vector<uint8_t>& codes) {
  std::vector<uint8_t> out(codes.size());
  for (size_t i = 0; i + 4 <= codes.size(); i += 4) {
    uint32_t v;
    std::memcpy(&v, &codes[i], 4);
    v = MmaOrderWord(v);
    std::memcpy(&out[i], &v, 4);
  }
  return out;
}
