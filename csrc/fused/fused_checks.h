// Argument checks shared by the CPU and CUDA implementations of the fused decode-path ops (add_rmsnorm,
// rope_cache), so both reject the same inputs with the same messages. Plain C++, included by .cpp and .cu.
#pragma once

#include <ATen/ATen.h>

#include "attention/attention_checks.h"

namespace xverse::fused {

// x, residual: [T, H] contiguous, one dtype (fp32 / bf16 / fp16) and device; weight: [H] of that dtype.
inline void check_add_rmsnorm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                              double eps) {
  TORCH_CHECK(x.dim() == 2, "add_rmsnorm: x must be [T, H], got shape ", x.sizes());
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rmsnorm: residual shape ", residual.sizes(), " must equal x shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "add_rmsnorm: weight must be [H] = [", x.size(1),
              "], got ", weight.sizes());
  TORCH_CHECK(attention::supported_dtype(x.scalar_type()), "add_rmsnorm: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "add_rmsnorm: x, residual and weight must have one dtype, got ", x.scalar_type(), ", ",
              residual.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(residual.device() == x.device() && weight.device() == x.device(),
              "add_rmsnorm: x, residual and weight must be on one device");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "add_rmsnorm: x, residual and weight must be contiguous (call .contiguous() first)");
  TORCH_CHECK(!x.is_same(residual), "add_rmsnorm: x and residual must be distinct tensors");
  TORCH_CHECK(eps > 0, "add_rmsnorm: eps must be > 0, got ", eps);
}

// query [T, Hq, D] (last dim contiguous, mutated); key / value / caches / slot_mapping as reshape_and_cache;
// positions [T] int64; cos_sin [P, D] fp32 contiguous (cos in the first D/2 columns, sin in the last D/2).
inline void check_rope_cache(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& positions, const at::Tensor& cos_sin) {
  attention::check_cache_write_args(key, value, key_cache, value_cache, slot_mapping);
  const int64_t num_tokens = key.size(0), head_dim = key.size(2);
  TORCH_CHECK(query.dim() == 3 && query.size(0) == num_tokens && query.size(2) == head_dim,
              "rope_cache: query must be [T, Hq, D] = [", num_tokens, ", Hq, ", head_dim, "], got ", query.sizes());
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "rope_cache: query heads ", query.size(1),
              " must be a multiple of key heads ", key.size(1));
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "rope_cache: query dtype ", query.scalar_type(),
              " must equal key dtype ", key.scalar_type());
  TORCH_CHECK(query.stride(2) == 1, "rope_cache: query's last dimension (head_dim) must be contiguous");
  TORCH_CHECK(head_dim % 2 == 0, "rope_cache: head_dim must be even, got ", head_dim);
  attention::check_same_device(key_cache, query, "query");
  attention::check_int_vector(positions, "positions", at::kLong, num_tokens, key_cache);
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == head_dim && cos_sin.scalar_type() == at::kFloat &&
                  cos_sin.is_contiguous(),
              "rope_cache: cos_sin must be a contiguous float32 [P, D = ", head_dim, "] table, got ", cos_sin.sizes(),
              " ", cos_sin.scalar_type());
  attention::check_same_device(key_cache, cos_sin, "cos_sin");
}

}  // namespace xverse::fused
