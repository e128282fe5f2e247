// Tensor-core prefill / chunked-prefill attention over the paged KV cache, in the FlashAttention-2 style.
//
// Grid (num_tiles, Hq), 128 threads = 4 warps. A CTA owns kQueryRows = 64 consecutive new tokens of ONE
// sequence and one query head; warp w owns rows 16w..16w+15 (one m16 tile). The CTA walks the keys its rows
// can see in tiles of kKeyTile keys (64 for head_dim <= 80, 32 above, so that two stages of K and V stay
// within the 48 KB of dynamic shared memory a launch gets without opting in), K and V gathered from the paged
// blocks into shared memory with cp.async, double-buffered (tile j+1 is in flight while tile j is computed).
// Per key tile and warp:
//   S = Q K^T     mma.m16n8k16: kKeyTile / 8 n-tiles of 8 keys, reducing over D in D/16 k-steps (D = 80: 5);
//                 Q's A fragments live in registers for the whole CTA, K's B fragments come from ldmatrix.
//   mask          causal with the cached-prefix offset: row r sits at context position
//                 context_len - q_len + r and sees keys [0, that position].
//   softmax       online, in registers, fp32: a row is spread over the 4 lanes of a quad (2 shuffles).
//   O += P V      P's S-accumulator registers are re-packed as the A fragments (FA2's register reuse);
//                 V's B fragments come from ldmatrix.trans; D/8 n-tiles of 8 output columns (D = 80: 10).
// Nothing is padded to a power of two: head_dim only needs to be a multiple of 16.
//
// Sequences and tiles: sequence b's tiles start at tile_base(b) = query_start_loc[b] / 64 + b, strictly
// increasing, leaving each sequence at least ceil(q_len / 64) tiles, so a CTA finds its sequence by binary
// search and the grid is sized from T and B alone (no host sync). A virtual sequence B covers the rows past
// query_start_loc[B] (graph padding): it has no context and writes zeros. Tiles are visited in reverse order
// of blockIdx so the long (late, causal) tiles of a sequence start first.
//
// Block table contract (as the decode kernel): entries for the blocks a context covers must be in
// [0, num_blocks); an entry outside that range is never dereferenced (its keys are read as zeros), and
// the CPU ops / XVERSE_CHECK_BLOCK_TABLES=1 turn it into an error.
#include <cstdint>
#include <cstring>

#include <ATen/cuda/CUDAContext.h>

#include "attention/attention_utils.cuh"
#include "attention/prefill_mma.h"
#include "common/launch.cuh"
#include "common/ptx.cuh"

namespace xverse::attention {

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / kWarpSize;
constexpr int kQueryRows = 16 * kMmaWarps;  // query rows per CTA: one m16 tile per warp
constexpr float kLog2e = 1.4426950408889634f;

template <int HEAD_DIM>
struct PrefillMmaShape {
  static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16 (mma k-steps of 16)");
  static constexpr int kKeyTile = HEAD_DIM <= 80 ? 64 : 32;  // keys per shared-memory tile
  static constexpr int kKSteps = HEAD_DIM / 16;       // k-steps of S = Q K^T
  static constexpr int kOutTiles = HEAD_DIM / 8;      // n-tiles of O = P V
  static constexpr int kRowElems = HEAD_DIM + 8;      // smem row: +16 bytes makes ldmatrix rows conflict-free
  static constexpr int kTileElems = kKeyTile * kRowElems;
  static constexpr int kChunksPerRow = HEAD_DIM / 8;  // 16-byte cp.async chunks per K/V row
  static constexpr int kSmemBytes = 2 /*stages*/ * 2 /*K, V*/ * kTileElems * 2 /*bytes*/;
  // No static shared memory: this is the whole budget, kept under the no-opt-in limit (D = 80: 45,056 B).
  static_assert(kSmemBytes <= 48 * 1024, "above 48 KB the launch would need cudaFuncSetAttribute");
};

// mma and packing for the two 16-bit element types.
template <typename T> struct Mma16;
template <> struct Mma16<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
};
template <> struct Mma16<__half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b, d);
  }
};

