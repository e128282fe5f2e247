// The weight-streaming expert GEMM for decode (few rows per expert), called by the grouped-GEMM launchers
// (grouped_gemm.cu) when the aligned layout uses block_m = kDecodeBlockM. Same contract as the grouped GEMM.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <cuda_runtime.h>

namespace xverse {
namespace moe {

constexpr int kDecodeBlockM = 8;  // rows (pairs) per aligned block: the n8 side of the MMA

// gate_up: a = x [T, K], w = w13 [E, 2N, K], out_act [P, N] (silu(gate) * up).
// down:    a = act [P, K], w = w2 [E, N, K], out_down [P, N] fp32.
struct DecodeGemmArgs {
  const void* a;
  const void* w;
  const int32_t* sorted_pair_ids;   // [num_blocks * kDecodeBlockM]
  const int32_t* block_expert_ids;  // [num_blocks]
  const int32_t* num_padded;        // [1]
  void* out_act;
  float* out_down;
  int64_t num_pairs;
  int top_k;  // pairs per token (gate_up reads row pair / top_k of x)
  int K;
  int N;
  int num_experts;
  int num_blocks;
};

// Launches the decode kernel if it applies (bf16 / fp16, K % 8 == 0, 16-byte aligned a and w); returns false
// otherwise, and the caller runs its general kernel.
bool launch_decode_gemm(const DecodeGemmArgs& args, at::ScalarType dtype, bool gate_up, cudaStream_t stream);

}  // namespace moe
}  // namespace xverse
