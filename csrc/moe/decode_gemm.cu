// Decode expert GEMM: streams each selected expert's weights once, at few rows per expert.
//
// At decode an expert sees 1..8 rows, so a tile with 16 activation rows (the usual MMA orientation) wastes
// 15/16 of it at T = 1. Here the weights are the wide side: mma.m16n8k16 with A = 16 weight rows (output
// columns) and B = the block's 8 activation rows (tokens). Both operands come straight from global memory
// with 16-byte loads (no shared-memory staging: each weight byte is used by exactly one MMA):
//   lane (g = lane / 4, t = lane % 4) loads elements k0 + 8t .. k0 + 8t + 7 of weight rows g and g + 8 and
//   of activation row g. The dot product does not care which k lands in which MMA slot, only that A and B
//   agree, so those 8 elements feed two MMAs: words 0,1 (elements 8t..8t+3) go to k slots {2t, 2t+1} and
//   {2t+8, 2t+9} of the first, words 2,3 to the same slots of the second. This is the fragment layout of the
//   PTX ISA (a0/a1: rows g / g+8 at slots 2t, 2t+1; a2/a3: slots 2t+8, 2t+9; b0/b1 likewise for column g).
// A CTA = 4 warps owns 2 m16 tiles of weight rows of one aligned block (gate_up: 16 gate rows + the matching
// 16 up rows, so silu(gate) * up happens in registers; down: 32 output rows) and splits K between its warps
// (warp w takes 32-wide chunks w, w + 4, ...). A register double buffer keeps the next group of loads
// (2 chunks: 10 x 16 B per lane, 5 KB per warp) in flight while the current one feeds the MMAs. Partial sums meet in shared memory in fixed warp order (deterministic).
// grid = (aligned blocks, N / columns per CTA): at T = 1 on the real shapes 8 experts x 108 CTAs for gate_up.
#include <ATen/cuda/CUDAContext.h>

#include <type_traits>

#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "moe/decode_gemm.h"
#include "moe/moe_common.cuh"

namespace xverse {
namespace moe {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTiles = 2;     // m16 tiles of weight rows per CTA
constexpr int kChunk = 32;    // k elements per lane-quad step: 4 lanes x 8 elements
constexpr int kUnroll = 2;    // chunks per load group; a warp has one group in flight while it computes

__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.f + expf(-gate)) * up; }

template <typename scalar_t>
__device__ __forceinline__ void mma(float (&acc)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3};
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ptx::mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    ptx::mma_m16n8k16_f16(acc, a, b, acc);
  }
}

// Weight row (within the expert's [2N or N, K] matrix) of row r (0..15) of tile `tile`, or -1 past N.
template <bool kGateUp>
__device__ __forceinline__ int64_t weight_row(int tile, int r, int n0, int N) {
  if constexpr (kGateUp) {  // tile 0: gate rows n0.., tile 1: the matching up rows N + n0..
    const int col = n0 + r;
    return col < N ? static_cast<int64_t>(tile) * N + col : -1;
  } else {                  // tiles 0, 1: output rows n0 .. n0 + 31
    const int col = n0 + tile * 16 + r;
    return col < N ? col : -1;
  }
}

// One lane's operands for U chunks: rows g, g + 8 of each weight tile and activation row g, 8 elements each.
template <int kTileCount, int U>
struct Fragments {
  uint4 w[U][kTileCount][2];
  uint4 a[U];

  // Chunks c0, c0 + kWarps, ... of this warp; zeros past K (K % 8 == 0: a lane's 8 elements are all inside or
  // all outside) and for rows that do not exist. Weights are read once: evict-first (__ldcs).
  template <typename scalar_t>
  __device__ __forceinline__ void load(const scalar_t* const (&w_rows)[kTileCount][2], const scalar_t* a_row,
                                       int c0, int num_chunks, int K, int t) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
      const int k = c * kChunk + 8 * t;
      const bool k_ok = c < num_chunks && k < K;
#pragma unroll
      for (int tile = 0; tile < kTileCount; ++tile)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const scalar_t* row = w_rows[tile][half];
          w[u][tile][half] = k_ok && row != nullptr ? __ldcs(reinterpret_cast<const uint4*>(row + k)) : zero;
        }
      a[u] = k_ok && a_row != nullptr ? __ldg(reinterpret_cast<const uint4*>(a_row + k)) : zero;
    }
  }
};

