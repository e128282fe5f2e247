// Argument checks shared by the CPU and CUDA implementations of draw_top_k_top_p, so both reject the same
// inputs with the same messages. Plain C++, included by .cpp and .cu.
#pragma once

#include <ATen/ATen.h>

namespace xverse::sampling {

// values [B, K] fp32, token_ids [B, K] int64, top_ks [B] int64, top_ps [B] fp32, keys [B] int64: contiguous,
// on one device, K >= 1.
inline void check_draw_top_k_top_p(const at::Tensor& values, const at::Tensor& token_ids, const at::Tensor& top_ks,
                                   const at::Tensor& top_ps, const at::Tensor& keys) {
  TORCH_CHECK(values.dim() == 2, "draw_top_k_top_p: values must be [B, K] (the output of topk), got shape ",
              values.sizes());
  TORCH_CHECK(values.size(1) > 0, "draw_top_k_top_p: values must have at least one candidate per row (K >= 1)");
  TORCH_CHECK(values.scalar_type() == at::kFloat, "draw_top_k_top_p: values must be float32, got ",
              values.scalar_type());
  TORCH_CHECK(token_ids.sizes() == values.sizes(), "draw_top_k_top_p: token_ids shape ", token_ids.sizes(),
              " must equal values shape ", values.sizes());
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, "draw_top_k_top_p: token_ids must be int64, got ",
              token_ids.scalar_type());
  const int64_t rows = values.size(0);
  const std::pair<const at::Tensor*, const char*> per_row[] = {{&top_ks, "top_ks"}, {&top_ps, "top_ps"},
                                                               {&keys, "keys"}};
  for (const auto& [t, name] : per_row) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "draw_top_k_top_p: ", name, " must be [B] = [", rows,
                "], got shape ", t->sizes());
  }
  TORCH_CHECK(top_ks.scalar_type() == at::kLong, "draw_top_k_top_p: top_ks must be int64, got ", top_ks.scalar_type());
  TORCH_CHECK(top_ps.scalar_type() == at::kFloat, "draw_top_k_top_p: top_ps must be float32, got ",
              top_ps.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kLong, "draw_top_k_top_p: keys must be int64 (row_keys), got ",
              keys.scalar_type());
  for (const at::Tensor* t : {&token_ids, &top_ks, &top_ps, &keys}) {
    TORCH_CHECK(t->device() == values.device(), "draw_top_k_top_p: every tensor must be on ", values.device(),
                " (the device of values), got one on ", t->device());
  }
  TORCH_CHECK(values.is_contiguous() && token_ids.is_contiguous() && top_ks.is_contiguous() && top_ps.is_contiguous() &&
                  keys.is_contiguous(),
              "draw_top_k_top_p: values, token_ids, top_ks, top_ps and keys must be contiguous (call .contiguous())");
}

}  // namespace xverse::sampling
