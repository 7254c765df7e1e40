// Normalized-cut Fiedler vector per sample: the CUDA kernels behind maskedssl::ncut_bipartition. Same
// function, solver and constants as the Triton kernels (kernels/ncut.py, whose docstring has the full story):
//
//   A_ij = max(cos(f_i, f_j), eps) (or 1 / eps around tau), d = A 1, M = D^-1/2 A D^-1/2,
//   v = D^-1/2 u2 with u2 the second eigenvector of M -> (B, N) float32; sign, split, seed and scores are
//   applied by maskedssl.ops.ncut.finish_partition.
//
// affinity_kernel: one block per (sample, 32 rows), 8 warps, each owning one 16 x 16 tile of a 32 x 64
//   output block; feature tiles of 32 columns of D are staged in shared memory and multiplied on tensor cores
//   (WMMA; fp16/bf16 operands exact with fp32 accumulation, fp32 operands as 3xTF32 hi/lo splits so they keep
//   fp32 accuracy). Row norms come from the same staged tiles (one warp per row, fixed order), so A and d are
//   deterministic. Writes A (B, N, N) fp32 and d (B, N) to a workspace: 2 B N^2 D FLOPs, B N D inputs read
//   (once per row block from L2), 4 B N^2 bytes written.
// lanczos_kernel: one block per sample, 256 threads, each owning entries i = tid + 256 v of every vector
//   (N <= 1024). A sits in shared memory when N^2 floats fit (N <= ~230 on an H100), else every product
//   streams it from L2/HBM; the Lanczos basis lives in a (B, STEPS, N) workspace that each thread only
//   reads back at its own entries, so it needs no synchronisation. Full reorthogonalisation, restarts,
//   convergence test and the tridiagonal solve (warp 0: 64-shift Sturm multisection, then inverse
//   iteration by lane 0) exactly as in the Triton kernel.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

#include "common.cuh"

