// The sampler's counter-based Gumbel noise of (row key, token id), for the CPU and CUDA kernels alike: the
// same bits as gumbel_noise_at in xverse_engine/ops/sampling.py, in uint32 arithmetic, and the same fp32
// roundings (u is exact; each log is one library call, accurate to an ulp, never a fast-math intrinsic).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(XVERSE_EMULATE)
#define XVERSE_HOST_DEVICE __host__ __device__
#else
#define XVERSE_HOST_DEVICE
#endif

namespace xverse::sampling {

// The murmur3 finaliser.
XVERSE_HOST_DEVICE inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// Gumbel(0, 1) noise of a token in the row whose key is `key` (row_keys in ops/sampling.py: 32 bits, held in
// int64; only the low 32 bits count, as in the twin's masks).
XVERSE_HOST_DEVICE inline float gumbel_noise(int64_t key, int64_t token_id) {
  const uint32_t bits = fmix32(static_cast<uint32_t>(key) ^ (static_cast<uint32_t>(token_id) * 0x27D4EB2Fu));
  const float uniform = (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);  // in (0, 1), exact
  return -logf(-logf(uniform));
}

}  // namespace xverse::sampling
