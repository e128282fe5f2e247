// draw_top_k_top_p on the GPU: one warp per row, lanes striding over the row's K <= 1024 candidates (best first).
// The same formulas as the CPU kernel (draw_top_k_top_p_cpu.cpp) and the twin (draw_top_k_top_p_torch in
// xverse_engine/ops/sampling.py): top-k by rank; top-p over the survivors' softmax (sum and cumulative sum in
// double: a warp scan, chunk by chunk, with the running total carried); then the argmax of value + Gumbel noise
// among the kept ranks, ties to the lowest rank. One launch replaces the ~30 small ops of the torch version.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "common/launch.cuh"
#include "ops.h"
#include "sampling/gumbel_noise.h"
#include "sampling/sampling_checks.h"

namespace xverse {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kMaxCandidates = 1024;  // MAX_CUDA_CANDIDATES in ops/sampling.py: 32 chunks of one warp

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// A butterfly: every lane ends with the same sum (a + b == b + a).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Inclusive prefix sum over the lanes.
__device__ __forceinline__ double warp_inclusive_sum(double v, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const double other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// values, token_ids: [B, width]; top_ks, top_ps, keys: [B]; out: [B]. grid = B, block = one warp.
__global__ void __launch_bounds__(kWarp)
    draw_top_k_top_p_kernel(const float* __restrict__ values, const int64_t* __restrict__ token_ids,
                            const int64_t* __restrict__ top_ks, const float* __restrict__ top_ps,
                            const int64_t* __restrict__ keys, int64_t* __restrict__ out, int width) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  const float* row_values = values + row * width;
  const int64_t* row_ids = token_ids + row * width;
  const int64_t top_k = top_ks[row];
  const int kept_by_k = top_k > 0 && top_k < width ? static_cast<int>(top_k) : width;  // ranks [0, kept_by_k)
  const float top_p = top_ps[row];
  const bool use_top_p = top_p < 1.f;
  const int64_t key = keys[row];

  float max_value = -INFINITY, inv_sum = 0.f;
  if (use_top_p) {  // uniform over the warp: one row per warp
    for (int r = lane; r < kept_by_k; r += kWarp) max_value = row_values[r] > max_value ? row_values[r] : max_value;
    max_value = warp_max(max_value);
    double sum = 0.0;
    for (int r = lane; r < kept_by_k; r += kWarp) sum += static_cast<double>(expf(row_values[r] - max_value));
    inv_sum = 1.f / static_cast<float>(warp_sum(sum));
  }

  // This lane's best kept rank so far; rank 0 with -inf stands for "nothing kept yet", as torch's argmax of an
  // all -inf row gives rank 0.
  int best_rank = 0;
  float best_score = -INFINITY;
  double carried = 0.0;  // the probability mass of the chunks before this one
  for (int base = 0; base < kept_by_k; base += kWarp) {
    const int r = base + lane;
    const bool in_row = r < kept_by_k;
    bool kept = in_row;
    if (use_top_p) {
      const float prob = in_row ? expf(row_values[r] - max_value) * inv_sum : 0.f;
      const double mass = carried + warp_inclusive_sum(static_cast<double>(prob), lane);
      carried = __shfl_sync(kFullMask, mass, kWarp - 1);
      const float mass_before = static_cast<float>(mass) - prob;
      kept = in_row && !(mass_before >= top_p);  // never rank 0 when top_p > 0
    }
    if (kept) {
      const float score = row_values[r] + sampling::gumbel_noise(key, row_ids[r]);
      if (score > best_score) {  // strictly: a lane visits its ranks in increasing order
        best_score = score;
        best_rank = r;
      }
    }
  }
  // the warp's best: the highest score, then the lowest rank
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_score = __shfl_xor_sync(kFullMask, best_score, offset);
    const int other_rank = __shfl_xor_sync(kFullMask, best_rank, offset);
    if (other_score > best_score || (other_score == best_score && other_rank < best_rank)) {
      best_score = other_score;
      best_rank = other_rank;
    }
  }
  if (lane == 0) out[row] = row_ids[best_rank];
}

}  // namespace

at::Tensor draw_top_k_top_p_cuda(const at::Tensor& values, const at::Tensor& token_ids, const at::Tensor& top_ks,
                                 const at::Tensor& top_ps, const at::Tensor& keys) {
  sampling::check_draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys);
  TORCH_CHECK(values.is_cuda(), "draw_top_k_top_p_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(values.size(1) <= kMaxCandidates, "draw_top_k_top_p: the CUDA kernel takes at most ", kMaxCandidates,
              " candidates per row, got K = ", values.size(1),
              "; call the front xverse_engine.ops.sampling.draw_top_k_top_p, which runs the twin beyond that");
  TORCH_CHECK(values.size(0) <= INT32_MAX, "draw_top_k_top_p: too many rows, got ", values.size(0));
  at::Tensor out = at::empty({values.size(0)}, token_ids.options());
  if (values.size(0) == 0) return out;
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_kernel(draw_top_k_top_p_kernel, dim3(static_cast<unsigned>(values.size(0))), dim3(kWarp), 0, stream,
                static_cast<const float*>(values.data_ptr<float>()),
                static_cast<const int64_t*>(token_ids.data_ptr<int64_t>()),
                static_cast<const int64_t*>(top_ks.data_ptr<int64_t>()),
                static_cast<const float*>(top_ps.data_ptr<float>()),
                static_cast<const int64_t*>(keys.data_ptr<int64_t>()), out.data_ptr<int64_t>(),
                static_cast<int>(values.size(1)));
  return out;
}

}  // namespace xverse
