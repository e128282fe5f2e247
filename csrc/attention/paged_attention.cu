// CUDA paged attention over the cache [num_blocks, n_kv, block_size, D]:
//   decode  - one query token per sequence; one block per (KV head's group of query heads, sequence,
//             partition), so K/V is read once per group; K/V tiles staged through a cp.async ring; split-K
//             over the context in partitions sized from the work (SMs, batch, bucketed max context), then a
//             reduce kernel that merges the partitions' softmax statistics (skipped when one partition
//             suffices). Bandwidth bound.
//   prefill - varlen causal attention of the new tokens over the whole paged context (cached prefix + new):
//             bf16/fp16 on tensor cores (prefill_mma.cu), fp32 on the tiled SIMT kernel below.
// All scores, softmax and accumulation in fp32. No host sync: every grid and buffer is sized from shapes.
#include <algorithm>
#include <cstdint>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/attention_checks.h"
#include "attention/attention_utils.cuh"
#include "attention/prefill_mma.h"
#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "ops.h"

namespace xverse {
namespace attention {

// ============================================ decode ====================================================
//
// Grid (Hq / G, B, P), 128 threads. A block owns G query heads that share one KV head (G: the largest of 8, 4,
// 2, 1 that divides Hq / Hkv; MHA runs G = 1), one sequence and one split-K partition. K and V of the KV head
// are read from memory once per block, so once per group of query heads instead of once per query head.
// The launcher sizes the partitions from the work (decode_plan below): P and partition_tokens come from the SM
// count, the number of blocks per partition and max_context_len (the caller's bucketed bound on the contexts,
// or the table capacity), never from device data, so a captured graph stays valid. Partition p covers context
// tokens [p * partition_tokens, (p + 1) * partition_tokens) and the last one everything to the end of the
// context, so the result is right whatever the hint (a context longer than the hint is only slower). A
// partition past the end of its context exits at once without touching memory (the reduce never reads it);
// with P == 1 the block writes the output itself and no reduce runs.
//
// Pipeline: the partition is walked in tiles of kTileTokens keys (64 * D bytes of K + V). cp.async copies
// tiles global -> shared into a ring of kDecodeStages slots, kDecodeStages - 1 tiles ahead of the one being
// computed, so about 3 * 64 * D bytes per block are in flight whatever the compute does. A tile's keys are
// runs of block_size * D elements (a kv head's rows of one cache block are contiguous); consecutive threads
// copy consecutive 16-byte chunks, so the copies coalesce. Keys past the context and bad table entries are
// zero-filled without reading memory. Per tile (all fp32):
//   scores : thread (row r, chunk c) dots chunk c of keys r, r + kRows, ... with chunk c of each of the G
//            queries (held in registers) -> partial_s; thread g * kTileTokens + t sums key t's partials for
//            head g;
//   softmax: per head, the tile max / sum by shuffles over the tile's kTileTokens lanes, merged into the
//            running (max, sum) in shared memory; p = exp(score - max) -> p_s;
//   values : thread (r, c) rescales its G accumulators (chunk c of each head's output) and adds p * v for
//            keys r, r + kRows, ...; the rows' accumulators are summed at the end (fixed order: deterministic).

constexpr int kDecodeThreads = 128;
constexpr int kDecodeStages = 4;          // ring slots: 3 tiles in flight while one is computed
constexpr int kMinPartitionTokens = 128;  // a partition shorter than this costs more in launch than it hides
constexpr int kMaxDecodeGroup = 8;        // query heads per block at most (Hq / Hkv = 16 runs 2 blocks of 8)

template <typename scalar_t, int HEAD_DIM, int GROUP>
struct DecodeShape {
  static constexpr int kVec = kChunkElems<scalar_t>;                         // elements per 16-byte chunk
  static constexpr int kChunks = HEAD_DIM / kVec;                            // chunks per K/V row
  static constexpr int kTileTokens = 32 / static_cast<int>(sizeof(scalar_t));  // 16 (16-bit) or 8 (fp32)
  static constexpr int kTileChunks = kTileTokens * kChunks;                  // chunks per K (or V) tile
  static constexpr int kRows = kDecodeThreads / kChunks;                     // keys worked on at once
  static constexpr int kScoreThreads = GROUP * kTileTokens;                  // one per (head, key) of a tile
  static constexpr int kSoftmaxThreads = ceil_div(kScoreThreads, kWarpSize) * kWarpSize;  // whole warps
  static_assert(HEAD_DIM % kVec == 0, "head_dim rows must be whole 16-byte chunks");
  static_assert(kRows >= 1, "a K/V row must fit in one block's threads");
  static_assert(kWarpSize % kTileTokens == 0, "a head's tile scores must sit in one warp (segmented shuffles)");
  static_assert(kSoftmaxThreads <= kDecodeThreads, "one thread per (head, key) of a tile");
  static_assert(kRows * HEAD_DIM * 4 <= kDecodeStages * 2 * kTileChunks * 16, "the final sum reuses the ring");
};

template <typename scalar_t, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(kDecodeThreads)
paged_decode_kernel(scalar_t* __restrict__ out,              // [B, Hq, D]   (num_partitions == 1)
                    float* __restrict__ partial_out,         // [B, Hq, P, D] (num_partitions > 1)
                    float* __restrict__ partial_max,         // [B, Hq, P]
                    float* __restrict__ partial_sum,         // [B, Hq, P]
                    const scalar_t* __restrict__ query,      // [B, Hq, D], strides q_stride_b, q_stride_h
                    const scalar_t* __restrict__ key_cache,  // [N, n_kv, block_size, D]
                    const scalar_t* __restrict__ value_cache,
                    const int* __restrict__ block_tables,    // [B, max_blocks]
                    const int* __restrict__ context_lens,    // [B]
                    int num_kv_heads, int block_size, int max_blocks, int num_cache_blocks, int num_partitions,
                    int partition_tokens, int64_t q_stride_b, int64_t q_stride_h, float scale) {
  using Shape = DecodeShape<scalar_t, HEAD_DIM, GROUP>;
  constexpr int kVec = Shape::kVec, kChunks = Shape::kChunks, kTileTokens = Shape::kTileTokens;
  constexpr int kTileChunks = Shape::kTileChunks, kRows = Shape::kRows;

  __shared__ uint4 kv_s[kDecodeStages][2][kTileChunks];        // the ring: [slot][K, V][key * kChunks + chunk]
  __shared__ float partial_s[GROUP][kTileTokens][kChunks + 1];  // per-chunk dot products (+1: no bank conflicts)
  __shared__ float p_s[GROUP][kTileTokens];                     // exp(score - running max) of the tile's keys
  __shared__ float correction_s[GROUP];                         // exp(old max - new max) of the current tile
  __shared__ float max_s[GROUP], sum_s[GROUP];                  // running softmax statistics per head

  const int seq = blockIdx.y, part = blockIdx.z;
  const int num_heads = gridDim.x * GROUP;
  const int head0 = blockIdx.x * GROUP;  // this block's heads: head0 .. head0 + GROUP - 1
  const int kv_head = head0 / (num_heads / num_kv_heads);
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(seq) * num_heads + head0;  // (seq, head0): the G rows are consecutive
  // Clamped to the block table's capacity so a bad length can never index past the table.
  const int context_len = min(max(context_lens[seq], 0), max_blocks * block_size);
  const int start = part * partition_tokens;
  const int end = part == num_partitions - 1 ? context_len : min(start + partition_tokens, context_len);

  if (start >= end) {  // no keys: past the context (P > 1: the reduce never reads it), or an empty context
    if (num_partitions == 1) {
      for (int i = tid; i < GROUP * HEAD_DIM; i += kDecodeThreads) out[row0 * HEAD_DIM + i] = from_float<scalar_t>(0.f);
    }
    return;
  }

  const int* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
  // Queues the copies of tile `tile` (keys from start + tile * kTileTokens) into ring slot `slot`. Keys past
  // `end` and bad blocks read nothing (src_bytes 0) and land as zeros (int64 offsets: caches exceed 2^31 elements).
  auto copy_tile = [&](int tile, int slot) {
    const int first = start + tile * kTileTokens;
    for (int i = tid; i < kTileChunks; i += kDecodeThreads) {
      const int t = first + i / kChunks, seg = i % kChunks;
      const int block = t < end ? table[t / block_size] : -1;
      const bool good = block >= 0 && block < num_cache_blocks;
      const int64_t offset =
          good ? ((static_cast<int64_t>(block) * num_kv_heads + kv_head) * block_size + t % block_size) * HEAD_DIM +
                     seg * kVec
               : 0;
      ptx::cp_async_16(&kv_s[slot][0][i], key_cache + offset, good ? 16 : 0);
      ptx::cp_async_16(&kv_s[slot][1][i], value_cache + offset, good ? 16 : 0);
    }
  };

  // Thread (row, chunk): chunk `chunk` of keys row, row + kRows, ... of every tile.
  const int chunk = tid % kChunks, row = tid / kChunks;
  const bool computes = row < kRows;  // the last 128 % kChunks threads only copy and reduce
  float q[GROUP][kVec];               // chunk `chunk` of each head's query, times scale
  float acc[GROUP][kVec];             // chunk `chunk` of each head's output, over this thread's keys
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    const scalar_t* q_row = query + seq * q_stride_b + (head0 + g) * q_stride_h + chunk * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      q[g][e] = to_float(q_row[e]) * scale;
      acc[g][e] = 0.f;
    }
  }
  if (tid < GROUP) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.f;
  }

  const int num_tiles = ceil_div(end - start, kTileTokens);
  for (int s = 0; s < kDecodeStages - 1; ++s) {
    if (s < num_tiles) copy_tile(s, s);
    ptx::cp_async_commit();  // one group per tile, empty past the last: the wait count below stays fixed
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    ptx::cp_async_wait<kDecodeStages - 2>();  // this thread's copies of `tile` have landed ...
    __syncthreads();  // ... everyone's too; and everyone is done with tile - 1, whose slot is refilled now
    const int ahead = tile + kDecodeStages - 1;
    if (ahead < num_tiles) copy_tile(ahead, ahead % kDecodeStages);
    ptx::cp_async_commit();
    const uint4* k_tile = kv_s[tile % kDecodeStages][0];
    const uint4* v_tile = kv_s[tile % kDecodeStages][1];
    const int tile_len = min(kTileTokens, end - (start + tile * kTileTokens));

    // ---- scores: partial dot products per chunk, then summed per (head, key) ----------------------------
    if (computes) {
      for (int t = row; t < tile_len; t += kRows) {
        float k[kVec];
        unpack_chunk<scalar_t>(k_tile[t * kChunks + chunk], k);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][e], k[e], dot);
          partial_s[g][t][chunk] = dot;
        }
      }
    }
    __syncthreads();

    // ---- softmax over the tile, merged into the running max / sum (thread g * kTileTokens + t) ----------
    if (tid < Shape::kSoftmaxThreads) {  // whole warps: the shuffles below are full-warp
      const int g = tid / kTileTokens, t = tid % kTileTokens;
      const bool mine = g < GROUP && t < tile_len;  // a real (head, key) of this tile
      float score = -INFINITY;
      if (mine) {
        score = 0.f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) score += partial_s[g][t][c];
      }
      const float old_max = g < GROUP ? max_s[g] : -INFINITY;
      float tile_max = score;  // over the head's kTileTokens lanes (key 0 is always real: finite)
