// Token gather / scatter for masked autoencoders: the CUDA kernels behind maskedssl::gather_tokens and
// maskedssl::scatter_tokens, forward and backward. Same algorithms and byte counts as the Triton kernels
// (kernels/token_gather.py, whose docstring has the full story):
//
//   gather  forward  out[b, k] = x[b, i] + pos[i], i = ids_keep[b, k]
//   scatter forward  out[b, l] = (x_vis[b, r] if r < K else mask_token) + pos[l], r = ids_restore[b, l]
//     one kernel (gather_rows_kernel): every output row copies one source row and adds one position row
//     in fp32, rounded once to the data type as torch rounds, so it is bit-identical to the torch backend.
//   backward: the index is inverted per batch row into CSR (invert_index_kernel: a stable counting sort),
//     then every gradient row is the fp32 sum of its segment in index order (segment_sum_kernel), written
//     once; repeated indices and non-permutations are summed, never raced. Sums over the batch (grad_pos,
//     grad_mask_token) are per-block fp32 partials summed by ATen in a fixed order (bitwise reproducible);
//     in the non-deterministic mode grad_pos is added with fp32 atomics into one buffer instead (the mask
//     token keeps its partials: every block would hit the same D addresses).
//
// Layout: token tensors (B, rows, D) with unit stride along D and any strides along B and rows; indices any
// strides; outputs contiguous. Threads along x cover a row in VEC-element packs, threads along y cover
// rows. Packs are 16 bytes when D and the row strides are multiples of 16 / sizeof(T) elements and every
// row pointer is 16-byte aligned; otherwise the same kernels run with VEC = 1.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace maskedssl {
namespace {

constexpr int kThreads = 256;
// CUDA's limit on gridDim.y, which carries the batch chunk. The CPU emulator of the tests builds with a
// small one, so every emulated backward with a few batch rows runs the chunking that B > 65535 needs.
#ifndef MASKEDSSL_MAX_GRID_Y
#define MASKEDSSL_MAX_GRID_Y 65535
#endif
constexpr int64_t kMaxGridY = MASKEDSSL_MAX_GRID_Y;

// The training dtypes only (MASKEDSSL_DISPATCH_FLOAT_TYPES, common.cuh): the kernels add and accumulate in
// fp32, which would silently round float64.

// Threads along x cover a row's VEC-packs (whole warps for wide rows, so D = 768 in bf16 runs 96 threads per
// row, none idle; a power of two for narrow ones, several rows per warp); threads along y cover rows.
dim3 row_block(int64_t packs_per_row) {
  unsigned int x = 1;
  if (packs_per_row >= 32) {
    x = static_cast<unsigned int>(std::min<int64_t>((packs_per_row + 31) / 32 * 32, kThreads));
  } else {
    while (x < packs_per_row) x <<= 1;
  }
  return dim3(x, kThreads / x);
}

// The chunk index is gridDim.y, which stops at kMaxGridY.
int64_t min_batch_chunk(int64_t batch) { return (batch + kMaxGridY - 1) / kMaxGridY; }

// Batch rows one block sums over when the op reduces over the batch: each chunk leaves one fp32 partial of
// partial_elements (stored and read back, or added atomically); chunks are as many as keep those under 1/32
// of the bytes the kernel moves anyway. Same rule as _batch_chunk in kernels/token_gather.py.
int64_t batch_chunk(int64_t batch, int64_t main_bytes, int64_t partial_elements) {
  const int64_t partial_bytes = std::max<int64_t>(1, 4 * partial_elements);
  const int64_t chunks = std::max<int64_t>(1, std::min(batch, main_bytes / (32 * partial_bytes)));
  return std::max((batch + chunks - 1) / chunks, min_batch_chunk(batch));
}

// ---------------------------------------------------------------------------------------------- forward
// out[b, i] = (src[b, r] if fill is null or r < rows_src else fill) + pos[r if pos_at_index else i],
// r = ids[b, i]. One thread row per output row.
template <typename T, typename I, int VEC>
__global__ void gather_rows_kernel(const T* __restrict__ src, const I* __restrict__ ids, const T* __restrict__ fill,
                                   const T* __restrict__ pos, T* __restrict__ out, int64_t batch, int64_t rows_out,
                                   int64_t rows_src, int64_t packs, int64_t src_stride_b, int64_t src_stride_r,
                                   int64_t ids_stride_b, int64_t ids_stride_r, int64_t pos_stride, bool pos_at_index) {
  using P = Pack<T, VEC>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= batch * rows_out) return;
  const int64_t b = row / rows_out;
  const int64_t i = row - b * rows_out;
  const int64_t r = static_cast<int64_t>(ids[b * ids_stride_b + i * ids_stride_r]);
  const T* row_src = fill == nullptr || r < rows_src ? src + b * src_stride_b + r * src_stride_r : fill;
  const P* from = reinterpret_cast<const P*>(row_src);
  const P* add = pos == nullptr ? nullptr : reinterpret_cast<const P*>(pos + (pos_at_index ? r : i) * pos_stride);
  P* to = reinterpret_cast<P*>(out + row * packs * VEC);
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    P v = from[c];
    if (add != nullptr) {
      const P p = add[c];
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(static_cast<float>(v.v[j]) + static_cast<float>(p.v[j]));
    }
    to[c] = v;
  }
}

