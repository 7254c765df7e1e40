// Normalized-cut Fiedler vector per sample: the CUDA path behind maskedssl::ncut_bipartition. Same
// function, eigensolver and constants as the Triton kernels (kernels/ncut.py, whose docstring has the
// full story):
//
//   A_ij = max(cos(f_i, f_j), eps) (or 1 / eps around tau), d = A 1, M = D^-1/2 A D^-1/2,
//   v = D^-1/2 u2 with u2 the second eigenvector of M -> (B, N) float32; then partition_kernel (below)
//   applies the sign, split and seed rules of maskedssl.ops.ncut.split_partition and scores every patch
//   against the foreground's mean feature, or partition_gram_kernel does the same from the Gram matrix
//   (fewer bytes for 16-bit features with N <= D). ncut_bipartition_cuda runs it all in one call, on the
//   Gram matrix ncut_gram_cuda computed where the caller checked the features through G's diagonal.
//
// Gram matrix: G = F F^T per sample by cuBLAS (at::bmm on tensor cores with fp32 output and accumulation;
//   fp32 features as a bf16 hi/lo split, see gram_matrix): 2 B N^2 D FLOPs (twice that for fp32), B N D
//   inputs read once, 4 B N^2 bytes written. A tuned batched GEMM is what a hand-written tile loop would
//   have to match; everything after it is fused into one kernel.
// lanczos_kernel: one block per sample, 256 threads, each owning entries i = tid + 256 v of every vector
//   (N <= 1024). It reads G once: the row norms from its diagonal, then A_ci = affinity(G_ci / (|f_c|
//   |f_i|)). A sits in shared memory when N^2 floats fit (N <= ~236 on an H100), else every product
//   streams G from L2/HBM and applies the affinity on the fly. Products read A by columns (thread i sums
//   A_ci x_c: consecutive threads, consecutive floats); degrees are the same column sums, so the solver
//   works with one consistent matrix even where cuBLAS rounds G_ij and G_ji differently. The Lanczos basis
//   lives in a (B, STEPS, N) workspace. Full reorthogonalisation (all projections of a pass computed by
//   the 8 warps in parallel, then subtracted by each thread at its own entries), restarts, convergence
//   test and the tridiagonal solve (warp 0: 64-shift Sturm multisection, then inverse iteration by lane 0)
//   exactly as in the Triton kernel, and so is the entry of v of each row of zeros of degree below 1.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.cuh"

