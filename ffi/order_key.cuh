// Float helpers of the sampler's kernels (topk_kernels.cu, sort_kernels.cu).
// OrderKey: a float32's bits mapped to an unsigned total order in which larger floats have
// larger keys (negative: all bits flipped; positive: the sign bit set), so -0.0 sits just below
// +0.0. XlaDivide: x / y with the bits XLA's GPU code gives for an f32 divide.
#pragma once

#include <cstdint>

namespace rjkeys {

__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// x / y as XLA's GPU backend divides f32: it compiles with -nvptx-prec-divf32=1, so an f32
// divide is PTX div.full.f32 (at most 2 ulp from the IEEE quotient), not div.rn. The sampler's
// z = logits / t must have XLA's bits (the XLA paths and the kernels' must agree).
__device__ __forceinline__ float XlaDivide(float x, float y) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

// The float of an order key (OrderKey's inverse).
__device__ __forceinline__ float FromOrderKey(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

}  // namespace rjkeys
