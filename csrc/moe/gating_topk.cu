// Fused gating on the GPU, one kernel: fp32 router logits -> softmax -> top-k -> renormalise (+ 1e-6).
// A block takes kTokensPerBlock tokens: its warps share the router rows (each expert's row is read once
// per block, for all its tokens), write the logits to shared memory, then one warp per token ranks them.
// Lower index wins ties; NaN ranks below every number, so an all-NaN row still yields ids 0..k-1.
// With num_shared = S > 0 each row gets S more entries, the shared experts E .. E+S-1 with weight 1.0.
// The twin is gating_topk_torch in xverse_engine/ops/moe.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>
#include <climits>

#include "common/launch.cuh"
#include "moe/moe_common.cuh"
#include "ops.h"

namespace xverse {
namespace {

using moe::kFullMask;

constexpr int kTokensPerBlock = 4;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxExperts = 256;  // one warp ranks a row: 8 values per lane
constexpr int kMaxTopK = 8;
constexpr int kPerLane = kMaxExperts / 32;
constexpr float kRouterEps = 1e-6f;
static_assert(kPerLane <= 32, "taken mask is one 32-bit word per lane");

// 4 consecutive elements of a hidden row as fp32 (caller guarantees 8/16-byte alignment).
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load4(const c10::BFloat16* p) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ float4 load4(const c10::Half* p) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// (rank a, index ia) beats (rank b, index ib): larger rank, then lower index.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// One warp: softmax over logits [E] (shared memory), then top-k, renormalised. Writes weights [k], ids [k].
__device__ void topk_one_token(const float* logits, int num_experts, int top_k, float* weights, int32_t* ids) {
  const int lane = threadIdx.x % 32;
  float prob[kPerLane];
  unsigned taken = 0;  // bit i: value i of this lane is used (or does not exist)
  float max_logit = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    prob[i] = e < num_experts ? logits[e] : -INFINITY;
    if (e < num_experts) max_logit = fmaxf(max_logit, prob[i]);
    else taken |= 1u << i;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) max_logit = fmaxf(max_logit, __shfl_xor_sync(kFullMask, max_logit, offset));
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    prob[i] = (taken >> i) & 1u ? 0.f : expf(prob[i] - max_logit);  // inf / NaN rows turn all-NaN, like torch
    sum += prob[i];
  }
  sum = moe::warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) prob[i] = prob[i] / sum;

  float chosen[kMaxTopK];
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    chosen[j] = 0.f;
    if (j < top_k) {
      float best_rank = -INFINITY, best_prob = 0.f;
      int best_e = INT_MAX;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const float rank = isnan(prob[i]) ? -INFINITY : prob[i];
        if (!((taken >> i) & 1u) && beats(rank, lane + 32 * i, best_rank, best_e)) {
          best_rank = rank;
          best_e = lane + 32 * i;
          best_prob = prob[i];
        }
      }
      // Butterfly: every lane ends with the same winner (beats() is a strict total order on distinct ids).
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_rank = __shfl_xor_sync(kFullMask, best_rank, offset);
        const int other_e = __shfl_xor_sync(kFullMask, best_e, offset);
        const float other_prob = __shfl_xor_sync(kFullMask, best_prob, offset);
        if (beats(other_rank, other_e, best_rank, best_e)) {
          best_rank = other_rank;
          best_e = other_e;
          best_prob = other_prob;
        }
      }
      if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);  // top_k <= E: best_e is a real expert
      chosen[j] = best_prob;
      total += best_prob;
      if (lane == 0) ids[j] = best_e;
    }
  }
  const float denom = total + kRouterEps;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    if (j < top_k && lane == 0) weights[j] = chosen[j] / denom;
  }
}

