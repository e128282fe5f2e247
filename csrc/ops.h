// Declarations of every xverse op implementation. Schemas (the contract) live in torch_bindings.cpp;
// the pure-PyTorch twin of each op, the readable reference, lives in xverse_engine/ops/.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace xverse {

// ---- MoE -------------------------------------------------------------------------------------------
// hidden [T, H] (bf16/fp16/fp32), router_weight [E, H] fp32
//   -> topk_weights [T, k] fp32 (renormalised: w / (sum w + 1e-6)), topk_ids [T, k] int32
//   (num_shared = S > 0: [T, k + S], the shared experts E .. E+S-1 appended with weight 1.0)
std::tuple<at::Tensor, at::Tensor> gating_topk_cpu(const at::Tensor& hidden, const at::Tensor& router_weight,
                                                   int64_t top_k, int64_t num_shared);
// topk_ids [T, k] int32 -> sorted_pair_ids [max_blocks * block_m] int32 (pair p = t * k + j; pad = T * k),
//   block_expert_ids [max_blocks] int32 (-1 past the end), num_padded [1] int32.
//   token_mask [T] bool (optional): pairs of tokens whose entry is false are left out (graph padding).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& topk_ids, int64_t num_experts,
                                                             int64_t block_m,
                                                             const std::optional<at::Tensor>& token_mask);
// x [T, H], w13 [E, 2I, H] (gate rows then up rows) -> act [T * k, I]: silu(x w_gate^T) * (x w_up^T)
at::Tensor moe_gate_up_cpu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& sorted_pair_ids,
                           const at::Tensor& block_expert_ids, const at::Tensor& num_padded, int64_t top_k,
                           int64_t block_m);
// act [T * k, I], w2 [E, H, I], topk_weights [T, k] fp32, shared_out [T, H] or none
//   -> out [T, H]: sum_j w[t, j] * act[t * k + j] w2_e^T (+ shared_out), fp32 sums in j order
at::Tensor moe_down_combine_cpu(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& sorted_pair_ids,
                                const at::Tensor& block_expert_ids, const at::Tensor& num_padded,
                                const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_out,
                                int64_t block_m);

// ---- Fused decode-path ops -------------------------------------------------------------------------------
// x, residual [T, H], weight [H]: residual += x; x = weight * rmsnorm(residual) (fp32 statistics), in place.
void add_rmsnorm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
// query [T, Hq, D] rotated in place; key / value [T, Hkv, D]: rotated key and value written to the paged caches
// at slot_mapping [T] int64 (< 0: skipped); positions [T] int64; cos_sin [P, D] fp32 (cos | sin).
void rope_cache_cpu(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& positions,
                    const at::Tensor& cos_sin);

// ---- Sampling --------------------------------------------------------------------------------------------
// values [B, K] fp32 best first, token_ids [B, K] int64, top_ks [B] int64 (0 = off), top_ps [B] fp32 (1 = off),
// keys [B] int64 (row_keys) -> [B] int64: the token drawn among the top-k / top-p survivors (Gumbel-max)
at::Tensor draw_top_k_top_p_cpu(const at::Tensor& values, const at::Tensor& token_ids, const at::Tensor& top_ks,
                                const at::Tensor& top_ps, const at::Tensor& keys);

// ---- Paged attention ---------------------------------------------------------------------------------
// Cache layout: [num_blocks, n_kv, block_size, D]; slot = block * block_size + offset.
// key/value [T, n_kv, D]; slot_mapping [T] int64, negative = padding (skipped).
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping);
// query [B, Hq, D]; block_tables [B, max_blocks] int32; context_lens [B] int32 -> out [B, Hq, D]
// max_context_len: a bound on the contexts that sizes the CUDA split-K (0: table capacity); never the result.
at::Tensor paged_attention_decode_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                      const at::Tensor& value_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, double scale, int64_t max_context_len);
// query [T, Hq, D] (varlen, sequences back to back); query_start_loc [B + 1] int32;
// context_lens [B] int32 (cached + new tokens) -> out [T, Hq, D], causal over each sequence's context
at::Tensor paged_attention_prefill_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                                       const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                                       double scale);

#ifdef XVERSE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gating_topk_cuda(const at::Tensor& hidden, const at::Tensor& router_weight,
                                                    int64_t top_k, int64_t num_shared);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                                              int64_t block_m,
                                                              const std::optional<at::Tensor>& token_mask);
void add_rmsnorm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rope_cache_cuda(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& positions,
                     const at::Tensor& cos_sin);
at::Tensor moe_gate_up_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& sorted_pair_ids,
                            const at::Tensor& block_expert_ids, const at::Tensor& num_padded, int64_t top_k,
                            int64_t block_m);
at::Tensor moe_down_combine_cuda(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& sorted_pair_ids,
                                 const at::Tensor& block_expert_ids, const at::Tensor& num_padded,
                                 const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_out,
                                 int64_t block_m);
at::Tensor draw_top_k_top_p_cuda(const at::Tensor& values, const at::Tensor& token_ids, const at::Tensor& top_ks,
                                 const at::Tensor& top_ps, const at::Tensor& keys);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping);
at::Tensor paged_attention_decode_cuda(const at::Tensor& query, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                                       const at::Tensor& context_lens, double scale, int64_t max_context_len);
at::Tensor paged_attention_prefill_cuda(const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                                        const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                                        double scale);
#endif

}  // namespace xverse
