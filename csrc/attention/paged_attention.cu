// CUDA paged attention over the cache [num_blocks, n_kv, block_size, D]:
//   decode  - one query token per sequence; split-K over the context in partitions sized from the work
//             (SMs, batch, bucketed max context), then a reduce kernel that merges the partitions' softmax
//             statistics (skipped when one partition suffices). Bandwidth bound.
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
#include "ops.h"

namespace xverse {
namespace attention {

// ============================================ decode ====================================================
//
// Grid (Hq, B, P), 128 threads. A block owns one (query head, sequence, partition). The launcher sizes the
// partitions from the work (decode_plan below): P and partition_tokens come from the SM count, the batch and
// max_context_len (the caller's bucketed bound on the contexts, or the table capacity), never from device data,
// so a captured graph stays valid. Partition p covers context tokens [p * partition_tokens,
// (p + 1) * partition_tokens) and the last one everything to the end of the context, so the result is right
// whatever the hint (a context longer than the hint is only slower). A partition past the end of its context
// exits at once without touching memory (the reduce never reads it); with P == 1 the block writes the output
// itself and no reduce runs.
//
// A partition is walked in chunks of kChunkTokens keys (the shared logits buffer), merged by online softmax.
// The kv head's rows of one cache block are contiguous, so a chunk's keys are runs of block_size * D elements.
// Each warp reads them as a flat stream of 16-byte chunks: in a "step" lane l issues kLoads independent 16-byte
// loads, load i fetching chunk f = i * 32 + l of the step (token f / kChunks, segment f % kChunks of its row).
// Consecutive lanes read consecutive 16 bytes, so every load instruction of the warp is one coalesced 512-byte
// run (two when it crosses a block), and kLoads loads per lane are in flight at once. Because 32 * kLoads is a
// multiple of kChunks, the segment a lane's load i touches is the same in every step: q (for K) and the output
// accumulators (for V) stay put.
//   pass 1: partial dot products per chunk -> shared memory -> summed per token -> logits[] in shared memory
//   softmax over the chunk (block max, exp, block sum), fp32, merged into the running (max, sum)
//   pass 2: the same chunk stream over V, acc[segment] += p[token] * v; reduced across lanes at the end.

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / kWarpSize;
constexpr int kChunkTokens = 512;        // keys per pass over shared memory
constexpr int kMinPartitionTokens = 128; // a partition shorter than this costs more in launch than it hides

template <typename scalar_t, int HEAD_DIM>
struct DecodeShape {
  static constexpr int kVec = kChunkElems<scalar_t>;       // elements per 16-byte chunk
  static constexpr int kChunks = HEAD_DIM / kVec;          // chunks per K/V row
  static constexpr int kPeriod = kChunks / gcd(kWarpSize, kChunks);  // loads after which the segment map repeats
  static constexpr int kLoads = kPeriod * ceil_div(8, kPeriod);      // 16-byte loads in flight per lane per step
  static constexpr int kStepTokens = kWarpSize * kLoads / kChunks;   // tokens one warp step covers
  static_assert(HEAD_DIM % kVec == 0, "head_dim rows must be whole 16-byte chunks");
  static_assert((kWarpSize * kPeriod) % kChunks == 0, "segment map must repeat every kPeriod loads");
  static_assert((kWarpSize * kLoads) % kChunks == 0, "a step must hold whole tokens");
  static_assert(kStepTokens >= 1 && kStepTokens <= kWarpSize, "one lane sums one token of a step");
};

template <typename scalar_t, int HEAD_DIM>
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
  using Shape = DecodeShape<scalar_t, HEAD_DIM>;
  constexpr int kVec = Shape::kVec, kChunks = Shape::kChunks, kPeriod = Shape::kPeriod;
  constexpr int kLoads = Shape::kLoads, kStepTokens = Shape::kStepTokens;

  __shared__ float q_s[HEAD_DIM];                                  // query * scale
  __shared__ float logits_s[kChunkTokens];                         // scores, then exp(score - max)
  __shared__ int blocks_s[kChunkTokens + 1];                       // the chunk's physical block ids (-1: bad)
  __shared__ float partial_s[kDecodeWarps][kWarpSize * kLoads];    // per-chunk partial dot products
  __shared__ float acc_s[kDecodeWarps][kWarpSize * kPeriod][kVec]; // per-lane V accumulators
  __shared__ float reduce_s[kDecodeWarps];

  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int num_heads = gridDim.x;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t row = static_cast<int64_t>(seq) * num_heads + head;  // (seq, head)
  // Clamped to the block table's capacity so a bad length can never index past the table.
  const int context_len = min(max(context_lens[seq], 0), max_blocks * block_size);
  const int start = part * partition_tokens;
  const int end = part == num_partitions - 1 ? context_len : min(start + partition_tokens, context_len);

