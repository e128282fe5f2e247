// Argument checks shared by the CPU and CUDA launchers of the grouped-GEMM ops, so both reject bad
// input with the same message naming the argument. Each launcher checks its own device kind first.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace xverse {
namespace moe_checks {

// The aligned layout from moe_align, on `device`.
inline void check_layout(const char* op, const at::Device& device, const at::Tensor& sorted_pair_ids,
                         const at::Tensor& block_expert_ids, const at::Tensor& num_padded, int64_t block_m) {
  TORCH_CHECK(block_m >= 1, op, ": block_m must be >= 1, got ", block_m);
  for (const at::Tensor* t : {&sorted_pair_ids, &block_expert_ids, &num_padded}) {
    TORCH_CHECK(t->device() == device, op, ": the layout tensors must be on ", device, ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(), op,
                ": sorted_pair_ids, block_expert_ids, num_padded must be contiguous 1-D int32");
  }
  TORCH_CHECK(num_padded.numel() == 1, op, ": num_padded must have one element");
  TORCH_CHECK(sorted_pair_ids.numel() == block_expert_ids.numel() * block_m, op,
              ": sorted_pair_ids must have block_expert_ids.numel() * block_m = ", block_expert_ids.numel() * block_m,
              " elements, got ", sorted_pair_ids.numel());
}

// token_mask: [T] bool on topk_ids' device, topk_ids: [T, pairs per token].
inline void check_token_mask(const char* op, const at::Tensor& token_mask, const at::Tensor& topk_ids) {
  TORCH_CHECK(topk_ids.dim() == 2, op, ": with a token_mask, topk_ids must be [T, k], got ", topk_ids.sizes());
  TORCH_CHECK(token_mask.device() == topk_ids.device(), op, ": token_mask must be on ", topk_ids.device(), ", got ",
              token_mask.device());
  TORCH_CHECK(token_mask.scalar_type() == at::kBool && token_mask.dim() == 1 && token_mask.size(0) == topk_ids.size(0),
              op, ": token_mask must be a [T = ", topk_ids.size(0), "] bool tensor, got ", token_mask.sizes(), " ",
              token_mask.scalar_type());
}

// x: [T, H], w13: [E, 2I, H] of x's dtype and device.
inline void check_gate_up(const at::Tensor& x, const at::Tensor& w13, int64_t top_k) {
  TORCH_CHECK(w13.device() == x.device(), "moe_gate_up: x and w13 must be on one device, got ", x.device(), " and ",
              w13.device());
  TORCH_CHECK(x.dim() == 2, "moe_gate_up: x must be [T, H], got ", x.sizes());
  TORCH_CHECK(w13.dim() == 3 && w13.size(2) == x.size(1) && w13.size(1) % 2 == 0,
              "moe_gate_up: w13 must be [E, 2I, H] with H = ", x.size(1), ", got ", w13.sizes());
  TORCH_CHECK(w13.scalar_type() == x.scalar_type(), "moe_gate_up: w13 dtype ", w13.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(top_k >= 1, "moe_gate_up: top_k must be >= 1, got ", top_k);
}

// act: [T * k, I], w2: [E, H, I], topk_weights: [T, k] fp32, shared_out: [T, H], all on act's device.
inline void check_down_combine(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& topk_weights,
                               const std::optional<at::Tensor>& shared_out) {
  TORCH_CHECK(w2.device() == act.device() && topk_weights.device() == act.device(),
              "moe_down_combine: act, w2, topk_weights must be on one device");
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.scalar_type() == at::kFloat,
              "moe_down_combine: topk_weights must be [T, k] float32, got ", topk_weights.sizes(), " ",
              topk_weights.scalar_type());
  const int64_t num_tokens = topk_weights.size(0);
  const int64_t num_pairs = num_tokens * topk_weights.size(1);
  TORCH_CHECK(act.dim() == 2 && act.size(0) == num_pairs, "moe_down_combine: act must be [T * k = ", num_pairs,
              ", I], got ", act.sizes());
  TORCH_CHECK(w2.dim() == 3 && w2.size(2) == act.size(1), "moe_down_combine: w2 must be [E, H, I] with I = ",
              act.size(1), ", got ", w2.sizes());
  TORCH_CHECK(w2.scalar_type() == act.scalar_type(), "moe_down_combine: w2 dtype ", w2.scalar_type(),
              " != act dtype ", act.scalar_type());
  if (shared_out.has_value()) {
    TORCH_CHECK(shared_out->device() == act.device(), "moe_down_combine: shared_out must be on ", act.device());
    TORCH_CHECK(shared_out->dim() == 2 && shared_out->size(0) == num_tokens && shared_out->size(1) == w2.size(1),
                "moe_down_combine: shared_out must be [T, H] = [", num_tokens, ", ", w2.size(1), "], got ",
                shared_out->sizes());
  }
}

}  // namespace moe_checks
}  // namespace xverse
