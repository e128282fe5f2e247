// The expert GEMMs on the GPU.
//   gate_up:      act[p, :]  = silu(x[p / k] Wg_e^T) * (x[p / k] Wu_e^T)     x: [T, H], w13: [E, 2I, H]
//   down_combine: down[p, :] = act[p] W2_e^T (fp32), then out[t] = sum_j w[t, j] down[t k + j] (+ shared)
// Rows come through the aligned layout (sorted_pair_ids, one expert per block of block_m slots): no
// permuted copy of x. A CTA computes one block of block_m rows against a slice of one expert's weights:
// grid = (blocks, N slices), so even 6 active experts (batch-1 decode) spread over > 132 SMs.
//
// bf16 / fp16 with K % 8 == 0: tensor cores (mma.sync m16n8k16, fp32 accumulate). Tiles of A (gathered
// rows) and W stream through a cp.async multi-stage shared-memory ring with 16-byte copies; out-of-range
// rows / columns / K are zero-filled by the copy itself. One kernel, three tile shapes picked by block_m:
//   block_m 16: small batches, 16 x 64 weight rows, 6 stages (bound by streaming weights: many copies in flight)
//   block_m 32: 32 x 128, 3 stages;  block_m 64: prefill, 64 x 128, 3 stages (bound by tensor-core math)
//   block_m 8: decode (few rows per expert), the weight-streaming kernel of decode_gemm.cu instead.
// fp32 or unaligned K: a simple SIMT kernel (one thread per output element).
// The down GEMM writes per-pair fp32 rows; a separate combine kernel sums them per token in fixed j order
// (deterministic: no float atomics), adding shared_out in fp32 like the twin. Twins: xverse_engine/ops/moe.py.
// Contract: a pair missing from the layout (an id outside [0, E), a masked padding token, a foreign expert)
// gets a zero act row and contributes 0 to its token's sum, on every device: act and down start zeroed.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <type_traits>

#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "moe/decode_gemm.h"
#include "moe/gemm_tiles.h"
#include "moe/moe_checks.h"
#include "moe/moe_common.cuh"
#include "ops.h"

namespace xverse {
namespace {

// ---- tile shapes -----------------------------------------------------------------------------------

// The three tile shapes and their shared-memory budget: moe/gemm_tiles.h
using moe::MidTile;
using moe::PrefillTile;
using moe::SmallTile;

// Everything a grouped GEMM launch needs. gate_up: a = x [T, H], w = w13 [E, 2N, K], out_act [P, N];
// down: a = act [P, K], w = w2 [E, N, K], out_down [P, N] fp32.
struct GemmArgs {
  const void* a;
  const void* w;
  const int32_t* sorted_pair_ids;   // [num_blocks * block_m]
  const int32_t* block_expert_ids;  // [num_blocks]
  const int32_t* num_padded;        // [1]
  void* out_act;
  float* out_down;
  int64_t num_pairs;
  int top_k;
  int K;
  int N;
  int num_experts;
  int block_m;
};

// ---- PTX (every instruction through csrc/common/ptx.cuh) ----------------------------------------------

// Copies 16 bytes to shared memory, or zero-fills them without reading (invalid: padding / past the end).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  ptx::cp_async_16(smem_dst, gmem_src, valid ? 16 : 0);  // 0: the 16 bytes are zero-filled, nothing is read
}
using ptx::cp_async_commit;
using ptx::cp_async_wait;

// d += a (16x16, row) * b (16x8, col), fp32 accumulate.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "tensor-core path is bf16 / fp16 only");
    ptx::mma_m16n8k16_f16(d, a, b, d);
  }
}

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.f + expf(-gate)) * up; }

// ---- tensor-core kernel ------------------------------------------------------------------------------

// Weight row (within the expert) held in smem row r of the CTA's weight tile, or -1 past the end.
template <typename Cfg, bool kGateUp>
__device__ __forceinline__ int64_t weight_row(int r, int n0, int N) {
  if constexpr (kGateUp) {
    const int half = r / (Cfg::BNW / 2);  // 0: gate rows, 1: up rows
    const int col = n0 + r % (Cfg::BNW / 2);
    return col < N ? static_cast<int64_t>(half) * N + col : -1;
  } else {
    const int col = n0 + r;
    return col < N ? col : -1;
  }
}