namespace maskedssl {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kSteps = 32;      // Lanczos basis per cycle
constexpr int kCheck = 8;       // steps between convergence tests
constexpr int kMaxCycles = 16;  // restarts: at most kSteps * kMaxCycles products
constexpr float kTol = 1e-6f;   // residual |M y - theta y|
constexpr int kShifts = 64;     // multisection shifts per round (two per lane of warp 0)
constexpr int kRounds = 4;
constexpr float kDelta = 4e-6f;  // sigma - theta_max for inverse iteration
constexpr int kInvIters = 3;
constexpr float kPivMin = 1e-30f;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxN = 1024;
constexpr int kPerThread = kMaxN / kThreads;

constexpr int kRows = 32;  // affinity rows per block
constexpr int kCols = 64;  // affinity columns per block iteration
constexpr int kDepth = 32;  // columns of D staged per step (one per lane)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Operand type on the tensor cores, its k per mma, and the shared-memory row padding that keeps every
// fragment pointer 32-byte aligned.
template <typename T> struct Mma;
template <> struct Mma<float> {
  using type = float;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
};
template <> struct Mma<at::Half> {
  using type = __half;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
};
template <> struct Mma<at::BFloat16> {
  using type = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
};

template <typename T>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, Mma<T>::kK, float>;

// acc += a (16 x k, row major) * b^T (b: 16 x k row major, i.e. k x 16 column major)
template <typename T>
__device__ __forceinline__ void mma_step(Acc<T>& acc, const typename Mma<T>::type* a,
                                         const typename Mma<T>::type* b, int ldm) {
  using E = typename Mma<T>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb;
  wmma::load_matrix_sync(fa, a, ldm);
  wmma::load_matrix_sync(fb, b, ldm);
  wmma::mma_sync(acc, fa, fb, acc);
}

template <>
__device__ __forceinline__ void mma_step<float>(Acc<float>& acc, const float* a, const float* b, int ldm) {
  // 3xTF32: x = hi + lo with both halves tf32; hi*hi + hi*lo + lo*hi recovers fp32 accuracy
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a_hi, a_lo;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b_hi, b_lo;
  wmma::load_matrix_sync(a_hi, a, ldm);
  wmma::load_matrix_sync(b_hi, b, ldm);
#pragma unroll
  for (int t = 0; t < a_hi.num_elements; ++t) {
    const float x = a_hi.x[t];
    a_hi.x[t] = wmma::__float_to_tf32(x);
    a_lo.x[t] = wmma::__float_to_tf32(x - a_hi.x[t]);
  }
#pragma unroll
  for (int t = 0; t < b_hi.num_elements; ++t) {
    const float x = b_hi.x[t];
    b_hi.x[t] = wmma::__float_to_tf32(x);
    b_lo.x[t] = wmma::__float_to_tf32(x - b_hi.x[t]);
  }
  wmma::mma_sync(acc, a_lo, b_hi, acc);
  wmma::mma_sync(acc, a_hi, b_lo, acc);
  wmma::mma_sync(acc, a_hi, b_hi, acc);
}

// One warp stages `count` rows (starting at `row`) of a kDepth-wide slice of the features into shared
// memory, lane = column of D, and adds each row's sum of squares to sq[] in a fixed order.
template <typename E>
__device__ __forceinline__ void stage_rows(E* dst, int ld, float* sq, const E* f, int64_t s_n, int64_t s_d,
                                           int n, int d, int first, int row, int count, int k0, int lane) {
  for (int r = row; r < row + count; ++r) {
    const int gr = first + r;
    const int k = k0 + lane;
    E e{};  // value-initialised: all bits zero, +0.0
    if (gr < n && k < d) e = f[gr * s_n + k * s_d];
    const float x = to_float(e);
    dst[r * ld + lane] = e;
    const float s = warp_sum(x * x);
    if (lane == 0) sq[r] += s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) affinity_kernel(const typename Mma<T>::type* __restrict__ feats,
                                                            float* __restrict__ a, float* __restrict__ deg,
                                                            int n, int d, int64_t s_b, int64_t s_n,
                                                            int64_t s_d, bool use_tau, float tau, float eps) {
  using E = typename Mma<T>::type;
  constexpr int kLd = kDepth + Mma<T>::kPad;
  constexpr int kLdOut = kCols + 4;
  __shared__ alignas(32) E fr[kRows * kLd];
  __shared__ alignas(32) E fc[kCols * kLd];
  __shared__ alignas(32) float tile[kRows * kLdOut];
  __shared__ float sq_r[kRows], sq_c[kCols], deg_r[kRows];

  const int b = blockIdx.x;
  const int row0 = blockIdx.y * kRows;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const E* f = feats + b * s_b;
  float* a_b = a + static_cast<int64_t>(b) * n * n;
  const int tile_r = (warp / 4) * 16, tile_c = (warp % 4) * 16;
  if (tid < kRows) deg_r[tid] = 0.f;

  for (int col0 = 0; col0 < n; col0 += kCols) {
    if (tid < kRows) sq_r[tid] = 0.f;
    if (tid < kCols) sq_c[tid] = 0.f;
    __syncthreads();
    Acc<T> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < d; k0 += kDepth) {
      stage_rows(fr, kLd, sq_r, f, s_n, s_d, n, d, row0, warp * (kRows / kWarps), kRows / kWarps, k0, lane);
      stage_rows(fc, kLd, sq_c, f, s_n, s_d, n, d, col0, warp * (kCols / kWarps), kCols / kWarps, k0, lane);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kDepth; kk += Mma<T>::kK)
        mma_step<T>(acc, fr + tile_r * kLd + kk, fc + tile_c * kLd + kk, kLd);
      __syncthreads();
    }
    wmma::store_matrix_sync(tile + tile_r * kLdOut + tile_c, acc, kLdOut, wmma::mem_row_major);
    __syncthreads();
    // epilogue: warp w finishes rows 4w..4w+3, lanes cover two columns each
    for (int r = warp * (kRows / kWarps); r < (warp + 1) * (kRows / kWarps); ++r) {
      const int gr = row0 + r;
      const float inv_r = 1.f / fmaxf(sqrtf(sq_r[r]), 1e-12f);
      float row_sum = 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h, gc = col0 + c;
        if (gr < n && gc < n) {
          const float cos = tile[r * kLdOut + c] * inv_r * (1.f / fmaxf(sqrtf(sq_c[c]), 1e-12f));
          const float v = use_tau ? (cos > tau ? 1.f : eps) : fmaxf(cos, eps);
          a_b[static_cast<int64_t>(gr) * n + gc] = v;
          row_sum += v;
        }
      }
      row_sum = warp_sum(row_sum);
      if (lane == 0) deg_r[r] += row_sum;
    }
    __syncthreads();
  }
  if (tid < kRows && row0 + tid < n) deg[static_cast<int64_t>(b) * n + row0 + tid] = deg_r[tid];
}