namespace maskedssl {
namespace {

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
constexpr int kPartitionMaxD = 2048;  // partition_kernel's shared memory, 9 D + 2 N floats, stays <= 80 KB
constexpr int kPerThread = kMaxN / kThreads;
constexpr float kGramMinMeanSq = 1e-2f;  // partition_gram_kernel: |foreground's mean unit row|^2 it trusts

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Min {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }
__device__ __forceinline__ float warp_min(float v) { return warp_reduce(v, Min{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, Max{}); }

// One affinity entry from a Gram entry and the two rows' inverse norms (zero rows have cosine 0, as with
// F.normalize). The norms are multiplied first, so A_rc and A_cr round alike wherever G_rc = G_cr.
__device__ __forceinline__ float affinity(float g, float inv_r, float inv_c, bool use_tau, float tau, float eps) {
  const float cos = g * (inv_r * inv_c);
  return use_tau ? (cos > tau ? 1.f : eps) : fmaxf(cos, eps);
}

// Reduce over the block, one barrier per call: consecutive calls alternate between the two halves of red
// (2 kWarps floats), so a call's writes never meet the previous call's reads (every thread has read them
// before it reaches the barrier of the call in between). `parity` is the same in every thread.
template <typename Op>
__device__ float block_reduce(float v, float* red, int& parity, Op op) {
  v = warp_reduce(v, op);
  float* slot = red + parity * kWarps;
  parity ^= 1;
  if (threadIdx.x % 32 == 0) slot[threadIdx.x / 32] = v;
  __syncthreads();
  float out = slot[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) out = op(out, slot[w]);
  return out;
}
__device__ float block_sum(float v, float* red, int& parity) { return block_reduce(v, red, parity, Sum{}); }
__device__ float block_min(float v, float* red, int& parity) { return block_reduce(v, red, parity, Min{}); }
__device__ float block_max(float v, float* red, int& parity) { return block_reduce(v, red, parity, Max{}); }

// Top eigenvector of the k x k tridiagonal (alpha, beta) into z[0:k] (unit norm), run by warp 0; z is in
// shared memory. Divisions are the fast 2-ulp kind: pivots stay within [1e-30, ~4] and the Sturm counts
// and the inverse iteration need no correctly rounded quotient. The whole block waits on this serial code,
// so its loops run over kSteps with k as a predicate, unrolled by 4: each group's loads are issued together
// ahead of its dependent chain (a rolled loop waited one load latency per link), the inverse iteration's
// arrays sit in shared memory (lane 0's local arrays took 256 bytes of stack, and full unrolling into
// registers cost 245 registers a thread, halving the blocks per SM at small N), and each lane runs its two
// Sturm shifts as interleaved chains.
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
    const float shift0 = lo + (hi - lo) * (static_cast<float>(lane + 1) / (kShifts + 1));
    const float shift1 = lo + (hi - lo) * (static_cast<float>(lane + 33) / (kShifts + 1));
    float piv0 = alpha[0] - shift0, piv1 = alpha[0] - shift1;
    int below0 = piv0 < 0.f, below1 = piv1 < 0.f;
#pragma unroll 4
    for (int i = 1; i < kSteps; ++i) {
      if (i < k) {
        const float a = alpha[i], bb = beta[i - 1] * beta[i - 1];
        if (fabsf(piv0) < kPivMin) piv0 = -kPivMin;
        if (fabsf(piv1) < kPivMin) piv1 = -kPivMin;
        piv0 = (a - shift0) - __fdividef(bb, piv0);
        piv1 = (a - shift1) - __fdividef(bb, piv1);
        below0 += piv0 < 0.f;
        below1 += piv1 < 0.f;
      }
    }
    float new_lo = lo, new_hi = hi;
    if (below0 < k) new_lo = fmaxf(new_lo, shift0);
    else new_hi = fminf(new_hi, shift0);
    if (below1 < k) new_lo = fmaxf(new_lo, shift1);
    else new_hi = fminf(new_hi, shift1);
    lo = warp_max(new_lo);
    hi = warp_min(new_hi);
  }
  if (lane != 0) return;
  // inverse iteration on sigma I - T (positive definite): factored once as L D L^T without pivoting
  // (l_i = beta_{i-1} / d_{i-1}), then every iteration is two sweeps of multiply-adds; entries past k
  // are never read
  const float sigma = hi + kDelta;
  __shared__ float d_inv[kSteps], l_sub[kSteps], rhs[kSteps];
  float piv = fmaxf(sigma - alpha[0], kPivMin);
  d_inv[0] = __fdividef(1.f, piv);
#pragma unroll
  for (int i = 1; i < kSteps; ++i) {
    if (i < k) {
      const float b = beta[i - 1];
      l_sub[i] = __fdividef(b, piv);
      piv = fmaxf((sigma - alpha[i]) - l_sub[i] * b, kPivMin);
      d_inv[i] = __fdividef(1.f, piv);
    }
  }
#pragma unroll
  for (int i = 0; i < kSteps; ++i) rhs[i] = 1.f;
  for (int it = 0; it < kInvIters; ++it) {
#pragma unroll 4
    for (int i = 1; i < kSteps; ++i)  // L y = rhs
      if (i < k) rhs[i] += l_sub[i] * rhs[i - 1];
#pragma unroll 4
    for (int i = kSteps - 1; i >= 0; --i) {  // D L^T z = y
      if (i == k - 1) rhs[i] *= d_inv[i];
      else if (i + 1 < kSteps && i < k - 1) rhs[i] = (rhs[i] + beta[i] * rhs[i + 1]) * d_inv[i];
    }
    float norm = 0.f;
#pragma unroll
    for (int i = 0; i < kSteps; ++i)
      if (i < k) norm += rhs[i] * rhs[i];
    const float inv_norm = rsqrtf(norm);
#pragma unroll
    for (int i = 0; i < kSteps; ++i) rhs[i] *= inv_norm;
  }
#pragma unroll
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

// Two blocks per SM: caps registers at 128, so two blocks fit wherever shared memory lets them (N <= ~120);
// with no minimum, ptxas squeezed the on-chip kernel to 80 registers and spilled on sm_80.
template <bool kOnChip>
__global__ void __launch_bounds__(kThreads, 2) lanczos_kernel(const float* __restrict__ gram_all,
                                                           float* __restrict__ basis_all, float* __restrict__ out,
                                                           int* __restrict__ products, int n, bool use_tau,
                                                           float tau, float eps) {
  extern __shared__ float a_smem[];
  __shared__ __align__(16) float xs[kMaxN];  // the product's input, then the vector being orthogonalised
  __shared__ float inv_s[kMaxN];             // 1 / |f_i| from G's diagonal
  __shared__ float red[2 * kWarps];
  int parity = 0;
  __shared__ float alpha_s[kSteps], beta_s[kSteps], z_s[kSteps], h_s[kSteps];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t nn = static_cast<int64_t>(n) * n;
  const float* g = gram_all + b * nn;
  float* basis = basis_all + static_cast<int64_t>(b) * kSteps * n;

  for (int i = tid; i < n; i += kThreads) inv_s[i] = 1.f / fmaxf(sqrtf(g[static_cast<int64_t>(i) * n + i]), 1e-12f);
  __syncthreads();
  if constexpr (kOnChip) {  // thread c loads column c (N < 256 here): coalesced rows, 16 loads in flight
    for (int c = tid; c < n; c += kThreads) {
      const float inv_c = inv_s[c];
#pragma unroll 16
      for (int r = 0; r < n; ++r) a_smem[r * n + c] = affinity(g[r * n + c], inv_s[r], inv_c, use_tau, tau, eps);
    }
    __syncthreads();
  }
  // A_ci, read by column i (A from shared memory, or G from global memory through the affinity)
  auto entry = [&](int c, int i) -> float {
    if constexpr (kOnChip) return a_smem[c * n + i];
    else return affinity(g[static_cast<int64_t>(c) * n + i], inv_s[c], inv_s[i], use_tau, tau, eps);
  };

  float s[kPerThread], u1[kPerThread], x[kPerThread], q[kPerThread], q_prev[kPerThread], w[kPerThread];
  float part = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const int i = tid + v * kThreads;
    float dg = 0.f;
    if (i < n)
      for (int c = 0; c < n; ++c) dg += entry(c, i);
    s[v] = i < n ? rsqrtf(dg) : 0.f;
    u1[v] = sqrtf(dg);
    part += dg;
    // fixed start vector: alternating signs keep it off u1, whose entries are all positive; hashed
    // magnitudes keep it off structured Fiedler vectors (two equal halves), as in kernels/ncut.py
    x[v] = i < n ? (i % 2 == 0 ? 1.f : -1.f) * (1.f + hash01(static_cast<uint32_t>(i))) : 0.f;
  }
  const float u1_norm = sqrtf(block_sum(part, red, parity));
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) u1[v] /= u1_norm;

