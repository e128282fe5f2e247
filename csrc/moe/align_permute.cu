// Align / permute on the GPU, one block, no host sync: count pairs per expert, padded prefix sums,
// per-block expert ids (-1 past the end), sentinel P in every padding slot, then scatter each pair to its
// expert's group. Outputs are sized from shapes alone (worst case), so the op is CUDA-graph capturable.
// Order inside a group is unspecified (shared-memory atomics); the GEMMs' per-row results do not depend on it.
// token_mask (optional, [T] bool): the pairs of a token whose entry is false (graph padding) are left out,
// graph-safely (the mask lives on the device). Ids outside [0, E) are left out too (the CPU version raises);
// the GEMMs then give such pairs zero rows (grouped_gemm.cu).
// The twin is moe_align_torch in xverse_engine/ops/moe.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "common/launch.cuh"
#include "moe/moe_checks.h"
#include "moe/moe_common.cuh"
#include "ops.h"

namespace xverse {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxExperts = 1024;

// topk_ids: [P] int32 -> sorted_pair_ids: [max_blocks * block_m], block_expert_ids: [max_blocks], num_padded: [1]
__global__ void __launch_bounds__(kThreads) moe_align_kernel(const int32_t* __restrict__ topk_ids,
                                                             const bool* __restrict__ token_mask, int pairs_per_token,
                                                             int num_pairs, int num_experts, int block_m, int max_blocks,
                                                             int32_t* __restrict__ sorted_pair_ids,
                                                             int32_t* __restrict__ block_expert_ids,
                                                             int32_t* __restrict__ num_padded) {
  __shared__ int count[kMaxExperts];          // pairs per expert, reused as the scatter cursor
  __shared__ int group_end[kMaxExperts];      // padded prefix sum: end slot of expert e's group
  const int tid = threadIdx.x;

  for (int e = tid; e < num_experts; e += kThreads) count[e] = 0;
  __syncthreads();
  // A pair is kept when its id is in range and its token is not masked out.
  auto kept_expert = [&](int p) {
    const int e = topk_ids[p];
    const bool kept = e >= 0 && e < num_experts && (token_mask == nullptr || token_mask[p / pairs_per_token]);
    return kept ? e : -1;
  };
  for (int p = tid; p < num_pairs; p += kThreads) {
    const int e = kept_expert(p);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (tid == 0) {  // E <= 1024: a serial scan is a few microseconds at most, usually E = 64
    int total = 0;
    for (int e = 0; e < num_experts; ++e) {
      total += (count[e] + block_m - 1) / block_m * block_m;
      group_end[e] = total;
    }
    num_padded[0] = total;
  }
  __syncthreads();
  const int padded_total = group_end[num_experts - 1];

  const int64_t num_slots = static_cast<int64_t>(max_blocks) * block_m;
  for (int64_t s = tid; s < num_slots; s += kThreads) sorted_pair_ids[s] = num_pairs;  // sentinel P
  for (int b = tid; b < max_blocks; b += kThreads) {
    const int64_t start = static_cast<int64_t>(b) * block_m;
    int expert = -1;
    if (start < padded_total) {  // first e with group_end[e] > start (that group is non-empty)
      int lo = 0, hi = num_experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (group_end[mid] > start) hi = mid;
        else lo = mid + 1;
      }
      expert = lo;
    }
    block_expert_ids[b] = expert;
  }
  for (int e = tid; e < num_experts; e += kThreads) count[e] = 0;
  __syncthreads();  // the sentinel fill above must land before the scatter below overwrites slots
  for (int p = tid; p < num_pairs; p += kThreads) {
    const int e = kept_expert(p);
    if (e >= 0) {
      const int group_start = e == 0 ? 0 : group_end[e - 1];
      sorted_pair_ids[group_start + atomicAdd(&count[e], 1)] = p;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                                              int64_t block_m,
                                                              const std::optional<at::Tensor>& token_mask) {
  TORCH_CHECK(topk_ids.is_cuda(), "moe_align_cuda: topk_ids must be a CUDA tensor");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt, "moe_align: topk_ids must be int32, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "moe_align_cuda: num_experts must be in [1, ",
              kMaxExperts, "], got ", num_experts);
  TORCH_CHECK(block_m >= 1 && block_m <= 1024, "moe_align: block_m must be in [1, 1024], got ", block_m);
  const int64_t num_pairs = topk_ids.numel();
  // Same formula as max_padded_blocks() in xverse_engine/ops/moe.py.
  const int64_t worst_rows = num_pairs + std::min(num_experts, num_pairs) * (block_m - 1);
  const int64_t max_blocks = (worst_rows + block_m - 1) / block_m;
  TORCH_CHECK(max_blocks * block_m < INT_MAX, "moe_align_cuda: too many pairs for int32 slots: ", num_pairs);

  at::Tensor mask;
  if (token_mask.has_value()) {
    moe_checks::check_token_mask("moe_align", *token_mask, topk_ids);
    mask = token_mask->contiguous();
  }
  const int pairs_per_token = topk_ids.dim() == 2 ? static_cast<int>(topk_ids.size(1)) : 1;

  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  auto opts = ids.options().dtype(at::kInt);
  auto sorted_pair_ids = at::empty({max_blocks * block_m}, opts);
  auto block_expert_ids = at::empty({max_blocks}, opts);
  auto num_padded = at::empty({1}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_kernel(moe_align_kernel, dim3(1), dim3(kThreads), 0, stream, static_cast<const int32_t*>(ids.data_ptr<int32_t>()),
                static_cast<const bool*>(mask.defined() ? mask.data_ptr<bool>() : nullptr), pairs_per_token,
                static_cast<int>(num_pairs), static_cast<int>(num_experts), static_cast<int>(block_m),
                static_cast<int>(max_blocks), sorted_pair_ids.data_ptr<int32_t>(), block_expert_ids.data_ptr<int32_t>(),
                num_padded.data_ptr<int32_t>());
  return {sorted_pair_ids, block_expert_ids, num_padded};
}

}  // namespace xverse
