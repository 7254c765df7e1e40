// Helpers shared by the CUDA kernels of maskedssl._C.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <type_traits>

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

// float32, float16 and bfloat16 (the public ops send float64 to the torch backend); any other dtype raises.
#define MASKEDSSL_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// VEC values of T loaded or stored as one access (16 bytes for the vector paths).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// 16-byte packs when every row start is 16-byte aligned: D and the row strides a multiple of the pack,
// and the base pointers aligned.
template <typename T>
inline bool can_vectorize(int64_t d, std::initializer_list<int64_t> strides,
                          std::initializer_list<const void*> ptrs) {
  constexpr int64_t vec = 16 / sizeof(T);
  if (d % vec != 0) return false;
  for (int64_t s : strides)
    if (s % vec != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Calls f(std::integral_constant<int, VEC>) with the 16-byte pack width, or 1.
template <typename T, typename F>
inline void with_vec(bool vectorized, F&& f) {
  if (vectorized)
    f(std::integral_constant<int, 16 / sizeof(T)>{});
  else
    f(std::integral_constant<int, 1>{});
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace maskedssl
