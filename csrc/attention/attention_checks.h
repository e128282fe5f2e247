// Argument checks shared by the CPU and CUDA implementations of the paged attention ops, so that both
// reject the same inputs with the same messages. Plain C++ (no CUDA), included by .cpp and .cu files.
#pragma once

#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>

namespace xverse::attention {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " (the device of the cache), got ",
              t.device());
}

// key_cache / value_cache: [num_blocks, n_kv, block_size, D], contiguous, same shape and dtype.
inline void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, n_kv, block_size, head_dim], got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " must equal key_cache shape ", key_cache.sizes());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache dtype ", value_cache.scalar_type(),
              " must equal key_cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "key_cache and value_cache must be contiguous");
  TORCH_CHECK(key_cache.size(2) > 0, "key_cache block_size must be > 0");
  check_same_device(key_cache, value_cache, "value_cache");
}

inline void check_int_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length,
                             const at::Tensor& cache) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must be 1-D of length ", length, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(cache, t, name);
}

// query [B or T, Hq, D]; block_tables int32 [B, max_blocks]; context_lens int32 [B].
// num_seqs: the B that block_tables / context_lens must have.
inline void check_attention_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens) {
  check_caches(key_cache, value_cache);
  TORCH_CHECK(query.dim() == 3, "query must be [tokens, num_heads, head_dim], got shape ", query.sizes());
  TORCH_CHECK(supported_dtype(query.scalar_type()), "query dtype must be float32, float16 or bfloat16, got ",
              query.scalar_type());
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type(), "query dtype ", query.scalar_type(),
              " must equal key_cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(query.stride(2) == 1, "query's last dimension (head_dim) must be contiguous");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "query head_dim ", query.size(2), " must equal key_cache head_dim ",
              key_cache.size(3));
  const int64_t num_kv_heads = key_cache.size(1);
  TORCH_CHECK(num_kv_heads > 0 && query.size(1) % num_kv_heads == 0, "query num_heads ", query.size(1),
              " must be a multiple of the cache's num_kv_heads ", num_kv_heads);
  check_same_device(key_cache, query, "query");
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be [num_seqs, max_blocks], got shape ", block_tables.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "block_tables must be int32, got ", block_tables.scalar_type());
  TORCH_CHECK(block_tables.is_contiguous(), "block_tables must be contiguous");
  check_same_device(key_cache, block_tables, "block_tables");
  check_int_vector(context_lens, "context_lens", at::kInt, block_tables.size(0), key_cache);
}

inline void check_decode_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                              const at::Tensor& block_tables, const at::Tensor& context_lens) {
  check_attention_args(query, key_cache, value_cache, block_tables, context_lens);
  TORCH_CHECK(block_tables.size(0) == query.size(0), "block_tables has ", block_tables.size(0),
              " rows but query has ", query.size(0), " sequences (decode: one query token per sequence)");
}

// Shapes every prefill implementation rejects alike: tokens without any sequence to belong to.
inline void check_prefill_batch(const at::Tensor& query, const at::Tensor& block_tables) {
  TORCH_CHECK(block_tables.size(0) > 0 || query.size(0) == 0, "paged_attention_prefill: ", query.size(0),
              " query tokens but no sequences (block_tables has 0 rows); pass B >= 1 sequences or T = 0 tokens");
}

inline void check_prefill_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                               const at::Tensor& context_lens) {
  check_attention_args(query, key_cache, value_cache, block_tables, context_lens);
  check_int_vector(query_start_loc, "query_start_loc", at::kInt, block_tables.size(0) + 1, key_cache);
  check_prefill_batch(query, block_tables);
}

// key / value [T, n_kv, D] (any token / head strides, last dim contiguous); slot_mapping int64 [T].
inline void check_cache_write_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_caches(key_cache, value_cache);
  for (const auto* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    TORCH_CHECK(t->dim() == 3, name, " must be [tokens, num_kv_heads, head_dim], got shape ", t->sizes());
    TORCH_CHECK(t->size(1) == key_cache.size(1) && t->size(2) == key_cache.size(3), name, " shape ", t->sizes(),
                " does not match the cache's [num_kv_heads, head_dim] = [", key_cache.size(1), ", ", key_cache.size(3),
                "]");
    TORCH_CHECK(t->scalar_type() == key_cache.scalar_type(), name, " dtype ", t->scalar_type(),
                " must equal the cache dtype ", key_cache.scalar_type());
    TORCH_CHECK(t->stride(2) == 1, name, "'s last dimension (head_dim) must be contiguous");
    check_same_device(key_cache, *t, name);
  }
  TORCH_CHECK(value.size(0) == key.size(0), "value has ", value.size(0), " tokens but key has ", key.size(0));
  check_int_vector(slot_mapping, "slot_mapping", at::kLong, key.size(0), key_cache);
}

// The block-table contract of the attention ops. For every sequence b:
//   - context_lens[b] is in [0, max_blocks * block_size], and
//   - the entries of the blocks its context covers, block_tables[b, :ceil(context_lens[b] / block_size)],
//     are blocks of the cache: in [0, num_blocks). Entries past a context are never read (may hold anything).
// The CPU ops check this on every call. The CUDA ops cannot without a host sync, so they check it only when
// XVERSE_CHECK_BLOCK_TABLES=1 (for debugging; same messages), and otherwise stay memory-safe: lengths are
// clamped to the capacity and an entry outside [0, num_blocks) is never dereferenced (its keys read as
// zeros, so the output is unspecified but no memory outside the cache is touched).
// block_tables / context_lens: CPU tensors (int32).
inline void check_block_tables(int64_t num_cache_blocks, int64_t block_size, const at::Tensor& block_tables,
                               const at::Tensor& context_lens) {
  const int64_t max_blocks = block_tables.size(1);
  const int* tables = block_tables.data_ptr<int>();
  const int* lens = context_lens.data_ptr<int>();
  for (int64_t b = 0; b < context_lens.numel(); ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= max_blocks * block_size, "context_lens[", b, "] = ", lens[b],
                " is outside [0, max_blocks * block_size = ", max_blocks * block_size, "]");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_cache_blocks, "block_tables[", b, ", ", i, "] = ", block,
                  " is not a block of the cache (num_blocks = ", num_cache_blocks, ")");
    }
  }
}

// XVERSE_CHECK_BLOCK_TABLES=1: the CUDA ops copy the tables to the host and run check_block_tables.
inline bool debug_check_block_tables() {
  const char* flag = std::getenv("XVERSE_CHECK_BLOCK_TABLES");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

}  // namespace xverse::attention