#pragma unroll
      for (int offset = kTileTokens / 2; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float new_max = fmaxf(old_max, tile_max);
      const float p = mine ? expf(score - new_max) : 0.f;
      float tile_sum = p;
#pragma unroll
      for (int offset = kTileTokens / 2; offset > 0; offset /= 2) {
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
      }
      __syncwarp();  // every lane has read max_s before lane t == 0 rewrites it
      if (g < GROUP) {
        p_s[g][t] = p;
        if (t == 0) {
          const float correction = expf(old_max - new_max);  // 0 on the first tile
          correction_s[g] = correction;
          sum_s[g] = sum_s[g] * correction + tile_sum;
          max_s[g] = new_max;
        }
      }
    }
    __syncthreads();

    // ---- values: acc = acc * correction + sum_t p_t * v_t ----------------------------------------------
    if (computes) {
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float correction = correction_s[g];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] *= correction;
      }
      for (int t = row; t < tile_len; t += kRows) {
        float v[kVec];
        unpack_chunk<scalar_t>(v_tile[t * kChunks + chunk], v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float p = p_s[g][t];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(p, v[e], acc[g][e]);
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // only empty groups are left; the ring is reused below
  __syncthreads();

  // ---- sum the rows' accumulators per head (fixed order: deterministic) and write ------------------------
  float* rows_s = reinterpret_cast<float*>(&kv_s[0][0][0]);  // [kRows][HEAD_DIM]
#pragma unroll  // acc[g] must be a register: a loop index that stays a variable would put acc in local memory
  for (int g = 0; g < GROUP; ++g) {
    if (computes) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) rows_s[row * HEAD_DIM + chunk * kVec + e] = acc[g][e];
    }
    __syncthreads();
    const int64_t out_row = row0 + g;
    const float inv_sum = 1.f / sum_s[g];  // sum >= 1: the max logit contributes exp(0)
    for (int d = tid; d < HEAD_DIM; d += kDecodeThreads) {
      float o = 0.f;
      for (int r = 0; r < kRows; ++r) o += rows_s[r * HEAD_DIM + d];
      o *= inv_sum;
      if (num_partitions == 1) {
        out[out_row * HEAD_DIM + d] = from_float<scalar_t>(o);
      } else {
        partial_out[(out_row * num_partitions + part) * HEAD_DIM + d] = o;
      }
    }
    if (num_partitions > 1 && tid == 0) {
      partial_max[out_row * num_partitions + part] = max_s[g];
      partial_sum[out_row * num_partitions + part] = sum_s[g];
    }
    __syncthreads();  // rows_s is rewritten for the next head
  }
}

