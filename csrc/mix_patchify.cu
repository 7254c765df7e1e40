// mix_patchify_cuda: mixup + patchify + row selection + per-patch normalised targets in one launch.
//
// Computes the function the torch backend of maskedssl/ops/mix_patchify.py specifies: pixels read as
// float32 (uint8 scaled by 1/255, then (x - mean[c]) / std[c] when given);
//   inputs[b, k] = patch ids_keep[b, k] of lerp(imgs[partner[b]], imgs[b], lam[b])   (no mixing: imgs[b])
//   target[b, m] = norm(patch ids_masked[b, m] of imgs[b]),  other[b, m] = the same of imgs[partner[b]]
// with norm = MAE's norm_pix_loss ((t - mean) / sqrt(var + 1e-6), unbiased var, fp32, taken on the row
// shifted by its first value so that a flat patch gives exact zeros) when norm_pix.
//
// Layout: imgs (B, C, H, W), any strides; outputs (B, rows, R) contiguous with R = p*p*C ordered
// (py, px, c). A group of G lanes (a power of two, up to the 256-thread block) owns one output row at a
// time and walks rows with a grid stride; each lane holds at most 8 entries of the row in registers, so
// G grows with R (p = 16, C = 3: G = 128). Only the first A = G - G % C lanes work: A being a multiple of
// C pins each lane to one channel, so a lane's per-entry state is an int offset inside the patch,
// computed once per thread. Lane t holds entries t + i*A: stores are coalesced, loads are runs of pixels.
// Row sums use warp shuffles, plus shared memory when a group spans warps.
//
// Bytes: each output row reads its patch once per image it needs (two when mixing) and writes once:
// read B*(K+M)*R*s_in*(1 or 2), write B*(K + M*(1 or 2))*R*s_out; the floor counts imgs once
// (B*C*H*W*s_in) plus the writes. A partner's patch is a second fetch of that pixel, an L2 hit when the
// batch fits in L2.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace maskedssl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Values of one row each lane holds: few enough that the kernel needs no spills (about 80 registers).
constexpr int kValues = 8;

struct MixPatchifyParams {
  const void* imgs;
  int64_t stride_b, stride_c, stride_h, stride_w;
  const void* partner;  // nullptr: no mixing
  const float* lam;
  const void* ids_keep;  // nullptr: all rows
  const void* ids_masked;
  const float* mean;  // nullptr: no per-channel normalisation
  const float* std;
  void* inputs;
  void* target;
  void* other;
  int64_t input_rows, target_rows, kept, masked;
  int grid_w, patch, channels, row, group;
  bool partner_i64, keep_i64, masked_i64, norm_pix;
};

__device__ __forceinline__ int64_t load_index(const void* ptr, bool is_i64, int64_t i) {
  return is_i64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[i]);
}

// Sum over the `group` lanes that share a row. Groups wider than a warp add their warps' partials through
// shared memory, so every thread of the block must call this the same number of times.
__device__ __forceinline__ float group_sum(float v, int group, unsigned mask, float* scratch) {
  const int width = group < kWarp ? group : kWarp;
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, width);
  if (group <= kWarp) return v;
  const int warp = threadIdx.x / kWarp, warps = group / kWarp;
  __syncthreads();  // the previous call's readers are done with scratch
  if ((threadIdx.x & (kWarp - 1)) == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = warp & ~(warps - 1), last = w + warps; w < last; ++w) total += scratch[w];
  return total;
}

// One lane's view of a patch row: entries lane + i * A of the R = p*p*C row, A = group - group % C.
// A being a multiple of C pins the lane to one channel; its entries' offsets inside a patch are the same
// for every row, so they are computed once per thread.
template <typename in_t>
struct Lane {
  int offset[kValues];
  int index;  // this lane's first entry
  int active;
  float channel_mean, channel_std;

  // The lane's `count` entries of patch `patch` of image `sample`, as float32 after scaling and
  // per-channel normalisation.
  __device__ __forceinline__ void read(const MixPatchifyParams& p, int64_t sample, int64_t patch, bool normalize,
                                       int count, float (&v)[kValues]) const {
    const int64_t hy = patch / p.grid_w, wx = patch - hy * p.grid_w;
    const in_t* base = static_cast<const in_t*>(p.imgs) + sample * p.stride_b + hy * p.patch * p.stride_h +
                       wx * p.patch * p.stride_w;
#pragma unroll
    for (int i = 0; i < kValues; ++i) {
      if (i < count) {
        float x = static_cast<float>(base[offset[i]]);
        if constexpr (std::is_same_v<in_t, uint8_t>) x = x / 255.0f;
        if (normalize) x = (x - channel_mean) / channel_std;
        v[i] = x;
      }
    }
  }