// smem row of the first weight row of n8 fragment f of warp column wn (gate f pairs with up f + NF/2).
template <typename Cfg, bool kGateUp>
__device__ __forceinline__ int fragment_row(int wn, int f) {
  if constexpr (kGateUp) {
    constexpr int HALF_NF = Cfg::NF / 2;
    const int base = wn * (Cfg::WTN / 2) + (f % HALF_NF) * 8;
    return f < HALF_NF ? base : Cfg::BNW / 2 + base;
  } else {
    return wn * Cfg::WTN + f * 8;
  }
}

template <typename Cfg, typename scalar_t, bool kGateUp>
__global__ void __launch_bounds__(Cfg::THREADS) grouped_gemm_mma_kernel(const GemmArgs args) {
  XVERSE_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* smem_a = smem;                                 // [STAGES][BM][LDS]
  uint16_t* smem_b = smem + Cfg::STAGES * Cfg::A_STAGE;    // [STAGES][BNW][LDS]
  __shared__ int64_t row_src[Cfg::BM];  // A row for each tile row (token for gate_up, pair for down), -1: padding
  __shared__ int64_t row_pair[Cfg::BM];
  static_assert(sizeof(row_src) + sizeof(row_pair) == Cfg::STATIC_SMEM_BYTES, "update TileConfig's static budget");

  const int block = blockIdx.x;
  const int64_t slot0 = static_cast<int64_t>(block) * Cfg::BM;
  const int expert = args.block_expert_ids[block];
  // Unused blocks exit at once (uniform over the CTA, before any barrier).
  if (expert < 0 || expert >= args.num_experts || slot0 >= args.num_padded[0]) return;

  const int tid = threadIdx.x;
  const int n0 = blockIdx.y * (kGateUp ? Cfg::BNW / 2 : Cfg::BNW);  // first output column of this CTA
  const int K = args.K;
  const int N = args.N;
  const auto* a_base = static_cast<const scalar_t*>(args.a);
  const auto* w_base = static_cast<const scalar_t*>(args.w) +
                       static_cast<int64_t>(expert) * (kGateUp ? 2 : 1) * N * static_cast<int64_t>(K);

  if (tid < Cfg::BM) {
    const int64_t slot = slot0 + tid;
    const int64_t pair = slot < args.num_padded[0] ? args.sorted_pair_ids[slot] : -1;
    const bool real = pair >= 0 && pair < args.num_pairs;
    row_pair[tid] = real ? pair : -1;
    row_src[tid] = real ? (kGateUp ? pair / args.top_k : pair) : -1;
  }
  __syncthreads();

  // Issues the copies of k-tile kt into ring stage `stage` (16-byte chunks; K % 8 == 0 so a chunk is
  // either wholly inside K or wholly outside).
  constexpr int CHUNKS = Cfg::BK / 8;
  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * Cfg::BK;
    uint16_t* sa = smem_a + stage * Cfg::A_STAGE;
    uint16_t* sb = smem_b + stage * Cfg::B_STAGE;
    for (int c = tid; c < Cfg::BM * CHUNKS; c += Cfg::THREADS) {
      const int r = c / CHUNKS;
      const int k = k0 + (c % CHUNKS) * 8;
      const int64_t src = row_src[r];
      const bool valid = src >= 0 && k < K;
      const scalar_t* g = valid ? a_base + src * K + k : a_base;
      cp_async_16(sa + r * Cfg::LDS + (c % CHUNKS) * 8, g, valid);
    }
    for (int c = tid; c < Cfg::BNW * CHUNKS; c += Cfg::THREADS) {
      const int r = c / CHUNKS;
      const int k = k0 + (c % CHUNKS) * 8;
      const int64_t wr = weight_row<Cfg, kGateUp>(r, n0, N);
      const bool valid = wr >= 0 && k < K;
      const scalar_t* g = valid ? w_base + wr * K + k : w_base;
      cp_async_16(sb + r * Cfg::LDS + (c % CHUNKS) * 8, g, valid);
    }
  };

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wm = warp / Cfg::WARPS_N;
  const int wn = warp % Cfg::WARPS_N;
  const int group = lane / 4;  // fragment row (A, C) / column (B)
  const int quad = lane % 4;   // fragment k pair / C column pair

  float acc[Cfg::MF][Cfg::NF][4];