template <typename scalar_t, bool kGateUp>
__global__ void __launch_bounds__(kThreads) decode_gemm_kernel(const DecodeGemmArgs args) {
  __shared__ float partial[kWarps][32][kTiles * 4];  // each warp's accumulators, for the split-K sum

  const int block = blockIdx.x;
  const int64_t slot0 = static_cast<int64_t>(block) * kDecodeBlockM;
  const int expert = args.block_expert_ids[block];
  const int padded = args.num_padded[0];
  // Unused blocks exit at once (uniform over the CTA, before any barrier).
  if (expert < 0 || expert >= args.num_experts || slot0 >= padded) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // weight rows g, g + 8 of each tile; activation row (block slot) g
  const int t = lane % 4;  // k elements 8t .. 8t + 7 of each chunk
  const int K = args.K;
  const int N = args.N;
  const int n0 = blockIdx.y * (kGateUp ? 16 : 32);

  // The pair of block slot s, or -1 for padding.
  auto pair_of_slot = [&](int s) -> int64_t {
    const int64_t slot = slot0 + s;
    const int64_t pair = slot < padded ? args.sorted_pair_ids[slot] : -1;
    return pair >= 0 && pair < args.num_pairs ? pair : -1;
  };

  const auto* a_base = static_cast<const scalar_t*>(args.a);
  const int64_t my_pair = pair_of_slot(g);
  const scalar_t* a_row =
      my_pair < 0 ? nullptr : a_base + (kGateUp ? my_pair / args.top_k : my_pair) * static_cast<int64_t>(K);
  const auto* w_expert = static_cast<const scalar_t*>(args.w) +
                         static_cast<int64_t>(expert) * (kGateUp ? 2 : 1) * N * static_cast<int64_t>(K);
  const scalar_t* w_rows[kTiles][2];  // rows g and g + 8 of each tile (nullptr past N)
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = weight_row<kGateUp>(tile, g + 8 * half, n0, N);
      w_rows[tile][half] = row < 0 ? nullptr : w_expert + row * K;
    }
  }

  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;

  // Register double buffer: the loads of the next kUnroll chunks are issued before the MMAs of the current
  // ones, so a warp always has one group (kUnroll x 5 x 16 B per lane) in flight while it computes.
  const int num_chunks = (K + kChunk - 1) / kChunk;
  constexpr int kStep = kWarps * kUnroll;  // chunks per group, over the CTA
  Fragments<kTiles, kUnroll> cur, next;
  cur.load(w_rows, a_row, warp, num_chunks, K, t);
  for (int c0 = warp; c0 < num_chunks; c0 += kStep) {
    next.load(w_rows, a_row, c0 + kStep, num_chunks, K, t);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        const uint4& lo = cur.w[u][tile][0];  // row g
        const uint4& hi = cur.w[u][tile][1];  // row g + 8
        const uint4& x = cur.a[u];
        mma<scalar_t>(acc[tile], lo.x, hi.x, lo.y, hi.y, x.x, x.y);  // elements 8t .. 8t+3
        mma<scalar_t>(acc[tile], lo.z, hi.z, lo.w, hi.w, x.z, x.w);  // elements 8t+4 .. 8t+7
      }
    }
    cur = next;
  }

#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][tile * 4 + i] = acc[tile][i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float sum = partial[0][lane][tile * 4 + i];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) sum += partial[w][lane][tile * 4 + i];
      acc[tile][i] = sum;
    }

  // C fragment: element i of a tile is weight row g + 8 * (i / 2), block slot (token column) 2t + i % 2.
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int64_t pair = pair_of_slot(2 * t + c);
    if (pair < 0) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = half * 2 + c;
      if constexpr (kGateUp) {
        const int col = n0 + g + 8 * half;
        if (col < N) {
          static_cast<scalar_t*>(args.out_act)[pair * N + col] =
              static_cast<scalar_t>(silu_times(acc[0][i], acc[1][i]));
        }
      } else {
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
          const int col = n0 + tile * 16 + g + 8 * half;
          if (col < N) args.out_down[pair * N + col] = acc[tile][i];
        }
      }
    }
  }
}

template <typename scalar_t>
void launch_typed(const DecodeGemmArgs& args, bool gate_up, cudaStream_t stream) {
  const int cols_per_cta = gate_up ? 16 : 32;
  const dim3 grid(static_cast<unsigned>(args.num_blocks), static_cast<unsigned>(ceil_div(args.N, cols_per_cta)));
  if (gate_up) {
    launch_kernel(decode_gemm_kernel<scalar_t, true>, grid, dim3(kThreads), 0, stream, args);
  } else {
    launch_kernel(decode_gemm_kernel<scalar_t, false>, grid, dim3(kThreads), 0, stream, args);
  }
}

}  // namespace

bool launch_decode_gemm(const DecodeGemmArgs& args, at::ScalarType dtype, bool gate_up, cudaStream_t stream) {
  const bool tensor_core_dtype = dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!tensor_core_dtype || args.K % 8 != 0 || !is_aligned(args.a, 16) || !is_aligned(args.w, 16)) return false;
  if (args.num_blocks == 0 || args.N == 0) return true;
  if (dtype == at::kBFloat16) {
    launch_typed<c10::BFloat16>(args, gate_up, stream);
  } else {
    launch_typed<c10::Half>(args, gate_up, stream);
  }
  return true;
}

}  // namespace moe
}  // namespace xverse