  template <typename out_t>
  __device__ __forceinline__ void write(void* out, int64_t row_index, int row, int count,
                                        const float (&v)[kValues]) const {
    out_t* dst = static_cast<out_t*>(out) + row_index * row + index;
#pragma unroll
    for (int i = 0; i < kValues; ++i)
      if (i < count) dst[i * active] = static_cast<out_t>(v[i]);
  }
};

// MAE's norm_pix_loss target in place: (v - mean) / sqrt(var + 1e-6), unbiased var, over the whole row.
// The row is first shifted by its first entry (held by lane 0 as v[0]), as the torch and Triton backends
// do: a flat patch then gives exact zeros, not its rounding error times 1 / sqrt(1e-6). The shift reaches
// the other lanes as a group sum of one nonzero term, which is exact.
__device__ __forceinline__ void normalize_row(float (&v)[kValues], int count, int lane, int row, int group,
                                              unsigned mask, float* scratch) {
  const float first = group_sum(lane == 0 && count > 0 ? v[0] : 0.0f, group, mask, scratch);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if (i < count) {
      v[i] -= first;
      sum += v[i];
    }
  }
  const float mean = group_sum(sum, group, mask, scratch) / row;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if (i < count) {
      const float d = v[i] - mean;
      squares += d * d;
    }
  }
  const float scale = sqrtf(group_sum(squares, group, mask, scratch) / (row - 1) + 1.0e-6f);
#pragma unroll
  for (int i = 0; i < kValues; ++i)
    if (i < count) v[i] = (v[i] - mean) / scale;
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) mix_patchify_kernel(const MixPatchifyParams p) {
  __shared__ float scratch[kThreads / kWarp];
  const int group = p.group;
  const int lane = threadIdx.x & (group - 1);
  const int first_lane = (threadIdx.x & (kWarp - 1)) & ~(group - 1);
  const unsigned mask = group >= kWarp ? 0xffffffffu : ((1u << group) - 1u) << first_lane;
  const int groups_per_block = kThreads / group;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / group;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const bool normalize = p.mean != nullptr;

  Lane<in_t> me;
  me.active = group - group % p.channels;
  me.index = lane;
  const bool working = lane < me.active && lane < p.row;
  const int count = working ? (p.row - 1 - lane) / me.active + 1 : 0;
  const int channel = lane % p.channels;
  const int position = lane / p.channels, step = me.active / p.channels;  // py * P + px
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    const int s = position + i * step;
    const int py = s / p.patch, px = s - py * p.patch;
    // Entries past `count` are never read; their offsets may be anything.
    me.offset[i] = static_cast<int>(channel * p.stride_c + py * p.stride_h + px * p.stride_w);
  }
  me.channel_mean = normalize ? p.mean[channel] : 0.0f;
  me.channel_std = normalize ? p.std[channel] : 1.0f;

  float x[kValues], y[kValues];
  for (int64_t r = first_row; r < p.input_rows; r += row_stride) {
    const int64_t sample = r / p.kept;
    const int64_t patch = p.ids_keep ? load_index(p.ids_keep, p.keep_i64, r) : r - sample * p.kept;
    me.read(p, sample, patch, normalize, count, x);
    if (p.partner) {
      me.read(p, load_index(p.partner, p.partner_i64, sample), patch, normalize, count, y);
      const float w = p.lam[sample];
      // torch.lerp's two-sided form: exact at both ends (lam = 0 gives the partner, 1 the sample).
#pragma unroll
      for (int i = 0; i < kValues; ++i) {
        if (i < count) {
          const float d = x[i] - y[i];
          x[i] = w < 0.5f ? y[i] + w * d : x[i] - d * (1.0f - w);
        }
      }
    }
    me.template write<out_t>(p.inputs, r, p.row, count, x);
  }

  // Target rows need row reductions, which for groups wider than a warp synchronise the block: the loop
  // runs the same trips in every thread, rows past the end computing nothing.
  const int64_t trips = (p.target_rows + row_stride - 1) / row_stride;
  for (int64_t trip = 0; trip < trips; ++trip) {
    const int64_t t = first_row + trip * row_stride;
    const bool live = t < p.target_rows;
    const int n = live ? count : 0;
    const int64_t sample = live ? t / p.masked : 0;
    int64_t patch = 0;
    if (live) patch = p.ids_masked ? load_index(p.ids_masked, p.masked_i64, t) : t - sample * p.masked;
    const int64_t mate = live && p.partner ? load_index(p.partner, p.partner_i64, sample) : 0;
    me.read(p, sample, patch, normalize, n, x);
    if (p.norm_pix) normalize_row(x, n, lane, p.row, group, mask, scratch);
    me.template write<out_t>(p.target, t, p.row, n, x);
    if (p.partner) {
      me.read(p, mate, patch, normalize, n, y);
      if (p.norm_pix) normalize_row(y, n, lane, p.row, group, mask, scratch);
      me.template write<out_t>(p.other, t, p.row, n, y);
    }
  }
}