#pragma unroll
  for (int mf = 0; mf < Cfg::MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < Cfg::NF; ++nf)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mf][nf][i] = 0.f;

  const int k_tiles = (K + Cfg::BK - 1) / Cfg::BK;
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    ptx::cp_async_commit();  // always commit (maybe empty) so the group count stays uniform
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    ptx::cp_async_wait<Cfg::STAGES - 2>();  // this thread's copies of tile kt have landed ...
    __syncthreads();                   // ... and everyone's; also: all reads of the stage refilled below are done
    const int next = kt + Cfg::STAGES - 1;
    if (next < k_tiles) load_tile(next % Cfg::STAGES, next);
    ptx::cp_async_commit();

    const uint16_t* sa = smem_a + (kt % Cfg::STAGES) * Cfg::A_STAGE;
    const uint16_t* sb = smem_b + (kt % Cfg::STAGES) * Cfg::B_STAGE;
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += 16) {
      uint32_t a_frag[Cfg::MF][4];
#pragma unroll
      for (int mf = 0; mf < Cfg::MF; ++mf) {
        const uint16_t* p = sa + (wm * Cfg::WTM + mf * 16 + group) * Cfg::LDS + kk + quad * 2;
        a_frag[mf][0] = lds32(p);                    // row g,     k 2q..2q+1
        a_frag[mf][1] = lds32(p + 8 * Cfg::LDS);     // row g + 8, k 2q..2q+1
        a_frag[mf][2] = lds32(p + 8);                // row g,     k 2q+8..2q+9
        a_frag[mf][3] = lds32(p + 8 * Cfg::LDS + 8); // row g + 8, k 2q+8..2q+9
      }
#pragma unroll
      for (int nf = 0; nf < Cfg::NF; ++nf) {
        const uint16_t* p = sb + (fragment_row<Cfg, kGateUp>(wn, nf) + group) * Cfg::LDS + kk + quad * 2;
        const uint32_t b0 = lds32(p);      // n = g, k 2q..2q+1
        const uint32_t b1 = lds32(p + 8);  // n = g, k 2q+8..2q+9
#pragma unroll
        for (int mf = 0; mf < Cfg::MF; ++mf) mma_16816<scalar_t>(acc[mf][nf], a_frag[mf], b0, b1);
      }
    }
  }
  ptx::cp_async_wait<0>();

  // Epilogue. C fragment: element i of acc[mf][nf] is row g + 8 * (i / 2), column 2q + i % 2.
#pragma unroll
  for (int mf = 0; mf < Cfg::MF; ++mf) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t pair = row_pair[wm * Cfg::WTM + mf * 16 + group + 8 * half];
      if (pair < 0) continue;
      if constexpr (kGateUp) {
        auto* out = static_cast<scalar_t*>(args.out_act) + pair * N;
#pragma unroll
        for (int nf = 0; nf < Cfg::NF / 2; ++nf) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = n0 + wn * (Cfg::WTN / 2) + nf * 8 + quad * 2 + c;
            if (col < N) {
              const float v = silu_times(acc[mf][nf][half * 2 + c], acc[mf][nf + Cfg::NF / 2][half * 2 + c]);
              out[col] = static_cast<scalar_t>(v);
            }
          }
        }
      } else {
        float* out = args.out_down + pair * N;
#pragma unroll
        for (int nf = 0; nf < Cfg::NF; ++nf) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = n0 + wn * Cfg::WTN + nf * 8 + quad * 2 + c;
            if (col < N) out[col] = acc[mf][nf][half * 2 + c];
          }
        }
      }
    }
  }
}

// ---- SIMT fallback: fp32, or K not a multiple of 8 ------------------------------------------------------

constexpr int kSimtThreads = 128;

// grid = (slots, ceil(N / 128)): one thread per (slot, output column).
template <typename scalar_t, bool kGateUp>
__global__ void __launch_bounds__(kSimtThreads) grouped_gemm_simt_kernel(const GemmArgs args) {
  const int64_t slot = blockIdx.x;
  const int col = blockIdx.y * kSimtThreads + threadIdx.x;
  if (slot >= args.num_padded[0] || col >= args.N) return;
  const int expert = args.block_expert_ids[slot / args.block_m];
  const int64_t pair = args.sorted_pair_ids[slot];
  if (expert < 0 || expert >= args.num_experts || pair < 0 || pair >= args.num_pairs) return;
  const int K = args.K;
  const int N = args.N;
  const auto* a = static_cast<const scalar_t*>(args.a) + (kGateUp ? pair / args.top_k : pair) * K;
  const auto* w = static_cast<const scalar_t*>(args.w) + static_cast<int64_t>(expert) * (kGateUp ? 2 : 1) * N * K;
  if constexpr (kGateUp) {
    const scalar_t* wg = w + static_cast<int64_t>(col) * K;
    const scalar_t* wu = w + (static_cast<int64_t>(N) + col) * K;
    float gate = 0.f, up = 0.f;
    for (int k = 0; k < K; ++k) {
      const float av = static_cast<float>(a[k]);
      gate += av * static_cast<float>(wg[k]);
      up += av * static_cast<float>(wu[k]);
    }
    static_cast<scalar_t*>(args.out_act)[pair * N + col] = static_cast<scalar_t>(silu_times(gate, up));
  } else {
    const scalar_t* wr = w + static_cast<int64_t>(col) * K;
    float sum = 0.f;
    for (int k = 0; k < K; ++k) sum += static_cast<float>(a[k]) * static_cast<float>(wr[k]);
    args.out_down[pair * N + col] = sum;
  }
}

