// Helpers shared by the FFI handlers (nvfp4_ffi.cc, attention_ffi.cc, decoder_layer_ffi.cc,
// topk_ffi.cc).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

namespace reset_jax_ffi {

// "[d0, d1, ...]" for error messages.
inline std::string Dims(xla::ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

// An Internal error for a failed CUDA call: "<what>: <error name>: <error string>".
inline xla::ffi::Error CudaFailure(const std::string& what, cudaError_t err) {
  return xla::ffi::Error::Internal(what + ": " + cudaGetErrorName(err) + ": " +
                                   cudaGetErrorString(err));
}

// Whether `b` has element type `t` and exactly the dimensions `dims`.
inline bool Shaped(const xla::ffi::AnyBuffer& b, xla::ffi::DataType t,
                   std::initializer_list<int64_t> dims) {
  if (b.element_type() != t) return false;
  const auto d = b.dimensions();
  if (d.size() != dims.size()) return false;
  size_t i = 0;
  for (int64_t v : dims)
    if (d[i++] != v) return false;
  return true;
}

// The KV caches are aliased to results (written in place); should XLA ever hand over
// distinct buffers, copy each input into its result first so the results hold the whole
// cache.  Returns the first CUDA error.
inline cudaError_t CopyUnaliasedCaches(const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v,
                                       void* k_out, void* v_out, cudaStream_t stream) {
  for (auto [src, dst] : {std::pair{k.untyped_data(), k_out}, std::pair{v.untyped_data(), v_out}}) {
    if (src != dst) {
      if (cudaError_t err = cudaMemcpyAsync(dst, src, k.size_bytes(), cudaMemcpyDeviceToDevice, stream);
          err != cudaSuccess)
        return err;
    }
  }
  return cudaSuccess;
}

}  // namespace reset_jax_ffi
