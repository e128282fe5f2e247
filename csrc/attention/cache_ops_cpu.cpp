// CPU implementation of reshape_and_cache: new K/V rows copied into the paged cache through a slot mapping.
#include <cstring>

#include <ATen/Parallel.h>

#include "attention/attention_checks.h"
#include "ops.h"

namespace xverse {

// key, value: [T, n_kv, D]; key_cache, value_cache: [num_blocks, n_kv, block_size, D]; slot_mapping: [T] int64
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  attention::check_cache_write_args(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key.device().is_cpu(), "reshape_and_cache_cpu: tensors must be on the CPU");
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = key_cache.size(2);
  const int64_t capacity = key_cache.size(0) * block_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {  // the CPU may check device data; the CUDA kernel skips instead
    TORCH_CHECK(slots[t] < capacity, "slot_mapping[", t, "] = ", slots[t], " is past the cache's ", capacity, " slots");
  }
  // The op is a copy, so it moves bytes and needs no dtype dispatch.
  const int64_t elem = key.element_size();
  const int64_t row_bytes = head_dim * elem;
  const auto* key_bytes = static_cast<const char*>(key.data_ptr());
  const auto* value_bytes = static_cast<const char*>(value.data_ptr());
  auto* key_cache_bytes = static_cast<char*>(key_cache.data_ptr());
  auto* value_cache_bytes = static_cast<char*>(value_cache.data_ptr());
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding
      const int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_dim * elem;
        std::memcpy(key_cache_bytes + dst, key_bytes + (t * key.stride(0) + h * key.stride(1)) * elem, row_bytes);
        std::memcpy(value_cache_bytes + dst, value_bytes + (t * value.stride(0) + h * value.stride(1)) * elem,
                    row_bytes);
      }
    }
  });
}

}  // namespace xverse