// Grid (Hq, B), kDecodeThreads threads: out = sum_p w_p * partial_out_p / sum_p w_p with
// w_p = partial_sum_p * exp(partial_max_p - max). Only the partitions the (clamped) context reaches are read:
// the same partitions the decode kernel wrote.
template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(kDecodeThreads)
paged_decode_reduce_kernel(scalar_t* __restrict__ out,                // [B, Hq, D]
                           const float* __restrict__ partial_out,     // [B, Hq, P, D]
                           const float* __restrict__ partial_max,     // [B, Hq, P]
                           const float* __restrict__ partial_sum,     // [B, Hq, P]
                           const int* __restrict__ context_lens,      // [B]
                           int capacity, int num_partitions, int partition_tokens) {
  const int head = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
  const int64_t row = static_cast<int64_t>(seq) * num_heads + head;
  const int context_len = min(max(context_lens[seq], 0), capacity);  // as the decode kernel clamps it
  const int used = min(ceil_div(context_len, partition_tokens), num_partitions);
  const float* maxes = partial_max + row * num_partitions;
  const float* sums = partial_sum + row * num_partitions;
  float max_logit = -INFINITY;
  for (int p = 0; p < used; ++p) max_logit = fmaxf(max_logit, maxes[p]);
  float total = 0.f;
  for (int p = 0; p < used; ++p) total += sums[p] * expf(maxes[p] - max_logit);
  const float inv_total = total > 0.f ? 1.f / total : 0.f;  // empty context -> zeros
  for (int d = threadIdx.x; d < HEAD_DIM; d += kDecodeThreads) {
    float o = 0.f;
    for (int p = 0; p < used; ++p) {
      o += sums[p] * expf(maxes[p] - max_logit) * partial_out[(row * num_partitions + p) * HEAD_DIM + d];
    }
    out[row * HEAD_DIM + d] = from_float<scalar_t>(o * inv_total);
  }
}