__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

// Top eigenvector of the k x k tridiagonal (alpha, beta) into z[0:k] (unit norm), run by warp 0.
// Returns (to lane 0) nothing; z is in shared memory.
__device__ void top_ritz(const float* alpha, const float* beta, float* z, int k, int lane) {
  // Gershgorin interval (k <= 32: one index per lane)
  float lo = INFINITY, hi = -INFINITY;
  if (lane < k) {
    const float bn = lane < k - 1 ? fabsf(beta[lane]) : 0.f;
    const float bp = lane > 0 ? fabsf(beta[lane - 1]) : 0.f;
    lo = alpha[lane] - bp - bn;
    hi = alpha[lane] + bp + bn;
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  // multisection on the Sturm count: negative pivots of T - shift I = eigenvalues below the shift
  for (int round = 0; round < kRounds; ++round) {
    float new_lo = lo, new_hi = hi;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float shift = lo + (hi - lo) * (static_cast<float>(lane + 32 * h + 1) / (kShifts + 1));
      float piv = alpha[0] - shift;
      int below = piv < 0.f;
      for (int i = 1; i < k; ++i) {
        if (fabsf(piv) < kPivMin) piv = -kPivMin;
        piv = (alpha[i] - shift) - beta[i - 1] * beta[i - 1] / piv;
        below += piv < 0.f;
      }
      if (below < k) new_lo = fmaxf(new_lo, shift);
      else new_hi = fminf(new_hi, shift);
    }
    lo = warp_max(new_lo);
    hi = warp_min(new_hi);
  }
  if (lane != 0) return;
  // inverse iteration on sigma I - T (positive definite): LDL^T without pivoting
  const float sigma = hi + kDelta;
  float piv_s[kSteps], fwd_s[kSteps], rhs[kSteps];
  for (int i = 0; i < k; ++i) rhs[i] = 1.f;
  for (int it = 0; it < kInvIters; ++it) {
    float piv = fmaxf(sigma - alpha[0], kPivMin);
    float u = rhs[0];
    piv_s[0] = piv;
    fwd_s[0] = u;
    for (int i = 1; i < k; ++i) {
      const float b = beta[i - 1];
      u = rhs[i] + (b / piv) * u;
      piv = fmaxf((sigma - alpha[i]) - b * b / piv, kPivMin);
      piv_s[i] = piv;
      fwd_s[i] = u;
    }
    float zi = fwd_s[k - 1] / piv_s[k - 1];
    rhs[k - 1] = zi;
    for (int i = k - 2; i >= 0; --i) {
      zi = fwd_s[i] / piv_s[i] + (beta[i] / piv_s[i]) * zi;
      rhs[i] = zi;
    }
    float norm = 0.f;
    for (int i = 0; i < k; ++i) norm += rhs[i] * rhs[i];
    norm = sqrtf(norm);
    for (int i = 0; i < k; ++i) rhs[i] /= norm;
  }
  for (int i = 0; i < kSteps; ++i) z[i] = i < k ? rhs[i] : 0.f;
}

// A fixed pseudo-random value in [0, 1) per index: the lowbias32 integer hash (kernels/ncut.py _hash01).
__device__ __forceinline__ float hash01(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return static_cast<float>(h >> 8) * (1.f / 16777216.f);
}