  auto dot = [&](const float* p, const float* r) {
    float acc = 0.f;
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) acc += p[v] * r[v];
    return block_sum(acc, red, parity);
  };

  int converged = 0, steps = 0;  // steps: the products taken, for the optional `products` output
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
      // w = M q = D^-1/2 A D^-1/2 q; xs is read four entries at a time (one broadcast 16-byte load)
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int i = tid + v * kThreads;
        if (i < n) xs[i] = s[v] * q[v];
      }
      __syncthreads();
      const int n4 = n & ~3;
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) {
        const int i = tid + v * kThreads;
        float acc0 = 0.f, acc1 = 0.f;
        if (i < n) {
          for (int c = 0; c < n4; c += 4) {
            const float4 x4 = *reinterpret_cast<const float4*>(xs + c);
            acc0 += entry(c, i) * x4.x;
            acc1 += entry(c + 1, i) * x4.y;
            acc0 += entry(c + 2, i) * x4.z;
            acc1 += entry(c + 3, i) * x4.w;
          }
          for (int c = n4; c < n; ++c) acc0 += entry(c, i) * xs[c];
        }
        w[v] = (acc0 + acc1) * s[v];
      }
      const float alpha = dot(q, w);  // its barrier also ends the product's reads of xs
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) w[v] -= alpha * q[v] + beta_prev * q_prev[v];
      for (int pass = 0; pass < 2; ++pass) {
        const float wu = dot(w, u1);
#pragma unroll
        for (int v = 0; v < kPerThread; ++v) {
          const int i = tid + v * kThreads;
          w[v] -= wu * u1[v];
          if (i < n) xs[i] = w[v];
        }
        __syncthreads();  // also makes every thread's basis rows visible to the whole block
        // classical Gram-Schmidt against q_0..q_j: warp r % 8 computes the projection on q_r
        for (int r = warp; r <= j; r += kWarps) {
          const float* row = basis + static_cast<int64_t>(r) * n;
          float acc = 0.f;
          for (int i = lane; i < n; i += 32) acc += row[i] * xs[i];
          acc = warp_sum(acc);
          if (lane == 0) h_s[r] = acc;
        }
        __syncthreads();
        for (int r = 0; r <= j; ++r) {
          const float h = h_s[r];
          const float* row = basis + static_cast<int64_t>(r) * n;
#pragma unroll
          for (int v = 0; v < kPerThread; ++v) {
            const int i = tid + v * kThreads;
            if (i < n) w[v] -= h * row[i];
          }
        }
      }
      const float beta = sqrtf(dot(w, w));
      if (tid == 0) {
        alpha_s[j] = alpha;
        beta_s[j] = beta;
      }
      ++j;
      ++steps;
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
    __syncthreads();  // z_s is rewritten by the next cycle's solves, basis row 0 by its start vector
  }
  // Rows of zeros (G_ii = 0) of degree below 1 (s > 1): v_z = S / (N theta - k) from their row of
  // A v = theta D v (k rows of zeros, S the sum of v over the other rows), not u_z / sqrt(N eps), which
  // multiplies the solver's error by 1 / sqrt(N eps); theta is the Ritz value z^T T z. The rule and its
  // limits are those of _zero_rows in kernels/ncut.py.
  float theta = 0.f;
  for (int r = 0; r < kSteps; ++r) {  // z is zero past the last cycle's steps, where alpha, beta are stale
    if (z_s[r] == 0.f) continue;
    const float next = r + 1 < kSteps ? 2.f * beta_s[r] * z_s[r + 1] : 0.f;
    theta += z_s[r] * (alpha_s[r] * z_s[r] + next);
  }
  bool zero[kPerThread];
  float zeros = 0.f, rest = 0.f;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const int i = tid + v * kThreads;
    x[v] *= s[v];
    zero[v] = i < n && g[static_cast<int64_t>(i) * n + i] == 0.f;
    if (zero[v]) zeros += 1.f;
    else rest += x[v];  // entries past n are 0
  }
  zeros = block_sum(zeros, red, parity);
  rest = block_sum(rest, red, parity);
  const float den = static_cast<float>(n) * theta - zeros;
  const bool refine = fabsf(theta) > kTol && fabsf(den) > static_cast<float>(n) * kTol;