// How many partitions per (sequence, head group), and how long: enough blocks for about kBlocksPerSm blocks
// per SM, none shorter than kMinPartitionTokens. num_blocks: blocks per partition (B * Hq / G). max_context: a
// bound on the contexts (the caller's bucketed hint or the table capacity). Pure host arithmetic in int64.
struct DecodePlan {
  int num_partitions;
  int partition_tokens;
};

inline DecodePlan decode_plan(int64_t num_blocks, int64_t max_context, int64_t num_sms) {
  constexpr int64_t kBlocksPerSm = 4;
  max_context = std::max<int64_t>(max_context, 1);
  const int64_t wanted = ceil_div<int64_t>(kBlocksPerSm * num_sms, std::max<int64_t>(num_blocks, 1));
  const int64_t by_length = ceil_div<int64_t>(max_context, kMinPartitionTokens);
  const int64_t partitions = std::clamp<int64_t>(std::min(wanted, by_length), 1, 65535);
  const int64_t tokens = ceil_div<int64_t>(max_context, partitions);
  // Recounted so that no partition starts past max_context (e.g. 9 tokens over 4 partitions of 3: 3 suffice).
  return {static_cast<int>(ceil_div<int64_t>(max_context, tokens)), static_cast<int>(tokens)};
}

// ============================================ prefill ===================================================
//
// Grid (num_tiles, Hq), 128 threads. A block owns kPrefillRows consecutive new tokens of ONE sequence and one
// head. Tiles are numbered per sequence: sequence b's tiles start at tile_base(b) = qsl[b] / kPrefillRows + b,
// which is strictly increasing and leaves each sequence at least ceil(q_len / kPrefillRows) tiles, so a block
// finds its sequence by binary search over query_start_loc and the grid is sized from T and B alone.
// The block walks the context in tiles of 32 keys (K and V staged in shared memory as fp32); warp w owns rows
// 4w..4w+3; lane j scores key j; online softmax per row; output element d = lane + 32k accumulates in lane.
// This is SIMT (no tensor cores): it serves fp32 (CPU-parity tests); bf16/fp16 run the mma kernel in
// prefill_mma.cu. As there, a virtual sequence B covers the rows past query_start_loc[B] and writes zeros.