template <bool kOnChip>
__global__ void __launch_bounds__(kThreads) lanczos_kernel(const float* __restrict__ a_all,
                                                           const float* __restrict__ deg_all,
                                                           float* __restrict__ basis_all, float* __restrict__ out,
                                                           int n) {
  extern __shared__ float a_smem[];
  __shared__ float xs[kMaxN];
  __shared__ float red[kWarps * kSteps];
  __shared__ float alpha_s[kSteps], beta_s[kSteps], z_s[kSteps], h_s[kSteps];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const float* a_g = a_all + b * nn;
  float* basis = basis_all + static_cast<int64_t>(b) * kSteps * n;
  const float* a = a_g;
  if constexpr (kOnChip) {
    for (int64_t e = tid; e < nn; e += kThreads) a_smem[e] = a_g[e];
    a = a_smem;
  }

  float s[kPerThread], u1[kPerThread], x[kPerThread], q[kPerThread], q_prev[kPerThread], w[kPerThread];
  float part = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const int i = tid + v * kThreads;
    const float dg = i < n ? deg_all[static_cast<int64_t>(b) * n + i] : 0.f;
    s[v] = i < n ? rsqrtf(dg) : 0.f;
    u1[v] = sqrtf(dg);
    part += dg;
    // fixed start vector: alternating signs keep it off u1, whose entries are all positive; hashed
    // magnitudes keep it off structured Fiedler vectors (two equal halves), as in kernels/ncut.py
    x[v] = i < n ? (i % 2 == 0 ? 1.f : -1.f) * (1.f + hash01(static_cast<uint32_t>(i))) : 0.f;
  }
  const float u1_norm = sqrtf(block_sum(part, red));
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) u1[v] /= u1_norm;

  auto dot = [&](const float* p, const float* r) {
    float acc = 0.f;
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) acc += p[v] * r[v];
    return block_sum(acc, red);
  };

  int converged = 0;
  for (int cycle = 0; cycle < kMaxCycles && !converged; ++cycle) {
    const float xu = dot(x, u1);
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) x[v] -= xu * u1[v];
    const float inv_norm = rsqrtf(dot(x, x));
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) {
      const int i = tid + v * kThreads;
      q[v] = x[v] * inv_norm;
      q_prev[v] = 0.f;
      if (i < n) basis[i] = q[v];
    }
    float beta_prev = 0.f;
    int j = 0;
    while (j < kSteps && !converged) {
      // w = M q = D^-1/2 A D^-1/2 q, reading A by columns (A is symmetric) so threads touch consecutive floats
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int i = tid + v * kThreads;
        if (i < n) xs[i] = s[v] * q[v];
      }
      __syncthreads();
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int i = tid + v * kThreads;
        float acc = 0.f;
        if (i < n)
          for (int c = 0; c < n; ++c) acc += a[static_cast<int64_t>(c) * n + i] * xs[c];
        w[v] = acc * s[v];
      }
      __syncthreads();
      const float alpha = dot(q, w);
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) w[v] -= alpha * q[v] + beta_prev * q_prev[v];
      for (int pass = 0; pass < 2; ++pass) {
        const float wu = dot(w, u1);
#pragma unroll
        for (int v = 0; v < kPerThread; ++v) w[v] -= wu * u1[v];
        // classical Gram-Schmidt against q_0..q_j: all j + 1 projections in one block reduction
        for (int r = 0; r <= j; ++r) {
          float acc = 0.f;
#pragma unroll
          for (int v = 0; v < kPerThread; ++v) {
            const int i = tid + v * kThreads;
            if (i < n) acc += basis[static_cast<int64_t>(r) * n + i] * w[v];
          }
          acc = warp_sum(acc);
          if (lane == 0) red[warp * kSteps + r] = acc;
        }
        __syncthreads();
        if (tid <= j) {
          float h = 0.f;
          for (int ww = 0; ww < kWarps; ++ww) h += red[ww * kSteps + tid];
          h_s[tid] = h;
        }
        __syncthreads();
        for (int r = 0; r <= j; ++r) {
          const float h = h_s[r];
#pragma unroll
          for (int v = 0; v < kPerThread; ++v) {
            const int i = tid + v * kThreads;
            if (i < n) w[v] -= h * basis[static_cast<int64_t>(r) * n + i];
          }
        }
        __syncthreads();
      }
      const float beta = sqrtf(dot(w, w));
      if (tid == 0) {
        alpha_s[j] = alpha;
        beta_s[j] = beta;
      }
      ++j;
      if (j % kCheck == 0 || j == kSteps || beta <= kTol) {
        __syncthreads();
        if (warp == 0) top_ritz(alpha_s, beta_s, z_s, j, lane);
        __syncthreads();
        converged = beta * fabsf(z_s[j - 1]) <= kTol;
      }
      const float inv_beta = 1.f / fmaxf(beta, kPivMin);
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int i = tid + v * kThreads;
        q_prev[v] = q[v];
        q[v] = w[v] * inv_beta;
        if (j < kSteps && i < n) basis[static_cast<int64_t>(j) * n + i] = q[v];
      }
      beta_prev = beta;
    }
    // Ritz vector: the basis combined with the tridiagonal's top eigenvector
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) {
      const int i = tid + v * kThreads;
      float acc = 0.f;
      if (i < n)
        for (int r = 0; r < j; ++r) acc += z_s[r] * basis[static_cast<int64_t>(r) * n + i];
      x[v] = acc;
    }
    __syncthreads();  // z_s is rewritten by the next cycle's solves
  }
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const int i = tid + v * kThreads;
    if (i < n) out[static_cast<int64_t>(b) * n + i] = x[v] * s[v];
  }
}

