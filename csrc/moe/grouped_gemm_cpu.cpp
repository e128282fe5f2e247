// The expert GEMMs on the CPU: gate_up (rows gathered through the permutation, silu(gate) * up fused) and
// down + combine (per-pair fp32 rows, then a per-token sum in fixed j order). Twins: moe_gate_up_torch,
// moe_down_combine_torch in xverse_engine/ops/moe.py. Each run of consecutive blocks of one expert is one
// fp32 GEMM (at::mm, single-threaded inside at::parallel_for); the gather, epilogue and combine are ours.
#include <cmath>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "moe/moe_checks.h"
#include "ops.h"

namespace xverse {

namespace {

// A run: the real pairs of consecutive blocks that belong to one expert.
struct ExpertRun {
  int64_t expert;
  std::vector<int64_t> pairs;
};

// Reads the aligned layout back into runs; rows with the sentinel (pair >= num_pairs) or past num_padded
// are padding and skipped.
std::vector<ExpertRun> expert_runs(const at::Tensor& sorted_pair_ids, const at::Tensor& block_expert_ids,
                                   const at::Tensor& num_padded, int64_t num_pairs, int64_t num_experts,
                                   int64_t block_m) {
  const int32_t* sorted = sorted_pair_ids.data_ptr<int32_t>();
  const int32_t* blocks = block_expert_ids.data_ptr<int32_t>();
  const int64_t padded = std::min<int64_t>(num_padded.data_ptr<int32_t>()[0], sorted_pair_ids.numel());
  std::vector<ExpertRun> runs;
  for (int64_t b = 0; b * block_m < padded; ++b) {
    const int64_t e = blocks[b];
    if (e < 0) continue;
    TORCH_CHECK(e < num_experts, "moe grouped GEMM: block_expert_ids[", b, "] = ", e, " >= E = ", num_experts);
    if (runs.empty() || runs.back().expert != e) runs.push_back({e, {}});
    for (int64_t slot = b * block_m; slot < std::min((b + 1) * block_m, padded); ++slot) {
      const int64_t pair = sorted[slot];
      if (pair >= 0 && pair < num_pairs) runs.back().pairs.push_back(pair);
    }
  }
  return runs;
}

inline float silu_times(float gate, float up) {
  return gate / (1.f + std::exp(-gate)) * up;
}

}  // namespace

at::Tensor moe_gate_up_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& sorted_pair_ids,
                           const at::Tensor& block_expert_ids, const at::Tensor& num_padded, int64_t top_k,
                           int64_t block_m) {
  TORCH_CHECK(x.device().is_cpu(), "moe_gate_up_cpu: x must be a CPU tensor");
  moe_checks::check_layout("moe_gate_up", x.device(), sorted_pair_ids, block_expert_ids, num_padded, block_m);
  moe_checks::check_gate_up(x, w13, top_k);
  const int64_t num_pairs = x.size(0) * top_k;
  const int64_t inter = w13.size(1) / 2;
  const at::Tensor xc = x.contiguous();
  auto act = at::zeros({num_pairs, inter}, x.options());  // [P, I]; unrouted pairs stay 0 like the twin
  const auto runs = expert_runs(sorted_pair_ids, block_expert_ids, num_padded, num_pairs, w13.size(0), block_m);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_gate_up_cpu", [&] {
    scalar_t* act_ptr = act.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const ExpertRun& run = runs[r];
        if (run.pairs.empty()) continue;
        auto pairs = at::tensor(run.pairs, at::kLong);
        const at::Tensor rows = xc.index_select(0, at::div(pairs, top_k, "floor")).to(at::kFloat);  // [n, H]
        const at::Tensor w = w13[run.expert].to(at::kFloat);                                          // [2I, H]
        const at::Tensor gate_up = at::mm(rows, w.t()).contiguous();                                  // [n, 2I]
        const float* gu = gate_up.data_ptr<float>();
        for (size_t i = 0; i < run.pairs.size(); ++i) {
          scalar_t* out = act_ptr + run.pairs[i] * inter;
          const float* g = gu + static_cast<int64_t>(i) * 2 * inter;
          for (int64_t c = 0; c < inter; ++c) out[c] = static_cast<scalar_t>(silu_times(g[c], g[inter + c]));
        }
      }
    });
  });
  return act;
}

at::Tensor moe_down_combine_cpu(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& sorted_pair_ids,
                                const at::Tensor& block_expert_ids, const at::Tensor& num_padded,
                                const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_out,
                                int64_t block_m) {
  TORCH_CHECK(act.device().is_cpu(), "moe_down_combine_cpu: act must be a CPU tensor");
  moe_checks::check_layout("moe_down_combine", act.device(), sorted_pair_ids, block_expert_ids, num_padded, block_m);
  moe_checks::check_down_combine(act, w2, topk_weights, shared_out);
  const int64_t num_tokens = topk_weights.size(0);
  const int64_t top_k = topk_weights.size(1);
  const int64_t num_pairs = num_tokens * top_k;
  const int64_t hidden = w2.size(1);
  const at::Tensor ac = act.contiguous();
  const at::Tensor wc = topk_weights.contiguous();
  const auto runs = expert_runs(sorted_pair_ids, block_expert_ids, num_padded, num_pairs, w2.size(0), block_m);

  // down: [P, H] fp32, one row per pair (unrouted pairs stay 0 like the twin)
  auto down = at::zeros({num_pairs, hidden}, act.options().dtype(at::kFloat));
  float* down_ptr = down.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const ExpertRun& run = runs[r];
      if (run.pairs.empty()) continue;
      const at::Tensor rows = ac.index_select(0, at::tensor(run.pairs, at::kLong)).to(at::kFloat);  // [n, I]
      const at::Tensor result = at::mm(rows, w2[run.expert].to(at::kFloat).t()).contiguous();        // [n, H]
      const float* src = result.data_ptr<float>();
      for (size_t i = 0; i < run.pairs.size(); ++i) {
        std::copy(src + static_cast<int64_t>(i) * hidden, src + (static_cast<int64_t>(i) + 1) * hidden,
                  down_ptr + run.pairs[i] * hidden);
      }
    }
  });

  auto out = at::empty({num_tokens, hidden}, act.options());  // [T, H]
  const float* weight_ptr = wc.data_ptr<float>();
  const std::optional<at::Tensor> shared =
      shared_out.has_value() ? std::optional<at::Tensor>(shared_out->to(at::kFloat).contiguous()) : std::nullopt;
  const float* shared_ptr = shared.has_value() ? shared->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "moe_down_combine_cpu", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(hidden);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), 0.f);
        for (int64_t j = 0; j < top_k; ++j) {  // fixed order j = 0..k-1: deterministic, same as the twin
          const float w = weight_ptr[t * top_k + j];
          const float* row = down_ptr + (t * top_k + j) * hidden;
          for (int64_t c = 0; c < hidden; ++c) sum[c] += row[c] * w;
        }
        if (shared_ptr != nullptr) {
          for (int64_t c = 0; c < hidden; ++c) sum[c] += shared_ptr[t * hidden + c];
        }
        for (int64_t c = 0; c < hidden; ++c) out_ptr[t * hidden + c] = static_cast<scalar_t>(sum[c]);
      }
    });
  });
  return out;
}

}  // namespace xverse