// ---- combine ------------------------------------------------------------------------------------------

constexpr int kCombineThreads = 256;

// down: [P, H] fp32, weights: [T, k] fp32, shared: [T, H] fp32 or null -> out: [T, H]; grid = (T, ceil(H / 256)).
// Sums in j order with explicit rounding (no FMA contraction), shared_out added in fp32: the twin's arithmetic.
template <typename scalar_t>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const float* __restrict__ down,
                                                                  const float* __restrict__ weights,
                                                                  const float* __restrict__ shared,
                                                                  scalar_t* __restrict__ out, int top_k, int hidden) {
  const int64_t t = blockIdx.x;
  const int col = blockIdx.y * kCombineThreads + threadIdx.x;
  if (col >= hidden) return;
  float sum = 0.f;
  for (int j = 0; j < top_k; ++j) {
    const int64_t pair = t * top_k + j;
    sum = __fadd_rn(sum, __fmul_rn(down[pair * hidden + col], weights[pair]));
  }
  if (shared != nullptr) sum = __fadd_rn(sum, shared[t * hidden + col]);
  out[t * hidden + col] = static_cast<scalar_t>(sum);
}

// ---- host side ------------------------------------------------------------------------------------------

template <typename Cfg, typename scalar_t, bool kGateUp>
void launch_mma(const GemmArgs& args, int64_t num_blocks, cudaStream_t stream) {
  const int64_t cols_per_cta = kGateUp ? Cfg::BNW / 2 : Cfg::BNW;
  const dim3 grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(moe::ceil_div(args.N, cols_per_cta)));
  launch_kernel(grouped_gemm_mma_kernel<Cfg, scalar_t, kGateUp>, grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream, args);
}

// Picks the kernel: tensor cores when the dtype, alignment and block_m allow, else SIMT.
template <typename scalar_t, bool kGateUp>
void launch_grouped_gemm(const GemmArgs& args, int64_t num_blocks, bool aligned, cudaStream_t stream) {
  if (num_blocks == 0 || args.N == 0) return;
  if (args.block_m == moe::kDecodeBlockM) {  // decode: stream the weights, tokens on the narrow side
    const moe::DecodeGemmArgs decode{args.a, args.w, args.sorted_pair_ids, args.block_expert_ids, args.num_padded,
                                     args.out_act, args.out_down, args.num_pairs, args.top_k, args.K, args.N,
                                     args.num_experts, static_cast<int>(num_blocks)};
    if (moe::launch_decode_gemm(decode, c10::CppTypeToScalarType<scalar_t>::value, kGateUp, stream)) return;
  }
  constexpr bool kTensorCores = !std::is_same_v<scalar_t, float>;
  if constexpr (kTensorCores) {
    if (aligned && args.K % 8 == 0) {
      switch (args.block_m) {
        case SmallTile::BM: return launch_mma<SmallTile, scalar_t, kGateUp>(args, num_blocks, stream);
        case MidTile::BM: return launch_mma<MidTile, scalar_t, kGateUp>(args, num_blocks, stream);
        case PrefillTile::BM: return launch_mma<PrefillTile, scalar_t, kGateUp>(args, num_blocks, stream);
        default: break;
      }
    }
  }
  const dim3 grid(static_cast<unsigned>(num_blocks * args.block_m),
                  static_cast<unsigned>(moe::ceil_div(args.N, kSimtThreads)));
  launch_kernel(grouped_gemm_simt_kernel<scalar_t, kGateUp>, grid, kSimtThreads, 0, stream, args);
}

}  // namespace