// The most dynamic shared memory (A on chip) lanczos_kernel<true> can take on `device`: the opt-in limit
// per block less the kernel's static arrays, as the runtime reports them. The function's limit is raised
// to exactly that, once per device and never lowered, so concurrent calls cannot undo each other.
int lanczos_dynamic_smem(int device) {
  static std::atomic<int> budget[64];  // 0 until queried; a race only sets the same value twice
  std::atomic<int>& slot = budget[device % 64];
  int value = slot.load();
  if (value == 0) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, lanczos_kernel<true>));
    value = std::max(1, optin - static_cast<int>(attributes.sharedSizeBytes));
    C10_CUDA_CHECK(cudaFuncSetAttribute(lanczos_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, value));
    slot.store(value);
  }
  return value;
}

template <typename T>
void launch_affinity(const at::Tensor& feats, at::Tensor& a, at::Tensor& deg, std::optional<double> tau,
                     double eps, cudaStream_t stream) {
  using E = typename Mma<T>::type;
  const int64_t n = feats.size(1);
  const dim3 grid(static_cast<unsigned int>(feats.size(0)), ceil_div(n, kRows));
  affinity_kernel<T><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const E*>(feats.data_ptr<T>()), a.data_ptr<float>(), deg.data_ptr<float>(),
      static_cast<int>(n), static_cast<int>(feats.size(2)), feats.stride(0), feats.stride(1), feats.stride(2),
      tau.has_value(), static_cast<float>(tau.value_or(0.0)), static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor ncut_fiedler_cuda(const at::Tensor& feats, std::optional<double> tau, double eps) {
  TORCH_CHECK(feats.is_cuda() && feats.dim() == 3, "ncut_fiedler_cuda: feats must be a 3-D CUDA tensor");
  const int64_t bsz = feats.size(0), n = feats.size(1), d = feats.size(2);
  TORCH_CHECK(n >= 2 && n <= kMaxN, "ncut_fiedler_cuda: N must be in [2, ", kMaxN, "], got ", n);
  c10::cuda::CUDAGuard guard(feats.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = feats.options().dtype(at::kFloat);
  at::Tensor out = empty_output({bsz, n}, f32);
  if (bsz == 0) return out;
  at::Tensor a = at::empty({bsz, n, n}, f32);
  at::Tensor deg = at::empty({bsz, n}, f32);
  at::Tensor basis = at::empty({bsz, kSteps, n}, f32);

  switch (feats.scalar_type()) {
    case at::kFloat: launch_affinity<float>(feats, a, deg, tau, eps, stream); break;
    case at::kHalf: launch_affinity<at::Half>(feats, a, deg, tau, eps, stream); break;
    case at::kBFloat16: launch_affinity<at::BFloat16>(feats, a, deg, tau, eps, stream); break;
    default: TORCH_CHECK(false, "ncut_fiedler_cuda: feats must be float32, float16 or bfloat16");
  }

  const int64_t a_bytes = static_cast<int64_t>(sizeof(float)) * n * n;
  const unsigned int grid_s = static_cast<unsigned int>(bsz);
  if (a_bytes <= lanczos_dynamic_smem(feats.get_device())) {
    lanczos_kernel<true><<<grid_s, kThreads, a_bytes, stream>>>(a.data_ptr<float>(), deg.data_ptr<float>(),
                                                                 basis.data_ptr<float>(), out.data_ptr<float>(),
                                                                 static_cast<int>(n));
  } else {
    lanczos_kernel<false><<<grid_s, kThreads, 0, stream>>>(a.data_ptr<float>(), deg.data_ptr<float>(),
                                                            basis.data_ptr<float>(), out.data_ptr<float>(),
                                                            static_cast<int>(n));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace maskedssl

TORCH_LIBRARY_IMPL(maskedssl, CUDA, m) { m.impl("ncut_fiedler_cuda", &maskedssl::ncut_fiedler_cuda); }
