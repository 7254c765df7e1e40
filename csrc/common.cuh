// Helpers shared by the CUDA kernels of maskedssl._C.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

namespace maskedssl {

// at::empty, or NaN-filled (integers: -1) when MASKEDSSL_POISON_OUTPUTS=1 (the tests set it), so an
// element a kernel forgets to write fails the comparison with the reference.
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("MASKEDSSL_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  if (!poison) return at::empty(shape, options);
  if (at::isFloatingType(options.dtype().toScalarType()))
    return at::full(shape, std::numeric_limits<float>::quiet_NaN(), options);
  return at::full(shape, -1, options);
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace maskedssl