at::Tensor moe_gate_up_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& sorted_pair_ids,
                            const at::Tensor& block_expert_ids, const at::Tensor& num_padded, int64_t top_k,
                            int64_t block_m) {
  TORCH_CHECK(x.is_cuda(), "moe_gate_up_cuda: x must be a CUDA tensor");
  moe_checks::check_layout("moe_gate_up", x.device(), sorted_pair_ids, block_expert_ids, num_padded, block_m);
  moe_checks::check_gate_up(x, w13, top_k);
  TORCH_CHECK(sorted_pair_ids.numel() < INT_MAX, "moe_gate_up: too many slots");
  TORCH_CHECK(x.size(1) < INT_MAX && w13.size(1) < INT_MAX, "moe_gate_up: H / I too large");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w13.contiguous();
  const int64_t num_pairs = x.size(0) * top_k;
  const int64_t inter = w13.size(1) / 2;
  auto act = at::zeros({num_pairs, inter}, x.options());  // [P, I]: rows of pairs missing from the layout stay 0
  if (num_pairs == 0) return act;

  GemmArgs args{xc.data_ptr(), wc.data_ptr(), sorted_pair_ids.data_ptr<int32_t>(),
                block_expert_ids.data_ptr<int32_t>(), num_padded.data_ptr<int32_t>(), act.data_ptr(), nullptr,
                num_pairs, static_cast<int>(top_k), static_cast<int>(x.size(1)), static_cast<int>(inter),
                static_cast<int>(w13.size(0)), static_cast<int>(block_m)};
  const bool aligned = moe::is_aligned(xc.data_ptr(), 16) && moe::is_aligned(wc.data_ptr(), 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  XVERSE_DISPATCH_MOE_TYPES(x.scalar_type(), "moe_gate_up_cuda", [&] {
    launch_grouped_gemm<scalar_t, true>(args, block_expert_ids.numel(), aligned, stream);
  });
  return act;
}

at::Tensor moe_down_combine_cuda(const at::Tensor& act, const at::Tensor& w2, const at::Tensor& sorted_pair_ids,
                                 const at::Tensor& block_expert_ids, const at::Tensor& num_padded,
                                 const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_out,
                                 int64_t block_m) {
  TORCH_CHECK(act.is_cuda(), "moe_down_combine_cuda: act must be a CUDA tensor");
  moe_checks::check_layout("moe_down_combine", act.device(), sorted_pair_ids, block_expert_ids, num_padded, block_m);
  moe_checks::check_down_combine(act, w2, topk_weights, shared_out);
  TORCH_CHECK(sorted_pair_ids.numel() < INT_MAX, "moe_down_combine: too many slots");
  TORCH_CHECK(act.size(1) < INT_MAX && w2.size(1) < INT_MAX, "moe_down_combine: H / I too large");
  const int64_t num_tokens = topk_weights.size(0);
  const int64_t top_k = topk_weights.size(1);
  const int64_t num_pairs = num_tokens * top_k;
  const int64_t hidden = w2.size(1);
  at::Tensor shared;  // added in fp32, as the twin and the CPU kernel do
  if (shared_out.has_value()) shared = shared_out->to(at::kFloat).contiguous();

  const c10::cuda::CUDAGuard guard(act.device());
  const at::Tensor ac = act.contiguous();
  const at::Tensor wc = w2.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  auto out = at::empty({num_tokens, hidden}, act.options());  // [T, H]
  if (num_tokens == 0 || hidden == 0) return out;
  // [P, H] fp32 per-pair rows; zero so a pair missing from the layout adds 0 to its token's sum
  auto down = at::zeros({num_pairs, hidden}, act.options().dtype(at::kFloat));

  GemmArgs args{ac.data_ptr(), wc.data_ptr(), sorted_pair_ids.data_ptr<int32_t>(),
                block_expert_ids.data_ptr<int32_t>(), num_padded.data_ptr<int32_t>(), nullptr, down.data_ptr<float>(),
                num_pairs, static_cast<int>(top_k), static_cast<int>(act.size(1)), static_cast<int>(hidden),
                static_cast<int>(w2.size(0)), static_cast<int>(block_m)};
  const bool aligned = moe::is_aligned(ac.data_ptr(), 16) && moe::is_aligned(wc.data_ptr(), 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  XVERSE_DISPATCH_MOE_TYPES(act.scalar_type(), "moe_down_combine_cuda", [&] {
    launch_grouped_gemm<scalar_t, false>(args, block_expert_ids.numel(), aligned, stream);
    const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(moe::ceil_div(hidden, kCombineThreads)));
    launch_kernel(combine_kernel<scalar_t>, grid, kCombineThreads, 0, stream, down.data_ptr<float>(),
                  weights.data_ptr<float>(), shared.defined() ? shared.data_ptr<float>() : nullptr,
                  out.data_ptr<scalar_t>(), static_cast<int>(top_k), static_cast<int>(hidden));
  });
  return out;
}

}  // namespace xverse