constexpr int kPrefillThreads = 128;
constexpr int kPrefillWarps = kPrefillThreads / kWarpSize;
constexpr int kPrefillRowsPerWarp = 4;
constexpr int kPrefillRows = kPrefillWarps * kPrefillRowsPerWarp;  // query rows per block
constexpr int kPrefillKeys = kWarpSize;                             // keys per tile: one per lane

template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(kPrefillThreads)
paged_prefill_kernel(scalar_t* __restrict__ out,                // [T, Hq, D]
                     const scalar_t* __restrict__ query,        // [T, Hq, D], strides q_stride_t, q_stride_h
                     const scalar_t* __restrict__ key_cache,    // [N, n_kv, block_size, D]
                     const scalar_t* __restrict__ value_cache,
                     const int* __restrict__ block_tables,      // [B, max_blocks]
                     const int* __restrict__ query_start_loc,   // [B + 1]
                     const int* __restrict__ context_lens,      // [B]
                     int num_tokens, int num_seqs, int num_kv_heads, int block_size, int max_blocks,
                     int num_cache_blocks, int64_t q_stride_t, int64_t q_stride_h, float scale) {
  constexpr int kVec = kChunkElems<scalar_t>;
  constexpr int kChunks = HEAD_DIM / kVec;
  constexpr int kDimsPerLane = ceil_div(HEAD_DIM, kWarpSize);
  static_assert(HEAD_DIM % kVec == 0, "head_dim rows must be whole 16-byte chunks");

  __shared__ float q_s[kPrefillRows][HEAD_DIM];
  __shared__ float k_s[kPrefillKeys][HEAD_DIM + 1];  // +1: lane j reads row j, column d: no bank conflicts
  __shared__ float v_s[kPrefillKeys][HEAD_DIM];

  const int head = blockIdx.y, num_heads = gridDim.y;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;

  // Find the sequence: the largest b in [0, B] with tile_base(b) <= blockIdx.x (same in every thread).
  const int tile_index = blockIdx.x;
  int lo = 0, hi = num_seqs;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] / kPrefillRows + mid <= tile_index) lo = mid; else hi = mid - 1;
  }
  const int seq = lo;
  // Clamped to [0, T]: a malformed query_start_loc can never address rows outside out / query.
  const int q_begin = min(max(query_start_loc[seq], 0), num_tokens);
  const int q_end = seq < num_seqs ? min(max(query_start_loc[seq + 1], q_begin), num_tokens) : num_tokens;
  const int q_len = q_end - q_begin;
  const int row0 = (tile_index - (query_start_loc[seq] / kPrefillRows + seq)) * kPrefillRows;
  if (row0 < 0 || row0 >= q_len) return;  // a spare tile
  const int rows = min(kPrefillRows, q_len - row0);
  const int context_len = seq < num_seqs ? min(max(context_lens[seq], 0), max_blocks * block_size) : 0;
  const int first_pos = context_len - q_len + row0;  // context position of this block's row 0
  const int kv_end = min(max(first_pos + rows, 0), context_len);  // keys the block's last row sees: [0, kv_end)
  const int* table = block_tables + static_cast<int64_t>(min(seq, num_seqs - 1)) * max_blocks;

  for (int i = tid; i < kPrefillRows * HEAD_DIM; i += kPrefillThreads) {
    const int r = i / HEAD_DIM, d = i % HEAD_DIM;
    q_s[r][d] = r < rows ? to_float(query[(q_begin + row0 + r) * q_stride_t + head * q_stride_h + d]) * scale : 0.f;
  }

  float row_max[kPrefillRowsPerWarp], row_sum[kPrefillRowsPerWarp];
  float acc[kPrefillRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kPrefillRowsPerWarp; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) acc[r][k] = 0.f;
  }

  for (int kv0 = 0; kv0 < kv_end; kv0 += kPrefillKeys) {
    __syncthreads();  // the previous tile is consumed (and q_s is written, on the first pass)
    for (int c = tid; c < kPrefillKeys * kChunks; c += kPrefillThreads) {
      const int j = c / kChunks, seg = c % kChunks, t = kv0 + j;
      float k[kVec], v[kVec];
      const int64_t block = t < kv_end ? table[t / block_size] : -1;
      if (block >= 0 && block < num_cache_blocks) {  // a bad table entry is never dereferenced: zeros
        const int64_t offset = ((block * num_kv_heads + kv_head) * block_size + t % block_size) * HEAD_DIM + seg * kVec;
        unpack_chunk<scalar_t>(load_chunk(key_cache + offset), k);
        unpack_chunk<scalar_t>(load_chunk(value_cache + offset), v);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) k[e] = v[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        k_s[j][seg * kVec + e] = k[e];
        v_s[j][seg * kVec + e] = v[e];
      }
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < kPrefillRowsPerWarp; ++r) {
      const int row = warp * kPrefillRowsPerWarp + r;  // warp-uniform
      if (row >= rows) break;
      const int pos = first_pos + row;
      const int t = kv0 + lane;
      float score = -INFINITY;
      if (t < kv_end && t <= pos) {
        float s = 0.f;
#pragma unroll 8
        for (int d = 0; d < HEAD_DIM; ++d) s = fmaf(q_s[row][d], k_s[lane][d], s);
        score = s;
      }
      const float tile_max = warp_max(score);
      if (tile_max == -INFINITY) continue;  // no visible key in this tile for this row (warp-uniform)
      const float new_max = fmaxf(row_max[r], tile_max);
      const float p = score == -INFINITY ? 0.f : expf(score - new_max);
      const float correction = expf(row_max[r] - new_max);  // 0 on the first visible tile
      row_sum[r] = row_sum[r] * correction + warp_sum(p);
      row_max[r] = new_max;
#pragma unroll
      for (int k = 0; k < kDimsPerLane; ++k) acc[r][k] *= correction;
      for (int j = 0; j < kPrefillKeys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int k = 0; k < kDimsPerLane; ++k) {
          const int d = lane + k * kWarpSize;
          if (d < HEAD_DIM) acc[r][k] = fmaf(pj, v_s[j][d], acc[r][k]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kPrefillRowsPerWarp; ++r) {
    const int row = warp * kPrefillRowsPerWarp + r;
    if (row >= rows) break;
    const float inv_sum = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;  // no visible key -> zeros
    scalar_t* o = out + (static_cast<int64_t>(q_begin + row0 + row) * num_heads + head) * HEAD_DIM;
#pragma unroll
    for (int k = 0; k < kDimsPerLane; ++k) {
      const int d = lane + k * kWarpSize;
      if (d < HEAD_DIM) o[d] = from_float<scalar_t>(acc[r][k] * inv_sum);
    }
  }
}

// Query heads per decode block: the largest of 8, 4, 2, 1 that divides Hq / Hkv (the heads sharing a KV head).
int decode_group(int64_t num_heads, int64_t num_kv_heads) {
  const int64_t shared = num_heads / num_kv_heads;
  for (int group = kMaxDecodeGroup; group > 1; group /= 2) {
    if (shared % group == 0) return group;
  }
  return 1;
}

template <int G> struct GroupTag { static constexpr int value = G; };

// Calls fn(GroupTag<G>{}) for the compiled decode groups 1 / 2 / 4 / 8.
template <typename Fn>
void dispatch_group(int group, Fn&& fn) {
  switch (group) {
    case 1: fn(GroupTag<1>{}); break;
    case 2: fn(GroupTag<2>{}); break;
    case 4: fn(GroupTag<4>{}); break;
    case 8: fn(GroupTag<8>{}); break;
    default: TORCH_CHECK(false, "paged_attention_decode: no kernel for ", group, " query heads per block");
  }
}

void check_cuda_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(query.is_cuda(), "paged attention (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(value_cache.data_ptr()) % 16 == 0,
              "key_cache and value_cache must be 16-byte aligned (they are read in 16-byte chunks)");
  TORCH_CHECK(key_cache.numel() < (int64_t{1} << 62), "cache too large");
  TORCH_CHECK(key_cache.size(0) < INT32_MAX, "too many cache blocks");
  TORCH_CHECK(key_cache.size(2) * key_cache.size(3) < INT32_MAX, "block_size * head_dim too large");
}

// Table capacity max_blocks * block_size, computed in int64 and checked to fit the kernels' int positions.
int64_t table_capacity(const at::Tensor& block_tables, const at::Tensor& key_cache, const char* op) {
  const int64_t capacity = block_tables.size(1) * key_cache.size(2);
  TORCH_CHECK(capacity < INT32_MAX, op, ": block table capacity max_blocks * block_size = ", capacity,
              " must be below 2^31 - 1");
  return capacity;
}

// XVERSE_CHECK_BLOCK_TABLES=1: the CPU ops' table check, at the price of a host sync.
void maybe_check_block_tables(const at::Tensor& key_cache, const at::Tensor& block_tables,
                              const at::Tensor& context_lens) {
  if (debug_check_block_tables()) {
    check_block_tables(key_cache.size(0), key_cache.size(2), block_tables.cpu(), context_lens.cpu());
  }
}

// The SM count the decode split-K is sized for. The emulator plans as for an H100 / H200 (132 SMs), so its
// tests run the partition counts a real card gets.
int num_sms(const at::Tensor& t) {
#ifdef XVERSE_EMULATE
  return 132;
#else
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
#endif
}

}  // namespace attention