// Two floats -> one b32 of two 16-bit values, `lo` in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(kMmaThreads)
prefill_mma_kernel(scalar_t* __restrict__ out,                // [T, Hq, D] contiguous
                   const scalar_t* __restrict__ query,        // [T, Hq, D], strides q_stride_t, q_stride_h
                   const scalar_t* __restrict__ key_cache,    // [N, n_kv, block_size, D]
                   const scalar_t* __restrict__ value_cache,
                   const int* __restrict__ block_tables,      // [B, max_blocks]
                   const int* __restrict__ query_start_loc,   // [B + 1]
                   const int* __restrict__ context_lens,      // [B]
                   int num_tokens, int num_seqs, int num_kv_heads, int block_size, int max_blocks,
                   int num_cache_blocks, int64_t q_stride_t, int64_t q_stride_h, float scale_log2) {
  using Shape = PrefillMmaShape<HEAD_DIM>;
  constexpr int kKSteps = Shape::kKSteps, kOutTiles = Shape::kOutTiles, kRowElems = Shape::kRowElems;
  constexpr int kTileElems = Shape::kTileElems, kChunksPerRow = Shape::kChunksPerRow;
  constexpr int kKeyTile = Shape::kKeyTile;
  XVERSE_DYNAMIC_SHARED(scalar_t, smem);  // [stage][K, V][kKeyTile][kRowElems]

  const int head = blockIdx.y, num_heads = gridDim.y;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int group = lane >> 2, quad_lane = lane & 3;  // mma fragment coordinates (groupID, threadID_in_group)

  // ---- which sequence and rows: the largest b in [0, B] with tile_base(b) <= tile ---------------------
  const int tile = gridDim.x - 1 - blockIdx.x;
  int lo = 0, hi = num_seqs;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] / kQueryRows + mid <= tile) lo = mid; else hi = mid - 1;
  }
  const int seq = lo;
  const int base = query_start_loc[seq] / kQueryRows + seq;
  // Clamped to [0, T] so a malformed query_start_loc can never address rows outside out / query.
  const int q_begin = min(max(query_start_loc[seq], 0), num_tokens);
  const int q_end = seq < num_seqs ? min(max(query_start_loc[seq + 1], q_begin), num_tokens) : num_tokens;
  const int q_len = q_end - q_begin;
  const int row0 = (tile - base) * kQueryRows;  // first row of this CTA within the sequence
  if (row0 >= q_len) return;                    // a spare tile (uniform across the CTA: before any barrier)
  const int rows = min(kQueryRows, q_len - row0);
  const int context_len = seq < num_seqs ? min(max(context_lens[seq], 0), max_blocks * block_size) : 0;
  const int first_pos = context_len - q_len + row0;                      // context position of row 0
  const int kv_end = min(max(first_pos + rows, 0), context_len);         // keys the last row sees: [0, kv_end)
  const int num_kv_tiles = ceil_div(kv_end, kKeyTile);
  const int* table = block_tables + static_cast<int64_t>(min(seq, num_seqs - 1)) * max_blocks;

  // ---- K/V tile loader: 16-byte cp.async chunks; keys past kv_end (or in a bad block) are zero-filled ----
  auto load_kv_tile = [&](int kv_tile, int stage) {
    scalar_t* k_s = smem + stage * 2 * kTileElems;
    scalar_t* v_s = k_s + kTileElems;
    for (int c = tid; c < kKeyTile * kChunksPerRow; c += kMmaThreads) {
      const int r = c / kChunksPerRow, seg = c % kChunksPerRow;
      const int key = kv_tile * kKeyTile + r;
      int64_t offset = 0;
      int bytes = 0;
      if (key < kv_end) {
        const int block = table[key / block_size];
        if (block >= 0 && block < num_cache_blocks) {
          offset = ((static_cast<int64_t>(block) * num_kv_heads + kv_head) * block_size + key % block_size) *
                       HEAD_DIM + seg * 8;
          bytes = 16;
        }
      }
      ptx::cp_async_16(k_s + r * kRowElems + seg * 8, key_cache + offset, bytes);
      ptx::cp_async_16(v_s + r * kRowElems + seg * 8, value_cache + offset, bytes);
    }
  };
  if (num_kv_tiles > 0) {
    load_kv_tile(0, 0);
    ptx::cp_async_commit();
  }

  // ---- Q: this warp's 16 rows as A fragments, straight from global memory (read once per CTA) -----------
  // reg i of k-step ks: row group + 8 * (i & 1), columns ks * 16 + 2 * quad_lane + 8 * (i >> 1) (+1).
  const int warp_row0 = 16 * warp;
  const bool warp_active = warp_row0 < rows;  // warp-uniform: a warp past the last row only joins barriers
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = warp_row0 + group + 8 * (i & 1);
      const int col = ks * 16 + 2 * quad_lane + 8 * (i >> 1);
      const scalar_t* src = query + static_cast<int64_t>(q_begin + row0 + r) * q_stride_t + head * q_stride_h + col;
      q_frag[ks][i] = r < rows ? *reinterpret_cast<const uint32_t*>(src) : 0u;
    }
  }

  float o[kOutTiles][4];  // O accumulator: c0,c1 row group, c2,c3 row group + 8; columns nt * 8 + 2 * quad_lane