  if (start >= end) {  // no keys: past the context (P > 1: the reduce never reads it), or an empty context
    if (num_partitions == 1) {
      for (int d = tid; d < HEAD_DIM; d += kDecodeThreads) out[row * HEAD_DIM + d] = from_float<scalar_t>(0.f);
    }
    return;
  }

  const int* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
  const scalar_t* q = query + seq * q_stride_b + head * q_stride_h;
  for (int d = tid; d < HEAD_DIM; d += kDecodeThreads) q_s[d] = to_float(q[d]) * scale;
  constexpr int kBlockStep = kDecodeWarps * kStepTokens;  // tokens the whole block covers per step

  // acc[j] is this lane's sum for segment (j * 32 + lane) % kChunks (load i feeds acc[i % kPeriod]).
  float acc[kPeriod][kVec];
#pragma unroll
  for (int j = 0; j < kPeriod; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[j][e] = 0.f;
  }
  float run_max = -INFINITY, run_sum = 0.f;  // online softmax over the chunks (same value in every thread)

  for (int chunk = start; chunk < end; chunk += kChunkTokens) {
    const int chunk_end = min(chunk + kChunkTokens, end);
    const int first_block = chunk / block_size;
    const int num_blocks = (chunk_end - 1) / block_size - first_block + 1;
    __syncthreads();  // the previous chunk is done with blocks_s / logits_s
    for (int i = tid; i < num_blocks; i += kDecodeThreads) {
      const int block = table[first_block + i];
      blocks_s[i] = block >= 0 && block < num_cache_blocks ? block : -1;
    }
    __syncthreads();

    // 16 bytes of token t's row at segment seg, zeros for a bad block (int64: caches exceed 2^31 elements).
    auto load = [&](const scalar_t* cache, int t, int seg) -> uint4 {
      const int64_t block = blocks_s[t / block_size - first_block];
      if (block < 0) return make_uint4(0, 0, 0, 0);
      return load_chunk(cache + ((block * num_kv_heads + kv_head) * block_size + t % block_size) * HEAD_DIM +
                        seg * kVec);
    };

    // ---- pass 1: logits = (q * scale) . k -----------------------------------------------------------
    float lane_max = -INFINITY;
    for (int step = chunk + warp * kStepTokens; step < chunk_end; step += kBlockStep) {
      uint4 raw[kLoads];
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {  // issue every load first: kLoads chunks in flight per lane
        const int f = i * kWarpSize + lane;
        const int t = step + f / kChunks;
        raw[i] = t < chunk_end ? load(key_cache, t, f % kChunks) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int f = i * kWarpSize + lane;
        const float* qs = q_s + (f % kChunks) * kVec;
        float k[kVec];
        unpack_chunk<scalar_t>(raw[i], k);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(qs[e], k[e], dot);
        partial_s[warp][f] = dot;
      }
      __syncwarp();
      if (lane < kStepTokens && step + lane < chunk_end) {  // lane sums the kChunks partials of token step + lane
        float score = 0.f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) score += partial_s[warp][lane * kChunks + c];
        logits_s[step + lane - chunk] = score;
        lane_max = fmaxf(lane_max, score);
      }
      __syncwarp();  // partial_s is rewritten by the next step
    }

    // ---- softmax over the chunk (fp32), merged into the running max / sum -----------------------------
    const float chunk_max = block_reduce<kDecodeWarps, true>(lane_max, reduce_s);  // also publishes logits_s
    const float new_max = fmaxf(run_max, chunk_max);
    const float correction = expf(run_max - new_max);  // 0 on the first chunk
    float lane_sum = 0.f;
    for (int i = tid; i < chunk_end - chunk; i += kDecodeThreads) {
      const float p = expf(logits_s[i] - new_max);
      logits_s[i] = p;
      lane_sum += p;
    }
    const float chunk_sum = block_reduce<kDecodeWarps, false>(lane_sum, reduce_s);  // also publishes the p's
    run_sum = run_sum * correction + chunk_sum;
    run_max = new_max;

