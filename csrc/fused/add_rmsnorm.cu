// add_rmsnorm on the GPU: residual += x, then x = weight * rmsnorm(residual), both in place, one CTA per row.
// The same roundings as the model's code and the twin (add_rmsnorm_torch): the sum is rounded to the
// activation dtype, statistics in fp32, the normalised row rounded to the dtype, then the scale rounded again.
// Rows move in 16-byte packs when H and the pointers allow it (H = 2560 bf16: 320 packs per row), else by
// element. Pass 1 writes the new residual and sums squares; pass 2 re-reads it (L1/L2) and writes x.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/launch.cuh"
#include "fused/fused_checks.h"
#include "moe/moe_common.cuh"
#include "ops.h"

namespace xverse {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// Sum over the CTA in a fixed order (warp butterflies, then warp 0 over the warp totals): deterministic.
__device__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = moe::warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.f;
    v = moe::warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// x, residual: [T, H] (as packs of N elements: H / N per row), weight: [H]; grid = T.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(scalar_t* __restrict__ x, scalar_t* __restrict__ residual,
                                                               const scalar_t* __restrict__ weight, int hidden,
                                                               float eps) {
  __shared__ float scratch[kThreads / 32];
  using P = Pack<scalar_t, N>;
  const int64_t row = blockIdx.x;
  P* xr = reinterpret_cast<P*>(x + row * hidden);
  P* rr = reinterpret_cast<P*>(residual + row * hidden);
  const P* wr = reinterpret_cast<const P*>(weight);
  const int packs = hidden / N;

  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < packs; i += kThreads) {
    const P a = xr[i];
    P r = rr[i];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      r.v[j] = static_cast<scalar_t>(static_cast<float>(r.v[j]) + static_cast<float>(a.v[j]));
      const float f = static_cast<float>(r.v[j]);
      sum_sq = fmaf(f, f, sum_sq);
    }
    rr[i] = r;
  }
  const float total = block_sum(sum_sq, scratch);
  const float inv_rms = 1.f / sqrtf(total / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < packs; i += kThreads) {
    const P r = rr[i];  // this thread's own writes from pass 1
    const P w = wr[i];
    P out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const scalar_t normed = static_cast<scalar_t>(__fmul_rn(static_cast<float>(r.v[j]), inv_rms));
      out.v[j] = static_cast<scalar_t>(__fmul_rn(static_cast<float>(w.v[j]), static_cast<float>(normed)));
    }
    xr[i] = out;
  }
}

template <typename scalar_t, int N>
void launch(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps, cudaStream_t stream) {
  launch_kernel(add_rmsnorm_kernel<scalar_t, N>, dim3(static_cast<unsigned>(x.size(0))), dim3(kThreads), 0, stream,
                x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), static_cast<const scalar_t*>(weight.data_ptr<scalar_t>()),
                static_cast<int>(x.size(1)), static_cast<float>(eps));
}

}  // namespace

void add_rmsnorm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  fused::check_add_rmsnorm(x, residual, weight, eps);
  TORCH_CHECK(x.is_cuda(), "add_rmsnorm_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, "add_rmsnorm: too many rows or columns");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  XVERSE_DISPATCH_MOE_TYPES(x.scalar_type(), "add_rmsnorm_cuda", [&] {
    constexpr int kPack = 16 / sizeof(scalar_t);
    const bool packed = x.size(1) % kPack == 0 && moe::is_aligned(x.data_ptr(), 16) &&
                        moe::is_aligned(residual.data_ptr(), 16) && moe::is_aligned(weight.data_ptr(), 16);
    if (packed) {
      launch<scalar_t, kPack>(x, residual, weight, eps, stream);
    } else {
      launch<scalar_t, 1>(x, residual, weight, eps, stream);
    }
  });
}

}  // namespace xverse
