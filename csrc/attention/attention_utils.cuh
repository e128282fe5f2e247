// Small device helpers shared by the paged attention kernels: 16-byte chunk loads with conversion to fp32,
// warp / block reductions, and the dtype / head_dim dispatch used by the launchers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/ATen.h>

namespace xverse::attention {

constexpr int kWarpSize = 32;

// Integer ceil(a / b) for a >= 0, b > 0, in the type of the arguments: hosts pass int64_t so that a table
// capacity near INT32_MAX cannot overflow in a + b - 1.
template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// ---- conversions -------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A 16-byte chunk of a K or V row holds kChunkElems<T> elements.
template <typename T> constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ uint4 load_chunk(const void* ptr) {  // ptr must be 16-byte aligned
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

// Unpacks one 32-bit word holding two 16-bit values (element 0 in the low half) or one float.
__device__ __forceinline__ void unpack_word(uint32_t w, __nv_bfloat16*, float* out) {
  out[0] = __uint_as_float(w << 16);          // bf16 is the high half of an fp32: exact
  out[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack_word(uint32_t w, __half*, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void unpack_word(uint32_t w, float*, float* out) { out[0] = __uint_as_float(w); }

// raw: 16 bytes of T -> out: kChunkElems<T> floats
template <typename T>
__device__ __forceinline__ void unpack_chunk(const uint4& raw, float (&out)[kChunkElems<T>]) {
  constexpr int kPerWord = kChunkElems<T> / 4;
  unpack_word(raw.x, static_cast<T*>(nullptr), out + 0 * kPerWord);
  unpack_word(raw.y, static_cast<T*>(nullptr), out + 1 * kPerWord);
  unpack_word(raw.z, static_cast<T*>(nullptr), out + 2 * kPerWord);
  unpack_word(raw.w, static_cast<T*>(nullptr), out + 3 * kPerWord);
}

// ---- reductions --------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block gets the max / sum. scratch: kWarps floats of shared memory.
// Starts and ends with __syncthreads, so shared memory written before the call is visible after it
// and scratch can be reused at once.
template <int kWarps, bool kIsMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = kIsMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = kIsMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

// ---- host-side dispatch ------------------------------------------------------------------------------
template <typename T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<cuda scalar type>{}) for float / half / bfloat16.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<__half>{}); break;
    case at::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

template <int D> struct HeadDimTag { static constexpr int value = D; };

// Calls fn(HeadDimTag<D>{}) for the compiled head dims 64 / 80 / 96 / 128.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, const char* op, Fn&& fn) {
  switch (head_dim) {
    case 64: fn(HeadDimTag<64>{}); break;
    case 80: fn(HeadDimTag<80>{}); break;
    case 96: fn(HeadDimTag<96>{}); break;
    case 128: fn(HeadDimTag<128>{}); break;
    default: TORCH_CHECK(false, op, ": head_dim must be one of 64, 80, 96, 128 on CUDA, got ", head_dim);
  }
}

}  // namespace xverse::attention
