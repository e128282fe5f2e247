// CUDA reshape_and_cache: new K/V rows [T, n_kv, D] copied into the paged cache
// [num_blocks, n_kv, block_size, D] through slot_mapping (negative slot = padding, skipped).
// The op is a copy: the kernel moves Pack-sized units (16 bytes when every address and stride allows it)
// and needs no dtype dispatch.
#include <algorithm>
#include <cstdint>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/attention_checks.h"
#include "common/launch.cuh"
#include "ops.h"

namespace xverse {
namespace {

// One thread block per token. Strides and head_dim are in units of Pack.
// key, value: [T, n_kv, D]; key_cache, value_cache: [num_blocks, n_kv, block_size, D]; slot_mapping: [T]
template <typename Pack>
__global__ void reshape_and_cache_kernel(const Pack* __restrict__ key, const Pack* __restrict__ value,
                                         Pack* __restrict__ key_cache, Pack* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t key_stride_t,
                                         int64_t key_stride_h, int64_t value_stride_t, int64_t value_stride_h,
                                         int num_kv_heads, int head_packs, int block_size, int64_t num_blocks) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding
  const int64_t block = slot / block_size, offset = slot % block_size;
  if (block >= num_blocks) return;  // out of range: skipped rather than writing past the cache (no host sync to raise)
  for (int i = threadIdx.x; i < num_kv_heads * head_packs; i += blockDim.x) {
    const int h = i / head_packs, c = i % head_packs;
    const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_packs + c;
    key_cache[dst] = key[token * key_stride_t + h * key_stride_h + c];
    value_cache[dst] = value[token * value_stride_t + h * value_stride_h + c];
  }
}

bool aligned_to(const at::Tensor& t, int64_t bytes) {
  const int64_t elem = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0) return false;
  for (int d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * elem) % bytes != 0 && d != t.dim() - 1) return false;
  }
  return (t.size(-1) * elem) % bytes == 0;
}

template <typename Pack>
void launch_cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                        at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr int64_t kPack = sizeof(Pack);
  const int64_t elem = key.element_size();
  auto packs = [&](int64_t elements) { return elements * elem / kPack; };  // exact: checked by aligned_to
  const int num_kv_heads = static_cast<int>(key.size(1));
  const int head_packs = static_cast<int>(packs(key.size(2)));
  const int threads = std::min(256, std::max(32, num_kv_heads * head_packs));
  const auto stream = at::cuda::getCurrentCUDAStream();
  launch_kernel(reshape_and_cache_kernel<Pack>, static_cast<unsigned>(key.size(0)), threads, 0, stream,
      static_cast<const Pack*>(key.data_ptr()), static_cast<const Pack*>(value.data_ptr()),
      static_cast<Pack*>(key_cache.data_ptr()), static_cast<Pack*>(value_cache.data_ptr()),
      slot_mapping.data_ptr<int64_t>(), packs(key.stride(0)), packs(key.stride(1)), packs(value.stride(0)),
      packs(value.stride(1)), num_kv_heads, head_packs, static_cast<int>(key_cache.size(2)), key_cache.size(0));
}

}  // namespace

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  attention::check_cache_write_args(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key.is_cuda(), "reshape_and_cache_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(key.size(0) <= INT32_MAX, "reshape_and_cache: too many tokens");
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  // The widest unit every address and stride is a multiple of: 16 bytes normally, else one element.
  const bool wide = aligned_to(key, 16) && aligned_to(value, 16) && aligned_to(key_cache, 16) &&
                    aligned_to(value_cache, 16);
  const int64_t elem = key.element_size();
  if (wide) {
    launch_cache_write<uint4>(key, value, key_cache, value_cache, slot_mapping);
  } else if (elem == 4) {
    launch_cache_write<uint32_t>(key, value, key_cache, value_cache, slot_mapping);
  } else {
    TORCH_CHECK(elem == 2, "reshape_and_cache: unexpected element size ", elem);
    launch_cache_write<uint16_t>(key, value, key_cache, value_cache, slot_mapping);
  }
}

}  // namespace xverse