// hidden: [T, H]  router: [E, H] fp32  ->  topk_weights: [T, k + S] fp32, topk_ids: [T, k + S] int32
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) gating_topk_kernel(const scalar_t* __restrict__ hidden,
                                                               const float* __restrict__ router,
                                                               float* __restrict__ topk_weights,
                                                               int32_t* __restrict__ topk_ids, int64_t num_tokens,
                                                               int hidden_size, int num_experts, int top_k,
                                                               int num_shared) {
  const int row = top_k + num_shared;  // entries per token
  __shared__ float logits[kTokensPerBlock][kMaxExperts];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;
  const int n_tok = static_cast<int>(min(static_cast<int64_t>(kTokensPerBlock), num_tokens - t0));

  for (int e = warp; e < num_experts; e += kWarps) {
    const float* w = router + static_cast<int64_t>(e) * hidden_size;
    float acc[kTokensPerBlock];
#pragma unroll
    for (int tt = 0; tt < kTokensPerBlock; ++tt) acc[tt] = 0.f;
    if constexpr (kVec) {  // H % 4 == 0 and aligned rows: 16-byte router loads
      for (int h = lane * 4; h < hidden_size; h += 32 * 4) {
        const float4 wv = __ldg(reinterpret_cast<const float4*>(w + h));
#pragma unroll
        for (int tt = 0; tt < kTokensPerBlock; ++tt) {
          if (tt < n_tok) {
            const float4 xv = load4(hidden + (t0 + tt) * hidden_size + h);
            acc[tt] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
          }
        }
      }
    } else {
      for (int h = lane; h < hidden_size; h += 32) {
        const float wv = __ldg(w + h);
#pragma unroll
        for (int tt = 0; tt < kTokensPerBlock; ++tt) {
          if (tt < n_tok) acc[tt] += wv * static_cast<float>(hidden[(t0 + tt) * hidden_size + h]);
        }
      }
    }
#pragma unroll
    for (int tt = 0; tt < kTokensPerBlock; ++tt) {
      const float total = moe::warp_sum(acc[tt]);
      if (lane == 0) logits[tt][e] = total;
    }
  }
  __syncthreads();
  for (int tt = warp; tt < n_tok; tt += kWarps) {
    const int64_t t = t0 + tt;
    topk_one_token(logits[tt], num_experts, top_k, topk_weights + t * row, topk_ids + t * row);
    if (lane < num_shared) {  // the always-on shared experts, after the routed ones
      topk_weights[t * row + top_k + lane] = 1.f;
      topk_ids[t * row + top_k + lane] = num_experts + lane;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gating_topk_cuda(const at::Tensor& hidden, const at::Tensor& router_weight,
                                                    int64_t top_k, int64_t num_shared) {
  TORCH_CHECK(hidden.is_cuda() && router_weight.is_cuda() && hidden.device() == router_weight.device(),
              "gating_topk_cuda: hidden and router_weight must be CUDA tensors on one device");
  TORCH_CHECK(hidden.dim() == 2, "gating_topk: hidden must be [T, H], got ", hidden.sizes());
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(1) == hidden.size(1),
              "gating_topk: router_weight must be [E, H] with H = ", hidden.size(1), ", got ", router_weight.sizes());
  TORCH_CHECK(router_weight.scalar_type() == at::kFloat, "gating_topk: router_weight must be float32, got ",
              router_weight.scalar_type());
  const int64_t num_tokens = hidden.size(0);
  const int64_t hidden_size = hidden.size(1);
  const int64_t num_experts = router_weight.size(0);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "gating_topk_cuda: E must be in [1, ", kMaxExperts,
              "], got ", num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= kMaxTopK && top_k <= num_experts, "gating_topk_cuda: top_k must be in [1, min(",
              kMaxTopK, ", E)], got ", top_k);
  TORCH_CHECK(hidden_size < INT_MAX, "gating_topk_cuda: H too large");
  TORCH_CHECK(num_shared >= 0 && num_shared <= 32, "gating_topk: num_shared must be in [0, 32], got ", num_shared);

  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor x = hidden.contiguous();
  const at::Tensor w = router_weight.contiguous();
  auto weights = at::empty({num_tokens, top_k + num_shared}, x.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, top_k + num_shared}, x.options().dtype(at::kInt));
  if (num_tokens == 0) return {weights, ids};

  const dim3 grid(static_cast<unsigned>(moe::ceil_div(num_tokens, kTokensPerBlock)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  XVERSE_DISPATCH_MOE_TYPES(x.scalar_type(), "gating_topk_cuda", [&] {
    const bool vec = hidden_size % 4 == 0 && moe::is_aligned(x.data_ptr(), 4 * sizeof(scalar_t)) &&
                     moe::is_aligned(w.data_ptr(), 16);
    auto kernel = vec ? gating_topk_kernel<scalar_t, true> : gating_topk_kernel<scalar_t, false>;
    launch_kernel(kernel, grid, kThreads, 0, stream, x.data_ptr<scalar_t>(), w.data_ptr<float>(),
                  weights.data_ptr<float>(), ids.data_ptr<int32_t>(), num_tokens, static_cast<int>(hidden_size),
                  static_cast<int>(num_experts), static_cast<int>(top_k), static_cast<int>(num_shared));
  });
  return {weights, ids};
}

}  // namespace xverse