at::Tensor gather_rows(const at::Tensor& src_in, const at::Tensor& ids, const std::optional<at::Tensor>& fill_in,
                       const std::optional<at::Tensor>& pos_in, bool pos_at_index) {
  const int64_t batch = src_in.size(0), rows_src = src_in.size(1), d = src_in.size(2), rows_out = ids.size(1);
  at::Tensor out = empty_output({batch, rows_out, d}, src_in.options());
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.stride(2) == 1 ? src_in : src_in.contiguous();
  const at::Tensor fill = fill_in.has_value() ? fill_in->reshape({d}).contiguous() : at::Tensor();
  const at::Tensor pos = pos_in.has_value() ? (pos_in->stride(1) == 1 ? *pos_in : pos_in->contiguous()) : at::Tensor();
  const int64_t pos_stride = pos.defined() ? pos.stride(0) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MASKEDSSL_DISPATCH_FLOAT_TYPES(src.scalar_type(), "gather_tokens_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_tokens_cuda", [&] {
      const scalar_t* fill_ptr = fill.defined() ? fill.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pos_ptr = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
      const bool vectorized = can_vectorize<scalar_t>(d, {src.stride(0), src.stride(1), pos_stride},
                                                      {src.data_ptr(), fill_ptr, pos_ptr, out.data_ptr()});
      with_vec<scalar_t>(vectorized, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const dim3 block = row_block(d / VEC);
        const unsigned int grid = ceil_div(batch * rows_out, block.y);
        gather_rows_kernel<scalar_t, index_t, VEC><<<grid, block, 0, stream>>>(
            src.data_ptr<scalar_t>(), ids.data_ptr<index_t>(), fill_ptr, pos_ptr, out.data_ptr<scalar_t>(), batch,
            rows_out, rows_src, d / VEC, src.stride(0), src.stride(1), ids.stride(0), ids.stride(1), pos_stride,
            pos_at_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep, const std::optional<at::Tensor>& pos) {
  return gather_rows(x, ids_keep, std::nullopt, pos, /*pos_at_index=*/true);
}

at::Tensor scatter_tokens_cuda(const at::Tensor& x_vis, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                               const std::optional<at::Tensor>& pos) {
  return gather_rows(x_vis, ids_restore, mask_token, pos, /*pos_at_index=*/false);
}

// ---------------------------------------------------------------------------------------------- index inversion
// For batch row b (one block): starts[b, m] = #{n : ids[b, n] < m} for m in [0, M], and perm[b, rank(n)] = n with
// rank(n) = #{n' : (ids[b, n'], n') < (ids[b, n], n)}, a stable counting sort. O(N * (N + M)) compares of a
// row that stays in L1; N and M are a few hundred tokens.
template <typename I>
__global__ void invert_index_kernel(const I* __restrict__ ids, int* __restrict__ perm, int* __restrict__ starts,
                                    int64_t n_rows, int64_t m_rows, int64_t stride_b, int64_t stride_n) {
  const int64_t b = blockIdx.x;
  const I* row = ids + b * stride_b;
  for (int64_t m = threadIdx.x; m <= m_rows; m += blockDim.x) {
    int count = 0;
    for (int64_t q = 0; q < n_rows; ++q) count += static_cast<int64_t>(row[q * stride_n]) < m;
    starts[b * (m_rows + 1) + m] = count;
  }
  for (int64_t n = threadIdx.x; n < n_rows; n += blockDim.x) {
    const int64_t v = row[n * stride_n];
    int rank = 0;
    for (int64_t q = 0; q < n_rows; ++q) {
      const int64_t w = row[q * stride_n];
      rank += w < v || (w == v && q < n);
    }
    perm[b * n_rows + rank] = static_cast<int>(n);
  }
}

std::tuple<at::Tensor, at::Tensor> invert_index(const at::Tensor& ids, int64_t targets, cudaStream_t stream) {
  const int64_t batch = ids.size(0), n = ids.size(1);
  const auto options = ids.options().dtype(at::kInt);
  at::Tensor perm = at::empty({batch, n}, options);
  at::Tensor starts = at::empty({batch, targets + 1}, options);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "invert_index_cuda", [&] {
    invert_index_kernel<index_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
        ids.data_ptr<index_t>(), perm.data_ptr<int>(), starts.data_ptr<int>(), n, targets, ids.stride(0),
        ids.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {perm, starts};
}

// ---------------------------------------------------------------------------------------------- backward
// out[b, m] = sum of grad[b, perm[b, j]] over j in [starts[b, m], starts[b, m + 1]), in fp32, in order. Block
// (x, y) covers rows m of batch rows [y * batch_chunk, (y + 1) * batch_chunk). With pos_part, each thread's
// sum of out[:, m] over its chunk goes to pos_part[y, m] (deterministic) or is added atomically to pos_part[m].
// A batch chunk's fp32 partial sums: stored in the chunk's own row (deterministic), or added atomically.
template <int VEC>
__device__ __forceinline__ void store_partial(float* dst, const float (&acc)[VEC], bool atomic) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (atomic)
      atomicAdd(dst + v, acc[v]);
    else
      dst[v] = acc[v];
  }
}

template <typename T, int VEC>
__global__ void segment_sum_kernel(const T* __restrict__ grad, const int* __restrict__ perm,
                                   const int* __restrict__ starts, T* __restrict__ out, float* __restrict__ pos_part,
                                   int64_t batch, int64_t m_rows, int64_t n_rows, int64_t packs, int64_t batch_chunk,
                                   bool atomic) {
  using P = Pack<T, VEC>;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (m >= m_rows) return;
  const int64_t d = packs * VEC;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * batch_chunk;
  const int64_t b1 = std::min(batch, b0 + batch_chunk);
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    float pos_acc[VEC] = {};
    for (int64_t b = b0; b < b1; ++b) {
      const int* segment = starts + b * (m_rows + 1) + m;
      const int begin = segment[0], end = segment[1];
      float acc[VEC] = {};
      for (int j = begin; j < end; ++j) {
        const int64_t n = perm[b * n_rows + j];
        const P g = reinterpret_cast<const P*>(grad + (b * n_rows + n) * d)[c];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += static_cast<float>(g.v[v]);
      }
      P o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        o.v[v] = static_cast<T>(acc[v]);
        pos_acc[v] += acc[v];
      }
      reinterpret_cast<P*>(out + (b * m_rows + m) * d)[c] = o;
    }
    if (pos_part != nullptr)
      store_partial<VEC>(pos_part + ((atomic ? 0 : static_cast<int64_t>(blockIdx.y) * m_rows) + m) * d + c * VEC,
                         pos_acc, atomic);
  }
}

// Sums of grad (B, L, D) over one block's rows l and batch chunk: of the rows with ids[b, l] >= num_visible into
// one row of mask_part (reduced over the block's rows through shared memory, in a fixed order), and, with
// pos_part, of every row per l as in segment_sum_kernel (stored per chunk, or added atomically). Without
// pos_part only the masked rows are read: segment_sum_kernel reads the visible ones.
template <typename T, typename I, int VEC>
__global__ void masked_sum_kernel(const T* __restrict__ grad, const I* __restrict__ ids, float* __restrict__ mask_part,
                                  float* __restrict__ pos_part, int64_t batch, int64_t length, int64_t num_visible,
                                  int64_t packs, int64_t ids_stride_b, int64_t ids_stride_l, int64_t batch_chunk,
                                  bool atomic) {
  using P = Pack<T, VEC>;
  extern __shared__ float block_sums[];  // blockDim.y * blockDim.x * VEC
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t d = packs * VEC;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * batch_chunk;
  const int64_t b1 = std::min(batch, b0 + batch_chunk);
  // Every thread runs the same number of iterations: the block synchronises inside.
  for (int64_t c0 = 0; c0 < packs; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    float mask_acc[VEC] = {};
    if (l < length && c < packs) {
      float pos_acc[VEC] = {};
      for (int64_t b = b0; b < b1; ++b) {
        const bool masked = static_cast<int64_t>(ids[b * ids_stride_b + l * ids_stride_l]) >= num_visible;
        if (!masked && pos_part == nullptr) continue;
        const P g = reinterpret_cast<const P*>(grad + (b * length + l) * d)[c];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float value = static_cast<float>(g.v[v]);
          pos_acc[v] += value;
          if (masked) mask_acc[v] += value;
        }
      }
      if (pos_part != nullptr)
        store_partial<VEC>(pos_part + ((atomic ? 0 : static_cast<int64_t>(blockIdx.y) * length) + l) * d + c * VEC,
                           pos_acc, atomic);
    }
    float* mine = block_sums + (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) mine[v] = mask_acc[v];
    __syncthreads();
    if (threadIdx.y == 0 && c < packs) {
      float total[VEC] = {};
      for (unsigned int y = 0; y < blockDim.y; ++y) {
        const float* theirs = block_sums + (y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
        for (int v = 0; v < VEC; ++v) total[v] += theirs[v];
      }
      float* dst = mask_part + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * d + c * VEC;
#pragma unroll
      for (int v = 0; v < VEC; ++v) dst[v] = total[v];
    }
    __syncthreads();
  }
}

// fp32 accumulator for a sum over the batch: one partial per chunk (deterministic) or one zeroed buffer (atomics).
at::Tensor batch_sum_buffer(int64_t chunks, at::IntArrayRef shape, bool deterministic, const at::Tensor& like) {
  const auto options = like.options().dtype(at::kFloat);
  if (!deterministic) return at::zeros(shape, options);
  std::vector<int64_t> sizes{chunks};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return at::empty(sizes, options);
}

at::Tensor finish_batch_sum(const at::Tensor& buffer, bool deterministic, at::ScalarType dtype) {
  return (deterministic ? buffer.sum(0) : buffer).to(dtype);
}

void launch_segment_sum(const at::Tensor& grad, const at::Tensor& perm, const at::Tensor& starts, at::Tensor& out,
                        float* pos_part, int64_t m_rows, int64_t chunk, int64_t chunks, bool atomic,
                        cudaStream_t stream) {
  const int64_t batch = grad.size(0), n_rows = grad.size(1), d = grad.size(2);
  MASKEDSSL_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "segment_sum_cuda", [&] {
    const bool vectorized = can_vectorize<scalar_t>(d, {}, {grad.data_ptr(), out.data_ptr()});
    with_vec<scalar_t>(vectorized, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 block = row_block(d / VEC);
      const dim3 grid(ceil_div(m_rows, block.y), static_cast<unsigned int>(chunks));
      segment_sum_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
          grad.data_ptr<scalar_t>(), perm.data_ptr<int>(), starts.data_ptr<int>(), out.data_ptr<scalar_t>(), pos_part,
          batch, m_rows, n_rows, d / VEC, chunk, atomic);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_keep,
                                                               int64_t length, bool need_pos, bool deterministic) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = grad.size(0), d = grad.size(2);
  at::Tensor grad_x = empty_output({batch, length, d}, grad.options());
  at::Tensor grad_pos = need_pos ? at::Tensor() : at::empty({0}, grad.options());
  if (grad_x.numel() == 0) {
    if (need_pos) grad_pos = at::zeros({length, d}, grad.options());
    return {grad_x, grad_pos};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [perm, starts] = invert_index(ids_keep, length, stream);
  const int64_t chunk =
      need_pos ? batch_chunk(batch, batch * length * d * grad.element_size(), length * d) : min_batch_chunk(batch);
  const int64_t chunks = (batch + chunk - 1) / chunk;
  at::Tensor pos_part = need_pos ? batch_sum_buffer(chunks, {length, d}, deterministic, grad) : at::Tensor();
  launch_segment_sum(grad, perm, starts, grad_x, need_pos ? pos_part.data_ptr<float>() : nullptr, length, chunk,
                     chunks, !deterministic, stream);
  if (need_pos) grad_pos = finish_batch_sum(pos_part, deterministic, grad.scalar_type());
  return {grad_x, grad_pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_backward_cuda(const at::Tensor& grad_in,
                                                                            const at::Tensor& ids_restore,
                                                                            int64_t num_visible, bool need_pos,
                                                                            bool deterministic) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t batch = grad.size(0), length = grad.size(1), d = grad.size(2);
  if (grad.numel() == 0) {
    return {at::zeros({batch, num_visible, d}, grad.options()), at::zeros({d}, grad.options()),
            need_pos ? at::zeros({length, d}, grad.options()) : at::empty({0}, grad.options())};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_x_vis = empty_output({batch, num_visible, d}, grad.options());
  if (num_visible > 0) {
    auto [perm, starts] = invert_index(ids_restore, num_visible, stream);
    const int64_t chunk = min_batch_chunk(batch);
    launch_segment_sum(grad, perm, starts, grad_x_vis, nullptr, num_visible, chunk, (batch + chunk - 1) / chunk,
                       false, stream);
  }

  at::Tensor grad_mask, grad_pos = at::empty({0}, grad.options());
  MASKEDSSL_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "scatter_tokens_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(ids_restore.scalar_type(), "scatter_tokens_backward_cuda", [&] {
      with_vec<scalar_t>(can_vectorize<scalar_t>(d, {}, {grad.data_ptr()}), [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const dim3 block = row_block(d / VEC);
        const int64_t row_blocks = ceil_div(length, block.y);
        const int64_t partial_elements = row_blocks * d + (need_pos ? length * d : 0);
        const int64_t chunk = batch_chunk(batch, batch * length * d * grad.element_size(), partial_elements);
        const int64_t chunks = (batch + chunk - 1) / chunk;
        at::Tensor mask_part = at::empty({chunks * row_blocks, d}, grad.options().dtype(at::kFloat));
        at::Tensor pos_part = need_pos ? batch_sum_buffer(chunks, {length, d}, deterministic, grad) : at::Tensor();
        const dim3 grid(static_cast<unsigned int>(row_blocks), static_cast<unsigned int>(chunks));
        const size_t shared = static_cast<size_t>(block.x) * block.y * VEC * sizeof(float);
        masked_sum_kernel<scalar_t, index_t, VEC><<<grid, block, shared, stream>>>(
            grad.data_ptr<scalar_t>(), ids_restore.data_ptr<index_t>(), mask_part.data_ptr<float>(),
            need_pos ? pos_part.data_ptr<float>() : nullptr, batch, length, num_visible, d / VEC,
            ids_restore.stride(0), ids_restore.stride(1), chunk, !deterministic);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_mask = mask_part.sum(0).to(grad.scalar_type());
        if (need_pos) grad_pos = finish_batch_sum(pos_part, deterministic, grad.scalar_type());
      });
    });
  });
  return {grad_x_vis, grad_mask, grad_pos};
}

}  // namespace
}  // namespace maskedssl

TORCH_LIBRARY_IMPL(maskedssl, CUDA, m) {
  m.impl("gather_tokens_cuda", &maskedssl::gather_tokens_cuda);
  m.impl("scatter_tokens_cuda", &maskedssl::scatter_tokens_cuda);
  m.impl("gather_tokens_backward_cuda", &maskedssl::gather_tokens_backward_cuda);
  m.impl("scatter_tokens_backward_cuda", &maskedssl::scatter_tokens_backward_cuda);
}
