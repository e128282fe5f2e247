// CPU implementation of paged attention (decode and varlen prefill): one (query token, head) per work item,
// keys and values read through the block table, fp32 scores / softmax / accumulation.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attention/attention_checks.h"
#include "ops.h"

namespace xverse {
namespace {

template <typename scalar_t>
void prefill_kernel(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                    const at::Tensor& block_tables, const std::vector<int>& starts, const std::vector<int>& ctx_lens,
                    float scale, at::Tensor& out) {
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t num_seqs = static_cast<int64_t>(ctx_lens.size());

  // token -> its sequence (sequences are back to back in query)
  std::vector<int64_t> token_seq(num_tokens, -1);  // -1: a padding row past query_start_loc[B]
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int64_t t = starts[b]; t < starts[b + 1]; ++t) token_seq[t] = b;
  }
  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* k_data = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = value_cache.data_ptr<scalar_t>();
  const int* tables = block_tables.data_ptr<int>();
  scalar_t* out_data = out.data_ptr<scalar_t>();  // [T, Hq, D] contiguous

  at::parallel_for(0, num_tokens * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(head_dim), acc(head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_heads, h = item % num_heads, kv_head = h / group;
      scalar_t* o = out_data + item * head_dim;
      const int64_t b = token_seq[t];
      if (b < 0) {
        std::fill(o, o + head_dim, scalar_t(0));
        continue;
      }
      const int64_t q_len = starts[b + 1] - starts[b];
      // The q_len new tokens are the last q_len positions of the context: this one sees keys [0, pos].
      const int64_t pos = ctx_lens[b] - q_len + (t - starts[b]);
      const int64_t num_keys = std::min<int64_t>(pos + 1, ctx_lens[b]);
      if (num_keys <= 0) {
        std::fill(o, o + head_dim, scalar_t(0));
        continue;
      }
      const scalar_t* q_row = q_data + t * query.stride(0) + h * query.stride(1);
      for (int64_t d = 0; d < head_dim; ++d) q[d] = static_cast<float>(q_row[d]) * scale;
      const int* table = tables + b * max_blocks;
      auto row_offset = [&](int64_t j) {  // element offset of key j's row for kv_head
        const int64_t block = table[j / block_size];
        return ((block * num_kv_heads + kv_head) * block_size + j % block_size) * head_dim;
      };
      scores.resize(num_keys);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < num_keys; ++j) {
        const scalar_t* k = k_data + row_offset(j);
        float s = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) s += q[d] * static_cast<float>(k[d]);
        scores[j] = s;
        max_score = std::max(max_score, s);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < num_keys; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < num_keys; ++j) {
        const scalar_t* v = v_data + row_offset(j);
        const float p = scores[j];
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * static_cast<float>(v[d]);
      }
      for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<scalar_t>(acc[d] / sum);
    }
  });
}

}  // namespace

at::Tensor paged_attention_prefill_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                                       const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                                       double scale) {
  attention::check_prefill_args(query, key_cache, value_cache, block_tables, query_start_loc, context_lens);
  TORCH_CHECK(query.device().is_cpu(), "paged_attention_prefill_cpu: tensors must be on the CPU");
  const int* qsl = query_start_loc.data_ptr<int>();
  std::vector<int> starts(qsl, qsl + query_start_loc.numel());
  const int* lens = context_lens.data_ptr<int>();
  std::vector<int> ctx_lens(lens, lens + context_lens.numel());
  // Rows past query_start_loc[B] belong to no sequence (graph padding): they come out as zeros.
  TORCH_CHECK(starts.front() == 0 && starts.back() <= query.size(0), "query_start_loc must run from 0 to at most the ",
              query.size(0), " query tokens, got ", starts.front(), " .. ", starts.back());
  for (size_t b = 0; b + 1 < starts.size(); ++b) {
    TORCH_CHECK(starts[b] <= starts[b + 1], "query_start_loc must be non-decreasing");
    // context_len 0 is an empty (padding) sequence whose rows come out as zeros
    TORCH_CHECK(ctx_lens[b] == 0 || starts[b + 1] - starts[b] <= ctx_lens[b], "sequence ", b, " has ",
                starts[b + 1] - starts[b], " new tokens but context_lens[", b, "] = ", ctx_lens[b],
                " (it counts cached + new tokens)");
  }
  attention::check_block_tables(key_cache.size(0), key_cache.size(2), block_tables, context_lens);
  auto out = at::empty(query.sizes(), query.options());  // contiguous [T, Hq, D]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_prefill_cpu", [&] {
    prefill_kernel<scalar_t>(query, key_cache, value_cache, block_tables, starts, ctx_lens,
                             static_cast<float>(scale), out);
  });
  return out;
}

at::Tensor paged_attention_decode_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                      const at::Tensor& value_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, double scale, int64_t /*max_context_len*/) {
  attention::check_decode_args(query, key_cache, value_cache, block_tables, context_lens);
  // Decode is prefill with one new token per sequence.
  auto query_start_loc = at::arange(query.size(0) + 1, context_lens.options());
  return paged_attention_prefill_cpu(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                                     scale);
}

}  // namespace xverse