// Lanes per row: the fewest (a power of two, at least C) whose working subset covers the row with at
// most kValues entries each. 0 when no group of a block fits (the Python side never asks for that).
int lanes_per_row(int row, int channels) {
  for (int group = 1; group <= kThreads; group *= 2) {
    const int active = group - group % channels;
    if (group >= channels && row <= active * kValues) return group;
  }
  return 0;
}

// The grid walks rows with a stride: it holds as many blocks as fit on the GPU at once (so none waits for a
// second wave), or fewer when there are fewer rows.
template <typename in_t, typename out_t>
void run_kernel(const MixPatchifyParams& params, int64_t wanted_blocks, int device, cudaStream_t stream) {
  static int resident[64] = {};  // per device; a benign race fills it with the same value
  int& fit = resident[device % 64];
  if (fit == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mix_patchify_kernel<in_t, out_t>,
                                                                 kThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    fit = std::max(1, per_sm * sms);
  }
  const int blocks = static_cast<int>(std::min<int64_t>(wanted_blocks, fit));
  mix_patchify_kernel<in_t, out_t><<<blocks, kThreads, 0, stream>>>(params);
}

template <typename in_t>
void launch_for_output(const MixPatchifyParams& params, at::ScalarType out_dtype, int64_t wanted_blocks,
                       int device, cudaStream_t stream) {
  switch (out_dtype) {
    case at::kFloat:
      run_kernel<in_t, float>(params, wanted_blocks, device, stream);
      break;
    case at::kBFloat16:
      run_kernel<in_t, at::BFloat16>(params, wanted_blocks, device, stream);
      break;
    case at::kHalf:
      run_kernel<in_t, at::Half>(params, wanted_blocks, device, stream);
      break;
    default:
      TORCH_CHECK(false, "mix_patchify_cuda: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  }
}

void launch(const MixPatchifyParams& params, at::ScalarType in_dtype, at::ScalarType out_dtype,
            int64_t wanted_blocks, int device, cudaStream_t stream) {
  switch (in_dtype) {
    case at::kFloat:
      launch_for_output<float>(params, out_dtype, wanted_blocks, device, stream);
      break;
    case at::kBFloat16:
      launch_for_output<at::BFloat16>(params, out_dtype, wanted_blocks, device, stream);
      break;
    case at::kHalf:
      launch_for_output<at::Half>(params, out_dtype, wanted_blocks, device, stream);
      break;
    case at::kByte:
      launch_for_output<uint8_t>(params, out_dtype, wanted_blocks, device, stream);
      break;
    default:
      TORCH_CHECK(false, "mix_patchify_cuda: imgs must be float32, bfloat16, float16 or uint8, got ", in_dtype);
  }
}

const void* index_pointer(const std::optional<at::Tensor>& ids, const char* name, bool& is_i64,
                          std::optional<at::Tensor>& keep_alive) {
  if (!ids.has_value()) return nullptr;
  TORCH_CHECK(ids->scalar_type() == at::kInt || ids->scalar_type() == at::kLong, "mix_patchify_cuda: ", name,
              " must be int32 or int64");
  keep_alive = ids->contiguous();
  is_i64 = keep_alive->scalar_type() == at::kLong;
  return keep_alive->data_ptr();
}

const float* float_pointer(const std::optional<at::Tensor>& t, const char* name,
                           std::optional<at::Tensor>& keep_alive) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat, "mix_patchify_cuda: ", name, " must be float32");
  keep_alive = t->contiguous();
  return keep_alive->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_patchify_cuda(
    const at::Tensor& imgs, int64_t patch_size, const std::optional<at::Tensor>& partner,
    const std::optional<at::Tensor>& lam, const std::optional<at::Tensor>& ids_keep,
    const std::optional<at::Tensor>& ids_masked, bool norm_pix, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& stdev, at::ScalarType out_dtype) {
  TORCH_CHECK(imgs.is_cuda() && imgs.dim() == 4, "mix_patchify_cuda: imgs must be a 4-D CUDA tensor");
  TORCH_CHECK(patch_size > 0 && imgs.size(2) % patch_size == 0 && imgs.size(3) % patch_size == 0,
              "mix_patchify_cuda: image size must be divisible by patch_size");
  TORCH_CHECK(partner.has_value() == lam.has_value(), "mix_patchify_cuda: partner and lam go together");
  TORCH_CHECK(mean.has_value() == stdev.has_value(), "mix_patchify_cuda: mean and std go together");
  const c10::cuda::CUDAGuard guard(imgs.device());
  const int64_t batch = imgs.size(0), channels = imgs.size(1), p = patch_size;
  const int64_t grid_w = imgs.size(3) / p, length = (imgs.size(2) / p) * grid_w, row = p * p * channels;
  const int group = lanes_per_row(static_cast<int>(std::min<int64_t>(row, std::numeric_limits<int>::max())),
                                  static_cast<int>(std::min<int64_t>(channels, kThreads + 1)));
  TORCH_CHECK(group > 0, "mix_patchify_cuda: a patch row of p*p*C = ", row, " values needs more than ",
              kThreads, " threads; use the triton or torch backend");
  const int64_t reach = (channels - 1) * imgs.stride(1) + (p - 1) * (imgs.stride(2) + imgs.stride(3));
  TORCH_CHECK(reach <= std::numeric_limits<int>::max(), "mix_patchify_cuda: imgs strides too large");

  MixPatchifyParams params{};
  std::optional<at::Tensor> partner_c, lam_c, keep_c, masked_c, mean_c, std_c;
  params.partner = index_pointer(partner, "partner", params.partner_i64, partner_c);
  params.lam = float_pointer(lam, "lam", lam_c);
  params.ids_keep = index_pointer(ids_keep, "ids_keep", params.keep_i64, keep_c);
  params.ids_masked = index_pointer(ids_masked, "ids_masked", params.masked_i64, masked_c);
  params.mean = float_pointer(mean, "mean", mean_c);
  params.std = float_pointer(stdev, "std", std_c);
  const int64_t kept = ids_keep.has_value() ? ids_keep->size(1) : length;
  const int64_t masked = ids_masked.has_value() ? ids_masked->size(1) : length;

  const auto options = imgs.options().dtype(out_dtype);
  at::Tensor inputs = empty_output({batch, kept, row}, options);
  at::Tensor target = empty_output({batch, masked, row}, options);
  at::Tensor other = partner.has_value() ? empty_output({batch, masked, row}, options) : at::empty({0}, options);

  params.imgs = imgs.data_ptr();
  params.stride_b = imgs.stride(0);
  params.stride_c = imgs.stride(1);
  params.stride_h = imgs.stride(2);
  params.stride_w = imgs.stride(3);
  params.inputs = inputs.data_ptr();
  params.target = target.data_ptr();
  params.other = partner.has_value() ? other.data_ptr() : nullptr;
  params.input_rows = batch * kept;
  params.target_rows = batch * masked;
  params.kept = kept;
  params.masked = masked;
  params.grid_w = static_cast<int>(grid_w);
  params.patch = static_cast<int>(p);
  params.channels = static_cast<int>(channels);
  params.row = static_cast<int>(row);
  params.group = group;
  params.norm_pix = norm_pix;
  const int64_t total_rows = batch * (kept + masked);
  if (total_rows == 0) return {inputs, target, other};

  const int64_t groups_per_block = kThreads / group;
  const int64_t wanted = (std::max(params.input_rows, params.target_rows) + groups_per_block - 1) / groups_per_block;
  launch(params, imgs.scalar_type(), out_dtype, wanted, imgs.get_device(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {inputs, target, other};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskedssl, CUDA, m) { m.impl("mix_patchify_cuda", &mix_patchify_cuda); }

}  // namespace maskedssl
