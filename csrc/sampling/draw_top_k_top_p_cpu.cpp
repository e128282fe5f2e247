// draw_top_k_top_p on the CPU: one plain pass per row over its K candidates (best first): top-k, then top-p
// over the survivors' softmax, then the argmax of value + Gumbel noise among the kept ranks (ties to the lowest
// rank). The twin, and the contract in full, is draw_top_k_top_p_torch in xverse_engine/ops/sampling.py.
#include <cmath>
#include <limits>

#include <ATen/Parallel.h>

#include "ops.h"
#include "sampling/gumbel_noise.h"
#include "sampling/sampling_checks.h"

namespace xverse {
namespace {

// One row: values, ids [width] -> the rank drawn.
int64_t draw_row(const float* values, const int64_t* ids, int64_t width, int64_t top_k, float top_p, int64_t key) {
  const int64_t kept_by_k = top_k > 0 && top_k < width ? top_k : width;  // ranks [0, kept_by_k) survive top-k
  const bool use_top_p = top_p < 1.f;
  // softmax of the top-k survivors (the rest are -inf: probability 0), its sum accumulated in double
  float max_value = -std::numeric_limits<float>::infinity();
  float inv_sum = 0.f;
  if (use_top_p) {
    for (int64_t r = 0; r < kept_by_k; ++r) max_value = values[r] > max_value ? values[r] : max_value;
    double sum = 0.0;
    for (int64_t r = 0; r < kept_by_k; ++r) sum += static_cast<double>(expf(values[r] - max_value));
    inv_sum = 1.f / static_cast<float>(sum);
  }
  double mass = 0.0;  // cumulative probability up to and including rank r (torch's CPU cumsum accumulates in double)
  int64_t best_rank = 0;
  float best_score = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < kept_by_k; ++r) {
    if (use_top_p) {
      const float prob = expf(values[r] - max_value) * inv_sum;
      mass += static_cast<double>(prob);
      const float mass_before = static_cast<float>(mass) - prob;
      if (mass_before >= top_p) continue;  // removed by top-p (never rank 0 when top_p > 0)
    }
    const float score = values[r] + sampling::gumbel_noise(key, ids[r]);
    if (score > best_score) {  // strictly: ties keep the lower rank
      best_score = score;
      best_rank = r;
    }
  }
  return best_rank;
}

}  // namespace

at::Tensor draw_top_k_top_p_cpu(const at::Tensor& values, const at::Tensor& token_ids, const at::Tensor& top_ks,
                                const at::Tensor& top_ps, const at::Tensor& keys) {
  sampling::check_draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys);
  TORCH_CHECK(values.device().is_cpu(), "draw_top_k_top_p_cpu: tensors must be on the CPU");
  const int64_t rows = values.size(0), width = values.size(1);
  at::Tensor out = at::empty({rows}, token_ids.options());
  const float* values_ptr = values.data_ptr<float>();
  const int64_t* ids_ptr = token_ids.data_ptr<int64_t>();
  const int64_t* top_k_ptr = top_ks.data_ptr<int64_t>();
  const float* top_p_ptr = top_ps.data_ptr<float>();
  const int64_t* key_ptr = keys.data_ptr<int64_t>();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t rank = draw_row(values_ptr + b * width, ids_ptr + b * width, width, top_k_ptr[b], top_p_ptr[b],
                                    key_ptr[b]);
      out_ptr[b] = ids_ptr[b * width + rank];
    }
  });
  return out;
}

}  // namespace xverse