at::Tensor paged_attention_decode_cuda(const at::Tensor& query, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& block_tables,
                                       const at::Tensor& context_lens, double scale, int64_t max_context_len) {
  using namespace attention;
  check_decode_args(query, key_cache, value_cache, block_tables, context_lens);
  check_cuda_args(query, key_cache, value_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  auto out = at::empty({num_seqs, num_heads, head_dim}, query.options());
  if (out.numel() == 0) return out;  // B = 0 or Hq = 0: nothing to launch (an empty grid is an error)
  TORCH_CHECK(num_seqs <= 65535 && num_heads <= INT32_MAX, "paged_attention_decode: at most 65535 sequences per call, got ",
              num_seqs);
  maybe_check_block_tables(key_cache, block_tables, context_lens);
  const int64_t capacity = table_capacity(block_tables, key_cache, "paged_attention_decode");
  // From shapes and the caller's bound only, never from context_lens: no host sync, graph capturable.
  const int64_t bound = max_context_len > 0 ? std::min(max_context_len, capacity) : capacity;
  const int group = decode_group(num_heads, key_cache.size(1));  // query heads per block: one KV head's read
  const DecodePlan plan = decode_plan(num_seqs * (num_heads / group), bound, num_sms(query));
  at::Tensor partial_out, partial_max, partial_sum;  // undefined (null pointers) with one partition
  if (plan.num_partitions > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    partial_out = at::empty({num_seqs, num_heads, plan.num_partitions, head_dim}, f32);
    partial_max = at::empty({num_seqs, num_heads, plan.num_partitions}, f32);
    partial_sum = at::empty({num_seqs, num_heads, plan.num_partitions}, f32);
  }
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_heads / group), static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(plan.num_partitions));
  dispatch_dtype(query.scalar_type(), "paged_attention_decode", [&](auto type_tag) {
    using scalar_t = typename decltype(type_tag)::type;
    dispatch_head_dim(head_dim, "paged_attention_decode", [&](auto dim_tag) {
      constexpr int kHeadDim = decltype(dim_tag)::value;
      auto* out_ptr = static_cast<scalar_t*>(out.data_ptr());
      dispatch_group(group, [&](auto group_tag) {
        launch_kernel(paged_decode_kernel<scalar_t, kHeadDim, decltype(group_tag)::value>, grid,
                      dim3(kDecodeThreads), 0, stream, out_ptr, ptr(partial_out), ptr(partial_max),
                      ptr(partial_sum), static_cast<const scalar_t*>(query.data_ptr()),
                      static_cast<const scalar_t*>(key_cache.data_ptr()),
                      static_cast<const scalar_t*>(value_cache.data_ptr()), block_tables.data_ptr<int>(),
                      context_lens.data_ptr<int>(), static_cast<int>(key_cache.size(1)),
                      static_cast<int>(key_cache.size(2)), static_cast<int>(block_tables.size(1)),
                      static_cast<int>(key_cache.size(0)), plan.num_partitions, plan.partition_tokens,
                      query.stride(0), query.stride(1), static_cast<float>(scale));
      });
      if (plan.num_partitions > 1) {  // one partition: the decode kernel wrote `out` itself
        launch_kernel(paged_decode_reduce_kernel<scalar_t, kHeadDim>,
                      dim3(static_cast<unsigned>(num_heads), static_cast<unsigned>(num_seqs)), dim3(kDecodeThreads),
                      0, stream, out_ptr, static_cast<const float*>(ptr(partial_out)),
                      static_cast<const float*>(ptr(partial_max)), static_cast<const float*>(ptr(partial_sum)),
                      static_cast<const int*>(context_lens.data_ptr<int>()), static_cast<int>(capacity),
                      plan.num_partitions, plan.partition_tokens);
      }
    });
  });
  return out;
}

