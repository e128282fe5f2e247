// The op contract: every schema of torch.ops.xverse, and which implementation serves which device.
// Fake (meta) implementations for torch.compile / opcheck are registered in Python (xverse_engine/ops).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(xverse, m) {
  // MoE (see ops.h for shapes)
  m.def("gating_topk(Tensor hidden, Tensor router_weight, int top_k, int num_shared=0) -> "
        "(Tensor topk_weights, Tensor topk_ids)");
  m.def("moe_align(Tensor topk_ids, int num_experts, int block_m, Tensor? token_mask=None) -> "
        "(Tensor sorted_pair_ids, Tensor block_expert_ids, Tensor num_padded)");
  m.def("moe_gate_up(Tensor x, Tensor w13, Tensor sorted_pair_ids, Tensor block_expert_ids, Tensor num_padded, "
        "int top_k, int block_m) -> Tensor");
  m.def("moe_down_combine(Tensor act, Tensor w2, Tensor sorted_pair_ids, Tensor block_expert_ids, "
        "Tensor num_padded, Tensor topk_weights, Tensor? shared_out, int block_m) -> Tensor");
  // Fused decode-path ops (in place)
  m.def("add_rmsnorm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rope_cache(Tensor(a!) query, Tensor key, Tensor value, Tensor(b!) key_cache, Tensor(c!) value_cache, "
        "Tensor slot_mapping, Tensor positions, Tensor cos_sin) -> ()");
  // Sampling: the draw among the top-k / top-p survivors of each row (contract: ops/sampling.py)
  m.def("draw_top_k_top_p(Tensor values, Tensor token_ids, Tensor top_ks, Tensor top_ps, Tensor keys) -> Tensor");
  // Paged attention
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
  // max_context_len: an optional bound on the contexts (bucketed by the caller so a captured graph stays
  // valid); it sizes the decode split-K, never the result. 0: the block table's capacity.
  m.def("paged_attention_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int max_context_len=0) -> Tensor");
  m.def("paged_attention_prefill(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(xverse, CPU, m) {
  m.impl("gating_topk", &xverse::gating_topk_cpu);
  m.impl("moe_align", &xverse::moe_align_cpu);
  m.impl("moe_gate_up", &xverse::moe_gate_up_cpu);
  m.impl("moe_down_combine", &xverse::moe_down_combine_cpu);
  m.impl("add_rmsnorm", &xverse::add_rmsnorm_cpu);
  m.impl("rope_cache", &xverse::rope_cache_cpu);
  m.impl("draw_top_k_top_p", &xverse::draw_top_k_top_p_cpu);
  m.impl("reshape_and_cache", &xverse::reshape_and_cache_cpu);
  m.impl("paged_attention_decode", &xverse::paged_attention_decode_cpu);
  m.impl("paged_attention_prefill", &xverse::paged_attention_prefill_cpu);
}

#ifdef XVERSE_WITH_CUDA
TORCH_LIBRARY_IMPL(xverse, CUDA, m) {
  m.impl("gating_topk", &xverse::gating_topk_cuda);
  m.impl("moe_align", &xverse::moe_align_cuda);
  m.impl("moe_gate_up", &xverse::moe_gate_up_cuda);
  m.impl("moe_down_combine", &xverse::moe_down_combine_cuda);
  m.impl("add_rmsnorm", &xverse::add_rmsnorm_cuda);
  m.impl("rope_cache", &xverse::rope_cache_cuda);
  m.impl("draw_top_k_top_p", &xverse::draw_top_k_top_p_cuda);
  m.impl("reshape_and_cache", &xverse::reshape_and_cache_cuda);
  m.impl("paged_attention_decode", &xverse::paged_attention_decode_cuda);
  m.impl("paged_attention_prefill", &xverse::paged_attention_prefill_cuda);
}
#endif

// A Python module so that `import xverse_engine._C` loads the library and registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef XVERSE_WITH_CUDA
  module.attr("built_with_cuda") = true;
#else
  module.attr("built_with_cuda") = false;
#endif
}
