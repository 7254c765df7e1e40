// Kernels that check the emulator itself (tests/test_cuda_emulator.py): each is plain CUDA, built by
// build.py with the kernels of csrc/, and either computes something the test compares with torch or breaks a
// CUDA rule that the emulator must report.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

// Sums of every `width` consecutive values by xor shuffles, one warp-segment per group.
__global__ void segment_sums_kernel(const float* x, float* out, int n, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.f;
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  if (i < n) out[i] = v;
}

// Every thread reads its neighbour's shared value after the barrier: right only if the barrier orders them.
__global__ void rotate_kernel(const float* x, float* out, int n) {
  __shared__ float values[1024];
  const int t = threadIdx.x;
  values[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = values[(t + 1) % blockDim.x];
}

// The same without the barrier: a race, whose result depends on which thread runs first.
__global__ void racy_rotate_kernel(const float* x, float* out, int n) {
  __shared__ float values[1024];
  const int t = threadIdx.x;
  values[t] = x[blockIdx.x * blockDim.x + t];
  out[blockIdx.x * blockDim.x + t] = values[(t + 1) % blockDim.x];
}

// Two block sums in a row, each a warp shuffle sum, then one partial per warp through shared memory and one
// barrier. With one buffer for both (double_buffer false) a warp that runs ahead writes its second partial
// over a first partial that a slower warp has still to read: a race that only the shuffles stand in front
// of, which the emulator's per-warp schedules expose.
__global__ void two_sums_kernel(const float* x, float* out, bool double_buffer) {
  __shared__ float partial[2 * 32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, warps = blockDim.x / 32;
  for (int k = 0; k < 2; ++k) {
    float v = x[t] * static_cast<float>(k + 1);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    float* slot = partial + (double_buffer ? k * 32 : 0);
    if (lane == 0) slot[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += slot[w];
    out[2 * t + k] = total;
  }
}

// Lanes 16-31 of each warp return at once; lanes 0-15 then sum their values by shuffles under a 16-lane
// mask (legal CUDA: the mask names exactly the lanes that call). A finished lane must never run again.
__global__ void half_warp_sums_kernel(const float* x, float* out) {
  const int t = threadIdx.x;
  float v = x[t];
  if (t % 32 >= 16) {
    out[t] = v;
    return;
  }
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o, 16);
  out[t] = v;
}

// Dynamic shared memory is per block: each block sums its own slice through it.
__global__ void block_sums_kernel(const float* x, float* out) {
  extern __shared__ float scratch[];
  scratch[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (unsigned int t = 0; t < blockDim.x; ++t) total += scratch[t];
    out[blockIdx.x] = total;
  }
}

// Reads shared memory nobody wrote: the emulator fills it with NaN.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float never_written[32];
  out[threadIdx.x] = never_written[threadIdx.x];
}

// Lanes 0-15 wait at __syncthreads, lanes 16-31 at a shuffle: hangs on a GPU.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

// A mask that leaves out lanes 16-31, which call the shuffle.
__global__ void bad_mask_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1); }

// A 16-byte load from an address 4 bytes past a 16-byte boundary: a misaligned-address fault on a GPU.
__global__ void misaligned_kernel(float* out) { out[0] = reinterpret_cast<const float4*>(out + 1)->x; }

__global__ void store_kernel(float* out) { out[0] = 1.f; }
// The same, for the launch that raises its shared-memory limit first (limits are per kernel).
__global__ void store_raised_kernel(float* out) { out[0] = 1.f; }

at::Tensor segment_sums(const at::Tensor& x, int64_t width) {
  at::Tensor out = at::empty_like(x);
  const int n = static_cast<int>(x.numel());
  segment_sums_kernel<<<(n + 63) / 64, 64, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), out.data_ptr<float>(), n, static_cast<int>(width));
  return out;
}

at::Tensor rotate(const at::Tensor& x, int64_t block, bool barrier) {
  at::Tensor out = at::empty_like(x);
  const auto kernel = barrier ? rotate_kernel : racy_rotate_kernel;
  kernel<<<static_cast<unsigned int>(x.numel() / block), static_cast<unsigned int>(block)>>>(
      x.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(x.numel()));
  return out;
}

at::Tensor two_sums(const at::Tensor& x, bool double_buffer) {
  at::Tensor out = at::empty({2 * x.numel()}, x.options());
  two_sums_kernel<<<1, static_cast<unsigned int>(x.numel())>>>(x.data_ptr<float>(), out.data_ptr<float>(),
                                                                  double_buffer);
  return out;
}

at::Tensor half_warp_sums(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  half_warp_sums_kernel<<<1, static_cast<unsigned int>(x.numel())>>>(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor block_sums(const at::Tensor& x, int64_t block) {
  at::Tensor out = at::empty({x.numel() / block}, x.options());
  block_sums_kernel<<<static_cast<unsigned int>(x.numel() / block), static_cast<unsigned int>(block),
                      block * sizeof(float)>>>(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// kind: "unwritten_shared", "deadlock", "bad_mask", "big_shared", "raised_shared", "big_grid", "grid_y_4",
// "big_block", "misaligned"
void misbehave(const at::Tensor& out, const std::string& kind) {
  float* p = out.data_ptr<float>();
  if (kind == "unwritten_shared") unwritten_shared_kernel<<<1, 32>>>(p);
  else if (kind == "deadlock") deadlock_kernel<<<1, 32>>>(p);
  else if (kind == "bad_mask") bad_mask_kernel<<<1, 32>>>(p);
  else if (kind == "big_shared") store_kernel<<<1, 1, 64 * 1024>>>(p);
  else if (kind == "raised_shared") {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(store_raised_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    store_raised_kernel<<<1, 1, 64 * 1024>>>(p);
  } else if (kind == "big_grid") store_kernel<<<dim3(1, 70000), 1>>>(p);
  else if (kind == "grid_y_4") store_kernel<<<dim3(1, 4), 1>>>(p);
  else if (kind == "big_block") store_kernel<<<1, 2048>>>(p);
  else if (kind == "misaligned") misaligned_kernel<<<1, 1>>>(p);
  else TORCH_CHECK(false, "unknown kind ", kind);
}

}  // namespace

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("segment_sums(Tensor x, int width) -> Tensor");
  m.def("rotate(Tensor x, int block, bool barrier) -> Tensor");
  m.def("block_sums(Tensor x, int block) -> Tensor");
  m.def("two_sums(Tensor x, bool double_buffer) -> Tensor");
  m.def("half_warp_sums(Tensor x) -> Tensor");
  m.def("misbehave(Tensor(a!) out, str kind) -> ()");
}

TORCH_LIBRARY_IMPL(cuda_emu_selftest, CUDA, m) {
  m.impl("segment_sums", &segment_sums);
  m.impl("rotate", &rotate);
  m.impl("block_sums", &block_sums);
  m.impl("two_sums", &two_sums);
  m.impl("half_warp_sums", &half_warp_sums);
  m.impl("misbehave", &misbehave);
}
