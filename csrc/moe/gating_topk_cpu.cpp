// Fused gating on the CPU: fp32 router logits -> softmax -> top-k (lower index wins ties, NaN ranks
// below every number) -> renormalise with + 1e-6; then the S shared experts E .. E+S-1 appended to every
// row with weight 1.0 (the grouped GEMM serves them as always-on experts). The twin is gating_topk_torch in xverse_engine/ops/moe.py.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "ops.h"

namespace xverse {

namespace {

constexpr float kRouterEps = 1e-6f;

// True when candidate (value a, index ia) ranks above (value b, index ib). Values are NaN-free here.
inline bool ranks_above(float a, int64_t ia, float b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

// probs: [E] fp32 of one row -> writes its top-k ids and renormalised weights.
void topk_row(const float* probs, int64_t num_experts, int64_t top_k, float* weights, int32_t* ids,
              std::vector<char>& taken) {
  std::fill(taken.begin(), taken.end(), 0);
  float sum = 0.f;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    float best_rank = 0.f;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (taken[e]) continue;
      // NaN ranks below every number (including 0), so padding rows still yield valid ids.
      float rank = std::isnan(probs[e]) ? -std::numeric_limits<float>::infinity() : probs[e];
      if (best < 0 || ranks_above(rank, e, best_rank, best)) {
        best = e;
        best_rank = rank;
      }
    }
    taken[best] = 1;
    ids[j] = static_cast<int32_t>(best);
    weights[j] = probs[best];
    sum += probs[best];
  }
  const float denom = sum + kRouterEps;
  for (int64_t j = 0; j < top_k; ++j) weights[j] = weights[j] / denom;
}

// logits: [E] -> probs: [E], softmax in fp32 (an all-NaN / inf row gives NaN probs, like torch.softmax).
void softmax_row(const float* logits, int64_t num_experts, float* probs) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) max_logit = std::fmax(max_logit, logits[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < num_experts; ++e) {
    probs[e] = std::exp(logits[e] - max_logit);
    sum += probs[e];
  }
  for (int64_t e = 0; e < num_experts; ++e) probs[e] = probs[e] / sum;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gating_topk_cpu(const at::Tensor& hidden, const at::Tensor& router_weight,
                                                   int64_t top_k, int64_t num_shared) {
  TORCH_CHECK(hidden.device().is_cpu() && router_weight.device().is_cpu(),
              "gating_topk_cpu: hidden and router_weight must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, "gating_topk: hidden must be [T, H], got ", hidden.sizes());
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(1) == hidden.size(1),
              "gating_topk: router_weight must be [E, H] with H = ", hidden.size(1), ", got ", router_weight.sizes());
  TORCH_CHECK(router_weight.scalar_type() == at::kFloat, "gating_topk: router_weight must be float32, got ",
              router_weight.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                  hidden.scalar_type() == at::kHalf,
              "gating_topk: hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  const int64_t num_tokens = hidden.size(0);
  const int64_t num_experts = router_weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "gating_topk: top_k must be in [1, E = ", num_experts,
              "], got ", top_k);

  TORCH_CHECK(num_shared >= 0 && num_shared <= 32, "gating_topk: num_shared must be in [0, 32], got ", num_shared);
  const int64_t row = top_k + num_shared;  // pairs per token
  auto weights = at::empty({num_tokens, row}, hidden.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, row}, hidden.options().dtype(at::kInt));
  if (num_tokens == 0) return {weights, ids};

  // logits: [T, E] fp32 = hidden.float() @ router^T (the router matmul itself is a plain fp32 GEMM)
  const at::Tensor logits = at::mm(hidden.to(at::kFloat), router_weight.t()).contiguous();
  const float* logits_ptr = logits.data_ptr<float>();
  float* weights_ptr = weights.data_ptr<float>();
  int32_t* ids_ptr = ids.data_ptr<int32_t>();

  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(num_experts);
    std::vector<char> taken(num_experts);
    for (int64_t t = begin; t < end; ++t) {
      softmax_row(logits_ptr + t * num_experts, num_experts, probs.data());
      topk_row(probs.data(), num_experts, top_k, weights_ptr + t * row, ids_ptr + t * row, taken);
      for (int64_t s = 0; s < num_shared; ++s) {
        weights_ptr[t * row + top_k + s] = 1.f;
        ids_ptr[t * row + top_k + s] = static_cast<int32_t>(num_experts + s);
      }
    }
  });
  return {weights, ids};
}

}  // namespace xverse