at::Tensor paged_attention_prefill_cuda(const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                                        const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                                        double scale) {
  using namespace attention;
  check_prefill_args(query, key_cache, value_cache, block_tables, query_start_loc, context_lens);  // B > 0 || T == 0
  check_cuda_args(query, key_cache, value_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_seqs = block_tables.size(0);
  auto out = at::empty({num_tokens, num_heads, head_dim}, query.options());
  if (out.numel() == 0) return out;  // T = 0 or Hq = 0: nothing to launch
  TORCH_CHECK(num_tokens < INT32_MAX / 2, "paged_attention_prefill: too many tokens");
  TORCH_CHECK(num_heads <= 65535, "paged_attention_prefill: too many heads");
  maybe_check_block_tables(key_cache, block_tables, context_lens);
  table_capacity(block_tables, key_cache, "paged_attention_prefill");
  if (prefill_mma_supported(query.scalar_type(), head_dim)) {  // bf16 / fp16: tensor cores
    prefill_mma(out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale);
    return out;
  }
  // Upper bound on the tiles: tile_base(B) + ceil((T - qsl[B]) / kPrefillRows) <= T / kPrefillRows + B + 1.
  const int64_t num_tiles = num_tokens / kPrefillRows + num_seqs + 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(num_heads));
  dispatch_dtype(query.scalar_type(), "paged_attention_prefill", [&](auto type_tag) {
    using scalar_t = typename decltype(type_tag)::type;
    dispatch_head_dim(head_dim, "paged_attention_prefill", [&](auto dim_tag) {
      constexpr int kHeadDim = decltype(dim_tag)::value;
      launch_kernel(paged_prefill_kernel<scalar_t, kHeadDim>, grid, dim3(kPrefillThreads), 0, stream,
                    static_cast<scalar_t*>(out.data_ptr()), static_cast<const scalar_t*>(query.data_ptr()),
                    static_cast<const scalar_t*>(key_cache.data_ptr()),
                    static_cast<const scalar_t*>(value_cache.data_ptr()), block_tables.data_ptr<int>(),
                    query_start_loc.data_ptr<int>(), context_lens.data_ptr<int>(), static_cast<int>(num_tokens),
                    static_cast<int>(num_seqs), static_cast<int>(key_cache.size(1)),
                    static_cast<int>(key_cache.size(2)), static_cast<int>(block_tables.size(1)),
                    static_cast<int>(key_cache.size(0)), query.stride(0), query.stride(1),
                    static_cast<float>(scale));
    });
  });
  return out;
}

}  // namespace xverse
