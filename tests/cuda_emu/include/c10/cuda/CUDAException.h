// cuda_emu stand-in: runtime calls report failure as CUDA's would (an exception naming the call); kernel
// errors already raise from the launch itself.
#pragma once
#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t maskedssl_emu_error = (expr);                                            \
    TORCH_CHECK(maskedssl_emu_error == cudaSuccess, "cuda emulator: ", #expr, " failed: ",     \
                cudaGetErrorString(maskedssl_emu_error));                                      \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
