// ATen calls of csrc/ that have no CPU kernel, as the emulated sources call them (build.py rewrites the names).
#pragma once
#include <ATen/ATen.h>

namespace cpu_emu {

// at::bmm with an output dtype runs on CUDA only. cuBLAS forms each product of fp16/bf16 inputs exactly and
// accumulates in fp32; so does an fp32 bmm of the inputs widened to fp32 (in another summation order).
inline at::Tensor bmm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat)).to(out_dtype);
}

}  // namespace cpu_emu
