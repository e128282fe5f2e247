// The tensor-core prefill kernel (prefill_mma.cu), launched by paged_attention_prefill_cuda for 16-bit dtypes.
#pragma once

#include <ATen/ATen.h>

namespace xverse::attention {

// True for the dtypes / head dims the mma kernel serves (bf16, fp16; head_dim 64, 80, 96, 128).
bool prefill_mma_supported(at::ScalarType dtype, int64_t head_dim);

// Varlen causal attention of the T new tokens over each sequence's paged context, on the current stream.
// out: [T, Hq, D] contiguous; query: [T, Hq, D] (last dim contiguous, even strides); caches
// [num_blocks, n_kv, block_size, D]; block_tables [B, max_blocks]; query_start_loc [B + 1]; context_lens [B].
// Rows at or past query_start_loc[B] (graph padding) are written as zeros.
void prefill_mma(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                 const at::Tensor& context_lens, double scale);

}  // namespace xverse::attention
