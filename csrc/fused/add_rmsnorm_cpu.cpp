// add_rmsnorm on the CPU: residual += x (rounded to the activation dtype), then x = weight * rmsnorm(residual)
// with fp32 statistics, the normalised row cast to the activation dtype before the scale, as the model's
// own RMSNorm. Both tensors are updated in place. The twin is add_rmsnorm_torch in xverse_engine/ops/fused.py.
#include <cmath>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "fused/fused_checks.h"
#include "ops.h"

namespace xverse {

void add_rmsnorm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  fused::check_add_rmsnorm(x, residual, weight, eps);
  TORCH_CHECK(x.device().is_cpu(), "add_rmsnorm_cpu: tensors must be on the CPU");
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rmsnorm_cpu", [&] {
    scalar_t* x_ptr = x.data_ptr<scalar_t>();
    scalar_t* res_ptr = residual.data_ptr<scalar_t>();
    const scalar_t* w_ptr = weight.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* xr = x_ptr + t * hidden;
        scalar_t* rr = res_ptr + t * hidden;
        float sum_sq = 0.f;
        for (int64_t h = 0; h < hidden; ++h) {
          const scalar_t r = static_cast<scalar_t>(static_cast<float>(rr[h]) + static_cast<float>(xr[h]));
          rr[h] = r;
          const float v = static_cast<float>(r);
          sum_sq += v * v;
        }
        const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + static_cast<float>(eps));
        for (int64_t h = 0; h < hidden; ++h) {
          const scalar_t normed = static_cast<scalar_t>(static_cast<float>(rr[h]) * inv_rms);
          xr[h] = static_cast<scalar_t>(static_cast<float>(w_ptr[h]) * static_cast<float>(normed));
        }
      }
    });
  });
}

}  // namespace xverse
