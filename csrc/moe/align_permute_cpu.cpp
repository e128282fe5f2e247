// Align / permute on the CPU: group the T * k (token, expert) pairs by expert, each group padded to a
// multiple of block_m with the sentinel P = T * k. The twin is moe_align_torch in xverse_engine/ops/moe.py.
// An id of -1 marks a pair whose expert lives on another tensor-parallel rank: it is skipped (placed nowhere),
// so the grouped GEMMs never compute it. Any other id outside [0, num_experts) is an error.
#include <vector>

#include "moe/moe_checks.h"
#include "ops.h"

namespace xverse {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                                             int64_t block_m,
                                                             const std::optional<at::Tensor>& token_mask) {
  TORCH_CHECK(topk_ids.device().is_cpu(), "moe_align_cpu: topk_ids must be a CPU tensor");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt, "moe_align: topk_ids must be int32, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_align: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_m >= 1, "moe_align: block_m must be >= 1, got ", block_m);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t num_pairs = ids.numel();
  TORCH_CHECK(num_pairs < (int64_t{1} << 31) - 1, "moe_align: too many pairs for int32 ids: ", num_pairs);

  // Worst case: every expert present adds block_m - 1 padding rows (same formula as max_padded_blocks).
  const int64_t worst_rows = num_pairs + std::min(num_experts, num_pairs) * (block_m - 1);
  const int64_t max_blocks = (worst_rows + block_m - 1) / block_m;
  auto opts = ids.options().dtype(at::kInt);
  auto sorted_pair_ids = at::full({max_blocks * block_m}, num_pairs, opts);  // [max_blocks * block_m]
  auto block_expert_ids = at::full({max_blocks}, -1, opts);                 // [max_blocks]
  auto num_padded = at::zeros({1}, opts);                                    // [1]

  // token_mask [T] bool: a token whose entry is false (graph padding) has its pairs left out of the layout.
  std::vector<char> pair_kept(num_pairs, 1);
  if (token_mask.has_value()) {
    moe_checks::check_token_mask("moe_align", *token_mask, topk_ids);
    const at::Tensor mask = token_mask->contiguous();
    const bool* mask_ptr = mask.data_ptr<bool>();
    const int64_t per_token = topk_ids.size(1);
    for (int64_t p = 0; p < num_pairs; ++p) pair_kept[p] = mask_ptr[p / per_token];
  }
  const int32_t* ids_ptr = ids.data_ptr<int32_t>();
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (!pair_kept[p]) continue;
    const int64_t e = ids_ptr[p];
    if (e == -1) continue;  // another rank's expert
    TORCH_CHECK(e >= 0 && e < num_experts, "moe_align: topk_ids[", p, "] = ", e, " is outside [0, ", num_experts,
                ") (-1 alone marks another rank's expert)");
    ++counts[e];
  }
  // group_start[e]: first slot of expert e's padded group
  std::vector<int64_t> group_start(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (counts[e] + block_m - 1) / block_m * block_m;
    group_start[e + 1] = group_start[e] + padded;
  }
  int32_t* sorted_ptr = sorted_pair_ids.data_ptr<int32_t>();
  int32_t* block_ptr = block_expert_ids.data_ptr<int32_t>();
  std::vector<int64_t> cursor(group_start.begin(), group_start.end() - 1);
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (pair_kept[p] && ids_ptr[p] != -1) sorted_ptr[cursor[ids_ptr[p]]++] = static_cast<int32_t>(p);
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t slot = group_start[e]; slot < group_start[e + 1]; slot += block_m) {
      block_ptr[slot / block_m] = static_cast<int32_t>(e);
    }
  }
  num_padded.data_ptr<int32_t>()[0] = static_cast<int32_t>(group_start[num_experts]);
  return {sorted_pair_ids, block_expert_ids, num_padded};
}

}  // namespace xverse
