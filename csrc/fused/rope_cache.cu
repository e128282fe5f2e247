// rope_cache on the GPU: query rotated in place, rotated key and the value written into the paged cache.
// grid = (T, Hq + Hkv): CTA (t, h < Hq) rotates query head h of token t; CTA (t, Hq + j) rotates key head j
// into the cache and copies value head j. "Rotate half" with cos/sin from the per-position fp32 table
// [P, D] (cos | sin), fp32 arithmetic rounded exactly as the twin (rope_cache_torch), no FMA contraction.
// No host sync: a negative slot (padding) writes nothing; a slot past the cache or a position past the
// table is skipped (the CPU version raises; the engine never produces them).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/launch.cuh"
#include "fused/fused_checks.h"
#include "moe/moe_common.cuh"
#include "ops.h"

namespace xverse {
namespace {

constexpr int kThreads = 64;

struct RopeCacheArgs {
  void* query;
  const void* key;
  const void* value;
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;  // [T]
  const int64_t* positions;     // [T]
  const float* cos_sin;         // [P, D]
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h;  // in elements
  int num_heads, num_kv_heads, head_dim, block_size;
  int64_t num_blocks, table_len;
};

// dst[i], dst[i + D/2] = rotation of src[i], src[i + D/2]; dst may alias src (each thread owns its i).
template <typename scalar_t>
__device__ __forceinline__ void rotate(const scalar_t* src, scalar_t* dst, const float* cos, const float* sin,
                                       int half) {
  for (int i = threadIdx.x; i < half; i += kThreads) {
    const float x1 = static_cast<float>(src[i]);
    const float x2 = static_cast<float>(src[i + half]);
    const float a = __fsub_rn(__fmul_rn(x1, cos[i]), __fmul_rn(x2, sin[i]));
    const float b = __fadd_rn(__fmul_rn(x2, cos[i]), __fmul_rn(x1, sin[i]));
    dst[i] = static_cast<scalar_t>(a);
    dst[i + half] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rope_cache_kernel(const RopeCacheArgs args) {
  const int64_t t = blockIdx.x;
  const int head = blockIdx.y;
  const int64_t pos = args.positions[t];
  if (pos < 0 || pos >= args.table_len) return;  // out of the table: skipped (see the header)
  const int D = args.head_dim, half = D / 2;
  const float* cos = args.cos_sin + pos * D;
  const float* sin = cos + half;
  if (head < args.num_heads) {
    scalar_t* q = static_cast<scalar_t*>(args.query) + t * args.q_stride_t + head * args.q_stride_h;
    rotate(q, q, cos, sin, half);
    return;
  }
  const int h = head - args.num_heads;
  const int64_t slot = args.slot_mapping[t];
  if (slot < 0) return;  // padding
  const int64_t block = slot / args.block_size, offset = slot % args.block_size;
  if (block >= args.num_blocks) return;
  const int64_t dst = ((block * args.num_kv_heads + h) * args.block_size + offset) * D;
  const scalar_t* k = static_cast<const scalar_t*>(args.key) + t * args.k_stride_t + h * args.k_stride_h;
  rotate(k, static_cast<scalar_t*>(args.key_cache) + dst, cos, sin, half);
  const scalar_t* v = static_cast<const scalar_t*>(args.value) + t * args.v_stride_t + h * args.v_stride_h;
  scalar_t* vc = static_cast<scalar_t*>(args.value_cache) + dst;
  for (int i = threadIdx.x; i < D; i += kThreads) vc[i] = v[i];
}

}  // namespace

void rope_cache_cuda(at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                     at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& positions,
                     const at::Tensor& cos_sin) {
  fused::check_rope_cache(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin);
  TORCH_CHECK(key.is_cuda(), "rope_cache_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(key.size(0) <= INT32_MAX && query.size(1) + key.size(1) <= 65535, "rope_cache: too many tokens or heads");
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const RopeCacheArgs args{query.data_ptr(), key.data_ptr(), value.data_ptr(), key_cache.data_ptr(),
                           value_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
                           cos_sin.data_ptr<float>(), query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                           value.stride(0), value.stride(1), static_cast<int>(query.size(1)),
                           static_cast<int>(key.size(1)), static_cast<int>(key.size(2)),
                           static_cast<int>(key_cache.size(2)), key_cache.size(0), cos_sin.size(0)};
  const dim3 grid(static_cast<unsigned>(key.size(0)), static_cast<unsigned>(query.size(1) + key.size(1)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  XVERSE_DISPATCH_MOE_TYPES(key.scalar_type(), "rope_cache_cuda", [&] {
    launch_kernel(rope_cache_kernel<scalar_t>, grid, dim3(kThreads), 0, stream, args);
  });
}

}  // namespace xverse