#pragma unroll
  for (int v = 0; v < kPerThread; ++v) {
    const int i = tid + v * kThreads;
    if (i < n) out[static_cast<int64_t>(b) * n + i] = refine && zero[v] && s[v] > 1.f ? rest / den : x[v];
  }
  if (products != nullptr && tid == 0) products[b] = steps;
}

// The rules of maskedssl.ops.ncut.split_partition on sample b's vector v, one block per sample (N <= kMaxN:
// entries i = tid + kThreads * k per thread): the seed is the first index with |v| >= seed_scale max |v|,
// the sign puts it above the mean, the vector is scaled to unit norm, and the foreground is the side above
// cut = the mean + split_tie max |fiedler| (everything when no entry is). Writes the sample's fiedler and
// foreground rows and in_fg (shared, 1 or 0 per entry; published by the caller's next barrier); returns the
// foreground's size.
__device__ float split_sample(const float* __restrict__ v_all, float* __restrict__ fiedler_out,
                              bool* __restrict__ foreground_out, float* in_fg, int b, int n, float seed_scale,
                              float split_tie, float* red, int& parity) {
  const int tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(b) * n;
  float v[kPerThread];
  float top = 0.f, total = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    v[k] = i < n ? v_all[base + i] : 0.f;
    top = fmaxf(top, fabsf(v[k]));
    total += v[k];
  }
  top = block_max(top, red, parity);
  float first = static_cast<float>(kMaxN);  // indices are exact in float
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    if (i < n && fabsf(v[k]) >= top * seed_scale) first = fminf(first, static_cast<float>(i));
  }
  const int seed = static_cast<int>(block_min(first, red, parity));
  const float mean_v = block_sum(total, red, parity) / static_cast<float>(n);
  float at_seed = 0.f, sq = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (tid + k * kThreads == seed) at_seed = v[k];
    sq += v[k] * v[k];  // |v sign| = |v|
  }
  const float sign = block_sum(at_seed, red, parity) > mean_v ? 1.f : -1.f;
  const float norm = fmaxf(sqrtf(block_sum(sq, red, parity)), 1e-12f);
  float fsum = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    v[k] = (v[k] * sign) / norm;  // now the Fiedler vector; 0 past n
    fsum += v[k];
  }
  // top / norm: max |fiedler|
  const float cut = block_sum(fsum, red, parity) / static_cast<float>(n) + split_tie * (top / norm);
  float above = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) above += (tid + k * kThreads < n && v[k] > cut) ? 1.f : 0.f;
  const float count_above = block_sum(above, red, parity);
  const bool empty = count_above == 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    if (i < n) {
      const bool fg = empty || v[k] > cut;
      fiedler_out[base + i] = v[k];
      foreground_out[base + i] = fg;
      in_fg[i] = fg ? 1.f : 0.f;
    }
  }
  return empty ? static_cast<float>(n) : count_above;
}

