// The order key of a float32 for the sampler's kernels (topk_kernels.cu, sort_kernels.cu): the
// float's bits mapped to an unsigned total order in which larger floats have larger keys
// (negative: all bits flipped; positive: the sign bit set), so -0.0 sits just below +0.0.
#pragma once

#include <cstdint>

namespace rjkeys {

__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of an order key (OrderKey's inverse).
__device__ __forceinline__ float FromOrderKey(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

}  // namespace rjkeys