#pragma unroll
  for (int nt = 0; nt < kOutTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the scaled (log2-domain) scores, rows g, g+8
  float row_sum[2] = {0.f, 0.f};              // this lane's share of the running exp sums
  // The last row of this warp that holds a real query: tiles starting past its position are fully masked.
  const int warp_last_pos = first_pos + min(warp_row0 + 15, rows - 1);

  for (int j = 0; j < num_kv_tiles; ++j) {
    if (j + 1 < num_kv_tiles) {  // prefetch tile j + 1 into the other stage (consumed at iteration j - 1)
      load_kv_tile(j + 1, (j + 1) & 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();  // tile j has landed (this thread's copies) ...
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // ... and every thread's copies are visible
    const int key0 = j * kKeyTile;
    if (warp_active && key0 <= warp_last_pos) {
      const scalar_t* k_s = smem + (j & 1) * 2 * kTileElems;
      const scalar_t* v_s = k_s + kTileElems;

      // S = Q K^T: s[nt] holds keys key0 + nt * 8 + 2 * quad_lane (+1) of rows group, group + 8.
      float s[kKeyTile / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTile / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kKeyTile / 16; ++np) {
          // matrices: (keys +0, dims +0) (keys +0, dims +8) (keys +8, dims +0) (keys +8, dims +8)
          const int key_row = np * 16 + (lane / 16) * 8 + lane % 8;
          const int dim = ks * 16 + ((lane / 8) % 2) * 8;
          uint32_t b[4];
          ptx::ldmatrix_x4(b, k_s + key_row * kRowElems + dim);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          Mma16<scalar_t>::mma(s[2 * np], q_frag[ks], b_lo);
          Mma16<scalar_t>::mma(s[2 * np + 1], q_frag[ks], b_hi);
        }
      }

      // Mask, scale into the log2 domain, and update the online softmax of rows group (h = 0), group + 8.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int pos = first_pos + warp_row0 + group + 8 * h;  // this row's context position
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = key0 + nt * 8 + 2 * quad_lane + e;
            float& v = s[nt][2 * h + e];
            v = (key <= pos && key < kv_end) ? v * scale_log2 : -INFINITY;
            tile_max = fmaxf(tile_max, v);
          }
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max);
        const float ref = new_max == -INFINITY ? 0.f : new_max;  // no visible key yet: every p is 0
        const float correction = exp2f(row_max[h] - ref);         // 0 when the row had no visible key
        row_max[h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& v = s[nt][2 * h + e];
            v = exp2f(v - ref);
            sum += v;
          }
        }
        row_sum[h] = row_sum[h] * correction + sum;
#pragma unroll
        for (int nt = 0; nt < kOutTiles; ++nt) {
          o[nt][2 * h] *= correction;
          o[nt][2 * h + 1] *= correction;
        }
      }

      // O += P V: P's accumulators become A fragments (16 keys per k-step), V via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        const uint32_t a[4] = {pack2<scalar_t>(s[2 * kk][0], s[2 * kk][1]),
                               pack2<scalar_t>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<scalar_t>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<scalar_t>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kOutTiles / 2; ++dp) {
          // matrices: (keys +0, dims +0) (keys +8, dims +0) (keys +0, dims +8) (keys +8, dims +8)
          const int key_row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
          const int dim = dp * 16 + (lane / 16) * 8;
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(b, v_s + key_row * kRowElems + dim);
          const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
          Mma16<scalar_t>::mma(o[2 * dp], a, b_lo);
          Mma16<scalar_t>::mma(o[2 * dp + 1], a, b_hi);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it
  }

  // ---- epilogue: O / l, rows past `rows` are not written ------------------------------------------------
  if (!warp_active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float total = row_sum[h];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const float inv = total > 0.f ? 1.f / total : 0.f;  // no visible key (empty context, padding) -> zeros
    const int r = warp_row0 + group + 8 * h;
    if (r >= rows) continue;
    scalar_t* dst = out + (static_cast<int64_t>(q_begin + row0 + r) * num_heads + head) * HEAD_DIM;
#pragma unroll
    for (int nt = 0; nt < kOutTiles; ++nt) {
      *reinterpret_cast<uint32_t*>(dst + nt * 8 + 2 * quad_lane) =
          pack2<scalar_t>(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
    }
  }
}