// finish_partition for one sample per block from the features: split_sample, then score_i = cos(f_i, m),
// m the sum of f_j / |f_j| over the foreground (the cosine to the foreground's mean normalised feature):
// warp w takes rows w, w + 8, ... in order, so every sum has a fixed order. Pass 1 reads each row for its
// norm and adds the foreground rows, scaled, into the warp's own partial of m (each lane owns the same
// columns of every row: no races, no atomics); the eight partials are summed in warp order; pass 2 reads
// the rows again for their dot products with m. Shared memory: kWarps * d partials, m (d), the rows'
// inverse norms and foreground flags (n each). VEC > 1: rows read as 16-byte packs (contiguous, aligned
// rows). (kThreads, 1): given only the block size, ptxas held this kernel to 40 registers and spilled a few.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1) partition_kernel(const T* __restrict__ feats,
                                                             const float* __restrict__ v_all,
                                                             float* __restrict__ fiedler_out,
                                                             bool* __restrict__ foreground_out,
                                                             float* __restrict__ score_out, int n, int d,
                                                             int64_t s_b, int64_t s_n, int64_t s_d,
                                                             float seed_scale, float split_tie,
                                                             const bool* __restrict__ only) {
  if (only != nullptr && !only[blockIdx.x]) return;  // a sample partition_gram_kernel has done
  extern __shared__ float partition_smem[];
  float* partial = partition_smem;
  float* m = partial + kWarps * d;
  float* inv_norm = m + d;
  float* in_fg = inv_norm + n;
  __shared__ float red[2 * kWarps];
  int parity = 0;
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t base = static_cast<int64_t>(b) * n;
  const float count = split_sample(v_all, fiedler_out, foreground_out, in_fg, b, n, seed_scale, split_tie, red,
                                   parity);

  // --- scores
  const T* f = feats + static_cast<int64_t>(b) * s_b;
  float* own = partial + warp * d;
  const int packs = d / VEC;  // VEC divides d on the vector path
  auto load = [&](const T* row, int p, float (&x)[VEC]) {
    if constexpr (VEC == 1) {
      x[0] = static_cast<float>(row[p * s_d]);
    } else {
      const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(row + p * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[k] = static_cast<float>(pack.v[k]);
    }
  };
  for (int p = lane; p < packs; p += 32)
#pragma unroll
    for (int k = 0; k < VEC; ++k) own[p * VEC + k] = 0.f;
  __syncthreads();  // in_fg
  for (int i = warp; i < n; i += kWarps) {
    const T* row = f + i * s_n;
    float row_sq = 0.f;
#pragma unroll 2  // two 16-byte loads in flight per lane (unrolled by 4, ptxas spilled the 16-bit variants)
    for (int p = lane; p < packs; p += 32) {
      float x[VEC];
      load(row, p, x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) row_sq += x[k] * x[k];
    }
    const float row_norm = fmaxf(sqrtf(warp_sum(row_sq)), 1e-12f);  // F.normalize's floor: zero rows score 0
    if (lane == 0) inv_norm[i] = 1.f / row_norm;
    if (in_fg[i] != 0.f) {
      // f / |f| divided, as F.normalize does: a reciprocal's rounding would leave m = 1e-8 where the
      // reference's unit rows cancel exactly (D = 1 rows of both signs)
#pragma unroll 2
      for (int p = lane; p < packs; p += 32) {  // the row again, from L1
        float x[VEC];
        load(row, p, x);
#pragma unroll
        for (int k = 0; k < VEC; ++k) own[p * VEC + k] += x[k] / row_norm;
      }
    }
  }
  __syncthreads();
  float part = 0.f;
  for (int c = tid; c < d; c += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w * d + c];
    m[c] = sum;
    part += sum * sum;
  }
  // |m / count| floored at 1e-12, as F.normalize of the foreground's mean; the barrier also publishes m
  const float inv_m = 1.f / fmaxf(sqrtf(block_sum(part, red, parity)), count * 1e-12f);
  for (int i = warp; i < n; i += kWarps) {
    const T* row = f + i * s_n;
    float dot = 0.f;
#pragma unroll 2
    for (int p = lane; p < packs; p += 32) {
      float x[VEC];
      load(row, p, x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += x[k] * m[p * VEC + k];
    }
    dot = warp_sum(dot);
    if (lane == 0) score_out[base + i] = fminf(fmaxf(dot * inv_norm[i] * inv_m, -1.f), 1.f);
  }
}

// finish_partition for one sample per block from its Gram matrix G = F F^T ((B, N, N) fp32, as the solver
// read it) instead of the features: split_sample, then the same scores. With r_j = max(sqrt(G_jj), 1e-12)
// (F.normalize's norm) and w_j = 1 / r_j on the foreground (0 elsewhere), m = sum_j w_j f_j has
// f_i . m = s_i = sum_j w_j G_ji and |m|^2 = sum_i w_i s_i, so score_i = s_i / (r_i max(|m|, count 1e-12)).
// Warp w takes the foreground rows w, w + 8, ... of G in order (a warp-uniform skip of the others), each
// lane columns lane + 32 c in registers: up to 32 independent loads of one row in flight per warp, no
// atomics; the eight partials are then summed in warp order. The traffic is the foreground's rows of G,
// about N^2 / 2 floats for a balanced cut, where the feature path reads 2 N D elements: the host takes
// this path for 16-bit features with N <= D. Their G holds exact products summed in fp32, so the scores
// agree with the feature path's to fp32 rounding, except where the foreground's unit rows nearly cancel:
// such a sample is flagged in redo_out, scores unwritten, for partition_kernel to redo from the features.
// Shared memory: kWarps * n partials, w and the flags (n each).
__global__ void __launch_bounds__(kThreads, 1) partition_gram_kernel(const float* __restrict__ gram,
                                                                  const float* __restrict__ v_all,
                                                                  float* __restrict__ fiedler_out,
                                                                  bool* __restrict__ foreground_out,
                                                                  float* __restrict__ score_out,
                                                                  bool* __restrict__ redo_out, int n,
                                                                  float seed_scale, float split_tie) {
  constexpr int kCols = kMaxN / 32;
  extern __shared__ float gram_smem[];
  float* partial = gram_smem;
  float* w = partial + kWarps * n;
  float* in_fg = w + n;
  __shared__ float red[2 * kWarps];
  int parity = 0;
  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t base = static_cast<int64_t>(b) * n;
  const float* g = gram + base * n;
  const float count = split_sample(v_all, fiedler_out, foreground_out, in_fg, b, n, seed_scale, split_tie, red,
                                   parity);
  float inv_r[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    inv_r[k] = 0.f;
    if (i < n) {
      inv_r[k] = 1.f / fmaxf(sqrtf(g[static_cast<int64_t>(i) * (n + 1)]), 1e-12f);
      w[i] = in_fg[i] != 0.f ? inv_r[k] : 0.f;  // in_fg[i] is this thread's own write
    }
  }
  __syncthreads();  // w, in_fg
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  for (int j = warp; j < n; j += kWarps) {
    if (in_fg[j] == 0.f) continue;  // the same for the whole warp
    const float wj = w[j];
    const float* row = g + static_cast<int64_t>(j) * n + lane;
    // every load of the row issued before the first use (interleaved, ptxas waited on each in turn), at
    // constant offsets from one address
    float x[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) x[c] = lane + 32 * c < n ? row[32 * c] : 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] += x[c] * wj;
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int i = lane + 32 * c;
    if (i < n) partial[warp * n + i] = acc[c];
  }
  __syncthreads();
  float s[kPerThread], part = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    s[k] = 0.f;
    if (i < n) {
#pragma unroll
      for (int q = 0; q < kWarps; ++q) s[k] += partial[q * n + i];
      part += w[i] * s[k];
    }
  }
  // |m|^2 as a quadratic form in G carries G's rounding relative to the row norms: its error is about
  // eps_G count^2, so the scores' error grows as 1 / |m / count|^2 (the feature path's as 1 / |m / count|).
  // Where the foreground's unit rows cancel that far (|mean| < 0.1; exact cancellation left |m|^2 <= 0 and
  // scores of +-1 where the reference gives 0), partition_kernel redoes the sample from the features.
  const float m_sq = block_sum(part, red, parity);
  const bool redo = !(m_sq >= kGramMinMeanSq * count * count);
  if (tid == 0) redo_out[b] = redo;
  if (redo) return;  // the whole block: m_sq and count are the same in every thread
  const float inv_m = 1.f / fmaxf(sqrtf(m_sq), count * 1e-12f);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int i = tid + k * kThreads;
    if (i < n) score_out[base + i] = fminf(fmaxf(s[k] * inv_r[k] * inv_m, -1.f), 1.f);
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