    // ---- pass 2: acc = acc * correction + sum_t p_t * v_t ----------------------------------------------
#pragma unroll
    for (int j = 0; j < kPeriod; ++j) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[j][e] *= correction;
    }
    for (int step = chunk + warp * kStepTokens; step < chunk_end; step += kBlockStep) {
      uint4 raw[kLoads];
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int f = i * kWarpSize + lane;
        const int t = step + f / kChunks;
        raw[i] = t < chunk_end ? load(value_cache, t, f % kChunks) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int t = step + (i * kWarpSize + lane) / kChunks;
        const float p = t < chunk_end ? logits_s[t - chunk] : 0.f;  // masked chunks were zero-filled, not loaded
        float v[kVec];
        unpack_chunk<scalar_t>(raw[i], v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i % kPeriod][e] = fmaf(p, v[e], acc[i % kPeriod][e]);
      }
    }
  }

  // ---- combine the lanes' accumulators per output element (fixed order: deterministic) -------------------
#pragma unroll
  for (int j = 0; j < kPeriod; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc_s[warp][j * kWarpSize + lane][e] = acc[j][e];
  }
  __syncthreads();
  const float inv_sum = 1.f / run_sum;  // run_sum >= 1: the max logit contributes exp(0)
  for (int d = tid; d < HEAD_DIM; d += kDecodeThreads) {
    const int seg = d / kVec, e = d % kVec;
    float o = 0.f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      for (int f = seg; f < kWarpSize * kPeriod; f += kChunks) o += acc_s[w][f][e];
    }
    o *= inv_sum;
    if (num_partitions == 1) {
      out[row * HEAD_DIM + d] = from_float<scalar_t>(o);
    } else {
      partial_out[(row * num_partitions + part) * HEAD_DIM + d] = o;
    }
  }
  if (num_partitions > 1 && tid == 0) {
    partial_max[row * num_partitions + part] = run_max;
    partial_sum[row * num_partitions + part] = run_sum;
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

// How many partitions per (sequence, head), and how long: enough blocks for about kWavesPerSm blocks per SM,
// none shorter than kMinPartitionTokens. max_context: a bound on the contexts (the caller's bucketed hint or
// the table capacity). Pure host arithmetic in int64.
struct DecodePlan {
  int num_partitions;
  int partition_tokens;
};

inline DecodePlan decode_plan(int64_t num_seqs, int64_t num_heads, int64_t max_context, int64_t num_sms) {
  constexpr int64_t kBlocksPerSm = 4;
  max_context = std::max<int64_t>(max_context, 1);
  const int64_t wanted = ceil_div<int64_t>(kBlocksPerSm * num_sms, std::max<int64_t>(num_seqs * num_heads, 1));
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
  const DecodePlan plan = decode_plan(num_seqs, num_heads, bound, num_sms(query));
  at::Tensor partial_out, partial_max, partial_sum;  // undefined (null pointers) with one partition
  if (plan.num_partitions > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    partial_out = at::empty({num_seqs, num_heads, plan.num_partitions, head_dim}, f32);
    partial_max = at::empty({num_seqs, num_heads, plan.num_partitions}, f32);
    partial_sum = at::empty({num_seqs, num_heads, plan.num_partitions}, f32);
  }
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_heads), static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(plan.num_partitions));
  dispatch_dtype(query.scalar_type(), "paged_attention_decode", [&](auto type_tag) {
    using scalar_t = typename decltype(type_tag)::type;
    dispatch_head_dim(head_dim, "paged_attention_decode", [&](auto dim_tag) {
      constexpr int kHeadDim = decltype(dim_tag)::value;
      auto* out_ptr = static_cast<scalar_t*>(out.data_ptr());
      launch_kernel(paged_decode_kernel<scalar_t, kHeadDim>, grid, dim3(kDecodeThreads), 0, stream, out_ptr,
                    ptr(partial_out), ptr(partial_max), ptr(partial_sum),
                    static_cast<const scalar_t*>(query.data_ptr()),
                    static_cast<const scalar_t*>(key_cache.data_ptr()),
                    static_cast<const scalar_t*>(value_cache.data_ptr()), block_tables.data_ptr<int>(),
                    context_lens.data_ptr<int>(), static_cast<int>(key_cache.size(1)),
                    static_cast<int>(key_cache.size(2)), static_cast<int>(block_tables.size(1)),
                    static_cast<int>(key_cache.size(0)), plan.num_partitions, plan.partition_tokens,
                    query.stride(0), query.stride(1), static_cast<float>(scale));
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