bool prefill_mma_supported(at::ScalarType dtype, int64_t head_dim) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) &&
         (head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128);
}

template <typename scalar_t, int HEAD_DIM>
void launch_prefill_mma(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                        const at::Tensor& query_start_loc, const at::Tensor& context_lens, double scale) {
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), num_seqs = block_tables.size(0);
  // Upper bound on the tiles: tile_base(B) + ceil((T - qsl[B]) / 64) <= T / 64 + B + 1 (see the kernel).
  const int64_t num_tiles = num_tokens / kQueryRows + num_seqs + 1;
  TORCH_CHECK(num_tiles < INT32_MAX && num_heads <= 65535, "paged_attention_prefill: too many tokens or heads");
  constexpr int smem = PrefillMmaShape<HEAD_DIM>::kSmemBytes;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_kernel(prefill_mma_kernel<scalar_t, HEAD_DIM>, dim3(static_cast<unsigned>(num_tiles), static_cast<unsigned>(num_heads)), dim3(kMmaThreads),
                smem, stream, static_cast<scalar_t*>(out.data_ptr()), static_cast<const scalar_t*>(query.data_ptr()),
                static_cast<const scalar_t*>(key_cache.data_ptr()),
                static_cast<const scalar_t*>(value_cache.data_ptr()), block_tables.data_ptr<int>(),
                query_start_loc.data_ptr<int>(), context_lens.data_ptr<int>(), static_cast<int>(num_tokens),
                static_cast<int>(num_seqs), static_cast<int>(key_cache.size(1)), static_cast<int>(key_cache.size(2)),
                static_cast<int>(block_tables.size(1)), static_cast<int>(key_cache.size(0)), query.stride(0),
                query.stride(1), static_cast<float>(scale) * kLog2e);
}

void prefill_mma(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                 const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(prefill_mma_supported(query.scalar_type(), query.size(2)),
              "paged_attention_prefill (mma): needs bf16/fp16 and head_dim 64, 80, 96 or 128, got ",
              query.scalar_type(), " and ", query.size(2));
  TORCH_CHECK(query.stride(0) % 2 == 0 && query.stride(1) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(query.data_ptr()) % 4 == 0,
              "paged_attention_prefill: query rows must be 4-byte aligned (even strides); pass a contiguous query");
  auto run = [&](auto type_tag, auto dim_tag) {
    using scalar_t = typename decltype(type_tag)::type;
    launch_prefill_mma<scalar_t, decltype(dim_tag)::value>(out, query, key_cache, value_cache, block_tables,
                                                           query_start_loc, context_lens, scale);
  };
  dispatch_head_dim(query.size(2), "paged_attention_prefill", [&](auto dim_tag) {
    if (query.scalar_type() == at::kBFloat16) {
      run(TypeTag<__nv_bfloat16>{}, dim_tag);
    } else {
      run(TypeTag<__half>{}, dim_tag);
    }
  });
}

}  // namespace xverse::attention