// Every entry point's features: a 3-D CUDA tensor of a float type the kernels read.
void check_feats(const at::Tensor& feats, const char* op) {
  TORCH_CHECK(feats.is_cuda() && feats.dim() == 3, op, ": feats must be a 3-D CUDA tensor");
  TORCH_CHECK(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kHalf ||
                  feats.scalar_type() == at::kBFloat16,
              op, ": feats must be float32, float16 or bfloat16");
}

// G = F F^T per sample in fp32 from cuBLAS. fp16/bf16 features go to the tensor cores as they are (exact
// products, fp32 accumulation). fp32 features are split as f = hi + lo with both halves bf16 (f - hi is
// exact, lo keeps its top 8 bits: |f - hi - lo| <= 2^-17 |f|) and G = hi hi^T + hi lo^T + lo hi^T, two
// bf16 GEMMs accurate to ~1e-5 of |f_i| |f_j| whatever the caller's TF32 setting, where a plain fp32
// bmm would either run on the CUDA cores (~4x slower) or, with TF32 enabled, keep only ~1e-3.
at::Tensor gram_matrix(const at::Tensor& feats) {
  if (feats.scalar_type() != at::kFloat) return at::bmm(feats, feats.transpose(1, 2), at::kFloat);
  const at::Tensor hi = feats.to(at::kBFloat16);
  const at::Tensor lo = (feats - hi.to(at::kFloat)).to(at::kBFloat16);
  const at::Tensor cross = at::bmm(hi, lo.transpose(1, 2), at::kFloat);
  return at::bmm(hi, hi.transpose(1, 2), at::kFloat).add_(cross).add_(cross.transpose(1, 2));
}

// The solver's checks and its Gram matrix: the caller's `given` one ((B, N, N) float32, as ncut_gram_cuda
// computes it) or a new one.
at::Tensor solver_gram(const at::Tensor& feats, const std::optional<at::Tensor>& given, const char* op) {
  check_feats(feats, op);
  const int64_t bsz = feats.size(0), n = feats.size(1);
  TORCH_CHECK(n >= 2 && n <= kMaxN, op, ": N must be in [2, ", kMaxN, "], got ", n);
  if (given.has_value()) {
    const at::Tensor& gram = *given;
    TORCH_CHECK(gram.scalar_type() == at::kFloat && gram.dim() == 3 && gram.size(0) == bsz && gram.size(1) == n &&
                    gram.size(2) == n && gram.device() == feats.device(),
                op, ": gram must be a (B, N, N) float32 tensor on feats' device");
    return gram.contiguous();
  }
  if (bsz == 0) return at::empty({0, n, n}, feats.options().dtype(at::kFloat));
  c10::cuda::CUDAGuard guard(feats.device());
  return gram_matrix(feats).contiguous();
}

