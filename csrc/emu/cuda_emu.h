// The CUDA device environment for kernels compiled by the host compiler (the CPU SIMT emulator).
// Force-included (-include emu/cuda_emu.h) into every emulated translation unit, before anything else,
// together with -DXVERSE_EMULATE. Kernels are unchanged; only these definitions differ from nvcc's.
#pragma once

#ifndef XVERSE_EMULATE
#error "emu/cuda_emu.h is the CPU emulator's CUDA environment: compile with -DXVERSE_EMULATE"
#endif

// Static __shared__ arrays become statics (only one block is ever live). The build copies each source with
// XVERSE_EMU_REGISTER_SHARED(name) appended to every `__shared__` declaration (on the same line,
// xverse_engine/ops/emulated_build.py), which registers the array so that the emulator fills it with 0xFF
// at every block start. Dynamic shared memory is XVERSE_DYNAMIC_SHARED(T, name) (csrc/common/launch.cuh);
// an `extern __shared__ T x[];` fails to compile here with "conflicting specifiers": use that macro instead.
#define __shared__ __attribute__((aligned(16))) static
#define XVERSE_EMU_REGISTER_SHARED(name)                        \
  [[maybe_unused]] static const bool xverse_emu_registered_##name = \
      ::xverse::emu::register_shared(&(name), sizeof(name))
#define __launch_bounds__(...)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <type_traits>

#include <cuda_bf16.h>  // host versions of the bf16 / fp16 types and conversions, which round as on the device
#include <cuda_fp16.h>
#include <driver_types.h>  // cudaStream_t
#include <vector_functions.h>
#include <vector_types.h>

#include "emu/runtime.h"

using std::isinf;
using std::isnan;

// ---- barriers and warp collectives -------------------------------------------------------------------
inline void __syncthreads(const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::block_barrier(site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::warp_barrier(mask, site);
}

namespace xverse::emu {
// Every lane of `mask` deposits v; returns the value of lane src (its own value when src < 0).
template <typename T>
T shuffle(unsigned mask, T v, int src, const char* what, const Site& site) {
  static_assert(sizeof(T) <= kExchangeBytes && std::is_trivially_copyable_v<T>, "shuffle of a large type");
  const unsigned char* slots = warp_exchange(mask, &v, sizeof(T), what, site);
  if (src < 0) return v;
  if (!(mask & (1u << src))) fail(what, site, "reads a lane that is not in the member mask (undefined on the GPU)");
  T out;
  std::memcpy(&out, slots + src * kExchangeBytes, sizeof(T));
  return out;
}
inline void check_width(int width, const char* what, const Site& site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail(what, site, "width must be a power of 2 in [1, 32]");
}
}  // namespace xverse::emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
              const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::check_width(width, "__shfl_sync", site);
  const int lane = xverse::emu::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return xverse::emu::shuffle(mask, v, src, "__shfl_sync", site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::check_width(width, "__shfl_xor_sync", site);
  const int lane = xverse::emu::lane_id();
  const int src = lane ^ lane_mask;
  const bool outside = (src & ~(width - 1)) != (lane & ~(width - 1));  // beyond this lane's segment: own value
  return xverse::emu::shuffle(mask, v, outside ? -1 : src, "__shfl_xor_sync", site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::check_width(width, "__shfl_down_sync", site);
  const int lane = xverse::emu::lane_id();
  const bool outside = (lane & (width - 1)) + static_cast<int>(delta) >= width;
  return xverse::emu::shuffle(mask, v, outside ? -1 : lane + static_cast<int>(delta), "__shfl_down_sync", site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const xverse::emu::Site& site = xverse::emu::Site::current()) {
  xverse::emu::check_width(width, "__shfl_up_sync", site);
  const int lane = xverse::emu::lane_id();
  const bool outside = (lane & (width - 1)) < static_cast<int>(delta);
  return xverse::emu::shuffle(mask, v, outside ? -1 : lane - static_cast<int>(delta), "__shfl_up_sync", site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const xverse::emu::Site& site = xverse::emu::Site::current()) {
  const int p = predicate != 0;
  const unsigned char* slots = xverse::emu::warp_exchange(mask, &p, sizeof(p), "__ballot_sync", site);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, slots + l * xverse::emu::kExchangeBytes, sizeof(v));
    if ((mask >> l) & 1u && v) bits |= 1u << l;
  }
  return bits;
}
inline int __any_sync(unsigned mask, int predicate, const xverse::emu::Site& site = xverse::emu::Site::current()) {
  return __ballot_sync(mask, predicate, site) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const xverse::emu::Site& site = xverse::emu::Site::current()) {
  return __ballot_sync(mask, predicate, site) == mask;
}

// ---- atomics (shared or global memory) ---------------------------------------------------------------
template <typename T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T> T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T> T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T> T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <typename T> T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <typename T> T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}
template <typename T> T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {}
  return old;
}
template <typename T> T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {}
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}

// ---- cache-hinted loads / stores are plain accesses ----------------------------------------------------
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldca(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> T __ldlu(const T* p) { return *p; }
template <typename T> void __stcg(T* p, T v) { *p = v; }
template <typename T> void __stcs(T* p, T v) { *p = v; }
template <typename T> void __stwt(T* p, T v) { *p = v; }

// ---- integer / float intrinsics (IEEE round-to-nearest; the build disables FMA contraction) ------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
