// Helpers shared by the FFI handlers (nvfp4_ffi.cc, attention_ffi.cc).
#pragma once

#include <string>

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

}  // namespace reset_jax_ffi
