// rope_cache on the CPU: query rotated in place ("rotate half", fp32 arithmetic, cos/sin from the per-position
// table), rotated key and the value written into the paged cache at slot_mapping (slot < 0: padding, skipped).
// The twin is rope_cache_torch in xverse_engine/ops/fused.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "fused/fused_checks.h"
#include "ops.h"

namespace xverse {

namespace {

// src: [D] -> dst: [D] rotated; dst may equal src (in place). cos, sin: [D/2].
template <typename scalar_t>
inline void rotate_row(const scalar_t* src, scalar_t* dst, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(src[i]);
    const float x2 = static_cast<float>(src[i + half]);
    const float a = x1 * cos[i] - x2 * sin[i];
    const float b = x2 * cos[i] + x1 * sin[i];
    dst[i] = static_cast<scalar_t>(a);
    dst[i + half] = static_cast<scalar_t>(b);
  }
}

}  // namespace

void rope_cache_cpu(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& positions,
                    const at::Tensor& cos_sin) {
  fused::check_rope_cache(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin);
  TORCH_CHECK(key.device().is_cpu(), "rope_cache_cpu: tensors must be on the CPU");
  const int64_t num_tokens = key.size(0), num_heads = query.size(1), num_kv_heads = key.size(1);
  const int64_t head_dim = key.size(2), half = head_dim / 2;
  const int64_t block_size = key_cache.size(2);
  const int64_t capacity = key_cache.size(0) * block_size;
  const int64_t table_len = cos_sin.size(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {  // the CPU may check device data; the CUDA kernel skips instead
    TORCH_CHECK(pos[t] >= 0 && pos[t] < table_len, "rope_cache: positions[", t, "] = ", pos[t],
                " is outside the RoPE table of ", table_len, " positions");
    TORCH_CHECK(slots[t] < capacity, "rope_cache: slot_mapping[", t, "] = ", slots[t], " is past the cache's ",
                capacity, " slots");
  }
  const float* table = cos_sin.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "rope_cache_cpu", [&] {
    scalar_t* q_ptr = query.data_ptr<scalar_t>();
    const scalar_t* k_ptr = key.data_ptr<scalar_t>();
    const scalar_t* v_ptr = value.data_ptr<scalar_t>();
    scalar_t* kc_ptr = key_cache.data_ptr<scalar_t>();
    scalar_t* vc_ptr = value_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = table + pos[t] * head_dim;
        const float* sin = cos + half;
        for (int64_t h = 0; h < num_heads; ++h) {
          scalar_t* q = q_ptr + t * query.stride(0) + h * query.stride(1);
          rotate_row(q, q, cos, sin, half);
        }
        const int64_t slot = slots[t];
        if (slot < 0) continue;  // padding: nothing written
        const int64_t block = slot / block_size, offset = slot % block_size;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_dim;
          rotate_row(k_ptr + t * key.stride(0) + h * key.stride(1), kc_ptr + dst, cos, sin, half);
          const scalar_t* v = v_ptr + t * value.stride(0) + h * value.stride(1);
          for (int64_t d = 0; d < head_dim; ++d) vc_ptr[dst + d] = v[d];
        }
      }
    });
  });
}

}  // namespace xverse