// The solver behind ncut_fiedler_cuda and ncut_bipartition_cuda on the Gram matrix from solver_gram: v (B, N)
// float32 and, when count_products, the products each sample took.
std::tuple<at::Tensor, at::Tensor> solve_fiedler(const at::Tensor& feats, const at::Tensor& gram,
                                                 std::optional<double> tau, double eps, bool count_products) {
  const int64_t bsz = feats.size(0), n = feats.size(1);
  c10::cuda::CUDAGuard guard(feats.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = feats.options().dtype(at::kFloat);
  at::Tensor out = empty_output({bsz, n}, f32);
  // the products each sample's solve took (a diagnostic), or an empty tensor when not asked for
  at::Tensor products = empty_output({count_products ? bsz : 0}, feats.options().dtype(at::kInt));
  if (bsz == 0) return {out, products};
  at::Tensor basis = at::empty({bsz, kSteps, n}, f32);

  const int64_t a_bytes = static_cast<int64_t>(sizeof(float)) * n * n;
  const unsigned int grid = static_cast<unsigned int>(bsz);
  const bool use_tau = tau.has_value();
  const float tau_f = static_cast<float>(tau.value_or(0.0)), eps_f = static_cast<float>(eps);
  int* products_ptr = count_products ? products.data_ptr<int>() : nullptr;
  if (a_bytes <= lanczos_dynamic_smem(feats.get_device())) {
    lanczos_kernel<true><<<grid, kThreads, a_bytes, stream>>>(gram.data_ptr<float>(), basis.data_ptr<float>(),
                                                               out.data_ptr<float>(), products_ptr,
                                                               static_cast<int>(n), use_tau, tau_f, eps_f);
  } else {
    lanczos_kernel<false><<<grid, kThreads, 0, stream>>>(gram.data_ptr<float>(), basis.data_ptr<float>(),
                                                          out.data_ptr<float>(), products_ptr,
                                                          static_cast<int>(n), use_tau, tau_f, eps_f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, products};
}

// The partition step from the Gram matrix reads the foreground's rows of G (4 N^2 / 2 bytes for a
// balanced cut) where the feature path reads the features twice (2 N D elements): used for 16-bit
// features with N <= D (fp32 features' G, from bf16 halves, is accurate to ~1e-5 only).
bool partition_from_gram(const at::Tensor& feats) {
  return feats.scalar_type() != at::kFloat && feats.size(1) <= feats.size(2);
}

}  // namespace

at::Tensor ncut_gram_cuda(const at::Tensor& feats) {
  return solver_gram(feats, std::nullopt, "ncut_gram_cuda");
}

std::tuple<at::Tensor, at::Tensor> ncut_fiedler_cuda(const at::Tensor& feats, std::optional<double> tau,
                                                     double eps, bool count_products) {
  return solve_fiedler(feats, solver_gram(feats, std::nullopt, "ncut_fiedler_cuda"), tau, eps, count_products);
}

namespace {

// Checks and outputs shared by both partition entry points: (fiedler, foreground, score) for (B, N).
std::tuple<at::Tensor, at::Tensor, at::Tensor> partition_outputs(const at::Tensor& feats, const at::Tensor& v,
                                                                 const char* op) {
  check_feats(feats, op);
  const int64_t bsz = feats.size(0), n = feats.size(1), d = feats.size(2);
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 2 && v.size(0) == bsz && v.size(1) == n &&
                  v.device() == feats.device(),
              op, ": v must be a (B, N) float32 tensor on feats' device");
  TORCH_CHECK(n >= 1 && n <= kMaxN && d >= 1 && d <= kPartitionMaxD, op, ": N must be in [1, ", kMaxN,
              "] and D in [1, ", kPartitionMaxD, "], got ", n, " and ", d);
  const auto f32 = feats.options().dtype(at::kFloat);
  return {empty_output({bsz, n}, f32), empty_output({bsz, n}, feats.options().dtype(at::kBool)),
          empty_output({bsz, n}, f32)};
}

// partition_kernel over the batch (only the samples flagged in `only`, when given).
void launch_partition(const at::Tensor& feats, const at::Tensor& vc, at::Tensor& fiedler, at::Tensor& foreground,
                      at::Tensor& score, float seed_scale, float split_tie, const bool* only) {
  const int64_t bsz = feats.size(0), n = feats.size(1), d = feats.size(2);
  const int smem = static_cast<int>(sizeof(float) * ((kWarps + 1) * d + 2 * n));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MASKEDSSL_DISPATCH_FLOAT_TYPES(feats.scalar_type(), "ncut_partition_cuda", [&] {
    const bool vectorized =
        feats.stride(2) == 1 && can_vectorize<scalar_t>(d, {feats.stride(0), feats.stride(1)}, {feats.data_ptr()});
    with_vec<scalar_t>(vectorized, [&](auto vec) {
      auto kernel = partition_kernel<scalar_t, decltype(vec)::value>;
      if (smem > 48 * 1024)  // past the default limit a kernel must opt in (at most ~80 KB here)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      kernel<<<static_cast<unsigned int>(bsz), kThreads, smem, stream>>>(
          feats.data_ptr<scalar_t>(), vc.data_ptr<float>(), fiedler.data_ptr<float>(),
          foreground.data_ptr<bool>(), score.data_ptr<float>(), static_cast<int>(n), static_cast<int>(d),
          feats.stride(0), feats.stride(1), feats.stride(2), seed_scale, split_tie, only);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ncut_partition_cuda(const at::Tensor& feats,
                                                                 const at::Tensor& v, double seed_tie,
                                                                 double split_tie) {
  auto [fiedler, foreground, score] = partition_outputs(feats, v, "ncut_partition_cuda");
  if (feats.size(0) == 0) return {fiedler, foreground, score};
  c10::cuda::CUDAGuard guard(feats.device());
  launch_partition(feats, v.contiguous(), fiedler, foreground, score, static_cast<float>(1.0 - seed_tie),
                   static_cast<float>(split_tie), nullptr);
  return {fiedler, foreground, score};
}

// From G = F F^T where that is accurate (partition_gram_kernel), then from the features for the samples it
// flags (a second launch whose other blocks return at once: no host sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ncut_partition_gram_cuda(const at::Tensor& feats,
                                                                      const at::Tensor& gram,
                                                                      const at::Tensor& v, double seed_tie,
                                                                      double split_tie) {
  auto [fiedler, foreground, score] = partition_outputs(feats, v, "ncut_partition_gram_cuda");
  const int64_t bsz = feats.size(0), n = feats.size(1);
  TORCH_CHECK(gram.scalar_type() == at::kFloat && gram.dim() == 3 && gram.size(0) == bsz && gram.size(1) == n &&
                  gram.size(2) == n && gram.device() == feats.device(),
              "ncut_partition_gram_cuda: gram must be a (B, N, N) float32 tensor on feats' device");
  if (bsz == 0) return {fiedler, foreground, score};
  c10::cuda::CUDAGuard guard(feats.device());
  const at::Tensor gc = gram.contiguous(), vc = v.contiguous();
  at::Tensor redo = at::empty({bsz}, feats.options().dtype(at::kBool));
  const float seed_scale = static_cast<float>(1.0 - seed_tie);
  const int smem = static_cast<int>(sizeof(float) * (kWarps + 2) * n);  // <= 40 KB: no opt-in
  partition_gram_kernel<<<static_cast<unsigned int>(bsz), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      gc.data_ptr<float>(), vc.data_ptr<float>(), fiedler.data_ptr<float>(), foreground.data_ptr<bool>(),
      score.data_ptr<float>(), redo.data_ptr<bool>(), static_cast<int>(n), seed_scale,
      static_cast<float>(split_tie));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_partition(feats, vc, fiedler, foreground, score, seed_scale, static_cast<float>(split_tie),
                   redo.data_ptr<bool>());
  return {fiedler, foreground, score};
}

// The whole op in one call (no Python between its launches): the solver on the caller's Gram matrix (from
// ncut_gram_cuda, whose diagonal the caller checked) or on a new one, then the partition step from G
// (partition_from_gram) or from the features (D <= kPartitionMaxD; the caller takes wider features to the
// reference rules).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ncut_bipartition_cuda(const at::Tensor& feats,
                                                                   const std::optional<at::Tensor>& gram,
                                                                   std::optional<double> tau, double eps,
                                                                   double seed_tie, double split_tie) {
  const at::Tensor g = solver_gram(feats, gram, "ncut_bipartition_cuda");
  const at::Tensor v = std::get<0>(solve_fiedler(feats, g, tau, eps, false));
  if (partition_from_gram(feats)) return ncut_partition_gram_cuda(feats, g, v, seed_tie, split_tie);
  return ncut_partition_cuda(feats, v, seed_tie, split_tie);
}

}  // namespace maskedssl

TORCH_LIBRARY_IMPL(maskedssl, CUDA, m) {
  m.impl("ncut_gram_cuda", &maskedssl::ncut_gram_cuda);
  m.impl("ncut_fiedler_cuda", &maskedssl::ncut_fiedler_cuda);
  m.impl("ncut_partition_cuda", &maskedssl::ncut_partition_cuda);
  m.impl("ncut_partition_gram_cuda", &maskedssl::ncut_partition_gram_cuda);
  m.impl("ncut_bipartition_cuda", &maskedssl::ncut_bipartition_cuda);
}
